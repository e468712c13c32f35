"""Multi-label deep supervision (METHODS §4; Reiß et al., *Every Annotation Counts*, CVPR 2021).

Targets. nnU-Net downsamples the label map for its low-resolution heads by nearest interpolation,
so a structure thinner than a head's stride vanishes from that head's target. Here the **one-hot**
label map is max-pooled to each head's resolution (kernel = stride = the head's downsampling
factor): a low-resolution voxel is positive for every class present anywhere in its patch, so a
one-voxel structure survives to the coarsest head. The full-resolution target stays nnU-Net's
label map.

Loss. The full-resolution head keeps its loss (nnU-Net's DC+CE, or the marginal DC+CE on partially
labelled data); every low-resolution head is a multi-label classifier: sigmoid + binary
cross-entropy per class and voxel, with nnU-Net's deep-supervision weights.

Masking on partially labelled data (case ``i`` annotates the labels ``A_i``):

- a foreground class ``k`` in ``A_i``: its max-pooled target is exact both ways (a voxel of ``k`` is
  stored as ``k``, and no stored ``k`` means no ``k``): trusted;
- a foreground class outside ``A_i``: never stored, so its target says nothing: no BCE term;
- background (channel 0): a stored ``0`` means "background *or* an organ not annotated here". A
  pooled background **positive** ("some voxel of the patch is background") is therefore trusted only
  on a case that annotates every label (any unannotated organ could hide in any stored background).
  A pooled background **negative** ("every voxel of the patch is an annotated organ") is true on
  every case and always trusted. An unlabelled case (``A_i = ∅``) has no negatives: no term at all.

The BCE is the mean over the trusted (case, class, voxel) entries; none trusted gives 0 with a graph.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F


# ---------------------------------------------------------------------- targets
def pool_kernel(scale: Sequence[float]) -> tuple:
    """Integer max-pool kernel (= stride) of a deep-supervision scale, e.g. (1, 0.5, 0.25) -> (1, 2, 4)."""
    kernel = tuple(int(round(1.0 / s)) for s in scale)
    if any(k < 1 or abs(k * s - 1.0) > 1e-6 for k, s in zip(kernel, scale)):
        raise ValueError(f"deep-supervision scale {tuple(scale)} is not 1/integer per axis; max-pooled targets "
                         "need integer strides (nnU-Net's pool_op_kernel_sizes give them)")
    return kernel


def max_pool(x: torch.Tensor, kernel: Sequence[int]) -> torch.Tensor:
    """Max-pool (N, C, *S) with kernel = stride ``kernel`` (2d or 3d; ceil mode, so no voxel is dropped
    at a border). Bool/integer input comes back in its dtype."""
    kernel = tuple(int(k) for k in kernel)
    if all(k == 1 for k in kernel):
        return x
    pool = {2: F.max_pool2d, 3: F.max_pool3d}[len(kernel)]
    out = pool(x if x.is_floating_point() else x.float(), kernel, kernel, ceil_mode=True)
    return out if x.is_floating_point() else out.to(x.dtype)


def one_hot(label_map: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, 1, *S) integer label map -> (N, C, *S) uint8 one-hot (labels outside 0..C-1 give all-zero)."""
    idx = label_map.long()
    classes = torch.arange(num_classes, device=label_map.device).reshape(1, num_classes, *([1] * (idx.ndim - 2)))
    return (idx == classes).to(torch.uint8)


