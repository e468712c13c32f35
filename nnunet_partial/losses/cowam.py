"""Losses of CoWAM (METHODS §1; Huang et al., *Multi-organ Segmentation via Co-training
Weight-Averaged Models from Few-Organ Datasets*, MICCAI 2020).

- hard loss ``λ_focal·L_focal + λ_dice·L_dice`` on what is known: a weighted focal loss and the
  foundation's Dice, both in the marginal formulation of §0 (background and every label a case
  does not annotate are one class), so an unannotated organ is never taught as background;
- soft loss ``L_soft(θ1|θ2) = −Σ_voxels T(y)·Σ_c F(x|E(θ2))_c·log F(x|θ1)_c`` inside the region
  mask ``T`` = stored background of the case (it contains every unannotated organ);
- the focal class weights ``α_c ∝ 1/(mean size of class c)`` from per-case voxel counts of the
  preprocessed training segmentations (counted once per configuration, cached as json).

Normalisation (the paper writes plain sums; these are the scales nnU-Net's own losses use):
focal and soft loss are means over all voxels of the batch (voxels outside ``T`` / of unlabelled
cases add 0), Dice is nnU-Net's ``−mean_c dc_c`` over annotated foreground labels. ``α`` is
normalised like scikit-learn's "balanced" weights, ``α_c = Σ_c' s_c' / (C·s_c)``, so that on an
average case ``Σ_c α_c·s_c`` equals the number of voxels: the weighted focal loss keeps the scale of
an unweighted one and ``λ_focal : λ_dice : λ_soft`` keep the paper's meaning.

Shapes: ``logits`` (B, C, *spatial) float; ``target`` (B, 1, *spatial) or (B, *spatial) integer
label map (stored labels); ``annotated`` (B, C) bool as in :meth:`PartialAnnotations.annotated_mask`
(column 0 False = unlabelled case).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from nnunet_partial.losses.marginal import MarginalDiceLoss, _as_index, marginal_log_probs


def _per_case(mask: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against a (B, *S) voxel map with ``ndim - 1`` dims."""
    return mask.reshape(mask.shape[0], *([1] * (ndim - 1)))


