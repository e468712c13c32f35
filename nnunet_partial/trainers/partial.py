"""``nnUNetTrainerPartial``: the partial-label baseline (METHODS §0).

Marginal CE + marginal Dice with nnU-Net's deep supervision weights, and online / final
validation that counts a label only on cases where it was annotated. On a dataset without
``annotated_labels`` every hook falls through to ``nnUNetTrainer``: same loss, same numbers.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_partial.annotations import PartialAnnotations, full_annotation_mask, validate_preprocessed
from nnunet_partial.losses.marginal import MarginalDCandCELoss
from nnunet_partial.trainers.common import autocast_context, backward_and_step, batch_to_device


class nnUNetTrainerPartial(nnUNetTrainer):
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

    def _build_loss(self):
        stock = super()._build_loss()
        if self.annotations is None:
            return stock
        loss = MarginalDCandCELoss(batch_dice=self.configuration_manager.batch_dice, smooth=1e-5,
                                   ddp=self.is_ddp, weight_ce=1, weight_dice=1)
        if isinstance(stock, DeepSupervisionWrapper):
            # same per-scale weights as nnU-Net (halving per scale, lowest scale 0, normalised)
            loss = DeepSupervisionWrapper(loss, stock.weight_factors)
        return loss

    # ------------------------------------------------------------------ helpers for subclasses
    def batch_annotated_mask(self, keys) -> torch.Tensor:
        """(B, C) bool mask of annotated labels for the cases of a batch (all True on stock data)."""
        if self.annotations is None:
            return full_annotation_mask(len(keys), self.label_manager.num_segmentation_heads, self.device)
        return self.annotations.annotated_mask(keys, self.device)

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
        return {name: (v * weight).sum(0)[1:].detach().cpu().numpy()
                for name, v in (("tp_hard", tp), ("fp_hard", fp), ("fn_hard", fn))}

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

    # ------------------------------------------------------------------ final validation
    def perform_actual_validation(self, save_probabilities: bool = False):
        super().perform_actual_validation(save_probabilities)
        if self.annotations is None or self.local_rank != 0:
            return
        from nnunet_partial.evaluation import rewrite_summary_partial_aware
        summary_file = os.path.join(self.output_folder, "validation", "summary.json")
        if os.path.isfile(summary_file):
            summary = rewrite_summary_partial_aware(summary_file, self.annotations, self.dataset_json["file_ending"])
            self.print_to_log_file("Partial-aware mean validation Dice (labels counted only where annotated):",
                                   np.round(summary["foreground_mean"]["Dice"], 4), also_print_to_console=True)
