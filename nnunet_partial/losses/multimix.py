"""MultiMix losses (METHODS §5; Haque et al., ISBI / MELBA 2021). Pure functions of tensors.

Shapes: ``B`` cases, ``n`` image classes, ``K`` segmentation classes (incl. background).

- :func:`supervised_classification_loss`: CE of the class logits (B, n) against the class index
  (B,) of each case, ``-1`` for a case without a class label (ignored); mean over labelled cases.
- :func:`pseudo_label_loss`: FixMatch-style. The weak view's softmax gives the pseudo label
  ``argmax ĉ_w`` and the mask ``max ĉ_w ≥ t``; the strong view's logits of the **same** cases are
  trained to it with CE: ``Σ_b mask_b · CE(ĉ_s,b, argmax ĉ_w,b) / #counted cases`` (the mean over
  every counted case, confident or not, as FixMatch / the MultiMix code; unconfident cases add 0).
- :func:`segmentation_distribution_kl`: the segmentation consistency term. The paper's
  ``KL(ŷ_l ‖ ŷ_u)`` between the predictions on labelled and unlabelled images is, in the official
  code, the KL of a tensor with itself (identically 0). Labelled and unlabelled images are different
  images, so a voxel-wise KL between them is meaningless; we compare their **predicted class
  proportions**: ``p̄_l`` = softmax of the full-resolution segmentation output averaged over all
  voxels of the segmented cases of the batch (detached: the reference), ``p̄_u`` = the same over the
  cases without segmentation, and the term is ``KL(p̄_l ‖ p̄_u) = Σ_k p̄_l,k (log p̄_l,k − log p̄_u,k)``.
  It pulls the organ proportions the network predicts on unsegmented images towards those it
  predicts on segmented images (where the supervised loss anchors them). 0 when the batch lacks
  either kind of case.

Everything is computed in float32 (CUDA autocast hands over float16 logits) and without a
device→host copy: case selections are multiplications by (B,) float masks.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def supervised_classification_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Scalar: mean CE over the cases with ``targets >= 0``; 0 (graph attached) when there are none.

    ``logits`` (B, n) float, ``targets`` (B,) int64 class index or -1."""
    valid = (targets >= 0).float()
    ce = F.cross_entropy(logits.float(), targets.clamp_min(0), reduction="none")
    return (ce * valid).sum() / valid.sum().clamp_min(1.0)


def confidence_mask(weak_logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pseudo_labels (B,) int64, mask (B,) bool)`` from the weak view's logits (B, n): the argmax of the
    softmax and whether its probability is at least ``threshold``. Detached."""
    probs = torch.softmax(weak_logits.detach().float(), 1)
    confidence, pseudo = probs.max(1)
    return pseudo, confidence >= threshold


def pseudo_label_loss(strong_logits: torch.Tensor, weak_logits: torch.Tensor, counted: torch.Tensor,
                      threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, usage)``: confidence-masked pseudo-label CE and the share of counted cases whose pseudo label
    was used (both scalars, 0 when no case counts).

    ``strong_logits``, ``weak_logits`` (B, n): the two views of the same cases (row b = case b);
    ``counted`` (B,) bool: cases the term applies to (those without a class label). The weak side is a
    target (detached)."""
    pseudo, confident = confidence_mask(weak_logits, threshold)
    used = (confident & counted).float()
    n = counted.float().sum().clamp_min(1.0)
    ce = F.cross_entropy(strong_logits.float(), pseudo, reduction="none")
    return (ce * used).sum() / n, used.sum() / n


def segmentation_distribution_kl(logits: torch.Tensor, segmented: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scalar ``KL(p̄_segmented ‖ p̄_unsegmented)`` of the mean predicted class proportions (module docstring).

    ``logits`` (B, K, *spatial) full-resolution segmentation output; ``segmented`` (B,) bool. The segmented
    side is detached; 0 (graph attached) unless both kinds of case are in the batch."""
    probs = torch.softmax(logits.float(), 1)
    per_case = probs.flatten(2).mean(2)                             # (B, K) predicted class proportions
    w_l = segmented.float()
    w_u = 1.0 - w_l
    p_l = (per_case.detach() * w_l[:, None]).sum(0) / w_l.sum().clamp_min(1.0)
    p_u = (per_case * w_u[:, None]).sum(0) / w_u.sum().clamp_min(1.0)
    kl = (torch.xlogy(p_l, p_l) - p_l * torch.log(p_u.clamp_min(eps))).sum()
    both = (w_l.sum() > 0) & (w_u.sum() > 0)
    return kl * both.float()
