"""CoWAM losses against hand computations of the METHODS §1 formulas."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from nnunet_partial.losses.cowam import (CoWAMHardLoss, RegionSoftLoss, focal_class_weights, label_voxel_counts,
                                         load_or_count_label_voxels, masked_soft_cross_entropy, mean_class_sizes,
                                         weighted_marginal_focal_loss)
from nnunet_partial.losses.marginal import MarginalDiceLoss


def _logits(*prob_columns):
    """(1, C, N) logits whose softmax is exactly the given per-voxel probability columns."""
    return torch.log(torch.tensor(prob_columns, dtype=torch.float64).T).unsqueeze(0)


# ---------------------------------------------------------------------------------- focal loss
def test_focal_hand_computed_with_unannotated_label_merged_into_background():
    # voxel 0: p = (0.5, 0.3, 0.2), stored 0; voxel 1: p = (0.1, 0.6, 0.3), stored 1; label 2 not annotated
    logits = _logits((0.5, 0.3, 0.2), (0.1, 0.6, 0.3))
    target = torch.tensor([[[0, 1]]])
    annotated = torch.tensor([[True, True, False]])
    alpha = torch.tensor([0.5, 2.0, 3.0])
    loss = weighted_marginal_focal_loss(logits, target, annotated, alpha, gamma=2.0)
    # voxel 0's class is "background or label 2": q = 0.5 + 0.2, weighted with alpha_0
    expected = (0.5 * (1 - 0.7) ** 2 * -math.log(0.7) + 2.0 * (1 - 0.6) ** 2 * -math.log(0.6)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_focal_reduces_to_cross_entropy_when_all_annotated_unweighted_gamma0():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 1, 5, 6))
    annotated = torch.ones(2, 4, dtype=torch.bool)
    loss = weighted_marginal_focal_loss(logits, target, annotated, torch.ones(4), gamma=0.0)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, target[:, 0]).item(), rel=1e-5)


def test_focal_unlabelled_case_adds_zero_but_counts_in_the_mean():
    logits = torch.cat([_logits((0.5, 0.3, 0.2)), _logits((0.1, 0.6, 0.3))]).requires_grad_(True)
    target = torch.tensor([[[1]], [[0]]])
    annotated = torch.tensor([[True, True, True], [False, False, False]])   # case 1 unlabelled
    loss = weighted_marginal_focal_loss(logits, target, annotated, torch.tensor([1.0, 1.0, 1.0]), gamma=2.0)
    assert loss.item() == pytest.approx((1 - 0.3) ** 2 * -math.log(0.3) / 2, rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.count_nonzero(logits.grad[1]) == 0


def test_focal_near_zero_probability_is_finite_and_absent_label_weight_is_unused():
    # the true class has probability ~e^-200: large but finite loss, no NaN gradient
    logits = torch.tensor([[[200.0], [0.0], [0.0]]], dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[[1]]])
    annotated = torch.ones(1, 3, dtype=torch.bool)
    w = torch.tensor([1.0, 1.0, 1e6])   # label 2 absent from the patch: its weight must not matter
    loss = weighted_marginal_focal_loss(logits, target, annotated, w, gamma=2.0)
    assert loss.item() == pytest.approx(200.0, rel=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_hard_loss_is_weighted_sum_and_none_means_fully_annotated():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 1, 8, 8))
    alpha = torch.tensor([0.2, 1.5, 3.0])
    full = torch.ones(2, 3, dtype=torch.bool)
    loss = CoWAMHardLoss(alpha, gamma=2.0, weight_focal=1.0, weight_dice=0.1, batch_dice=True)
    expected = (weighted_marginal_focal_loss(logits, target, full, alpha, 2.0)
                + 0.1 * MarginalDiceLoss(batch_dice=True)(logits, target, full))
    assert loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss(logits, target, full).item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------------------------- soft loss
def test_soft_cross_entropy_hand_computed_inside_region_only():
    logits = _logits((0.5, 0.5), (0.8, 0.2))
    teacher = torch.tensor([[[0.9, 0.4], [0.1, 0.6]]], dtype=torch.float64)   # (1, C=2, N=2)
    region = torch.tensor([[True, False]])
    loss = masked_soft_cross_entropy(logits, teacher, region)
    expected = -(0.9 * math.log(0.5) + 0.1 * math.log(0.5)) / 2   # voxel 1 outside T, still in N
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_soft_cross_entropy_empty_region_and_zero_teacher_probabilities():
    logits = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).reshape(1, 3, 1).expand(1, 3, 4)
    empty = masked_soft_cross_entropy(logits, teacher, torch.zeros(1, 1, 4, dtype=torch.bool))
    assert empty.item() == 0.0
    empty.backward()
    assert torch.count_nonzero(logits.grad) == 0
    # a one-hot teacher (zeros elsewhere) over the whole patch is plain cross-entropy
    full = masked_soft_cross_entropy(logits, teacher, torch.ones(1, 4, dtype=torch.bool))
    ce = torch.nn.functional.cross_entropy(logits, torch.zeros(1, 4, dtype=torch.long))
    assert full.item() == pytest.approx(ce.item(), rel=1e-5)


def test_region_soft_loss_uses_stored_background_and_never_trains_the_teacher():
    torch.manual_seed(2)
    student = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[[0, 1, 1, 0, 2, 0]], [[0, 0, 0, 0, 0, 0]]])   # case 2: unlabelled -> T everywhere
    loss = RegionSoftLoss()(student, teacher, target)
    q = torch.softmax(teacher.detach(), 1)
    logp = torch.log_softmax(student.detach(), 1)
    t = (target[:, 0] == 0).double()
    expected = -((q * logp).sum(1) * t).sum() / 12
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert teacher.grad is None
    assert torch.count_nonzero(student.grad[0][:, [1, 2, 4]]) == 0   # annotated foreground: outside T
    assert torch.count_nonzero(student.grad[1]) > 0


# ---------------------------------------------------------------------------------- class weights
def test_label_voxel_counts_counts_minus_one_as_background():
    seg = np.array([[[-1, 0, 1], [2, 2, 0]]])
    assert label_voxel_counts(seg, 3) == [3, 1, 2]


def test_mean_class_sizes_over_annotating_cases_and_weights():
    counts = {"a": [90, 10, 0], "b": [80, 0, 20], "c": [70, 20, 10], "u": [100, 0, 0], "val": [0, 99, 1]}
    annotated = {"a": {1}, "b": {2}, "c": {1, 2}, "u": set(), "val": {1, 2}}
    sizes = mean_class_sizes(counts, ["a", "b", "c", "u"], annotated)   # "val" is not a training case
    # organ 1: cases a, c -> 15; organ 2: cases b, c -> 15; background: mean labelled size 100 - 30
    np.testing.assert_allclose(sizes, [70, 15, 15])
    w = focal_class_weights(sizes)
    np.testing.assert_allclose(w, [100 / 210, 100 / 45, 100 / 45])
    assert (w * sizes).sum() == pytest.approx(sizes.sum())


def test_mean_class_sizes_unannotated_organ_and_empty_organ():
    counts = {"a": [95, 5, 0, 0], "b": [100, 0, 0, 0]}
    annotated = {"a": {1}, "b": {1, 2}}   # organ 2 annotated on b but 0 voxels; organ 3 nowhere
    sizes = mean_class_sizes(counts, ["a", "b"], annotated)
    # organ 3 gets the mean of the known sizes (2.5, 0); organ 2's empty mean is clipped to one voxel
    np.testing.assert_allclose(sizes, [100 - 2.5 - 0 - 1.25, 2.5, 1.0, 1.25])
    # stock dataset: every case annotates everything
    np.testing.assert_allclose(mean_class_sizes(counts, ["a", "b"]), [100 - 2.5, 2.5, 1, 1])


def test_voxel_counts_from_preprocessed_files_are_cached(tmp_path):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    folder = tmp_path / "nnUNetPlans_3d_fullres"
    folder.mkdir()
    segs = {"case_a": np.array([0, 1, 1, 2, -1, 0]), "case_b": np.array([2, 2, 2, 0, 0, 0])}
    for case, seg in segs.items():
        nnUNetDatasetBlosc2.save_case(np.zeros((1, 1, 2, 3), np.float32), seg.reshape(1, 1, 2, 3).astype(np.int16),
                                      {"spacing": [1, 1, 1]}, str(folder / case))
    cache = tmp_path / "counts.json"
    counts = load_or_count_label_voxels(str(folder), 3, str(cache))
    assert counts == {"case_a": [3, 2, 1], "case_b": [3, 0, 3]}
    # the second call reads the cache (a tampered value shows it), and recounts what it misses
    stored = json.loads(cache.read_text())
    stored["counts"]["case_a"] = [6, 0, 0]
    del stored["counts"]["case_b"]
    cache.write_text(json.dumps(stored))
    assert load_or_count_label_voxels(str(folder), 3, str(cache)) == {"case_a": [6, 0, 0], "case_b": [3, 0, 3]}
