"""Multi-label deep supervision trainers (METHODS §4; Reiß et al., *Every Annotation Counts*, CVPR 2021).

- ``nnUNetTrainerMLDS``: nnU-Net's network and pipeline; only the deep-supervision targets and the
  low-resolution losses change. The one transform of nnU-Net's training / validation pipelines that
  downsamples the label map by nearest interpolation (``DownsampleSegForDSTransform``) is swapped for
  :class:`MaxPooledOneHotDSTransform` (max-pooled one-hot maps); the full-resolution head keeps
  nnU-Net's DC+CE (marginal with ``annotated_labels``), the low-resolution heads are trained with
  sigmoid + masked BCE (nnunet_partial/losses/mlds.py), weighted with nnU-Net's deep-supervision
  weights. ``nnUNetv2_predict`` runs the stock network.
- ``nnUNetTrainerMLDSSelfTaught``: batches mix labelled and unlabelled (``[]``) cases with Mean
  Teacher's two-stream sampler. The network is nnU-Net's, wrapped by :class:`PseudoHeadNetwork`
  (built in ``build_network_architecture``): one extra 1×1 output head on the outermost decoder
  features, beside nnU-Net's. Pseudo labels are the softmax of the clean full-resolution head on
  the same batch (detached), thresholded at ``pseudo_threshold`` and restricted to the classes a
  case's image-level labels name (``image_labels``, when given); the extra head learns from them
  (completed by the manual labels where a case has them; :func:`pseudo_label_targets`) with a
  multi-label BCE after max-pooling logits and target to the first deep-supervision level
  (``pseudo_pool_level``), weighted ``pseudo_weight · sigmoid_rampup``. The clean heads learn only
  from the manual labels (nnU-Net's loss on the labelled cases of the batch). At inference
  (deep supervision off) the wrapper returns the clean head only, so ``nnUNetv2_predict`` loads the
  checkpoint through this class's ``build_network_architecture`` and predicts with the clean head.
- ``nnUNetTrainerMLDSMeanTaught``: the same, pseudo labels from an EMA teacher (Mean Teacher's
  ``EMATwin``, decay and warm-up) that sees the batch plus Mean Teacher's clamped Gaussian noise;
  student and teacher are both validated and the better one exported (``CandidateExportMixin``).

Rules and measurements: docs/mlds.md.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, SegOnlyTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.utilities.collate_outputs import collate_outputs

from nnunet_partial.losses.mlds import (MultiLabelDeepSupervisionLoss, max_pooled_ds_targets, pool_kernel,
                                        pseudo_head_loss, pseudo_label_targets)
from nnunet_partial.trainers.candidates import CandidateExportMixin
from nnunet_partial.trainers.common import (EMATwin, autocast_context, backward_and_step, batch_to_device,
                                            host_values, sigmoid_rampup)
from nnunet_partial.trainers.mean_teacher import nnUNetTrainerMeanTeacher
from nnunet_partial.trainers.partial import nnUNetTrainerPartial


# ---------------------------------------------------------------------- targets in nnU-Net's pipeline
class MaxPooledOneHotDSTransform(SegOnlyTransform):
    """Drop-in for nnU-Net's ``DownsampleSegForDSTransform``: the label map at full resolution, the
    max-pooled one-hot map (uint8, C channels) at every lower scale (losses/mlds.py)."""

    def __init__(self, ds_scales, num_classes: int):
        super().__init__()
        self.ds_scales = ds_scales
        self.num_classes = int(num_classes)

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params) -> List[torch.Tensor]:
        return max_pooled_ds_targets(segmentation, self.num_classes, self.ds_scales)


def with_max_pooled_ds_targets(pipeline: BasicTransform, foreground_labels, regions, ignore_label) -> BasicTransform:
    """nnU-Net's composed pipeline with its one ``DownsampleSegForDSTransform`` replaced (same scales);
    a pipeline without deep supervision is returned as it is."""
    if regions is not None or ignore_label is not None:
        raise RuntimeError("multi-label deep supervision needs plain integer labels: region-based training and "
                           "the ignore label are not supported (one-hot targets of label values)")
    steps = pipeline.transforms if isinstance(pipeline, ComposeTransforms) else []
    found = [i for i, t in enumerate(steps) if isinstance(t, DownsampleSegForDSTransform)]
    if not found:
        return pipeline
    if len(found) > 1:
        raise RuntimeError(f"expected one DownsampleSegForDSTransform in nnU-Net's pipeline, found {len(found)}")
    num_classes = max(int(v) for v in foreground_labels) + 1
    steps[found[0]] = MaxPooledOneHotDSTransform(steps[found[0]].ds_scales, num_classes)
    return pipeline


class nnUNetTrainerMLDS(nnUNetTrainerPartial):
    """Multi-label deep supervision; see the module docstring."""

    @staticmethod
    def get_training_transforms(patch_size: Union[np.ndarray, Tuple[int]], rotation_for_DA,
                                deep_supervision_scales: Union[List, Tuple, None], mirror_axes: Tuple[int, ...],
                                do_dummy_2d_data_aug: bool, use_mask_for_norm: List[bool] = None,
                                is_cascaded: bool = False, foreground_labels=None, regions=None,
                                ignore_label: int = None) -> BasicTransform:
        pipeline = nnUNetTrainerPartial.get_training_transforms(
            patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes, do_dummy_2d_data_aug,
            use_mask_for_norm=use_mask_for_norm, is_cascaded=is_cascaded, foreground_labels=foreground_labels,
            regions=regions, ignore_label=ignore_label)
        return with_max_pooled_ds_targets(pipeline, foreground_labels, regions, ignore_label)

    @staticmethod
    def get_validation_transforms(deep_supervision_scales: Union[List, Tuple, None], is_cascaded: bool = False,
                                  foreground_labels=None, regions=None, ignore_label: int = None) -> BasicTransform:
        pipeline = nnUNetTrainerPartial.get_validation_transforms(
            deep_supervision_scales, is_cascaded=is_cascaded, foreground_labels=foreground_labels,
            regions=regions, ignore_label=ignore_label)
        return with_max_pooled_ds_targets(pipeline, foreground_labels, regions, ignore_label)

    def _build_loss(self):
        if self.label_manager.has_regions or self.label_manager.ignore_label is not None:
            raise RuntimeError(f"{self.__class__.__name__} needs plain integer labels: region-based labels and the "
                               "ignore label are not supported by multi-label deep supervision.")
        stock = super()._build_loss()  # marginal DC+CE with nnU-Net's DS weights, or nnU-Net's own loss
        if not isinstance(stock, DeepSupervisionWrapper):
            return stock  # deep supervision off: nothing to change
        return MultiLabelDeepSupervisionLoss(stock.loss, stock.weight_factors, marginal=self.annotations is not None)

    def supervised_loss(self, output, target, annotated: torch.Tensor) -> torch.Tensor:
        if isinstance(self.loss, MultiLabelDeepSupervisionLoss):
            return self.loss(output, target, annotated if self.annotations is not None else None)
        return super().supervised_loss(output, target, annotated)


# ---------------------------------------------------------------------- the extra head
class _CleanAndPseudoHead(nn.Module):
    """nnU-Net's outermost 1x1 output conv and a second one on the same features; channels concatenated."""

    def __init__(self, clean: nn.Module):
        super().__init__()
        self.clean = clean
        self.pseudo = type(clean)(clean.in_channels, clean.out_channels, 1, 1, 0, bias=True)
        from dynamic_network_architectures.initialization.weight_init import InitWeights_He
        self.pseudo.apply(InitWeights_He(1e-2))  # nnU-Net's initialisation of its own heads

    def forward(self, x):
        return torch.cat((self.clean(x), self.pseudo(x)), 1)


