"""Machinery shared by every nnunet-partial trainer: unwrapping compiled/DDP networks, the EMA
twin, the sigmoid ramp-up, extra log keys, and the optimiser step of nnU-Net's ``train_step``.

One concept, one place: CoWAM, Mean Teacher and later trainers import these instead of
re-implementing them.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2.utilities.helpers import dummy_context


def unwrap(network: nn.Module) -> nn.Module:
    """The plain module behind DDP (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    if isinstance(network, DDP):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


def sigmoid_rampup(step: float, length: float) -> float:
    """``exp(-5 (1 - t/T)^2)`` for t in [0, T], 1 afterwards (Laine & Aila; Mean Teacher code)."""
    if length <= 0:
        return 1.0
    t = min(max(float(step), 0.0), float(length)) / float(length)
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def schedule_capped_decay(decay: float, total_steps: int, horizon_fraction: Optional[float]) -> float:
    """``decay``, lowered where needed so that the EMA's averaging horizon ``1/(1 − a)`` is at most
    ``horizon_fraction`` of all training steps (``None``/0: ``decay`` unchanged).

    An EMA with a horizon longer than the run is mostly an average of early, untrained weights.
    E.g. 0.999 (horizon 1000) stays 0.999 for runs of ≥ 20 000 steps at fraction 0.05, and becomes
    0.96 on a 500-step run; runs of at most 1/fraction steps get 0 (the twin copies the network).
    """
    if not horizon_fraction:
        return float(decay)
    return float(min(decay, max(0.0, 1.0 - 1.0 / (horizon_fraction * total_steps))))


class WeightAveragingSchedule:
    """The EMA-twin settings shared by the weight-averaging trainers (CoWAM, Partial + EMA); a mixin.

    ``ema_decay`` 0.999 (CoWAM paper); ``ema_warmup``: Mean Teacher's ``min(1 - 1/(t+1), decay)`` so that
    early twins are not mostly their random initialisation; ``ema_horizon_fraction``: the decay is
    capped so that the horizon ``1/(1-a)`` is at most this fraction of all iterations (0.999 from
    20 000 iterations on, nnU-Net's 1000 x 250 included; 0.96 on a 500-iteration run). None = no cap.
    """
    ema_decay: float = 0.999
    ema_warmup: bool = True
    ema_horizon_fraction: Optional[float] = 0.05

    def effective_ema_decay(self) -> float:
        return schedule_capped_decay(self.ema_decay, self.total_iterations(), self.ema_horizon_fraction)


class EMATwin:
    """A frozen exponential moving average of a network (timm's ``ModelEmaV3`` does the maths).

    ``E_t = a E_{t-1} + (1 - a) θ_t`` after every optimiser step. With ``warmup=True`` the decay
    follows the Mean Teacher rule ``a_t = min(1 - 1/(t+1), a)`` (t = number of updates before
    this one), which is ModelEmaV3's warm-up with gamma = power = 1.

    The twin holds a deep copy of the *unwrapped* network: never compiled, never DDP-wrapped,
    never given gradients. Every DDP rank updates it from identical, all-reduced student
    weights, so the twins stay identical across ranks.
    """

    def __init__(self, network: nn.Module, decay: float, warmup: bool = False):
        from timm.utils.model_ema import ModelEmaV3
        # exclude_buffers: timm's default path lerps every state_dict entry, and nnU-Net's networks list
        # one tensor several times there (decoder.encoder is the encoder), so shared weights would decay
        # with a^k. The parameters() path updates each tensor once and copies buffers.
        self.ema = ModelEmaV3(unwrap(network), decay=decay, use_warmup=warmup, warmup_gamma=1.0,
                              warmup_power=1.0, exclude_buffers=True)
        for p in self.ema.module.parameters():
            p.requires_grad_(False)
        self.warmup = warmup
        self.num_updates = 0

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    def decay_for_next_update(self) -> float:
        return self.ema.get_decay(self.num_updates + 1) if self.warmup else self.ema.decay

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        step = self.num_updates + 1 if self.warmup else None
        self.ema.update(unwrap(network), step=step)
        self.num_updates += 1

    @torch.no_grad()
    def __call__(self, x: torch.Tensor):
        return self.ema.module(x)

    def state_dict(self) -> dict:
        return {"weights": self.ema.module.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.ema.module.load_state_dict(state["weights"])
        self.num_updates = int(state["num_updates"])


def autocast_context(device: torch.device):
    """nnU-Net's rule: autocast on CUDA only (on CPU it is slow, on MPS it complains)."""
    return torch.autocast(device.type, enabled=True) if device.type == "cuda" else dummy_context()


def batch_to_device(batch: dict, device: torch.device):
    data = batch["data"].to(device, non_blocking=True)
    target = batch["target"]
    if isinstance(target, list):
        target = [t.to(device, non_blocking=True) for t in target]
    else:
        target = target.to(device, non_blocking=True)
    return data, target


def host_values(values: Sequence[torch.Tensor]) -> np.ndarray:
    """(n,) float32 array of ``n`` scalar tensors with one device→host copy: the one host sync per step
    that nnU-Net's own ``train_step`` makes (``loss.cpu().numpy()``), shared by every value a step logs.
    ``host_values(...)[i, ...]`` is the 0-d array nnU-Net's ``loss.detach().cpu().numpy()`` gives."""
    return torch.stack([v.detach().float() for v in values]).cpu().numpy()


def scaled_backward(loss: torch.Tensor, grad_scaler: Optional[torch.amp.GradScaler]) -> None:
    """``loss.backward()``, scaled when AMP's grad scaler is in use (CUDA)."""
    (grad_scaler.scale(loss) if grad_scaler is not None else loss).backward()


def clip_and_step(steps: Sequence[Tuple[nn.Module, torch.optim.Optimizer]],
                  grad_scaler: Optional[torch.amp.GradScaler], max_grad_norm: float = 12.0) -> None:
    """nnU-Net's optimiser step for one or several (network, optimiser) pairs whose gradients are in.

    Per pair unscale, clip the grad norm to 12 and step; one scaler update at the end (PyTorch's AMP
    recipe for several losses and optimisers: every loss's scaled backward comes before any step).
    """
    for network, optimizer in steps:
        if grad_scaler is not None:
            grad_scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(network.parameters(), max_grad_norm)
        if grad_scaler is not None:
            grad_scaler.step(optimizer)
        else:
            optimizer.step()
    if grad_scaler is not None:
        grad_scaler.update()


def backward_and_step(loss: torch.Tensor, steps: Sequence[Tuple[nn.Module, torch.optim.Optimizer]],
                      grad_scaler: Optional[torch.amp.GradScaler], max_grad_norm: float = 12.0) -> None:
    """One (scaled) backward of ``loss``, then :func:`clip_and_step`. Every loss term must be part of
    ``loss``: anything added after ``optimizer.step()`` would train nothing."""
    scaled_backward(loss, grad_scaler)
    clip_and_step(steps, grad_scaler, max_grad_norm)


def register_log_keys(logger, keys: Iterable[str]) -> None:
    """Let nnU-Net's LocalLogger accept extra per-epoch values (it asserts on unknown keys)."""
    store = logger.local_logger.my_fantastic_logging
    for k in keys:
        store.setdefault(k, [])


def plot_logged_groups(logger, groups: dict, path: str, height_per_plot: float = 3.2) -> None:
    """One panel per group (title -> logger keys), every key's per-epoch values as a line; saved as ``path``.
    The extra progress plots of our trainers, beside nnU-Net's progress.png."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(groups), 1, figsize=(10, height_per_plot * len(groups)), squeeze=False)
    for ax, (title, keys) in zip(axes[:, 0], groups.items()):
        for k in keys:
            values = logger.get_value(k, step=None)
            ax.plot(range(len(values)), values, label=k)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
