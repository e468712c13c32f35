"""Multi-label deep supervision (nnunet_partial/losses/mlds.py, nnunet_partial/trainers/mlds.py):
max-pooled targets, BCE masking, pseudo-label targets, the trainers' real nnU-Net pipelines and
gradients, and the stock nnUNetv2_train / predict CLIs."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_helpers import load_trainer, predict_one_test_case, resume_after_epoch_0, run

from nnunet_partial.losses.marginal import MarginalDCandCELoss
from nnunet_partial.losses.mlds import (MultiLabelDeepSupervisionLoss, bce_trust_mask, masked_bce_with_logits,
                                        max_pooled_ds_targets, pseudo_head_loss, pseudo_label_targets)
from nnunet_partial.trainers import get_trainer
from nnunet_partial.trainers.common import unwrap
from nnunet_partial.trainers.mlds import (MaxPooledOneHotDSTransform, PseudoHeadNetwork, nnUNetTrainerMLDS,
                                          nnUNetTrainerMLDSMeanTaught, nnUNetTrainerMLDSMeanTaughtNoPseudo,
                                          nnUNetTrainerMLDSSelfTaught)

SCALES_2D = [[1.0, 1.0], [0.5, 0.5], [0.25, 0.25], [0.125, 0.125]]
SCALES_3D = [[1.0, 1.0, 1.0], [1.0, 0.5, 0.5], [0.5, 0.25, 0.25]]


# ---------------------------------------------------------------------- targets
@pytest.mark.parametrize("shape, scales, voxel", [((32, 32), SCALES_2D, (16, 24)),
                                                  ((8, 16, 16), SCALES_3D, (4, 8, 12))])
def test_one_voxel_structure_survives_max_pooling_but_not_nnunets_nearest(shape, scales, voxel):
    seg = torch.zeros((1, *shape), dtype=torch.int16)
    seg[(0, *[slice(0, s // 2) for s in shape])] = 1  # a large organ
    seg[(0, *voxel)] = 3                             # a one-voxel structure
    ours = max_pooled_ds_targets(seg, 4, scales)
    stock = DownsampleSegForDSTransform(scales)(segmentation=seg)["segmentation"]
    assert torch.equal(ours[0], seg)  # full resolution: nnU-Net's label map, unchanged
    for target, nearest, scale in zip(ours[1:], stock[1:], scales[1:]):
        kernel = [int(round(1 / s)) for s in scale]
        assert target.dtype == torch.uint8 and target.shape == (4, *[n // k for n, k in zip(shape, kernel)])
        expected = tuple(v // k for v, k in zip(voxel, kernel))
        assert torch.nonzero(target[3]).tolist() == [list(expected)]       # survives, at its patch
        assert target[1].sum() == np.prod([n // 2 // k for n, k in zip(shape, kernel)])  # organ: same extent
        assert target[0].sum() == target[0].numel() - target[1].sum()  # background: wherever the organ is not
        assert not (nearest == 3).any()  # nnU-Net's nearest interpolation drops it
    # brute force: a low-resolution voxel is positive for class c iff c occurs in its patch
    kernel = [int(round(1 / s)) for s in scales[-1]]
    blocks = F.one_hot(seg[0].long(), 4).movedim(-1, 0).float()
    pooled = (F.max_pool2d if len(shape) == 2 else F.max_pool3d)(blocks[None], kernel, kernel)[0]
    assert torch.equal(ours[-1], pooled.to(torch.uint8))


def test_transform_batched_and_in_nnunet_pipeline():
    seg = torch.randint(0, 3, (2, 1, 16, 16), dtype=torch.int16)
    batched = max_pooled_ds_targets(seg, 3, SCALES_2D[:3])
    single = [max_pooled_ds_targets(s, 3, SCALES_2D[:3]) for s in seg]
    for level in range(3):
        assert torch.equal(batched[level], torch.stack([s[level] for s in single]))
    out = MaxPooledOneHotDSTransform(SCALES_2D[:3], 3)(image=torch.zeros(1, 16, 16), segmentation=seg[0])
    assert all(torch.equal(a, b) for a, b in zip(out["segmentation"], single[0]))


# ---------------------------------------------------------------------- masking
def test_bce_mask_by_annotated_labels_and_background_rule():
    # 3 cases x 3 classes, 2 low-res voxels: voxel 0 = background + organ 1, voxel 1 = organ 1 only
    target = torch.tensor([[1, 0], [1, 1], [0, 0]], dtype=torch.uint8)[None].repeat(3, 1, 1)
    annotated = torch.tensor([[True, True, True],     # fully annotated
                              [True, True, False],    # organ 2 not annotated
                              [False, False, False]])  # unlabelled
    trusted = bce_trust_mask(target, annotated)
    assert trusted[0].all()
    # partial case: organ 1 trusted, organ 2 masked; background trusted only where the patch holds no
    # stored background (an unannotated organ could hide in a stored 0)
    assert trusted[1, 1].all() and not trusted[1, 2].any() and trusted[1, 0].tolist() == [False, True]
    assert not trusted[2].any()

    logits = torch.randn(3, 3, 2, requires_grad=True)
    loss = masked_bce_with_logits(logits, target, trusted)
    loss.backward()
    assert torch.equal(logits.grad != 0, trusted)  # masked entries get no gradient, trusted ones do
    expected = F.binary_cross_entropy_with_logits(logits[trusted], target[trusted].float())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    none = masked_bce_with_logits(logits, target, torch.zeros_like(trusted))
    assert none.item() == 0 and none.requires_grad


def test_multilabel_ds_loss_full_res_is_nnunets_and_low_res_is_bce():
    torch.manual_seed(0)
    seg = torch.randint(0, 3, (2, 1, 16, 16))
    targets = max_pooled_ds_targets(seg, 3, SCALES_2D[:3])
    outputs = [torch.randn(2, 3, *t.shape[2:]) for t in targets]
    weights = (4 / 7, 2 / 7, 1 / 7)
    stock = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                           weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    expected = weights[0] * stock(outputs[0], seg) + sum(
        w * F.binary_cross_entropy_with_logits(o, t.float()) for w, o, t in zip(weights[1:], outputs[1:], targets[1:]))
    assert MultiLabelDeepSupervisionLoss(stock, weights, marginal=False)(outputs, targets).item() == \
        pytest.approx(expected.item(), rel=1e-5)
    # marginal on partial data: the unannotated organ's channel never matters at low resolution
    annotated = torch.tensor([[True, True, False], [True, True, True]])
    loss = MultiLabelDeepSupervisionLoss(MarginalDCandCELoss(), weights, marginal=True)
    outputs = [o.requires_grad_() for o in outputs]
    loss(outputs, [torch.where(seg == 2, 0, seg) if i == 0 else t for i, t in enumerate(targets)], annotated).backward()
    for o in outputs[1:]:
        assert (o.grad[0, 2] == 0).all() and (o.grad[1, 2] != 0).any()


# ---------------------------------------------------------------------- pseudo labels
def test_pseudo_label_targets_complete_manual_labels():
    # 1D "images" of 4 voxels, classes bg / organ 1 / organ 2
    probs = torch.tensor([[0.1, 0.1, 0.8], [0.2, 0.7, 0.1], [0.6, 0.2, 0.2], [0.4, 0.3, 0.3]]).T[None].repeat(3, 1, 1)
    label_map = torch.tensor([[[1, 0, 0, 0]], [[0, 0, 0, 0]], [[1, 2, 0, 0]]])
    annotated = torch.tensor([[True, True, False], [False, False, False], [True, True, True]])
    t = pseudo_label_targets(probs, label_map, annotated, threshold=0.5)
    # partial case: stored organ 1 stays organ 1; organ 1 is 0 on stored background (annotated); organ 2
    # and background come from the pseudo labels there
    assert t[0].T.tolist() == [[0, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]]
    # unlabelled: pure thresholded pseudo labels (an uncertain voxel is negative everywhere)
    assert t[1].T.tolist() == [[0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 0]]
    # fully annotated: the manual one-hot map, whatever the pseudo labels say
    assert t[2].T.tolist() == [[0, 1, 0], [0, 0, 1], [1, 0, 0], [1, 0, 0]]


def test_image_level_labels_restrict_pseudo_labels_only():
    probs = torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.1, 0.8]]).T[None].repeat(2, 1, 1)  # voxel 0: organ 1, 1: organ 2
    label_map = torch.tensor([[[0, 0]], [[2, 0]]])
    annotated = torch.tensor([[False, False, False], [True, False, True]])
    possible = torch.tensor([[True, False, True], [True, True, False]])  # case 0: only organ 2; case 1: only organ 1
    t = pseudo_label_targets(probs, label_map, annotated, 0.5, possible)
    assert t[0].T.tolist() == [[0, 0, 0], [0, 0, 1]]  # organ 1 not named: absent, its pseudo-positive dropped
    assert t[1].T.tolist() == [[0, 0, 1], [0, 0, 0]]  # a manual label is never changed; organ 2 pseudo dropped
    assert torch.equal(pseudo_label_targets(probs, label_map, annotated, 0.5, torch.ones_like(possible)),
                       pseudo_label_targets(probs, label_map, annotated, 0.5))


def test_image_labels_metadata_is_validated():
    from nnunet_partial.annotations import PartialAnnotations, PartialLabelError
    dj = {"labels": {"background": 0, "liver": 1, "spleen": 2},
          "annotated_labels": {"a": ["liver"], "b": []}, "image_labels": {"b": ["spleen"]}}
    ann = PartialAnnotations.from_dataset_json(dj)
    assert ann.image_labels == {"b": frozenset({2})}
    assert ann.possible_labels().annotated == {"a": frozenset({1, 2}), "b": frozenset({2})}
    with pytest.raises(PartialLabelError, match="names case 'c', which is not a training case"):
        PartialAnnotations.from_dataset_json({**dj, "image_labels": {"c": ["liver"]}})
    with pytest.raises(PartialLabelError, match="unknown label 'kidney'"):
        PartialAnnotations.from_dataset_json({**dj, "image_labels": {"b": ["kidney"]}})


def test_pseudo_head_loss_pools_logits_and_target():
    target = torch.zeros(1, 2, 4, 4, dtype=torch.uint8)
    target[0, 1, 0, 1] = 1
    target[0, 0] = 1 - target[0, 1]
    logits = torch.full((1, 2, 4, 4), -5.0)
    logits[0, 1, 1, 0] = 5.0  # right class, off by one voxel inside the same 2x2 patch
    logits[0, 0] = 5.0
    logits[0, 0, 1, 0] = -5.0
    pooled = pseudo_head_loss(logits, target, (2, 2))
    assert pooled.item() < 0.01 < pseudo_head_loss(logits, target, (1, 1)).item()


# ---------------------------------------------------------------------- trainers on real nnU-Net data
SPLIT = {"train": ["liver_001", "liver_002", "spleen_001", "spleen_002", "full_002", "unlabelled_002",
                   "unlabelled_003", "unlabelled_004"], "val": ["full_001", "unlabelled_001"]}


@pytest.fixture(scope="module")
def mlds_dataset(make_dataset):
    """Dataset 610 (2d): liver-only and spleen-only cases x 2, 2 fully labelled, 4 unlabelled; 8x32x32."""
    ds = make_dataset(610, configurations=("2d",), name="SyntheticMLDS",
                      sources={"liver": ("liver",), "spleen": ("spleen",)}, cases_per_source=2, n_full=2,
                      n_unlabelled=4, shape=(8, 32, 32))
    splits_file = os.path.join(ds.preprocessed, "splits_final.json")
    if not os.path.isfile(splits_file):
        with open(splits_file, "w") as f:
            json.dump([SPLIT] * 5, f)
    return ds


def _load(ds, cls):
    return load_trainer(cls, ds.name, "2d", 0)


def test_mlds_pipelines_deliver_max_pooled_targets(mlds_dataset):
    t = _load(mlds_dataset, nnUNetTrainerMLDS)
    assert isinstance(t.loss, MultiLabelDeepSupervisionLoss) and t.loss.marginal
    scales = t._get_deep_supervision_scales()
    dl_train, dl_val = t.get_dataloaders()
    for batch in (next(dl_train), next(dl_val)):
        target = batch["target"]
        assert len(target) == len(scales) and target[0].shape[1] == 1  # full res: nnU-Net's label map
        expected = max_pooled_ds_targets(target[0], 5, scales)
        for got, exp in zip(target[1:], expected[1:]):
            assert got.shape[1] == 5 and torch.equal(got, exp)
        # the loss runs on it, and validation too (partial-aware counts)
        data, annotated = batch["data"], t.batch_annotated_mask(batch["keys"])
        out = t.validation_step(batch)
        assert np.isfinite(out["loss"]) and out["tp_hard"].shape == (4,)
        assert torch.isfinite(t.supervised_loss(t.network(data), target, annotated))


def _grad_norm(params) -> float:
    return sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)


def test_pseudo_head_learns_from_pseudo_labels_clean_heads_only_from_real(mlds_dataset):
    t = _load(mlds_dataset, nnUNetTrainerMLDSSelfTaught)
    net = unwrap(t.network)
    assert isinstance(net, PseudoHeadNetwork)
    dl_train, _ = t.get_dataloaders()
    batch = next(dl_train)
    annotated = t.batch_annotated_mask(batch["keys"])
    assert (~annotated.any(1)).any() and annotated.any(1).any()  # two-stream: both kinds of case
    pseudo_head = list(net.decoder.seg_layers[-1].pseudo.parameters())
    clean_heads = [p for i, layer in enumerate(net.decoder.seg_layers)
                   for p in (layer.clean if i == len(net.decoder.seg_layers) - 1 else layer).parameters()]
    backbone = list(net.encoder.parameters())

    def grads(term, rows):
        t.network.zero_grad(set_to_none=True)
        sub_target = [x[rows] for x in batch["target"]]
        terms = t.mlds_losses(batch["data"][rows], sub_target, annotated[rows], [batch["keys"][i] for i in rows.tolist()])
        terms[term].backward()
        return _grad_norm(pseudo_head), _grad_norm(clean_heads), _grad_norm(backbone), terms

    unlabelled = torch.nonzero(~annotated.any(1))[:, 0]
    ph, ch, bb, terms = grads("pseudo", unlabelled)
    assert ph > 0 and bb > 0 and ch == 0  # pseudo labels train the extra head (and the features)
    assert terms["supervised"].item() == 0  # an unlabelled case gives no real-label loss
    ph, ch, bb, _ = grads("supervised", torch.arange(len(batch["keys"])))
    assert ch > 0 and ph == 0  # real labels train the clean heads only

    # a full train step: both terms, the pseudo head moves, the step counter drives the ramp-up
    before = net.decoder.seg_layers[-1].pseudo.weight.detach().clone()
    t.global_step = t.pseudo_rampup_steps()
    out = t.train_step(batch)
    assert out["mlds_pseudo_weight"] == pytest.approx(t.pseudo_weight) and out["mlds_pseudo_loss"] > 0
    assert not torch.equal(before, net.decoder.seg_layers[-1].pseudo.weight) and t.global_step == 1 + t.pseudo_rampup_steps()

    # inference view: deep supervision off (as nnUNetPredictor builds it) -> the clean head only
    net.eval()
    t.set_deep_supervision_enabled(False)
    with torch.no_grad():
        x = batch["data"][:1]
        assert torch.equal(net(x), net.network(x)[:, :5])


def test_mean_taught_pseudo_labels_from_noisy_ema_teacher(mlds_dataset, tmp_path):
    t = _load(mlds_dataset, nnUNetTrainerMLDSMeanTaught)
    assert list(t.candidate_networks()) == ["teacher", "student"] and isinstance(t.teacher.module, PseudoHeadNetwork)
    dl_train, _ = t.get_dataloaders()
    batch = next(dl_train)
    t.train_step(batch)
    t.train_step(next(dl_train))
    assert t.teacher.num_updates == 2 and t.global_step == 2
    data = batch["data"]
    with torch.no_grad():
        clean = t.network(data)[:-1]
        a = t.pseudo_label_probabilities(data, clean)
        b = t.pseudo_label_probabilities(data, clean)
    assert a.shape == clean[0].shape and not torch.equal(a, b)  # teacher sees freshly noised input
    assert not torch.allclose(a, torch.softmax(clean[0], 1))   # not the student's own head
    # image-level labels reach the trainer's batches as a (B, C) mask on the device
    keys = ["unlabelled_002", "liver_001"]
    assert t.batch_possible_classes(keys) is None
    t.annotations = dataclasses.replace(t.annotations, image_labels={"unlabelled_002": frozenset({3})})
    assert t.batch_possible_classes(keys).tolist() == [[True, False, False, True, False], [True] * 5]
    path = str(tmp_path / "checkpoint.pth")
    t.save_checkpoint(path)
    r = _load(mlds_dataset, nnUNetTrainerMLDSMeanTaught)
    r.load_checkpoint(path)
    assert r.teacher.num_updates == 2 and r.global_step == 2
    sa, sb = unwrap(t.teacher.module).state_dict(), unwrap(r.teacher.module).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_mean_taught_ablation_trains_no_pseudo_head(mlds_dataset):
    """The benchmark ablation: mean-taught's batches and export, the pseudo-label loss computed and logged but
    weighted 0, so the pseudo head gets no gradient while the clean heads do."""
    t = _load(mlds_dataset, nnUNetTrainerMLDSMeanTaughtNoPseudo)
    assert list(t.candidate_networks()) == ["teacher", "student"]
    dl_train, _ = t.get_dataloaders()
    t.global_step = t.pseudo_rampup_steps()
    out = t.train_step(next(dl_train))
    head = unwrap(t.network).decoder.seg_layers[-1]
    assert out["mlds_pseudo_weight"] == 0 and out["mlds_pseudo_loss"] > 0
    assert head.pseudo.weight.grad is not None and not head.pseudo.weight.grad.any()
    assert head.clean.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------- end to end (real CLIs)
@pytest.mark.integration
@pytest.mark.parametrize("base, resume", [("nnUNetTrainerMLDS", False), ("nnUNetTrainerMLDSSelfTaught", False),
                                          ("nnUNetTrainerMLDSMeanTaught", True)])
def test_cli_train_resume_predict(base, resume, mlds_dataset, nnunet_env, tmp_path):
    """Each trainer through the stock CLIs. ``--c`` only for mean-taught (the trainer with the most state:
    student, teacher, step counter; self-taught resumes through the same CandidateExportMixin code), to
    keep the CPU budget of the test suite."""
    env = {**nnunet_env, "nnUNet_def_n_proc": "1"}  # one export worker in the final validation
    name = f"{base}_tiny"
    assert get_trainer(name).__mro__[1] is get_trainer(base)
    ds_id = str(mlds_dataset.dataset_id)
    train = ["nnUNetv2_train", ds_id, "2d", "0", "-tr", name, "-device", "cpu"]
    run(train, env=env)
    fold = os.path.join(nnunet_env["nnUNet_results"], mlds_dataset.name, f"{name}__nnUNetPlans__2d", "fold_0")
    final = os.path.join(fold, "checkpoint_final.pth")
    ckpt = torch.load(final, map_location="cpu", weights_only=False)
    assert len(ckpt["logging"]["train_losses"]) == 2
    if base != "nnUNetTrainerMLDS":
        assert ckpt["nnunet_partial"]["global_step"] == 8  # 2 epochs x 4 steps
        assert len(ckpt["logging"]["mlds_pseudo_loss"]) == 2
        assert ckpt["logging"]["mlds_pseudo_weight"][1] > ckpt["logging"]["mlds_pseudo_weight"][0] > 0
        assert any(".pseudo." in k for k in ckpt["network_weights"])
    else:
        assert not any("pseudo" in k for k in ckpt["network_weights"])  # nnU-Net's network, unchanged
    assert os.path.isfile(os.path.join(fold, "validation", "summary.json"))

    if resume:  # --c from the state an interruption after epoch 0 would leave
        resumed = resume_after_epoch_0(fold, train, env)["nnunet_partial"]
        assert resumed["global_step"] == 12 and resumed["teacher"]["num_updates"] == 12  # +1 epoch of 4 steps

    pred = predict_one_test_case(str(tmp_path), mlds_dataset.dataset_id, "2d", name, (8, 32, 32), env)
    assert pred.shape == (8, 32, 32) and set(np.unique(pred)) <= {0, 1, 2, 3, 4}
