"""MultiMix's strong-view transforms (nnunet_partial/augmentation.py), each against what it must do by hand;
that they make no host sync is checked on the whole MultiMix train step in tests/test_host_sync.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_partial import augmentation as aug


def _smooth(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    pool = torch.nn.functional.avg_pool3d if x.ndim == 4 else torch.nn.functional.avg_pool2d
    return pool(x[None], 3, 1, 1)[0] * 3


@pytest.fixture(autouse=True)
def _seeded():
    np.random.seed(0)
    torch.manual_seed(0)


def test_bg_contrast_draws_half_below_and_half_above_one():
    draws = np.array([aug.bg_contrast(0.5, 2.0) for _ in range(2000)])
    assert ((draws >= 0.5) & (draws <= 2.0)).all()
    assert 0.45 < (draws < 1).mean() < 0.55
    assert all(1 <= aug.bg_contrast(1.2, 2.0) <= 2.0 for _ in range(100))   # no part below 1 to draw from


def test_contrast_scales_each_channel_about_its_mean():
    x = _smooth(2, 6, 10, 10)
    y = aug.contrast(x)
    for c in range(2):
        torch.testing.assert_close(y[c].mean(), x[c].mean(), atol=1e-5, rtol=0)
        m = (y[c] - y[c].mean()) / (x[c] - x[c].mean())
        assert 0.5 <= float(m.median()) <= 1.8 and float((m - m.median()).abs().max()) < 1e-3


def test_brightness_adds_one_constant_per_channel():
    x = _smooth(2, 12, 12)
    shift = aug.brightness(x) - x
    for c in range(2):
        assert float(shift[c].max() - shift[c].min()) < 1e-5 and float(shift[c].abs().max()) > 0


def test_gamma_keeps_mean_std_and_order():
    x = _smooth(1, 6, 10, 10)
    y = aug.gamma(x)
    torch.testing.assert_close(y.mean(), x.mean(), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.std(), x.std(), atol=1e-4, rtol=0)
    order = torch.argsort(x.flatten())
    assert (torch.diff(y.flatten()[order]) >= -1e-5).all() and not torch.allclose(y, x)


def test_gaussian_noise_has_the_drawn_variance():
    x = torch.zeros(1, 40, 40, 40)
    std = float(aug.gaussian_noise(x).std())
    assert 0.02 ** 0.5 * 0.95 < std < 0.15 ** 0.5 * 1.05


def test_blur_is_a_normalised_separable_gaussian():
    x = torch.zeros(1, 9, 21, 21)
    x[0, 4, 10, 10] = 1
    y = aug.gaussian_blur_fixed(x, [1.0, 1.0, 2.0])
    assert float(y.sum()) == pytest.approx(1.0, abs=1e-5)
    line = y[0, 4, 10].numpy()   # along the last axis: exp(-d^2 / (2 * 2^2)), up to the normalisation
    assert line[12] / line[10] == pytest.approx(np.exp(-4 / 8), rel=1e-4)
    assert float(y[0, 4, 12, 10] / y[0, 4, 10, 10]) == pytest.approx(np.exp(-4 / 2), rel=1e-4)
    const = torch.full((2, 7, 9), 3.0)
    torch.testing.assert_close(aug.gaussian_blur(const), const)   # edges replicated: a constant stays
    torch.testing.assert_close(aug.sharpen(const), const)


def test_sharpen_adds_the_detail_the_blur_removes():
    x = _smooth(1, 24, 24)
    s = aug.sharpen(x)
    detail = x - aug.gaussian_blur_fixed(x, [1.0, 1.0])
    ratio = (s - x) / detail
    assert 0.3 <= float(ratio.median()) <= 1.0 and float((ratio - ratio.median()).abs().max()) < 1e-3


@pytest.mark.parametrize("shape", [(3, 1, 8, 24, 24), (4, 2, 32, 32)])
def test_strong_view_same_crops_untouched_input_and_reproducible(shape):
    data = _smooth(*shape[1:])[None].repeat(shape[0], *[1] * (len(shape) - 1)) + torch.arange(shape[0]).view(
        -1, *[1] * (len(shape) - 1)).float()
    before = data.clone()
    np.random.seed(1)
    torch.manual_seed(1)
    strong = aug.strong_view(data, aug.default_strong_transforms())
    assert torch.equal(data, before) and strong.shape == data.shape and strong.dtype == data.dtype
    assert not torch.equal(strong, data)
    np.random.seed(1)
    torch.manual_seed(1)
    assert torch.equal(aug.strong_view(data, aug.default_strong_transforms()), strong)
    assert torch.equal(aug.strong_view(data, [], (0, 0)), data)
