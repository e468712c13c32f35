"""Marginal cross-entropy and marginal Dice (METHODS §0; Shi et al., MedIA 2021).

For case ``i`` with annotated labels ``A_i``, the probabilities of background and of every
label outside ``A_i`` are merged into one background class (in log space: a logsumexp of the
log-probabilities); CE and Dice are then taken over ``{bg} ∪ A_i`` against the stored label
map. An organ left unannotated on a case is therefore never taught as background.

Shapes: ``logits`` (B, C, *spatial) float; ``target`` (B, 1, *spatial) integer label map (or
(B, *spatial)); ``annotated`` (B, C) bool, ``annotated[i, k]`` = label ``k`` annotated on case
``i`` (column 0 is ignored; see :meth:`PartialAnnotations.annotated_mask`).

With every label annotated both losses reduce to nnU-Net's ``RobustCrossEntropyLoss`` and
``MemoryEfficientSoftDiceLoss`` (``do_bg=False``), value for value.
"""
from __future__ import annotations

import torch
from torch import nn

from nnunetv2.utilities.ddp_allgather import AllGatherGrad


def _merged_mask(annotated: torch.Tensor) -> torch.Tensor:
    """(B, C) bool: channels merged into background (background itself + unannotated labels)."""
    merged = ~annotated.clone()
    merged[:, 0] = True
    return merged


def _full_precision(x: torch.Tensor) -> torch.Tensor:
    """Autocast gives fp16/bf16 logits; softmax/log maths runs in at least fp32."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _expand(mask: torch.Tensor, ndim: int) -> torch.Tensor:
    return mask.reshape(*mask.shape, *([1] * (ndim - 2)))


def marginal_log_probs(logits: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) log-probabilities of the marginal classes.

    Channel 0 holds ``log Σ_{k ∈ {0} ∪ not A_i} p_k``, annotated channels keep ``log p_k`` and
    unannotated channels are ``-inf`` (their mass now lives in channel 0).
    """
    logp = torch.log_softmax(_full_precision(logits), dim=1)
    merged = _expand(_merged_mask(annotated), logits.ndim)
    neg_inf = torch.finfo(logp.dtype).min
    log_bg = torch.logsumexp(logp.masked_fill(~merged, neg_inf), dim=1, keepdim=True)
    out = logp.masked_fill(merged, float("-inf"))
    return torch.cat((log_bg, out[:, 1:]), dim=1)


def _foreground_classes(logits: torch.Tensor) -> torch.Tensor:
    """(1, C-1, 1, ..., 1) label values 1..C-1, made on the logits' device (nothing crosses from the host)."""
    classes = torch.arange(1, logits.shape[1], device=logits.device)
    return classes.reshape(1, -1, *([1] * (logits.ndim - 2)))


def _as_index(target: torch.Tensor, ndim: int) -> torch.Tensor:
    if target.ndim == ndim:
        target = target[:, 0]
    return target.long()


def marginal_cross_entropy(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """Scalar: mean over all voxels of ``-log p_marginal(target)``.

    A voxel stored as a label outside ``A_i`` is a metadata error (validated before training);
    it would give ``inf`` here.
    """
    logq = marginal_log_probs(logits, annotated)
    return nn.functional.nll_loss(logq, _as_index(target, logits.ndim))


class MarginalDiceLoss(nn.Module):
    """Negative soft Dice over the annotated foreground labels (nnU-Net sign convention).

    Per case and label: intersect ``Σ p_k y_k``, ``Σ p_k``, ``Σ y_k``; pairs (i, k) with k not
    annotated on case i are dropped. With ``batch_dice`` the sums are pooled over the cases that
    annotate k (and over DDP ranks); the mean runs only over entries that exist, so a label
    annotated nowhere in the batch neither adds nor dilutes anything. No annotated entry at all
    (an unlabelled batch) gives 0 with a graph attached.
    """

    def __init__(self, batch_dice: bool = False, smooth: float = 1e-5, ddp: bool = False):
        super().__init__()
        self.batch_dice, self.smooth, self.ddp = batch_dice, smooth, ddp

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(_full_precision(logits), dim=1)[:, 1:]
        axes = tuple(range(2, logits.ndim))
        with torch.no_grad():
            # (B, C-1, *S) one-hot of the foreground labels in one broadcast comparison (no loop over labels)
            onehot = _as_index(target, logits.ndim).unsqueeze(1) == _foreground_classes(logits)
            weight = annotated[:, 1:].to(probs.dtype)            # (B, C-1)
            sum_gt = onehot.sum(axes).to(probs.dtype) * weight
        intersect = (probs * onehot).sum(axes) * weight
        sum_pred = probs.sum(axes) * weight
        if self.batch_dice:
            parts = (intersect, sum_pred, sum_gt, weight)
            if self.ddp:
                parts = tuple(AllGatherGrad.apply(t).sum(0) for t in parts)
            intersect, sum_pred, sum_gt, weight = (t.sum(0) for t in parts)
        present = weight > 0
        dc = (2 * intersect + self.smooth) / torch.clip(sum_gt + sum_pred + self.smooth, 1e-8)
        # mean over the present entries without leaving the device (no `if present.any()`, no boolean
        # indexing: both wait for the GPU); no present entry: 0 with the graph attached
        return -(torch.where(present, dc, 0.0).sum() / present.sum().clamp_min(1))


class MarginalDCandCELoss(nn.Module):
    """``weight_ce * marginal CE + weight_dice * marginal Dice`` (nnU-Net's DC_and_CE_loss, marginalised)."""

    def __init__(self, batch_dice: bool = False, smooth: float = 1e-5, ddp: bool = False,
                 weight_ce: float = 1.0, weight_dice: float = 1.0):
        super().__init__()
        self.weight_ce, self.weight_dice = weight_ce, weight_dice
        self.dice = MarginalDiceLoss(batch_dice=batch_dice, smooth=smooth, ddp=ddp)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        ce = marginal_cross_entropy(logits, target, annotated) if self.weight_ce else 0
        dc = self.dice(logits, target, annotated) if self.weight_dice else 0
        return self.weight_ce * ce + self.weight_dice * dc