# ---------------------------------------------------------------------------------- hard losses
def weighted_marginal_focal_loss(logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor,
                                 class_weights: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Scalar: mean over all B·N voxels of ``−α_y (1 − q_y)^γ log q_y``.

    ``q`` are the marginal probabilities of :func:`marginal_log_probs` (background merged with the
    labels the case does not annotate), ``y`` the stored label. A stored-background voxel is
    weighted with ``α_0`` (it is "background or an unannotated organ": the merged class). Voxels of
    unlabelled cases (``annotated[i, 0]`` False) contribute 0. ``class_weights``: (C,).
    With every label annotated and ``α ≡ 1, γ = 0`` this is nnU-Net's cross-entropy.
    """
    logq = marginal_log_probs(logits, annotated)
    idx = _as_index(target, logits.ndim)
    logq_y = logq.gather(1, idx.unsqueeze(1)).squeeze(1)                      # (B, *S)
    if class_weights.device != logq_y.device:   # trainers keep them on the device: no copy per call
        class_weights = class_weights.to(logq_y.device)
    alpha = class_weights.to(dtype=logq_y.dtype)[idx]                          # (B, *S)
    modulation = (1.0 - logq_y.exp()).clamp_min(0.0) ** gamma
    labelled = _per_case(annotated[:, 0], logq_y.ndim)
    # where() rather than a product: an unlabelled case must add exactly 0, never 0·inf
    return torch.where(labelled, -alpha * modulation * logq_y, torch.zeros_like(logq_y)).mean()


class CoWAMHardLoss(nn.Module):
    """``weight_focal·weighted marginal focal + weight_dice·marginal Dice`` on one network output.

    ``forward(logits, target, annotated=None)``; ``annotated=None`` means every label is annotated
    (a stock nnU-Net dataset). Dice is :class:`MarginalDiceLoss` (nnU-Net's sign: ``−mean dc``).
    """

    def __init__(self, class_weights: Sequence[float], gamma: float = 2.0, weight_focal: float = 1.0,
                 weight_dice: float = 0.1, batch_dice: bool = False, smooth: float = 1e-5, ddp: bool = False):
        super().__init__()
        self.register_buffer("class_weights", torch.as_tensor(class_weights, dtype=torch.float32))
        self.gamma, self.weight_focal, self.weight_dice = float(gamma), float(weight_focal), float(weight_dice)
        self.dice = MarginalDiceLoss(batch_dice=batch_dice, smooth=smooth, ddp=ddp)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                annotated: Optional[torch.Tensor] = None) -> torch.Tensor:
        if annotated is None:
            annotated = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        focal = weighted_marginal_focal_loss(logits, target, annotated, self.class_weights, self.gamma)
        return self.weight_focal * focal + self.weight_dice * self.dice(logits, target, annotated)


# ---------------------------------------------------------------------------------- soft loss
def masked_soft_cross_entropy(logits: torch.Tensor, teacher_probs: torch.Tensor,
                              region: torch.Tensor) -> torch.Tensor:
    """Scalar: ``−1/(B·N) Σ_voxels T·Σ_c q_c log p_c``, ``p = softmax(logits)``.

    ``teacher_probs`` (B, C, *S) soft targets ``q`` (no gradient flows into them); ``region``
    (B, *S) or (B, 1, *S) bool/0-1 mask ``T``. Voxels outside ``T`` add 0 but count in ``N``: the
    loss is a mean over the whole patch like the focal loss, not over ``T``, so its weight does not
    grow when little of a case is unannotated. An empty ``T`` gives 0 with a graph attached.
    """
    logp = torch.log_softmax(logits.float(), dim=1)
    ce = -(teacher_probs.detach().float() * logp).sum(1)                       # (B, *S)
    if region.ndim == logits.ndim:
        region = region[:, 0]
    return (ce * region.to(ce.dtype)).mean()


class RegionSoftLoss(nn.Module):
    """Soft loss of one student against the other network's EMA twin, inside ``T`` = stored background.

    ``forward(student_logits, teacher_logits, target)``: ``teacher_logits`` (B, C, *S) are turned into
    probabilities here (detached), ``T = (target == 0)``. For an unlabelled case the whole stored map
    is background, so ``T`` is everything; for a fully labelled one ``T`` is its true background.
    Written for nnU-Net's ``DeepSupervisionWrapper`` (one call per output scale).
    """

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher = torch.softmax(teacher_logits.float(), dim=1)
            region = _as_index(target, student_logits.ndim) == 0
        return masked_soft_cross_entropy(student_logits, teacher, region)


# ---------------------------------------------------------------------------------- class weights
def label_voxel_counts(seg: np.ndarray, num_classes: int) -> list[int]:
    """``[n_0, n_1, …, n_{C-1}]`` for one stored label map; ``n_0`` = every voxel that is no label
    1..C-1 (nnU-Net's ``-1`` "outside the image" voxels become background in training, so count there)."""
    seg = np.asarray(seg).ravel()
    fg = np.bincount(seg[seg > 0].astype(np.int64), minlength=num_classes)[:num_classes]
    fg[0] = seg.size - int(fg[1:].sum())
    return [int(v) for v in fg]


def mean_class_sizes(counts: Mapping[str, Sequence[int]], cases: Iterable[str],
                     annotated: Optional[Mapping[str, Iterable[int]]] = None) -> np.ndarray:
    """(C,) mean voxel count per class over ``cases``.

    Organ ``k``: mean ``n_k`` over the cases that annotate ``k`` (all cases when ``annotated`` is
    None). Background: mean case size minus the organs' mean sizes, over labelled cases (a stored
    background also holds unannotated organs, so it would overestimate). An organ annotated on no
    case gets the mean size of the others; sizes are clipped to at least one voxel.
    """
    cases = list(cases)
    num_classes = len(counts[cases[0]])
    sizes = np.full(num_classes, np.nan)
    for k in range(1, num_classes):
        values = [counts[c][k] for c in cases if annotated is None or k in annotated[c]]
        if values:
            sizes[k] = np.mean(values)
    known = sizes[1:][np.isfinite(sizes[1:])]
    sizes[1:][~np.isfinite(sizes[1:])] = known.mean() if known.size else 1.0
    labelled = [c for c in cases if annotated is None or len(annotated[c]) > 0] or cases
    sizes[0] = np.mean([sum(counts[c]) for c in labelled]) - sizes[1:].sum()
    return np.maximum(sizes, 1.0)


def focal_class_weights(sizes: Sequence[float]) -> np.ndarray:
    """``α_c = Σ_c' s_c' / (C·s_c)``: inversely proportional to the mean class size, normalised so
    that ``Σ_c α_c s_c = Σ_c s_c`` (scikit-learn's "balanced" class weights)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    return sizes.sum() / (len(sizes) * sizes)


def load_or_count_label_voxels(preprocessed_folder: str, num_classes: int, cache_file: Optional[str] = None,
                               dataset_class=None) -> dict[str, list[int]]:
    """Case id -> :func:`label_voxel_counts` for every case of one preprocessed configuration folder.

    Reads the stored segmentations once and caches the counts in ``cache_file`` (json); cases
    missing from the cache, or a cache for another number of classes, are recounted. The cache must
    live outside ``preprocessed_folder``: nnU-Net infers the dataset format from the file endings
    there and refuses a folder with a stray ``.json``.
    """
    if dataset_class is None:
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        dataset_class = infer_dataset_class(preprocessed_folder)
    identifiers = dataset_class.get_identifiers(preprocessed_folder)
    counts: dict = {}
    if cache_file is not None and os.path.isfile(cache_file):
        with open(cache_file) as f:
            cached = json.load(f)
        if cached.get("num_classes") == num_classes:
            counts = cached["counts"]
    missing = [c for c in identifiers if c not in counts]
    if missing:
        dataset = dataset_class(preprocessed_folder, list(missing))
        for case in missing:
            _, seg, _, _ = dataset.load_case(case)
            counts[case] = label_voxel_counts(seg[:], num_classes)
        if cache_file is not None:
            tmp = f"{cache_file}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({"num_classes": num_classes, "counts": counts}, f)
            os.replace(tmp, cache_file)  # atomic: concurrent trainers (DDP ranks) never read half a file
    return {c: counts[c] for c in identifiers}
