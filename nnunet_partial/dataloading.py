"""Two-stream sampling (Mean Teacher's ``TwoStreamBatchSampler``) inside nnU-Net's data loader.

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
