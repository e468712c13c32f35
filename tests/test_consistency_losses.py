"""Consistency losses of Mean Teacher against hand computations of METHODS §3."""
import numpy as np
import pytest
import torch

from nnunet_partial.losses.consistency import ConsistencyLoss, softmax_kl, softmax_mse


def _np_softmax(x, axis=1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 4, 5, generator=g) * 2, torch.randn(2, 3, 4, 5, generator=g) * 2


def test_softmax_mse_matches_hand_computation(logits):
    s, t = logits
    ps, pt = _np_softmax(s.numpy().astype(np.float64)), _np_softmax(t.numpy().astype(np.float64))
    expected = np.mean((ps - pt) ** 2)  # mean over cases, channels and voxels
    assert softmax_mse(s, t).item() == pytest.approx(expected, rel=1e-5)
    assert ConsistencyLoss("mse")(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_softmax_kl_matches_hand_computation(logits):
    s, t = logits
    ps, pt = _np_softmax(s.numpy().astype(np.float64)), _np_softmax(t.numpy().astype(np.float64))
    expected = np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=1))  # sum over channels, mean over voxels
    assert softmax_kl(s, t).item() == pytest.approx(expected, rel=1e-5)
    assert ConsistencyLoss("kl")(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_identical_outputs_give_zero(logits):
    s, _ = logits
    assert softmax_mse(s, s.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert softmax_kl(s, s.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_with_zero_teacher_probabilities_is_finite_and_exact():
    # teacher puts exactly zero probability (float32 underflow) on channel 1: p log p must count as 0
    t = torch.tensor([[[0.0], [-1e4], [0.0]]])          # (1, 3, 1): p_t = (0.5, 0, 0.5)
    s = torch.tensor([[[1.0], [0.0], [-1.0]]])
    assert torch.softmax(t, 1)[0, 1, 0].item() == 0.0
    ps = _np_softmax(s.numpy().astype(np.float64))[0, :, 0]
    expected = 0.5 * (np.log(0.5) - np.log(ps[0])) + 0.5 * (np.log(0.5) - np.log(ps[2]))
    value = softmax_kl(s, t)
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_gradient_reaches_student_only(logits):
    s, t = (x.clone().requires_grad_(True) for x in logits)
    for fn in (softmax_mse, softmax_kl):
        s.grad = t.grad = None
        fn(s, t).backward()
        assert s.grad is not None and s.grad.abs().sum() > 0
        assert t.grad is None  # the teacher output is a target


def test_empty_batch_gives_zero_with_graph():
    s = torch.randn(0, 3, 4, 4, requires_grad=True)
    for kind in ("mse", "kl"):
        value = ConsistencyLoss(kind)(s, torch.randn(0, 3, 4, 4))
        assert value.item() == 0.0
        value.backward()  # must not raise


def test_float16_inputs_are_computed_in_float32(logits):
    s, t = logits
    value = softmax_mse(s.half(), t.half())
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(softmax_mse(s.half().float(), t.half().float()).item(), rel=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown consistency loss"):
        ConsistencyLoss("l1")
    with pytest.raises(ValueError, match="differ in shape"):
        softmax_mse(torch.zeros(1, 3, 4), torch.zeros(1, 2, 4))
