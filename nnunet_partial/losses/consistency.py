"""Consistency losses between a student's and a teacher's softmax outputs (METHODS §3).

Shapes: ``student_logits`` and ``teacher_logits`` (B, C, *spatial) float (logits, not
probabilities) of the cases that count — the caller selects them (Mean Teacher: the unlabelled
cases, or all), so that the teacher only runs on those. The teacher side is a target: it is
detached, no gradient reaches the teacher. Both are computed in float32 (CUDA autocast hands
over float16 logits).

- ``softmax_mse``: ``mean over counted cases, channels and voxels of (softmax(s) - softmax(t))²``
  — the UA-MT / SSL4MIS convention (``torch.mean`` of the element-wise squared difference).
- ``softmax_kl``: ``KL(p_t || p_s) = Σ_c p_t (log p_t − log p_s)`` per voxel, mean over counted
  cases and voxels. A zero teacher probability contributes 0 (``xlogy``). The UA-MT code
  multiplies this by 0.2; we do not — scale ``consistency_weight`` instead.

An empty batch (B = 0: no case counts) gives 0 with the graph attached.
"""
from __future__ import annotations

import torch
from torch import nn


def _as_float(student_logits: torch.Tensor, teacher_logits: torch.Tensor):
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher outputs differ in shape: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}")
    return student_logits.float(), teacher_logits.detach().float()


def softmax_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Scalar: mean squared difference of the softmax probabilities (see module docstring)."""
    s, t = _as_float(student_logits, teacher_logits)
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    return ((torch.softmax(s, 1) - torch.softmax(t, 1)) ** 2).mean()


def softmax_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Scalar: per-voxel ``KL(teacher || student)`` summed over channels, averaged over cases and voxels."""
    s, t = _as_float(student_logits, teacher_logits)
    if s.shape[0] == 0:
        return student_logits.sum() * 0.0
    p_t = torch.softmax(t, 1)
    kl = torch.xlogy(p_t, p_t) - p_t * torch.log_softmax(s, 1)
    return kl.sum(1).mean()


CONSISTENCY_LOSSES = {"mse": softmax_mse, "kl": softmax_kl}


class ConsistencyLoss(nn.Module):
    """``kind`` = ``"mse"`` (default of the reference code) or ``"kl"``; forward as the functions above."""

    def __init__(self, kind: str = "mse"):
        super().__init__()
        if kind not in CONSISTENCY_LOSSES:
            raise ValueError(f"unknown consistency loss {kind!r}; choose one of {sorted(CONSISTENCY_LOSSES)}")
        self.kind = kind
        self.fn = CONSISTENCY_LOSSES[kind]

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return self.fn(student_logits, teacher_logits)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"
