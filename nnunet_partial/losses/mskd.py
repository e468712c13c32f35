"""Loss terms of multi-teacher single-student knowledge distillation (MS-KD, METHODS §2).

Notation: ``K`` binary teachers, teacher ``k`` teaches the student's channel ``channels[k]``; the
student has ``C`` output channels (background first). Shapes:

- ``teacher_probs``: (K, B, 2, *S) float — the teachers' softmax outputs ``q^k`` (channels q0, q1)
  on the student's batch; no gradient (targets).
- ``student_logits``: (B, C, *S) float — the student's full-resolution logits.
- ``teacher_features``: (K, B, F, *S_l), ``student_features``: (B, F, *S_l) — encoder outputs after
  ``l`` downsamplings (equal widths ``F``: the trainer refuses other teachers).
- masks: bool, (K, B, *S) for ``M^k`` and (B, *S) for ``M^B``.

Every term is ``1/(B·|R|) Σ_voxels KL(target ‖ prediction)·mask`` (``|R|`` = voxels of one patch, so
each case's patch is averaged as in the paper and the batch is averaged on top): a voxel outside the
mask adds 0 but still counts in ``|R|``; an empty mask gives 0 with the graph attached. ``KL(p ‖ q) =
Σ_c p_c (log p_c − log q_c)``, where a zero target probability contributes 0 (``xlogy``), never NaN.
Everything is computed in float32 (CUDA autocast hands over float16).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def expand_teacher_probabilities(q: torch.Tensor, channel: int, num_classes: int) -> torch.Tensor:
    """``q̂^k``: one teacher's (B, 2, *S) probabilities on the student's (B, C, *S) classes —
    ``q0`` at background (channel 0), ``q1`` at ``channel``, 0 elsewhere."""
    if q.shape[1] != 2:
        raise ValueError(f"a teacher gives 2 channels (background, organ), got {q.shape[1]}")
    if not 0 < channel < num_classes:
        raise ValueError(f"teacher channel {channel} is not a foreground channel of {num_classes} classes")
    out = q.new_zeros((q.shape[0], num_classes) + tuple(q.shape[2:]))
    out[:, 0] = q[:, 0]
    out[:, channel] = q[:, 1]
    return out


def background_consensus_target(teacher_probs: torch.Tensor, channels: Sequence[int], num_classes: int) -> torch.Tensor:
    """``q̂^B = (q̂^1 + … + q̂^K) / K``: (B, C, *S)."""
    total = sum(expand_teacher_probabilities(q, c, num_classes) for q, c in zip(teacher_probs, channels))
    return total / len(channels)


def teacher_masks(teacher_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, M^B)``: ``M[k]`` (K, B, *S) where teacher k predicts its organ (``q1 > q0``, i.e. its argmax;
    a tie is background), ``M^B`` (B, *S) where every teacher predicts background."""
    organ = teacher_probs[:, :, 1] > teacher_probs[:, :, 0]
    return organ, ~organ.any(0)


def masked_kl(target: torch.Tensor, student_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1/(B·|R|) Σ_i KL(target_i ‖ exp(student_log_probs_i))·mask_i`` for (B, C, *S) target and log
    probabilities and a (B, *S) mask; a zero target probability contributes 0."""
    target = target.detach().float()
    student_log_probs = student_log_probs.float()
    kl = (torch.xlogy(target, target) - target * student_log_probs).sum(1)
    return (kl * mask.to(kl.dtype)).mean()


def logit_losses(teacher_probs: torch.Tensor, student_logits: torch.Tensor, channels: Sequence[int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ_k L^k_logit, L^B_logit)``: ``KL(q̂^k ‖ q^S)`` inside ``M^k`` summed over the teachers, and
    ``KL(q̂^B ‖ q^S)`` inside the background consensus ``M^B`` (scalars; weights are the caller's)."""
    if teacher_probs.shape[0] != len(channels):
        raise ValueError(f"{teacher_probs.shape[0]} teachers for {len(channels)} channels")
    num_classes = student_logits.shape[1]
    log_q = torch.log_softmax(student_logits.float(), 1)
    organ, background = teacher_masks(teacher_probs)
    per_teacher = sum(masked_kl(expand_teacher_probabilities(q, c, num_classes), log_q, m)
                      for q, c, m in zip(teacher_probs, channels, organ))
    consensus = masked_kl(background_consensus_target(teacher_probs, channels, num_classes), log_q, background)
    return per_teacher, consensus


def downsample_mask(mask: torch.Tensor, shape: Sequence[int], mode: str = "max") -> torch.Tensor:
    """A (B, *S) bool mask at the (B, *shape) resolution of a feature map. ``"max"``: a feature voxel is
    in the mask when any voxel of its cell is (no organ voxel is lost); ``"nearest"``: the voxel
    nnU-Net's nearest-neighbour interpolation picks."""
    x = mask[:, None].float()
    if mode == "max":
        pool = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}[x.ndim - 2]
        x = pool(x, tuple(shape))
    elif mode == "nearest":
        x = F.interpolate(x, size=tuple(shape), mode="nearest")
    else:
        raise ValueError(f"mask downsampling must be 'max' or 'nearest', got {mode!r}")
    return x[:, 0] > 0.5


def sorted_channel_log_softmax(features: torch.Tensor) -> torch.Tensor:
    """(B, F, *S) features -> log of their softmax over channels, sorted along the channel axis
    (descending). Sorting the log probabilities sorts the probabilities (log is monotonic); the sort
    is differentiable (a gather)."""
    return torch.sort(torch.log_softmax(features.float(), 1), dim=1, descending=True).values


def feature_loss(teacher_features: torch.Tensor, student_features: torch.Tensor, organ_masks: torch.Tensor,
                 mode: str = "max") -> torch.Tensor:
    """``Σ_k L^{k,l}_feature``: ``KL(sort(softmax F^{k,l}) ‖ sort(softmax F^{S,l}))`` inside ``M^k``
    downsampled to the feature resolution, over ``B·|R^l|`` (scalar)."""
    if teacher_features.shape[1:] != student_features.shape:
        raise ValueError(f"teacher features {tuple(teacher_features.shape[1:])} and student features "
                         f"{tuple(student_features.shape)} differ in shape")
    log_s = sorted_channel_log_softmax(student_features)
    total = student_features.new_zeros((), dtype=torch.float32)
    for feats, mask in zip(teacher_features, organ_masks):
        target = sorted_channel_log_softmax(feats.detach()).exp()
        total = total + masked_kl(target, log_s, downsample_mask(mask, student_features.shape[2:], mode))
    return total
