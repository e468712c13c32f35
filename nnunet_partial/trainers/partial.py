"""``nnUNetTrainerPartial``: the partial-label baseline (METHODS §0).

Marginal CE + marginal Dice with nnU-Net's deep supervision weights, and online / final
validation that counts a label only on cases where it was annotated. On a dataset without
``annotated_labels`` the loss, steps and sampling fall through to ``nnUNetTrainer``: same loss,
same numbers.

Shared by every trainer of this package (they all derive from this class):

- a cross-validation split stratified by annotation pattern and source, written when the dataset
  has ``annotated_labels`` and no ``splits_final.json`` yet (nnunet_partial/splits.py), and a
  start-up warning naming the labels the validation fold cannot score;
- annotation-aware sampling (``annotation_aware_sampling``; nnunet_partial/dataloading.py) through
  the one training-loader hook ``make_training_loader``;
- per-class diagnostics of online validation (share of voxels predicted as each class, mean
  softmax probability), logged every epoch;
- a ``LOST ORGAN`` warning after the final validation when a label annotated somewhere in the
  dataset is predicted on none of the validation cases.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import numpy as np
import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_partial.annotations import PROVENANCE_KEY, PartialAnnotations, full_annotation_mask, validate_preprocessed
from nnunet_partial.dataloading import AnnotationAwareDataLoader
from nnunet_partial.losses.marginal import MarginalDCandCELoss
from nnunet_partial.splits import split_coverage, write_stratified_split
from nnunet_partial.trainers.common import autocast_context, backward_and_step, batch_to_device, register_log_keys

DIAGNOSTIC_LOG_KEYS = ("predicted_fraction_per_class", "mean_probability_per_class")


class AnnotatedMaskTable:
    """:meth:`PartialAnnotations.annotated_mask` of every case, built once on the trainer's device.

    A batch's (B, C) mask is then a stack of row views: one kernel, no per-step loop over labels on
    the host and no host→device copy (a blocking ``.to(device)`` of a pageable array waits for the GPU).
    """

    def __init__(self, annotations: PartialAnnotations, device: torch.device):
        self.annotations, self.device = annotations, device
        cases = sorted(annotations.annotated)
        self.row_of = {case: i for i, case in enumerate(cases)}
        self.rows = annotations.annotated_mask(cases, device).unbind(0)

    def __call__(self, keys) -> torch.Tensor:
        try:
            return torch.stack([self.rows[self.row_of[k]] for k in keys])
        except KeyError:
            return self.annotations.annotated_mask(keys, self.device)   # raises the error naming the case


class nnUNetTrainerPartial(nnUNetTrainer):
    # every batch holds, as far as batch size allows, a case annotating each label (partial data only)
    annotation_aware_sampling: bool = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # label names and region/ignore labels are checked now; the case list once the
        # preprocessed folder is known (initialize)
        self.annotations = PartialAnnotations.from_dataset_json(dataset_json)

    # ------------------------------------------------------------------ set-up
    def initialize(self):
        super().initialize()
        if self.annotations is not None and self.preprocessed_dataset_folder is not None \
                and os.path.isdir(self.preprocessed_dataset_folder):
            validate_preprocessed(self.annotations, self.preprocessed_dataset_folder, self.dataset_class)
        if self.annotations is not None:
            self.annotated_mask_table(self.annotations)   # built now, not in the first train step
        register_log_keys(self.logger, DIAGNOSTIC_LOG_KEYS)

    # ------------------------------------------------------------------ split and sampling
    def do_split(self):
        """nnU-Net's split, except that a partially labelled dataset without ``splits_final.json`` gets a
        stratified one (nnunet_partial/splits.py); warns once when validation cannot score a label."""
        if self.dataset_class is None:  # as nnU-Net's do_split: it may run before the data loaders exist
            from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        if self.annotations is not None and self.fold != "all":
            written = write_stratified_split(self.preprocessed_dataset_folder_base,
                                             self.dataset_class.get_identifiers(self.preprocessed_dataset_folder),
                                             self.annotations, self.dataset_json.get(PROVENANCE_KEY))
            if written:
                self.print_to_log_file("Wrote a 5-fold split stratified by annotation pattern and source to "
                                       f"{written} (nnunet-partial; a split file you write is never replaced)")
        tr_keys, val_keys = super().do_split()
        if self.annotations is not None and not getattr(self, "_split_checked", False):
            self._split_checked = True
            self.warn_split_coverage(tr_keys, val_keys)
        return tr_keys, val_keys

    def warn_split_coverage(self, tr_keys, val_keys) -> None:
        cover = split_coverage(self.annotations, tr_keys, val_keys)
        if cover["untrained"]:
            self.print_to_log_file(
                f"WARNING: no training case of fold {self.fold} annotates {cover['untrained']}: the model cannot "
                "learn them. Use another split (splits_final.json) that puts cases annotating them into training.",
                also_print_to_console=True)
        if cover["labelled_val"] == 0:
            self.print_to_log_file(
                f"WARNING: the validation cases of fold {self.fold} annotate no label at all: pseudo Dice and the "
                "final validation score nothing, and a network with several candidates exports its default one "
                "(see the trainer's docs). Put labelled cases into this fold's validation (splits_final.json).",
                also_print_to_console=True)
        elif cover["unscorable"]:
            self.print_to_log_file(
                f"WARNING: no validation case of fold {self.fold} annotates {cover['unscorable']}: online pseudo "
                "Dice and the final validation cannot score them, so losing them would go unnoticed there (the "
                "LOST ORGAN check after training still looks at predicted volumes). Delete splits_final.json to "
                "get nnunet-partial's stratified split, or train another fold.", also_print_to_console=True)

    def make_training_loader(self, data, *args, **kwargs):
        """The training data loader (same arguments as ``nnUNetDataLoader``). Subclasses that sample
        differently override this one hook."""
        if self.annotations is None or not self.annotation_aware_sampling:
            return self._stock_loader(data, *args, **kwargs)
        return AnnotationAwareDataLoader(data, *args, annotations=self.annotations, **kwargs)

    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        self._training_dataset = dataset_tr
        return dataset_tr, dataset_val

    def get_dataloaders(self):
        # nnU-Net builds the training loader inside get_dataloaders (patch sizes, transforms) and starts
        # the augmentation workers with it before returning; there is no hook for the loader class, and
        # swapping the loader afterwards would mean restarting those workers. So nnU-Net's method runs
        # unchanged while the module-level name it constructs loaders with resolves to a factory:
        # make_training_loader for the training dataset, the stock loader for validation. Nothing of
        # nnU-Net's pipeline is copied; the name is restored before returning.
        module = sys.modules[nnUNetTrainer.__module__]
        self._stock_loader = stock = module.nnUNetDataLoader

        def make_loader(data, *args, **kwargs):
            if data is getattr(self, "_training_dataset", None):
                return self.make_training_loader(data, *args, **kwargs)
            return stock(data, *args, **kwargs)

        module.nnUNetDataLoader = make_loader
        try:
            return super().get_dataloaders()
        finally:
            module.nnUNetDataLoader = stock

    def _build_loss(self):
        stock = super()._build_loss()
        if self.annotations is None:
            return stock
        loss = MarginalDCandCELoss(batch_dice=self.configuration_manager.batch_dice, smooth=1e-5,
                                   ddp=self.is_ddp, weight_ce=1, weight_dice=1)
        if self._do_i_compile():
            # nnU-Net compiles its Dice when it compiles the network (CUDA); marginal CE + Dice trace into one
            # graph without breaks (tests/test_host_sync.py), so torch.compile fuses both
            loss = torch.compile(loss)
        if isinstance(stock, DeepSupervisionWrapper):
            # same per-scale weights as nnU-Net (halving per scale, lowest scale 0, normalised)
            loss = DeepSupervisionWrapper(loss, stock.weight_factors)
        return loss

    # ------------------------------------------------------------------ helpers for subclasses
    def annotated_mask_table(self, annotations: PartialAnnotations) -> AnnotatedMaskTable:
        """The device-side mask table of ``annotations`` (built on first use, one per annotations object)."""
        tables = self.__dict__.setdefault("_annotated_mask_tables", {})
        table = tables.get(id(annotations))
        if table is None or table.annotations is not annotations or table.device != self.device:
            table = tables[id(annotations)] = AnnotatedMaskTable(annotations, self.device)
        return table

    def batch_annotated_mask(self, keys) -> torch.Tensor:
        """(B, C) bool mask of annotated labels for the cases of a batch (all True on stock data), on the
        device, from the table built at ``initialize``: no host work beyond B dictionary look-ups."""
        if self.annotations is None:
            return full_annotation_mask(len(keys), self.label_manager.num_segmentation_heads, self.device)
        return self.annotated_mask_table(self.annotations)(keys)

    def supervised_loss(self, output, target, annotated: torch.Tensor) -> torch.Tensor:
        """``self.loss`` on one network output (list with deep supervision) and its targets."""
        if self.annotations is None:
            return self.loss(output, target)
        if isinstance(output, (list, tuple)):
            return self.loss(output, target, [annotated] * len(output))
        return self.loss(output, target, annotated)

    def partial_tp_fp_fn(self, output, target, annotated: torch.Tensor) -> dict:
        """Online-validation counts (foreground labels), summed only over cases annotating each label."""
        from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
        if isinstance(output, (list, tuple)):
            output, target = output[0], target[0]
        axes = list(range(2, output.ndim))
        onehot = torch.zeros(output.shape, device=output.device, dtype=torch.float32)
        onehot.scatter_(1, output.argmax(1, keepdim=True), 1)
        tp, fp, fn, _ = get_tp_fp_fn_tn(onehot, target, axes=axes)
        weight = annotated.to(tp.dtype)
        parts = {name: (v * weight).sum(0)[1:] for name, v in (("tp_hard", tp), ("fp_hard", fp), ("fn_hard", fn))}
        # diagnostics over every case (annotated or not: an organ is in every image): voxels predicted as
        # each class and summed softmax probability, per class incl. background; a dying class shows here
        reduce = [0] + axes
        parts["predicted_voxels"] = onehot.sum(reduce)
        parts["probability_sum"] = torch.softmax(output.float(), 1).sum(reduce)
        # one device->host copy for all five
        host = torch.cat([v.detach().float() for v in parts.values()]).cpu().numpy()
        return dict(zip(parts, np.split(host, np.cumsum([v.numel() for v in parts.values()])[:-1])))

    def all_ranks(self, value) -> list:
        """``[value]``, or every DDP rank's value."""
        if not self.is_ddp:
            return [value]
        import torch.distributed as dist
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, value)
        return gathered

    def log_class_diagnostics(self, collated: dict, prefix: str = "") -> None:
        """Per-epoch share of voxels predicted as each class and mean probability per class (incl. background)."""
        predicted, probability = (np.sum(self.all_ranks(np.sum(collated[f"{prefix}{key}"], 0)), 0)
                                  for key in ("predicted_voxels", "probability_sum"))
        total = max(float(predicted.sum()), 1.0)
        self.logger.log("predicted_fraction_per_class", (predicted / total).tolist(), self.current_epoch)
        self.logger.log("mean_probability_per_class", (probability / total).tolist(), self.current_epoch)
        self.print_to_log_file("Share of validation voxels predicted per class (bg first):",
                               np.round(predicted / total, 4).tolist())

    # ------------------------------------------------------------------ steps
    def train_step(self, batch: dict) -> dict:
        if self.annotations is None:
            return super().train_step(batch)
        data, target = batch_to_device(batch, self.device)
        annotated = self.batch_annotated_mask(batch["keys"])
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.device):
            output = self.network(data)
            loss = self.supervised_loss(output, target, annotated)
        backward_and_step(loss, [(self.network, self.optimizer)], self.grad_scaler)
        return {"loss": loss.detach().cpu().numpy()}

    def validation_step(self, batch: dict) -> dict:
        if self.annotations is None:
            return super().validation_step(batch)
        data, target = batch_to_device(batch, self.device)
        annotated = self.batch_annotated_mask(batch["keys"])
        with autocast_context(self.device):
            output = self.network(data)
            loss = self.supervised_loss(output, target, annotated)
        return {"loss": loss.detach().cpu().numpy(), **self.partial_tp_fp_fn(output, target, annotated)}

    def on_validation_epoch_end(self, val_outputs):
        super().on_validation_epoch_end(val_outputs)
        if self.annotations is not None:
            from nnunetv2.utilities.collate_outputs import collate_outputs
            self.log_class_diagnostics(collate_outputs(val_outputs))

    # ------------------------------------------------------------------ final validation
    def warn_lost_organs(self, prediction_folder: str) -> list:
        """Warn (log + console) for every label annotated somewhere in the dataset that no validation
        case's prediction holds a single voxel of. Returns the lost label names."""
        from nnunet_partial.evaluation import predicted_label_voxels
        names = {int(v): k for k, v in self.dataset_json["labels"].items() if k != "background" and not
                 isinstance(v, (list, tuple)) and k != "ignore"}
        if self.annotations is not None:
            annotated_somewhere = set().union(*self.annotations.annotated.values())
            names = {v: n for v, n in names.items() if v in annotated_somewhere}
        counts = predicted_label_voxels(prediction_folder, self.dataset_json["file_ending"], list(names))
        if counts is None:
            return []
        lost = [names[v] for v in names if counts[v] == 0]
        if lost:
            self.print_to_log_file(
                f"WARNING: LOST ORGAN: {lost} predicted on none of the {counts['n_cases']} validation cases although "
                f"the dataset annotates them. {self._switch_on_history({v: n for v, n in names.items() if n in lost})}"
                " Small or look-alike organs are learned late in short schedules (docs/lost_organs.md): train longer, "
                "check the split and annotations (nnunet-partial check), or use a weight-averaged trainer "
                "(nnUNetTrainerPartialEMA / nnUNetTrainerCoWAM).", also_print_to_console=True)
        return lost

    def _switch_on_history(self, lost: dict) -> str:
        """What the per-epoch pseudo Dice says about lost labels (value -> name): never learned in the
        epochs trained (the usual case in short runs), or learned and then forgotten."""
        from nnunet_partial.evaluation import EMERGED_DICE, emergence_epoch
        history = self.logger.get_value("dice_per_class_or_region", step=None) or []
        foreground = list(self.label_manager.foreground_labels)
        never, forgotten = [], []
        for value, name in lost.items():
            if value not in foreground or not history:
                continue
            curve = [epoch[foreground.index(value)] for epoch in history]
            if not np.isfinite(np.asarray(curve, dtype=float)).any():
                continue  # the validation fold never scored it: the curve cannot tell
            first = emergence_epoch(curve)
            if first is None:
                never.append(name)
            else:
                forgotten.append(f"{name} (from epoch {first})")
        parts = []
        if never:
            parts.append(f"Pseudo Dice of {never} never reached {EMERGED_DICE} in {len(history)} epochs: "
                         "not learned yet.")
        if forgotten:
            parts.append(f"Pseudo Dice of {forgotten} reached {EMERGED_DICE} and was lost again: forgotten.")
        return " ".join(parts)

    def perform_actual_validation(self, save_probabilities: bool = False):
        super().perform_actual_validation(save_probabilities)
        if self.local_rank != 0:
            return
        self.warn_lost_organs(os.path.join(self.output_folder, "validation"))
        if self.annotations is None:
            return
        from nnunet_partial.evaluation import rewrite_summary_partial_aware
        summary_file = os.path.join(self.output_folder, "validation", "summary.json")
        if os.path.isfile(summary_file):
            summary = rewrite_summary_partial_aware(summary_file, self.annotations, self.dataset_json["file_ending"])
            self.print_to_log_file("Partial-aware mean validation Dice (labels counted only where annotated):",
                                   np.round(summary["foreground_mean"]["Dice"], 4), also_print_to_console=True)
        # stock nnUNetv2_find_best_configuration would score unannotated organs as false positives
        self.print_to_log_file(
            f"Next: nnunet-partial find-best-configuration {self.plans_manager.dataset_name} -c {self.configuration_name} "
            f"-tr {self.__class__.__name__} -p {self.plans_manager.plans_name} [-f FOLDS] once all folds are "
            "trained (not nnUNetv2_find_best_configuration: it scores every label on cases not annotating it)",
            also_print_to_console=True)


