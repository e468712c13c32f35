"""Marginal CE / Dice against hand computations of METHODS §0 and against nnU-Net's own loss."""
import math

import numpy as np
import pytest
import torch

from nnunet_partial.losses.marginal import (MarginalDCandCELoss, MarginalDiceLoss, marginal_cross_entropy,
                                            marginal_log_probs)


def _softmax(x):
    e = np.exp(x - np.max(x, axis=0, keepdims=True))
    return e / e.sum(0, keepdims=True)


# two cases, 3 classes (bg, liver=1, kidney=2), 4 voxels each (1D spatial)
LOGITS = np.array([
    [[2.0, 0.1, -1.0, 0.5], [0.0, 1.5, 0.3, -0.2], [-1.0, 0.2, 2.5, 0.1]],
    [[0.3, -0.5, 1.0, 0.0], [1.2, 0.4, -0.3, 2.0], [0.1, 1.1, 0.0, -1.0]],
])
TARGET = np.array([[0, 1, 0, 0], [0, 0, 2, 2]])


def _t(a, **kw):
    return torch.tensor(a, dtype=torch.float64, **kw)


def _hand_ce(annotated_sets):
    total = []
    for i in range(2):
        p = _softmax(LOGITS[i])
        merged = [0] + [k for k in (1, 2) if k not in annotated_sets[i]]
        for v in range(4):
            t = TARGET[i, v]
            q = p[merged, v].sum() if t == 0 else p[t, v]
            total.append(-math.log(q))
    return float(np.mean(total))


def _mask(annotated_sets):
    m = torch.zeros(2, 3, dtype=torch.bool)
    for i, s in enumerate(annotated_sets):
        m[i, list(s)] = True
        m[i, 0] = len(s) > 0
    return m


# annotated sets consistent with TARGET (case 0 holds liver, case 1 kidney): one label, all labels, mixed
VALID_SETS = [({1}, {2}), ({1, 2}, {1, 2}), ({1}, {1, 2}), ({1, 2}, {2})]


@pytest.mark.parametrize("sets", VALID_SETS)
def test_marginal_ce_matches_hand_computation(sets):
    logits = _t(LOGITS)
    target = torch.tensor(TARGET)
    got = marginal_cross_entropy(logits, target, _mask(sets)).item()
    assert got == pytest.approx(_hand_ce(sets), rel=1e-6)


def test_unlabelled_case_gives_zero_loss_and_zero_gradient():
    logits = _t(LOGITS, requires_grad=True)
    target = torch.zeros(2, 4, dtype=torch.long)
    loss = MarginalDCandCELoss()(logits, target, _mask((set(), set())))
    loss.backward()
    assert abs(loss.item()) < 1e-12
    assert logits.grad.abs().max().item() < 1e-12


def test_marginal_log_probs_merge_unannotated_mass_into_background():
    logq = marginal_log_probs(_t(LOGITS), _mask(({1}, {1, 2})))
    p = _softmax(LOGITS[0])
    np.testing.assert_allclose(logq[0, 0].exp().numpy(), p[0] + p[2], rtol=1e-9)
    np.testing.assert_allclose(logq[0, 1].exp().numpy(), p[1], rtol=1e-9)
    assert torch.isinf(logq[0, 2]).all()          # kidney not annotated on case 0: no own class
    np.testing.assert_allclose(logq[1].exp().sum(0).numpy(), 1.0, rtol=1e-9)


def _hand_dice(sets, batch_dice, smooth=1e-5):
    probs = np.stack([_softmax(LOGITS[i]) for i in range(2)])
    terms = {}
    for i in range(2):
        for k in (1, 2):
            if k not in sets[i]:
                continue
            y = (TARGET[i] == k).astype(float)
            terms.setdefault(k if batch_dice else (i, k), []).append(
                ((probs[i, k] * y).sum(), probs[i, k].sum(), y.sum()))
    dcs = []
    for parts in terms.values():
        inter, sp, sg = (sum(p[j] for p in parts) for j in range(3))
        dcs.append((2 * inter + smooth) / (sg + sp + smooth))
    return -float(np.mean(dcs)) if dcs else 0.0


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("sets", VALID_SETS)
def test_marginal_dice_matches_hand_computation(sets, batch_dice):
    got = MarginalDiceLoss(batch_dice=batch_dice)(_t(LOGITS), torch.tensor(TARGET)[:, None], _mask(sets)).item()
    assert got == pytest.approx(_hand_dice(sets, batch_dice), rel=1e-6, abs=1e-12)


def test_label_absent_from_patch_but_annotated_still_penalises_false_positives():
    # kidney annotated on case 0 but absent from its patch: predicting kidney there must cost Dice
    logits = torch.zeros(1, 3, 4, dtype=torch.float64)
    logits[0, 2] = 5.0  # confident kidney everywhere
    target = torch.zeros(1, 4, dtype=torch.long)
    annotated = torch.tensor([[True, False, True]])
    loss = MarginalDiceLoss()(logits, target, annotated)
    assert loss.item() > -0.01  # dice ~ smooth / (sum_pred + smooth) ~ 0
    # ...whereas with kidney unannotated the same prediction is free (no Dice term at all)
    assert MarginalDiceLoss()(logits, target, torch.tensor([[True, False, False]])).item() == 0.0
    assert marginal_cross_entropy(logits, target, torch.tensor([[True, False, False]])).item() < 1e-12


def test_zero_probability_does_not_produce_nan():
    logits = torch.tensor([[[-1e4, 0.0], [1e4, 0.0], [-1e4, 0.0]]], dtype=torch.float32, requires_grad=True)
    target = torch.tensor([[1, 0]])
    loss = MarginalDCandCELoss()(logits, target, torch.tensor([[True, True, False]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("batch_dice", [False, True])
def test_equals_nnunet_dc_and_ce_when_everything_is_annotated(batch_dice):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 6, 7, 8)
    target = torch.randint(0, 5, (2, 1, 6, 7, 8))
    stock = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                           weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    ours = MarginalDCandCELoss(batch_dice=batch_dice)
    full = torch.ones(2, 5, dtype=torch.bool)
    assert ours(logits, target, full).item() == pytest.approx(stock(logits, target).item(), rel=1e-6)
