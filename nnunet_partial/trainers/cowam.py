"""``nnUNetTrainerCoWAM``: co-training weight-averaged models (METHODS §1; Huang et al., MICCAI 2020).

Two students built by nnU-Net's own ``build_network_architecture`` from different seeds, each
with its own optimiser, poly schedule and EMA twin (timm ``ModelEmaV3`` via :class:`EMATwin`,
updated after every optimiser step, never DDP-wrapped, never given gradients). Per batch both
students and both twins see the same augmented patch; each student gets

- the hard loss on what is known, marginal for labels the case does not annotate, with nnU-Net's
  deep-supervision weights: the foundation's Dice + CE by default, the paper's
  ``λ_focal·focal + λ_dice·Dice`` with ``hard_loss = "focal"``;
- the soft loss against the **other** network's twin inside ``T`` = stored background (every
  unannotated organ lives there), weighted ``λ_soft·sigmoid_rampup(step)``, at every
  deep-supervision output with the same weights as the hard loss.

Each student's backward runs before the other's forward (the losses are independent), then both
optimisers step. The twins are the candidates of :class:`CandidateExportMixin`: both are validated
each epoch, the better one is exported as ``network_weights`` (what ``nnUNetv2_predict`` loads) and
runs the final validation. The hard losses use only the manual labels (the paper's "w/o pseudo
labels" variant, METHODS §1).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.utilities.collate_outputs import collate_outputs

from nnunet_partial.losses.cowam import (CoWAMHardLoss, RegionSoftLoss, focal_class_weights,
                                         load_or_count_label_voxels, mean_class_sizes)
from nnunet_partial.trainers.candidates import CandidateExportMixin
from nnunet_partial.trainers.common import (EMATwin, WeightAveragingSchedule, autocast_context, batch_to_device,
                                            clip_and_step, host_values, scaled_backward, sigmoid_rampup, unwrap)
from nnunet_partial.trainers.partial import nnUNetTrainerPartial


class nnUNetTrainerCoWAM(WeightAveragingSchedule, CandidateExportMixin, nnUNetTrainerPartial):
    # ---- defaults: the paper's (Huang et al. 2020, §3.3) unless noted; override in a subclass
    # ema_decay 0.999 (the paper's), ema_warmup, ema_horizon_fraction 0.05: WeightAveragingSchedule.
    # The paper's 0.999 averages over ~1000 of its ~30 000 iterations (10 epochs, batch 24), a few % of
    # training; the horizon cap keeps that share on short schedules.
    # Hard loss on what is known. "dc_ce": the foundation's marginal Dice + cross-entropy (nnU-Net's
    # weights). "focal": the paper's λ_focal·weighted focal + λ_dice·Dice below. Not the default: the
    # paper applies it to fully pseudo-labelled images; on marginal targets the focal modulation stops
    # pushing unannotated organs out of the stored background once the merged class is likely, so
    # background is barely predicted (0-52 % of the true background after 120 steps on the synthetic
    # benchmark, vs 96 % with "dc_ce"; docs/cowam.md).
    hard_loss: str = "dc_ce"
    lambda_focal: float = 1.0
    lambda_dice: float = 0.1
    lambda_soft: float = 0.1
    focal_gamma: float = 2.0
    # ramp-up of the soft loss over this fraction of all training iterations (num_epochs x
    # iterations per epoch): the paper ramps over the first of its 10 epochs, ~2 of 10 here
    rampup_fraction: float = 0.2
    student_seeds: tuple = (12345, 67890)   # torch seeds of the two students' initialisations
    # True: the soft loss at every deep-supervision output, weighted like the hard loss;
    # False: at full resolution only
    soft_loss_deep_supervision: bool = True

    extra_plot_groups = {
        "CoWAM train losses (both students; soft before weighting)": ["cowam_hard_loss", "cowam_soft_loss"],
        "soft-loss ramp-up (lambda_rampup, 0..1)": ["cowam_rampup"],
    }

    # ------------------------------------------------------------------ set-up
    def initialize(self):
        if len(self.student_seeds) != 2 or self.student_seeds[0] == self.student_seeds[1]:
            raise ValueError(f"{self.__class__.__name__}.student_seeds must be two different seeds, got "
                             f"{self.student_seeds!r}: identical students would teach each other nothing new")
        # student 1 is nnU-Net's self.network, built inside nnU-Net's initialize: give it its seed there
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.student_seeds[0])
            super().initialize()

    def build_extra_networks(self) -> None:
        self.network2 = self._build_second_student()
        # built after the DDP wrap (which broadcasts rank 0's weights), so every rank's twin starts equal
        decay = self.effective_ema_decay()
        self.ema1 = EMATwin(self.network, decay, warmup=self.ema_warmup)
        self.ema2 = EMATwin(self.network2, decay, warmup=self.ema_warmup)
        self.print_to_log_file(f"CoWAM EMA decay {decay:.5g} (ema_decay {self.ema_decay}, horizon at most "
                               f"{self.ema_horizon_fraction} of {self.total_iterations()} iterations), "
                               f"warm-up {self.ema_warmup}")

    def _build_second_student(self) -> nn.Module:
        """Student 2 exactly as nnUNetTrainer.initialize builds self.network, from its own seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.student_seeds[1])
            network = self.build_network_architecture(
                self.plans_manager, self.configuration_manager, self.num_input_channels,
                self.label_manager.num_segmentation_heads, self.enable_deep_supervision).to(self.device)
        if self._do_i_compile():
            network = torch.compile(network)
        # its own optimiser + lr schedule from the trainer's (possibly user-overridden)
        # configure_optimizers, which reads self.network
        network1, self.network = self.network, network
        try:
            self.optimizer2, self.lr_scheduler2 = self.configure_optimizers()
        finally:
            self.network = network1
        if self.is_ddp:
            network = self._ddp_wrap(network)
        return network

    def _ddp_wrap(self, network: nn.Module) -> nn.Module:
        network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
        # nnU-Net's device_ids on GPU; a CPU (gloo) process group needs None
        return DDP(network, device_ids=[self.local_rank] if self.device.type == "cuda" else None)

    def _build_loss(self):
        if self.label_manager.has_regions or self.label_manager.ignore_label is not None:
            raise RuntimeError(f"{self.__class__.__name__} needs plain integer labels: region-based labels and "
                               "the ignore label are not supported by its focal/soft losses.")
        if self.hard_loss not in ("dc_ce", "focal"):
            raise ValueError(f"{self.__class__.__name__}.hard_loss must be 'dc_ce' or 'focal', got {self.hard_loss!r}")
        # the foundation's marginal DC+CE (nnU-Net's DC_and_CE on stock data), with nnU-Net's
        # deep-supervision weights (DDP-adjusted), which the focal variant and the soft loss reuse
        hard = super()._build_loss()
        ds_weights = hard.weight_factors if isinstance(hard, DeepSupervisionWrapper) else None
        if self.hard_loss == "focal":
            # .to(device): the class weights live on the device, not copied there in every loss call
            hard = CoWAMHardLoss(self.compute_focal_class_weights(), gamma=self.focal_gamma,
                                 weight_focal=self.lambda_focal, weight_dice=self.lambda_dice,
                                 batch_dice=self.configuration_manager.batch_dice, ddp=self.is_ddp).to(self.device)
            if ds_weights is not None:
                hard = DeepSupervisionWrapper(hard, ds_weights)
        self.soft_loss = RegionSoftLoss()
        if ds_weights is not None:
            soft_weights = ds_weights if self.soft_loss_deep_supervision else (1.0,) + (0.0,) * (len(ds_weights) - 1)
            self.soft_loss = DeepSupervisionWrapper(self.soft_loss, soft_weights)
        self.print_to_log_file(f"CoWAM hard loss: {self.hard_loss}")
        return hard

    def compute_focal_class_weights(self) -> np.ndarray:
        """α_c ∝ 1/mean size of class c over this fold's training cases (annotated ones per organ)."""
        num_classes = self.label_manager.num_segmentation_heads
        # one cache per configuration, beside (not inside) its preprocessed data folder
        cache = os.path.join(self.preprocessed_dataset_folder_base,
                             f"cowam_label_voxel_counts_{self.configuration_manager.data_identifier}.json")
        counts = load_or_count_label_voxels(self.preprocessed_dataset_folder, num_classes, cache)
        train_cases, _ = self.do_split()
        annotated = None if self.annotations is None else self.annotations.annotated
        weights = focal_class_weights(mean_class_sizes(counts, train_cases, annotated))
        self.print_to_log_file("CoWAM focal class weights (background, labels 1..K):",
                               np.round(weights, 4).tolist())
        return weights

    # ------------------------------------------------------------------ hooks of the mixin
    def candidate_networks(self) -> Dict[str, nn.Module]:
        return {"ema1": self.ema1.module, "ema2": self.ema2.module}

    def extra_checkpoint_state(self) -> dict:
        return {"cowam_network2_weights": unwrap(self.network2).state_dict(),
                "cowam_optimizer2_state": self.optimizer2.state_dict(),
                "cowam_ema1": self.ema1.state_dict(),
                "cowam_ema2": self.ema2.state_dict()}

    def load_extra_checkpoint_state(self, state: dict) -> None:
        unwrap(self.network2).load_state_dict(state["cowam_network2_weights"])
        self.optimizer2.load_state_dict(state["cowam_optimizer2_state"])
        self.ema1.load_state_dict(state["cowam_ema1"])
        self.ema2.load_state_dict(state["cowam_ema2"])

    def set_deep_supervision_enabled(self, enabled: bool):
        super().set_deep_supervision_enabled(enabled)
        unwrap(self.network2).decoder.deep_supervision = enabled

    # ------------------------------------------------------------------ schedule
    def rampup_length(self) -> float:
        """Ramp-up length in optimiser steps."""
        return self.rampup_fraction * self.total_iterations()

    def rampup_weight(self) -> float:
        return sigmoid_rampup(self.global_step, self.rampup_length())

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.network2.train()
        self.lr_scheduler2.step(self.current_epoch)

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self.network2.eval()

    # ------------------------------------------------------------------ training
    def twin_outputs(self, data: torch.Tensor):
        with torch.no_grad():
            return self.ema1(data), self.ema2(data)

    def student_losses(self, student: nn.Module, data: torch.Tensor, other_twin_output, target,
                       annotated: torch.Tensor, rampup: float) -> dict:
        """One student's terms of METHODS §1: ``loss`` (with graph) = ``hard + λ_soft·rampup·soft``,
        ``soft`` against the *other* network's twin output (a network is never taught by its own past)."""
        output = student(data)
        hard = self.supervised_loss(output, target, annotated)
        soft = self.soft_loss(output, other_twin_output, target)
        return {"loss": hard + self.lambda_soft * rampup * soft, "hard": hard, "soft": soft}

    def cowam_losses(self, data: torch.Tensor, target, annotated: torch.Tensor) -> dict:
        """Both students and both twins on the same batch, with graphs (for inspection; ``train_step``
        runs the same terms one student at a time). Returns ``loss`` (total), ``hard_loss`` (both
        students), ``soft1``/``soft2`` (student 1 <- twin 2, student 2 <- twin 1, unweighted), ``rampup``."""
        twin1, twin2 = self.twin_outputs(data)
        rampup = self.rampup_weight()
        s1 = self.student_losses(self.network, data, twin2, target, annotated, rampup)
        s2 = self.student_losses(self.network2, data, twin1, target, annotated, rampup)
        return {"loss": s1["loss"] + s2["loss"], "hard_loss": s1["hard"] + s2["hard"],
                "soft1": s1["soft"], "soft2": s2["soft"], "rampup": rampup}

    def train_step(self, batch: dict) -> dict:
        data, target = batch_to_device(batch, self.device)
        annotated = self.batch_annotated_mask(batch["keys"])
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer2.zero_grad(set_to_none=True)
        with autocast_context(self.device):
            twin1, twin2 = self.twin_outputs(data)
        rampup = self.rampup_weight()
        terms = []
        # the two students' losses are independent (twin outputs carry no graph), so each student's
        # backward runs before the other's forward: half the peak activation memory, and on CPU a
        # ~10 % faster step than one backward of the sum. Both backwards precede both optimiser steps.
        for student, other_twin_output in ((self.network, twin2), (self.network2, twin1)):
            with autocast_context(self.device):
                t = self.student_losses(student, data, other_twin_output, target, annotated, rampup)
            scaled_backward(t["loss"], self.grad_scaler)
            terms.append({k: v.detach() for k, v in t.items()})
            del t
        # nnU-Net's unscale / clip(12) / step per student, one scaler update
        clip_and_step([(self.network, self.optimizer), (self.network2, self.optimizer2)], self.grad_scaler)
        self.ema1.update(self.network)
        self.ema2.update(self.network2)
        self.global_step += 1
        # both students summed, one device->host copy for the three values (nnU-Net's one sync per step)
        keys = {"loss": "loss", "hard_loss": "hard", "soft_loss": "soft"}
        values = host_values([sum(t[name] for t in terms) for name in keys.values()])
        return {key: values[i, ...] for i, key in enumerate(keys)}

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        collated = collate_outputs(train_outputs)
        for key in ("hard_loss", "soft_loss"):
            value = float(np.mean(self.all_ranks(float(np.mean(collated[key])))))
            self.logger.log(f"cowam_{key}", value, self.current_epoch)
        self.logger.log("cowam_rampup", self.rampup_weight(), self.current_epoch)
        self.print_to_log_file(
            f"CoWAM hard loss {self.logger.get_value('cowam_hard_loss', step=-1):.4f}, soft loss "
            f"{self.logger.get_value('cowam_soft_loss', step=-1):.4f}, ramp-up {self.rampup_weight():.4f} "
            f"(step {self.global_step})")
