"""Case sampling inside nnU-Net's data loader: annotation-aware batches (every partial-label trainer)
and two-stream batches (Mean Teacher's ``TwoStreamBatchSampler``). Only the case selection
(``get_indices``) changes; cropping, foreground oversampling and augmentation are nnU-Net's.

Annotation-aware (:class:`AnnotationAwareDataLoader`): stock nnU-Net draws the cases of a batch
uniformly with replacement, so with batch 2 and four single-organ sources half the 3d batches hold
no case annotating a given organ. Here ``min(batch_size, K)`` positions go to one case annotating
each of the next labels of a shuffled label stream (every label equally often), the rest are drawn
as nnU-Net draws them.

Two-stream (:class:`TwoStreamDataLoader`):

Every batch holds exactly ``labeled_batch_size`` labelled cases and ``batch_size -
labeled_batch_size`` unlabelled ones. Each stream is an endless sequence of random permutations
of its cases (labelled reshuffled every pass, unlabelled cycled forever, as in the reference
sampler); a batch takes the next cases of each stream. Unlike the reference we carry the
remainder of a labelled pass over instead of dropping it, so every labelled case is seen equally
often and ``labeled_batch_size`` may exceed the number of labelled cases (2D: a batch of slices
from few volumes, as stock nnU-Net does by sampling with replacement).

Only the index selection changes: cropping, foreground oversampling and augmentation are
nnU-Net's. Unlabelled cases have no foreground locations, so nnU-Net's ``get_bbox`` crops them at
random even when asked for foreground; to keep the oversampling on cases that can use it, the
labelled cases are placed *last* in the batch, the positions nnU-Net's default rule
(``_oversample_last_XX_percent``) forces to foreground. The trainer finds the labelled cases by
their keys, never by position.

With several augmentation workers each worker holds its own copy of the streams (like stock
nnU-Net's independent random draws); the batch composition holds in every worker.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from nnunet_partial.annotations import PartialAnnotations


class SemiSupervisedSplitError(ValueError):
    """The training split lacks unlabelled (or labelled) cases, so a semi-supervised trainer cannot run."""


class ShuffledStream:
    """Endless stream of a list's items: one random permutation after another (``np.random``,
    so every data-augmentation worker draws differently, like nnU-Net's own sampling)."""

    def __init__(self, items: Sequence[str]):
        if len(items) == 0:
            raise ValueError("a sampling stream needs at least one case")
        self.items = list(items)
        self._pending: list = []

    def take(self, n: int) -> list:
        out = []
        while len(out) < n:
            if not self._pending:
                self._pending = [self.items[i] for i in np.random.permutation(len(self.items))]
            k = min(n - len(out), len(self._pending))
            out += self._pending[:k]
            self._pending = self._pending[k:]
        return out


def split_labelled_unlabelled(identifiers: Sequence[str], annotations: Optional[PartialAnnotations],
                              trainer_name: str = "this trainer") -> tuple[list, list]:
    """(labelled, unlabelled) case ids of a training split. Unlabelled = ``annotated_labels: []``;
    partially labelled cases count as labelled. Clear errors when either group is empty."""
    identifiers = list(identifiers)
    is_unlabelled = [annotations is not None and annotations.is_unlabelled(k) for k in identifiers]
    unlabelled = [k for k, u in zip(identifiers, is_unlabelled) if u]
    labelled = [k for k, u in zip(identifiers, is_unlabelled) if not u]
    if not unlabelled:
        where = ("the dataset has no 'annotated_labels' in dataset.json, so every case counts as fully labelled"
                 if annotations is None else
                 "no training case of this fold is listed with an empty list ([]) in 'annotated_labels'")
        raise SemiSupervisedSplitError(
            f"{trainer_name} is semi-supervised and needs unlabelled cases in the training split, but {where}. "
            "Train with nnUNetTrainerPartial (partially labelled data) or nnUNetTrainer (fully labelled data) "
            "instead, or add unlabelled cases (all-background label file, annotated_labels [] ).")
    if not labelled:
        raise SemiSupervisedSplitError(
            f"{trainer_name}: every training case of this fold is unlabelled; at least one case with annotated "
            "labels is needed for the supervised loss.")
    return labelled, unlabelled


class AnnotationAwareDataLoader(nnUNetDataLoader):
    """``nnUNetDataLoader`` whose batches hold, as far as the batch size allows, a case annotating each
    label. The guaranteed cases come last: the positions nnU-Net's default rule crops around
    foreground, which for them is an annotated organ. All other arguments are ``nnUNetDataLoader``'s."""

    def __init__(self, data, batch_size: int, *args, annotations: PartialAnnotations, **kwargs):
        super().__init__(data, batch_size, *args, **kwargs)
        cases = list(self.indices)
        by_label = {v: [c for c in cases if v in annotations.annotated[c]] for v in sorted(annotations.all_labels)}
        self.cases_by_label = {v: c for v, c in by_label.items() if c}  # a label nobody annotates: nothing to pick
        self.label_stream = ShuffledStream(list(self.cases_by_label)) if self.cases_by_label else None

    def get_indices(self):
        if self.label_stream is None:
            return super().get_indices()
        guaranteed = [self.cases_by_label[v][np.random.randint(len(self.cases_by_label[v]))]
                      for v in self.label_stream.take(min(self.batch_size, len(self.cases_by_label)))]
        rest = list(np.random.choice(self.indices, self.batch_size - len(guaranteed), replace=True))
        return rest + guaranteed


class TwoStreamDataLoader(nnUNetDataLoader):
    """``nnUNetDataLoader`` whose batches hold ``labeled_batch_size`` labelled cases (last) and
    unlabelled cases for the rest. All other arguments are ``nnUNetDataLoader``'s."""

    def __init__(self, data, batch_size: int, *args, labelled_keys: Sequence[str], unlabelled_keys: Sequence[str],
                 labeled_batch_size: int, **kwargs):
        super().__init__(data, batch_size, *args, **kwargs)
        if not 1 <= labeled_batch_size < batch_size:
            raise ValueError(f"labeled_batch_size must be between 1 and batch_size - 1 = {batch_size - 1} so that "
                             f"every batch holds labelled and unlabelled cases; got {labeled_batch_size}")
        unknown = sorted(set(labelled_keys).union(unlabelled_keys) - set(self.indices))
        if unknown:
            raise ValueError(f"cases {unknown[:3]} are not in this loader's dataset")
        if set(labelled_keys) & set(unlabelled_keys):
            raise ValueError("a case cannot be both labelled and unlabelled")
        self.labeled_batch_size = int(labeled_batch_size)
        self.labelled_stream = ShuffledStream(labelled_keys)
        self.unlabelled_stream = ShuffledStream(unlabelled_keys)

    def get_indices(self):
        return (self.unlabelled_stream.take(self.batch_size - self.labeled_batch_size)
                + self.labelled_stream.take(self.labeled_batch_size))