class PseudoHeadNetwork(nn.Module):
    """nnU-Net's network with a separate pseudo-label head at the outermost decoder level.

    Returns what nnU-Net's network returns (the clean heads; a list with deep supervision), plus, in
    training mode with deep supervision, the pseudo head's logits as the **last** list element.
    ``decoder`` / ``encoder`` are the wrapped network's (nnU-Net toggles ``decoder.deep_supervision``).
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        seg_layers = getattr(getattr(network, "decoder", None), "seg_layers", None)
        if seg_layers is None:
            raise TypeError(f"{type(network).__name__} has no decoder.seg_layers (nnU-Net's U-Net decoders): the "
                            "self-/mean-taught trainers cannot add their pseudo-label head to it")
        self.num_classes = int(seg_layers[-1].out_channels)
        seg_layers[-1] = _CleanAndPseudoHead(seg_layers[-1])
        self.network = network

    @property
    def decoder(self):
        return self.network.decoder

    @property
    def encoder(self):
        return self.network.encoder

    def forward(self, x):
        out = self.network(x)
        c = self.num_classes
        if not isinstance(out, (list, tuple)):
            return out[:, :c]
        clean = [out[0][:, :c], *out[1:]]
        return clean + [out[0][:, c:]] if self.training else clean


# ---------------------------------------------------------------------- self-taught / mean-taught
PSEUDO_LOG_KEYS = ("mlds_supervised_loss", "mlds_pseudo_loss", "mlds_pseudo_weight")


class nnUNetTrainerMLDSSelfTaught(CandidateExportMixin, nnUNetTrainerMLDS):
    """Self-taught deep supervision; see the module docstring."""
    labeled_batch_size: Optional[int] = None   # labelled cases per batch; None = ceil(batch_size / 2)
    pseudo_threshold: float = 0.5              # class k is a pseudo-positive where p_k >= threshold
    pseudo_weight: float = 1.0                 # weight of the pseudo-head loss after the ramp-up
    pseudo_rampup_fraction: float = 0.5        # sigmoid ramp-up over this fraction of all optimiser steps
    pseudo_pool_level: int = 1                 # deep-supervision level the pseudo head is pooled to (0: none)

    extra_plot_groups = {"MLDS loss terms (pseudo unweighted)": ["mlds_supervised_loss", "mlds_pseudo_loss"],
                         "pseudo-label weight": ["mlds_pseudo_weight"]}

    # Mean Teacher's two-stream batches (labelled last) and its supervised part (labelled cases only, selected
    # by rows known on the host: no host sync)
    make_training_loader = nnUNetTrainerMeanTeacher.make_training_loader
    effective_labeled_batch_size = nnUNetTrainerMeanTeacher.effective_labeled_batch_size
    labelled_cases = nnUNetTrainerMeanTeacher.labelled_cases
    _supervised_part = nnUNetTrainerMeanTeacher._supervised_part

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return PseudoHeadNetwork(nnUNetTrainerMLDS.build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision))

    def initialize(self):
        if not self.enable_deep_supervision:
            raise RuntimeError(f"{self.__class__.__name__} needs nnU-Net's deep supervision (its pseudo-label head "
                               "is trained beside the deep-supervision heads)")
        super().initialize()

    def build_extra_networks(self) -> None:
        self.print_to_log_file(
            f"{self.__class__.__name__}: pseudo labels thresholded at {self.pseudo_threshold}, pseudo head pooled "
            f"by {self.pseudo_pool_kernel()}, weight {self.pseudo_weight} ramped up over "
            f"{self.pseudo_rampup_steps()} steps")

    def candidate_networks(self):
        return {"student": self.network}

    def pseudo_pool_kernel(self) -> tuple:
        scales = self._get_deep_supervision_scales()
        return pool_kernel(scales[min(self.pseudo_pool_level, len(scales) - 1)])

    def pseudo_rampup_steps(self) -> int:
        return int(round(self.pseudo_rampup_fraction * self.total_iterations()))

    def current_pseudo_weight(self) -> float:
        return self.pseudo_weight * sigmoid_rampup(self.global_step, self.pseudo_rampup_steps())

    @torch.no_grad()
    def pseudo_label_probabilities(self, data: torch.Tensor, clean_output: list) -> torch.Tensor:
        """Softmax of the network's own clean full-resolution head on this batch (self-taught)."""
        return torch.softmax(clean_output[0].detach().float(), 1)

    def after_optimizer_step(self) -> None:
        pass

    def batch_possible_classes(self, keys) -> Optional[torch.Tensor]:
        """(B, C) bool on the device: classes each case may contain by its image-level labels
        (``image_labels``; background always), or None when the dataset has none."""
        if self.annotations is None or not self.annotations.image_labels:
            return None
        if getattr(self, "_possible_labels", None) is None:
            self._possible_labels = self.annotations.possible_labels()
        possible = self.annotated_mask_table(self._possible_labels)(keys)
        possible[:, 0] = True  # a case may name no organ at all: it still holds background
        return possible

    def mlds_losses(self, data: torch.Tensor, target: list, annotated: torch.Tensor, keys) -> dict:
        """The loss terms of one batch, with graphs: ``supervised`` (clean heads, manual labels of the
        labelled cases) and ``pseudo`` (pseudo head only)."""
        *clean, pseudo_logits = self.network(data)
        labelled = self.labelled_cases(keys, annotated)
        supervised = self._supervised_part(clean, target, annotated, labelled)
        probabilities = self.pseudo_label_probabilities(data, clean)
        pseudo_target = pseudo_label_targets(probabilities, target[0], annotated, self.pseudo_threshold,
                                             self.batch_possible_classes(keys))
        pseudo = pseudo_head_loss(pseudo_logits, pseudo_target, self.pseudo_pool_kernel())
        return {"supervised": supervised, "pseudo": pseudo}

    def train_step(self, batch: dict) -> dict:
        data, target = batch_to_device(batch, self.device)
        annotated = self.batch_annotated_mask(batch["keys"])
        weight = self.current_pseudo_weight()
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.device):
            terms = self.mlds_losses(data, target, annotated, batch["keys"])
            loss = terms["supervised"] + weight * terms["pseudo"]
        backward_and_step(loss, [(self.network, self.optimizer)], self.grad_scaler)
        self.after_optimizer_step()
        self.global_step += 1
        values = host_values([loss, terms["supervised"], terms["pseudo"]])  # one device->host copy, as nnU-Net
        return {"loss": values[0, ...], "mlds_supervised_loss": float(values[1]),
                "mlds_pseudo_loss": float(values[2]), "mlds_pseudo_weight": weight}

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        collated = collate_outputs(train_outputs)
        for k in PSEUDO_LOG_KEYS:
            self.logger.log(k, float(np.mean(self.all_ranks(float(np.mean(collated[k]))))), self.current_epoch)


