"""``nnUNetTrainerCoWAMPseudo``: the full CoWAM of the paper (METHODS §1), stage 2 on the pseudo-labelled D̂.

Trains on a dataset made by ``nnunet-partial pseudolabel`` (``pseudo_labels`` in its dataset.json;
nnunet_partial/teachers.py). It is :class:`nnUNetTrainerCoWAM` with two changes:

- **Training** sees the pseudo labels as known: the annotation mask of case ``i`` is
  ``annotated_labels[i] ∪ pseudo_labels[i]`` (the training view), so the hard loss is the paper's
  ``λ_focal·weighted focal (γ = 2, α_c ∝ 1/mean organ size) + λ_dice·Dice`` with ``λ_focal = 1.0``,
  ``λ_dice = 0.1`` on D̂'s labels, marginal only for labels no teacher filled. The soft loss is
  CoWAM's, inside the stored background of D̂ (where the teachers, too, saw background).
- **Validation** scores label ``k`` on case ``i`` only where ``k`` is in the case's *manual*
  ``annotated_labels`` — online pseudo Dice (hence ``checkpoint_best`` and the exported twin), the final
  ``summary.json`` and the split warnings. On those pairs D̂'s label file equals the manual label
  (see nnunet_partial/teachers.py), so this is validation against the manual labels only. The
  validation loss logged beside it is the training objective (training view).
"""
from __future__ import annotations

import contextlib

import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json

from nnunet_partial.annotations import PSEUDO_KEY, PSEUDO_SOURCE_KEY, PartialLabelError
from nnunet_partial.trainers.cowam import nnUNetTrainerCoWAM


class nnUNetTrainerCoWAMPseudo(nnUNetTrainerCoWAM):
    # the paper's hard loss: on D̂ every organ a teacher filled is labelled, so the focal loss has the
    # fully labelled targets it was designed for (cf. hard_loss = "dc_ce" of the w/o-pseudo-labels variant)
    hard_loss: str = "focal"
    lambda_focal: float = 1.0
    lambda_dice: float = 0.1

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.annotations is None or PSEUDO_KEY not in dataset_json:
            raise PartialLabelError(
                f"{self.__class__.__name__} trains on a pseudo-labelled dataset made by 'nnunet-partial pseudolabel' "
                f"(dataset.json with '{PSEUDO_KEY}'); this one has none. Run nnunet-partial teachers + pseudolabel "
                "first, or train nnUNetTrainerCoWAM (CoWAM without pseudo labels) on this dataset.")
        # manual annotations score validation; the training view (pseudo labels known) drives everything else
        self.manual_annotations = self.annotations
        self.annotations = self.manual_annotations.with_pseudo_as_annotated()
        self._scoring_mask = None

    @contextlib.contextmanager
    def manual_view(self):
        """``self.annotations`` = the manual annotations inside the block (validation, split checks)."""
        training_view, self.annotations = self.annotations, self.manual_annotations
        try:
            yield
        finally:
            self.annotations = training_view

    # ------------------------------------------------------------------ split
    def do_split(self):
        # a split written here is stratified by the manual annotation, i.e. the parent's split
        with self.manual_view():
            tr_keys, val_keys = super().do_split()
        source = self.dataset_json.get(PSEUDO_SOURCE_KEY, {})
        if not getattr(self, "_pseudo_split_checked", False):
            self._pseudo_split_checked = True
            self._warn_teacher_leakage(source, val_keys)
        return tr_keys, val_keys

    def _warn_teacher_leakage(self, source: dict, val_keys) -> None:
        """Warn when this fold's validation cases may have been training cases of the teachers."""
        from nnunetv2.paths import nnUNet_preprocessed
        if self.fold != "all" and str(source.get("fold")) not in (str(self.fold), "all"):
            self.print_to_log_file(
                f"WARNING: the pseudo labels come from teachers of fold {source.get('fold')}, this is fold {self.fold}: "
                "its validation cases may have trained the teachers. Train the fold the teachers were trained on, "
                "or pseudo-label again with -f of this fold.", also_print_to_console=True)
        parent_splits = join(str(nnUNet_preprocessed), str(source.get("parent", "")), "splits_final.json")
        if self.fold != "all" and source.get("parent") and isfile(parent_splits):
            splits = load_json(parent_splits)
            fold = int(self.fold)
            if fold < len(splits) and sorted(splits[fold]["val"]) != sorted(val_keys):
                self.print_to_log_file(
                    f"WARNING: the validation cases of fold {fold} differ from {source['parent']}'s (its "
                    "splits_final.json), which the teachers were kept away from: copy that file over this dataset's.",
                    also_print_to_console=True)

    def warn_split_coverage(self, tr_keys, val_keys) -> None:
        with self.manual_view():
            super().warn_split_coverage(tr_keys, val_keys)

    # ------------------------------------------------------------------ validation: manual labels only
    def validation_step(self, batch: dict) -> dict:
        self._scoring_mask = self.annotated_mask_table(self.manual_annotations)(batch["keys"])
        try:
            return super().validation_step(batch)
        finally:
            self._scoring_mask = None

    def partial_tp_fp_fn(self, output, target, annotated: torch.Tensor) -> dict:
        return super().partial_tp_fp_fn(output, target, annotated if self._scoring_mask is None else self._scoring_mask)

    def perform_actual_validation(self, save_probabilities: bool = False):
        # summary.json (rewritten partial-aware) and the LOST ORGAN check count manual annotations only
        with self.manual_view():
            super().perform_actual_validation(save_probabilities)
