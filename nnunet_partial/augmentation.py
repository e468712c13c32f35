"""Strong intensity augmentation on the device, without host syncs (MultiMix's strong view, METHODS §5).

MultiMix classifies a strongly augmented view of crops that are already on the device, inside the train
step. batchgeneratorsv2's intensity transforms would do it, but they draw their random parameters on the
tensor's device and read them back (``nonzero``, ``tolist``, ``int``): a host sync per transform and case on
CUDA (tests/test_host_sync.py counted 4 per step). Here the random parameters come from NumPy's global
generator on the host (the generator nnU-Net's own augmentation uses) as Python floats, and the images never
leave the device; only Gaussian noise is drawn on the device (``torch.randn_like``).

Each transform takes one case ``(C, *spatial)`` (2D or 3D, any device, floating point), returns a new tensor of
the same shape and dtype, and draws its parameters per channel:

- contrast: ``(x − mean)·m + mean``, ``m`` from (0.5, 1.8) (half the time below 1, as batchgeneratorsv2's
  ``BGContrast``); stands in for autocontrast;
- brightness: ``x + b``, ``b ~ N(0, 0.4)``;
- gamma: the channel rescaled to [0, 1], raised to ``γ`` from (0.5, 2.0) (``BGContrast`` sampling), scaled back,
  then its mean and standard deviation restored;
- noise: ``x + N(0, v)``, ``v ~ U(0.02, 0.15)``;
- blur: a separable Gaussian with ``σ ~ U(0.6, 1.5)`` per axis (edge voxels replicated);
- sharpen: unsharp masking ``x + s·(x − blur_σ=1(x))``, ``s ~ U(0.3, 1.0)``.

Why these: docs/multimix.md (equalise / posterize / solarize destroy quantitative intensities; spatial ones
would break the voxel alignment of the weak and strong views of the same crop).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

StrongTransform = Callable[[torch.Tensor], torch.Tensor]


def bg_contrast(low: float, high: float) -> float:
    """batchgeneratorsv2's ``BGContrast`` sampling: half the time from ``[low, 1)``, else from ``[1, high]``, so
    that weakening and strengthening are equally likely however asymmetric the range."""
    if low < 1 and np.random.uniform() < 0.5:
        return float(np.random.uniform(low, 1))
    return float(np.random.uniform(max(low, 1), high))


def _channels(image: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return torch.stack([fn(image[c]) for c in range(image.shape[0])])


def contrast(image: torch.Tensor, low: float = 0.5, high: float = 1.8) -> torch.Tensor:
    def one(x):
        mean = x.mean()
        return (x - mean) * bg_contrast(low, high) + mean
    return _channels(image, one)


def brightness(image: torch.Tensor, sigma: float = 0.4) -> torch.Tensor:
    return _channels(image, lambda x: x + float(np.random.normal(0.0, sigma)))


def gamma(image: torch.Tensor, low: float = 0.5, high: float = 2.0, eps: float = 1e-7) -> torch.Tensor:
    def one(x):
        mean, std = x.mean(), x.std()
        lowest, highest = torch.aminmax(x)
        span = (highest - lowest).clamp_min(eps)
        y = ((x - lowest) / span).clamp(0, 1) ** bg_contrast(low, high) * span + lowest
        return (y - y.mean()) / y.std().clamp_min(eps) * std + mean
    return _channels(image, one)


def gaussian_noise(image: torch.Tensor, variance: tuple = (0.02, 0.15)) -> torch.Tensor:
    return image + torch.randn_like(image) * math.sqrt(float(np.random.uniform(*variance)))


def gaussian_blur_fixed(image: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of ``(C, *spatial)`` with one σ per spatial axis; kernels built on the device."""
    out = image
    for axis, sigma in enumerate(sigmas, start=1):
        radius = max(1, int(round(3 * sigma)))
        offsets = torch.arange(-radius, radius + 1, device=image.device, dtype=image.dtype)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = (kernel / kernel.sum()).view(1, 1, -1)
        moved = out.movedim(axis, -1)
        lines = moved.reshape(-1, 1, moved.shape[-1])
        lines = F.conv1d(F.pad(lines, (radius, radius), mode="replicate"), kernel)
        out = lines.reshape(moved.shape).movedim(-1, axis)
    return out


def gaussian_blur(image: torch.Tensor, sigma: tuple = (0.6, 1.5)) -> torch.Tensor:
    return gaussian_blur_fixed(image, [float(np.random.uniform(*sigma)) for _ in range(image.ndim - 1)])


def sharpen(image: torch.Tensor, strength: tuple = (0.3, 1.0)) -> torch.Tensor:
    s = float(np.random.uniform(*strength))
    return image + s * (image - gaussian_blur_fixed(image, [1.0] * (image.ndim - 1)))


def default_strong_transforms() -> list[StrongTransform]:
    """MultiMix's strong-view transforms (module docstring), stronger than nnU-Net's own intensity augmentation,
    which the weak view already went through."""
    return [contrast, brightness, gamma, gaussian_noise, gaussian_blur, sharpen]


def strong_view(data: torch.Tensor, transforms: Sequence[StrongTransform], num_ops: tuple = (1, 3)) -> torch.Tensor:
    """(B, C, *spatial) -> a strongly augmented copy of the same crops (same shape, dtype and device): per case a
    random number in ``[num_ops[0], num_ops[1]]`` of distinct random transforms (RandAugment-style); the input
    is not modified."""
    out = []
    for i in range(data.shape[0]):
        image = data[i]
        k = np.random.randint(num_ops[0], num_ops[1] + 1)
        for j in np.random.permutation(len(transforms))[:k]:
            image = transforms[j](image)
        out.append(image)
    return torch.stack(out).to(data.dtype)