def block_presence(label_map: torch.Tensor, labels: torch.Tensor, kernel: Sequence[int]) -> torch.Tensor:
    """(N, P, *s) uint8: 1 where label ``labels[p]`` occurs in the ``kernel``-sized block of the (N, 1, *S)
    label map, i.e. the max-pooled one-hot map of those labels. Works on the label map itself (one
    blocked view, a comparison per label), 3x faster than pooling float one-hot channels."""
    n, spatial = label_map.shape[0], label_map.shape[2:]
    if len(labels) == 0 or any(s % k for s, k in zip(spatial, kernel)):  # ragged border: pool the masks
        masks = (label_map == labels.to(label_map.dtype).reshape(1, -1, *([1] * len(spatial)))).to(torch.uint8)
        return max_pool(masks, kernel)
    d = len(spatial)
    blocks = label_map.reshape(n, *[v for s, k in zip(spatial, kernel) for v in (s // k, k)])
    blocks = blocks.permute(0, *range(1, 2 * d + 1, 2), *range(2, 2 * d + 2, 2))
    blocks = blocks.reshape(n, *[s // k for s, k in zip(spatial, kernel)], -1)
    return torch.stack([(blocks == v).any(-1) for v in labels.tolist()], 1).to(torch.uint8)


def max_pooled_ds_targets(label_map: torch.Tensor, num_classes: int, ds_scales: Sequence) -> list:
    """Deep-supervision targets of one label map, one per scale of ``ds_scales`` (nnU-Net's list, first
    entry full resolution).

    ``label_map``: (1, *S) integer (one case, as nnU-Net's transforms see it) or (N, 1, *S). Scale 1
    gives the label map unchanged; every other scale gives the max-pooled one-hot map, uint8
    (C, *s) (or (N, C, *s)): 1 where the class occurs anywhere in the voxel's patch.

    Cost: only the classes present in the map are computed (a crop of a 100-class dataset holds a
    few); the first lower level from the label map (:func:`block_presence`), every further one by
    max-pooling the previous (max-pooling composes).
    """
    first = ds_scales[0]
    spatial = len(first) if isinstance(first, (list, tuple)) else label_map.ndim - 1
    batched = label_map.ndim == spatial + 2
    x = label_map if batched else label_map[None]
    # labels 0..C-1 present in the map (a count, no sort: faster than torch.unique)
    counts = torch.bincount(x.flatten().long().clamp(-1, num_classes) + 1, minlength=num_classes + 2)
    present = torch.nonzero(counts[1:num_classes + 1])[:, 0]
    current, current_kernel = None, (1,) * spatial
    results = []
    for s in ds_scales:
        s = tuple(s) if isinstance(s, (list, tuple)) else (s,) * spatial
        kernel = pool_kernel(s)
        if all(k == 1 for k in kernel):
            results.append(label_map)
            continue
        if current is not None and all(k % c == 0 for k, c in zip(kernel, current_kernel)):
            current = max_pool(current, [k // c for k, c in zip(kernel, current_kernel)])
        else:
            current = block_presence(x, present, kernel)
        current_kernel = kernel
        out = torch.zeros((x.shape[0], num_classes, *current.shape[2:]), dtype=torch.uint8, device=x.device)
        out[:, present] = current
        results.append(out if batched else out[0])
    return results


# ---------------------------------------------------------------------- masking and BCE
def bce_trust_mask(target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """(B, C, *s) bool: which entries of a max-pooled multi-label target are trusted (module docstring).

    ``target``: (B, C, *s) max-pooled one-hot; ``annotated``: (B, C) bool, column 0 ignored."""
    b, c = annotated.shape
    shape = (b, c) + (1,) * (target.ndim - 2)
    fg = annotated.clone()
    fg[:, 0] = False
    trusted = fg.reshape(shape).expand(target.shape).clone()
    fully = annotated[:, 1:].all(1)
    # background: positives only where every organ is annotated, negatives wherever the case has labels
    labelled = annotated[:, 1:].any(1)
    bg_target = target[:, 0] > 0
    bg_shape = (b,) + (1,) * (target.ndim - 2)
    trusted[:, 0] = (fully.reshape(bg_shape) & bg_target) | (labelled.reshape(bg_shape) & ~bg_target)
    return trusted


def masked_bce_with_logits(logits: torch.Tensor, target: torch.Tensor, trusted: torch.Tensor) -> torch.Tensor:
    """Mean sigmoid BCE over the trusted entries (0 with a graph when none is trusted)."""
    logits = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    weight = trusted.to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), weight=weight, reduction="sum")
    return loss / weight.sum().clamp_min(1)  # no `if`: a branch on a device value waits for the GPU


class MultiLabelDeepSupervisionLoss(nn.Module):
    """``w_0 · full_res_loss(out_0, label map) + Σ_{i≥1} w_i · masked BCE(out_i, max-pooled one-hot_i)``.

    ``full_res_loss``: nnU-Net's ``DC_and_CE_loss`` (called as ``loss(logits, target)``) or, with
    ``marginal=True``, :class:`~nnunet_partial.losses.marginal.MarginalDCandCELoss` (called with the
    annotated mask). ``weights``: nnU-Net's deep-supervision weights (a zero weight skips the head).
    ``annotated`` (B, C) bool, or None for a fully annotated batch.
    """

    def __init__(self, full_res_loss: nn.Module, weights: Sequence[float], marginal: bool):
        super().__init__()
        self.full_res_loss = full_res_loss
        self.weight_factors = tuple(float(w) for w in weights)
        self.marginal = marginal

    def forward(self, outputs: List[torch.Tensor], targets: List[torch.Tensor],
                annotated: Optional[torch.Tensor] = None) -> torch.Tensor:
        if len(outputs) != len(targets) or len(outputs) > len(self.weight_factors):
            raise ValueError(f"{len(outputs)} outputs, {len(targets)} targets, {len(self.weight_factors)} weights")
        if annotated is None:
            annotated = torch.ones(outputs[0].shape[:2], dtype=torch.bool, device=outputs[0].device)
        w0 = self.weight_factors[0]
        if self.marginal:
            total = w0 * self.full_res_loss(outputs[0], targets[0], annotated)
        else:
            total = w0 * self.full_res_loss(outputs[0], targets[0])
        for out, tgt, w in zip(outputs[1:], targets[1:], self.weight_factors[1:]):
            if w != 0:
                total = total + w * masked_bce_with_logits(out, tgt, bce_trust_mask(tgt, annotated))
        return total


# ---------------------------------------------------------------------- pseudo labels (self-/mean-taught)
def pseudo_label_targets(probabilities: torch.Tensor, label_map: torch.Tensor, annotated: torch.Tensor,
                         threshold: float, possible: Optional[torch.Tensor] = None,
                         allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, C, *S) uint8 multi-label target of the pseudo-label head: what is known, completed by
    thresholded pseudo labels where it is not.

    ``probabilities``: (B, C, *S) softmax of the pseudo-label source (detached); ``label_map``:
    (B, 1, *S) stored labels; ``annotated``: (B, C) bool. Per voxel:

    - stored as an annotated organ ``k``: one-hot ``k`` (manual label; one organ per voxel);
    - stored background, class ``k`` annotated on the case: 0 (the annotator would have drawn it);
    - stored background, organ ``k`` not annotated, or background on a case missing any organ
      (unlabelled cases: every class): ``p_k >= threshold``. Background is taken as manual (1) only on
      a case annotating every organ, the rule of the BCE mask.

    A fully annotated case thus gets its manual one-hot map, an unlabelled case pure pseudo labels.
    With ``threshold > 0.5`` an uncertain voxel is negative for every class.

    ``possible`` (B, C) bool, image-level labels: a pseudo-positive of class ``k`` is kept only where
    ``possible[i, k]`` (a class the image-level labels do not name is absent: target 0). Manual labels
    are never changed by it.

    ``allowed`` (B, C, *S) bool, bounding boxes (:func:`box_allowed`): a pseudo-positive of class ``k`` is
    kept only where ``allowed[i, k]`` (inside the case's boxes of ``k``). Combines with ``possible``
    (both must hold); manual labels are never changed by it either.
    """
    num_classes = annotated.shape[1]
    stored = one_hot(label_map, num_classes).bool()
    use_pseudo = ~annotated.clone()
    use_pseudo[:, 0] = ~annotated[:, 1:].all(1)
    use_pseudo = use_pseudo.reshape(*use_pseudo.shape, *([1] * (probabilities.ndim - 2)))
    known = (label_map > 0) | ~use_pseudo
    pseudo = probabilities >= threshold
    if possible is not None:
        pseudo = pseudo & possible.reshape(*possible.shape, *([1] * (probabilities.ndim - 2)))
    if allowed is not None:
        pseudo = pseudo & allowed
    return torch.where(known, stored, pseudo).to(torch.uint8)


def box_allowed(box_channel: torch.Tensor, restricted: torch.Tensor, box_values: Sequence[int]) -> torch.Tensor:
    """(B, C, *S) bool: where each class's pseudo-foreground may stay, by bounding boxes.

    ``box_channel``: (B, *S) integer bit field as the box-mask channel of the batch carries it (bit ``j``
    set: the voxel lies inside a box of label value ``box_values[j]``); ``restricted``: (B, C) bool, True
    where the case has a ``boxes`` entry for class ``k`` (its pseudo-foreground is kept inside its boxes
    only; an entry without boxes keeps it nowhere). A class without an entry, and background (column 0,
    ignored), is allowed everywhere. Device ops only (no host sync).
    """
    b, c = restricted.shape
    spatial = box_channel.shape[1:]
    bits = box_channel.to(torch.int32)
    inside = torch.zeros((b, c, *spatial), dtype=torch.bool, device=box_channel.device)
    for j, v in enumerate(box_values):
        inside[:, int(v)] = ((bits >> j) & 1).bool()
    free = ~restricted
    free[:, 0] = True
    return inside | free.reshape(b, c, *([1] * len(spatial)))


def pseudo_head_loss(logits: torch.Tensor, target: torch.Tensor, kernel: Sequence[int]) -> torch.Tensor:
    """Multi-label BCE of the pseudo-label head: logits and target max-pooled with ``kernel`` (a
    voxel of the pooled map is "class k occurs in this patch": max of the per-voxel logits against
    the max-pooled target), so a pseudo label off by less than a patch costs nothing."""
    pooled_logits, pooled_target = max_pool(logits, kernel), max_pool(target, kernel)
    return masked_bce_with_logits(pooled_logits, pooled_target, torch.ones_like(pooled_target, dtype=torch.bool))