class FixedBatchSize:
    """Benchmark ablation mixin: ``fixed_batch_size`` cases per batch instead of the batch nnU-Net planned.

    Two labelled cases plan a batch of 3 in 2d, while Mean Teacher on the same cases plus unlabelled ones
    gets half of a planned 32 as labelled slices (docs/mean_teacher.md); this tells what the batch alone
    is worth. Single process only (DDP splits nnU-Net's planned batch over its workers).
    ``fixed_oversample_foreground_percent`` (optional) replaces nnU-Net's 0.33 share of batch positions forced
    to hold foreground."""
    fixed_batch_size: int
    fixed_oversample_foreground_percent: Optional[float] = None

    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()
        if self.is_ddp:
            raise RuntimeError(f"{type(self).__name__} is a single-process benchmark ablation; run it without DDP")
        self.batch_size = self.fixed_batch_size
        if self.fixed_oversample_foreground_percent is not None:
            self.oversample_foreground_percent = self.fixed_oversample_foreground_percent


class nnUNetTrainerPartialBatch16(FixedBatchSize, nnUNetTrainerPartial):
    """Benchmark ablation: nnUNetTrainerPartial with 16 cases per batch (Mean Teacher's labelled share of the
    batch of 32 planned for the semi scenario's 20 cases)."""
    fixed_batch_size = 16


class nnUNetTrainerPartialBatch16Foreground(nnUNetTrainerPartialBatch16):
    """Benchmark ablation: nnUNetTrainerPartialBatch16 with 11 of its 16 positions forced to foreground — what
    Mean Teacher's labelled half gets: nnU-Net forces the last 11 of a batch of 32, and Mean Teacher puts its
    16 labelled cases last (nnunet_partial/dataloading.py). Plain Batch16 forces 5."""
    fixed_oversample_foreground_percent = 11 / 16


class nnUNetTrainerPartialStockSampling(nnUNetTrainerPartial):
    """Benchmark ablation: the marginal loss with nnU-Net's own case sampling, so a benchmark tells what the
    annotation-aware sampler adds (docs/lost_organs.md)."""
    annotation_aware_sampling = False
