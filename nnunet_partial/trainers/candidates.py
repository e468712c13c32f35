"""Trainers that keep several networks (students, EMA twins, teachers) and export one of them.

``CandidateExportMixin`` (mix in before :class:`nnUNetTrainerPartial`) does, once for every such
trainer:

- online validation of every *candidate* network on the same validation batches, partial-aware,
  logging ``pseudo_dice_<name>`` per epoch; nnU-Net's own ``mean_fg_dice`` / ``val_losses`` /
  ``dice_per_class_or_region`` (and so ``checkpoint_best``) follow the exported candidate;
- the exported candidate is the one with the best smoothed pseudo Dice (nnU-Net's 0.9/0.1 EMA);
  its weights go to ``network_weights`` in every checkpoint, so ``nnUNetv2_predict`` loads one
  plain network; the final validation (``perform_actual_validation``) runs that network;
- everything else needed to resume (``self.network``'s weights, the step counter, the choice,
  the subclass's ``extra_checkpoint_state``) goes under the checkpoint key ``nnunet_partial``,
  which the predictor ignores;
- a second progress plot, ``progress_partial.png``, of the keys in ``extra_plot_groups``.
"""
from __future__ import annotations

import os
from typing import Dict, List

import numpy as np
import torch
from torch import nn

from nnunetv2.utilities.collate_outputs import collate_outputs

from nnunet_partial.trainers.common import (autocast_context, batch_to_device, plot_logged_groups, register_log_keys,
                                            unwrap)

CHECKPOINT_KEY = "nnunet_partial"


def _mean_finite(values) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