class nnUNetTrainerMLDSMeanTaught(nnUNetTrainerMLDSSelfTaught):
    """Mean-taught deep supervision: pseudo labels from an EMA teacher on noisy input."""
    ema_decay: float = nnUNetTrainerMeanTeacher.ema_decay
    teacher_noise_std: float = nnUNetTrainerMeanTeacher.teacher_noise_std
    teacher_noise_clamp: float = nnUNetTrainerMeanTeacher.teacher_noise_clamp

    # teacher first (exported when validation cannot tell them apart), saved and restored with checkpoints
    candidate_networks = nnUNetTrainerMeanTeacher.candidate_networks
    extra_checkpoint_state = nnUNetTrainerMeanTeacher.extra_checkpoint_state
    load_extra_checkpoint_state = nnUNetTrainerMeanTeacher.load_extra_checkpoint_state

    def build_extra_networks(self) -> None:
        self.teacher = EMATwin(self.network, decay=self.ema_decay, warmup=True)
        super().build_extra_networks()

    @torch.no_grad()
    def pseudo_label_probabilities(self, data: torch.Tensor, clean_output: list) -> torch.Tensor:
        noise = torch.clamp(torch.randn_like(data) * self.teacher_noise_std,
                            -self.teacher_noise_clamp, self.teacher_noise_clamp)
        out = self.teacher(data + noise)
        return torch.softmax((out[0] if isinstance(out, (list, tuple)) else out).float(), 1)

    def after_optimizer_step(self) -> None:
        self.teacher.update(self.network)