class CandidateExportMixin:
    # ------------------------------------------------------------------ to be provided by subclasses
    def build_extra_networks(self) -> None:
        """Create EMA twins / extra students here. Called by ``initialize`` once ``self.network``,
        the optimiser and the loss exist (self.network may already be compiled / DDP-wrapped)."""

    def candidate_networks(self) -> Dict[str, nn.Module]:
        """Name -> network evaluated each epoch; the best one is exported. Order = tie-break priority."""
        raise NotImplementedError

    def extra_checkpoint_state(self) -> dict:
        """Everything besides ``self.network``/``self.optimizer`` needed to resume (other nets, EMA twins...)."""
        return {}

    def load_extra_checkpoint_state(self, state: dict) -> None:
        pass

    # per-epoch values the subclass logs itself, plotted in progress_partial.png: {title: [keys]}
    extra_plot_groups: Dict[str, List[str]] = {}

    # ------------------------------------------------------------------ state
    def initialize(self):
        super().initialize()
        self.build_extra_networks()
        self.global_step = 0  # optimiser steps taken; drives ramp-ups and EMA warm-up
        self._candidate_dice_ema: Dict[str, float] = {}
        self.exported_candidate = next(iter(self.candidate_networks()))
        register_log_keys(self.logger, self._candidate_log_keys())

    def _candidate_log_keys(self) -> List[str]:
        keys = [f"pseudo_dice_{n}" for n in self.candidate_networks()]
        for group in self.extra_plot_groups.values():
            keys += [k for k in group if k not in keys]
        return keys

    def total_iterations(self) -> int:
        """Optimiser steps of the whole run, for ramp-ups and EMA horizons: read from the schedule in
        ``initialize`` or later, never in ``__init__`` (the schedule variants set it after)."""
        return self.num_epochs * self.num_iterations_per_epoch

    def exported_network(self) -> nn.Module:
        return unwrap(self.candidate_networks()[self.exported_candidate])

    def set_deep_supervision_enabled(self, enabled: bool):
        super().set_deep_supervision_enabled(enabled)
        for net in self.candidate_networks().values():
            unwrap(net).decoder.deep_supervision = enabled

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict) -> dict:
        data, target = batch_to_device(batch, self.device)
        annotated = self.batch_annotated_mask(batch["keys"])
        out = {}
        with torch.no_grad(), autocast_context(self.device):
            for name, net in self.candidate_networks().items():
                output = net(data)
                out[f"{name}:loss"] = self.supervised_loss(output, target, annotated).detach().cpu().numpy()
                for k, v in self.partial_tp_fp_fn(output, target, annotated).items():
                    out[f"{name}:{k}"] = v
        return out

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        collated = collate_outputs(val_outputs)
        per_class, losses = {}, {}
        for name in self.candidate_networks():
            tp, fp, fn = (np.sum(self.all_ranks(np.sum(collated[f"{name}:{k}"], 0)), 0)
                          for k in ("tp_hard", "fp_hard", "fn_hard"))
            with np.errstate(divide="ignore", invalid="ignore"):
                per_class[name] = [float(v) for v in 2 * tp / (2 * tp + fp + fn)]
            losses[name] = float(np.mean(self.all_ranks(float(np.mean(collated[f"{name}:loss"])))))
            dice = _mean_finite(per_class[name])
            self.logger.log(f"pseudo_dice_{name}", dice, self.current_epoch)
            prev = self._candidate_dice_ema.get(name)
            if np.isfinite(dice):
                self._candidate_dice_ema[name] = dice if prev is None else 0.9 * prev + 0.1 * dice
        if self._candidate_dice_ema:
            # max() keeps the first of equal scores: candidate order is the tie-break
            self.exported_candidate = max(self.candidate_networks(),
                                          key=lambda n: self._candidate_dice_ema.get(n, -np.inf))
        elif not getattr(self, "_told_default_export", False):
            self._told_default_export = True
            self.print_to_log_file(
                f"Validation scored no label yet, so the candidates cannot be compared: exporting "
                f"'{self.exported_candidate}', the default (first of {list(self.candidate_networks())}).",
                also_print_to_console=True)
        best = self.exported_candidate
        self.log_class_diagnostics(collated, prefix=f"{best}:")
        self.logger.log("mean_fg_dice", _mean_finite(per_class[best]), self.current_epoch)
        self.logger.log("dice_per_class_or_region", per_class[best], self.current_epoch)
        self.logger.log("val_losses", losses[best], self.current_epoch)

    def on_epoch_end(self):
        self.print_to_log_file("Pseudo dice per candidate: " + ", ".join(
            f"{n}={self.logger.get_value(f'pseudo_dice_{n}', step=-1):.4f}" for n in self.candidate_networks())
            + f"; exported: {self.exported_candidate}")
        super().on_epoch_end()
        if self.local_rank == 0:
            self.plot_extra_progress()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        # the keys nnU-Net writes (see nnUNetTrainer.save_checkpoint), with the exported candidate
        # as network_weights
        checkpoint = {
            "network_weights": self.exported_network().state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            CHECKPOINT_KEY: {
                "network_weights": unwrap(self.network).state_dict(),
                "exported_candidate": self.exported_candidate,
                "candidate_dice_ema": dict(self._candidate_dice_ema),
                "global_step": self.global_step,
                **self.extra_checkpoint_state(),
            },
        }
        torch.save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        # nnU-Net's load_checkpoint accepts only a path
        super().load_checkpoint(filename_or_checkpoint)
        checkpoint = torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            raise RuntimeError(
                f"{filename_or_checkpoint} was not written by an nnunet-partial multi-network trainer (no "
                f"'{CHECKPOINT_KEY}' entry), so {self.__class__.__name__} cannot resume from it. To start from "
                "pretrained weights use nnUNetv2_train's -pretrained_weights instead of --c.")
        # super() put the exported candidate into self.network; restore the real one
        unwrap(self.network).load_state_dict(state["network_weights"])
        self.exported_candidate = state["exported_candidate"]
        self._candidate_dice_ema = dict(state["candidate_dice_ema"])
        self.global_step = int(state["global_step"])
        self.load_extra_checkpoint_state(state)
        register_log_keys(self.logger, self._candidate_log_keys())

    # ------------------------------------------------------------------ final validation
    def perform_actual_validation(self, save_probabilities: bool = False):
        """Validate the exported candidate (the network nnUNetv2_predict will load)."""
        self.print_to_log_file(f"Final validation with the exported network '{self.exported_candidate}'")
        network = self.network
        self.network = self.exported_network()
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.network = network

    # ------------------------------------------------------------------ plots
    def plot_extra_progress(self) -> None:
        groups = {"pseudo Dice per candidate": [f"pseudo_dice_{n}" for n in self.candidate_networks()],
                  **self.extra_plot_groups}
        plot_logged_groups(self.logger, groups, os.path.join(self.output_folder, "progress_partial.png"))
