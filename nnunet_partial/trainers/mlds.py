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

Bounding boxes (``boxes`` of dataset.json, raw voxel coordinates) restrict the pseudo labels of the two
taught trainers. They travel with the case as one extra segmentation channel: the training dataset is
wrapped (:class:`BoxMaskDataset`, in the ``make_training_loader`` hook) so that ``load_case`` returns, in
the place of nnU-Net's cascade ``seg_prev``, a lazy bit-field volume (:class:`BoxChannel`) holding the
boxes mapped through the case's transpose, crop and resampling (:func:`preprocessed_box`, from the
preprocessing properties). nnU-Net's loader crops it like ``seg`` and its spatial transforms resample
it like ``seg``; :class:`MaxPooledOneHotDSTransform` passes it on at full resolution, and the trainer
splits it off the target before any loss (:func:`split_box_channel`). Stock preprocessing, no custom
preprocessor.

Rules and measurements: docs/mlds.md.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, SegOnlyTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.utilities.collate_outputs import collate_outputs

from nnunet_partial.annotations import PartialAnnotations, PartialLabelError
from nnunet_partial.losses.mlds import (MultiLabelDeepSupervisionLoss, box_allowed, max_pooled_ds_targets,
                                        pool_kernel, pseudo_head_loss, pseudo_label_targets)
from nnunet_partial.networks import PseudoHeadNetwork, _CleanAndPseudoHead  # noqa: F401 (re-exported: old imports)
from nnunet_partial.trainers.candidates import CandidateExportMixin
from nnunet_partial.trainers.common import (EMATwin, autocast_context, backward_and_step, batch_to_device,
                                            host_values, sigmoid_rampup)
from nnunet_partial.trainers.mean_teacher import nnUNetTrainerMeanTeacher
from nnunet_partial.trainers.partial import nnUNetTrainerPartial


# ---------------------------------------------------------------------- targets in nnU-Net's pipeline
class MaxPooledOneHotDSTransform(SegOnlyTransform):
    """Drop-in for nnU-Net's ``DownsampleSegForDSTransform``: the label map at full resolution, the
    max-pooled one-hot map (uint8, C channels) at every lower scale (losses/mlds.py).

    A segmentation with more than one channel (the label map, then the box-mask channel of
    :class:`BoxMaskDataset`) keeps all its channels at full resolution; the lower scales are computed from
    the label map (channel 0) only."""

    def __init__(self, ds_scales, num_classes: int):
        super().__init__()
        self.ds_scales = ds_scales
        self.num_classes = int(num_classes)

    def _apply_to_segmentation(self, segmentation: torch.Tensor, **params) -> List[torch.Tensor]:
        targets = max_pooled_ds_targets(segmentation[:1], self.num_classes, self.ds_scales)
        if segmentation.shape[0] > 1:
            targets[0] = segmentation  # label map + box channel; split by the trainer (split_box_channel)
        return targets


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


# ---------------------------------------------------------------------- bounding boxes through nnU-Net's pipeline
BOX_BITS = 15  # nnU-Net's loader casts the extra segmentation channel to int16: 15 bits per voxel without the sign


def raw_shape_of(properties: dict, transpose_forward: Sequence[int]) -> tuple:
    """The raw image's array shape (axes as nnU-Net's reader returns them) from the preprocessing properties,
    whose ``shape_before_cropping`` is already transposed (``transposed[d] = raw[transpose_forward[d]]``)."""
    transposed = properties["shape_before_cropping"]
    raw = [0] * len(transposed)
    for d, axis in enumerate(transpose_forward):
        raw[axis] = int(transposed[d])
    return tuple(raw)


def preprocessed_box(box: Sequence[int], properties: dict, transpose_forward: Sequence[int], shape: Sequence[int],
                     margin: int = 1) -> Optional[tuple]:
    """A raw box ``(z0, y0, x0, z1, y1, x1)`` (upper bound exclusive) -> ``(lower, upper)`` in the preprocessed
    array of ``shape`` (the case's ``seg.shape[1:]``), or None when nothing of it survives nnU-Net's crop.

    The same three steps as nnU-Net's ``DefaultPreprocessor.run_case_npy``, from the case's properties:
    transpose (``transpose_forward``), crop to the non-zero region (``bbox_used_for_cropping``, in transposed
    axes), resample from ``shape_after_cropping_and_before_resampling`` to ``shape``. Voxel edges scale by
    ``shape / cropped shape``; the result is rounded outwards and dilated by ``margin`` voxels on every
    non-singleton axis, so the resampled and augmented label map of an organ inside the box stays inside it
    (linear interpolation reaches less than one voxel).
    """
    bbox = properties["bbox_used_for_cropping"]
    cropped = properties["shape_after_cropping_and_before_resampling"]
    lower, upper = [], []
    for d, axis in enumerate(transpose_forward):
        lo = max(int(box[axis]) - int(bbox[d][0]), 0)
        hi = min(int(box[3 + axis]) - int(bbox[d][0]), int(cropped[d]))
        if hi <= lo:
            return None  # the box lies in the zero border nnU-Net cropped away
        f = shape[d] / cropped[d]
        m = margin if shape[d] > 1 else 0
        lower.append(max(0, math.floor(lo * f) - m))
        upper.append(min(int(shape[d]), math.ceil(hi * f) + m))
    return tuple(lower), tuple(upper)


class BoxChannel:
    """Lazy (Z, Y, X) int16 box mask of one preprocessed case: bit ``j`` set inside a box of bit ``j``.

    nnU-Net's loader crops its patch out of it with ``crop_and_pad_nd`` (``array[slices]``), so only that
    patch is rasterised: no full volume is stored or built. ``boxes``: ``(bit, lower, upper)`` in
    preprocessed voxels, upper exclusive."""
    ndim = 3
    dtype = np.dtype(np.int16)

    def __init__(self, shape: Sequence[int], boxes: Sequence[tuple]):
        self.shape = tuple(int(s) for s in shape)
        self.boxes = list(boxes)

    def __getitem__(self, index) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (3 - len(index))
        if len(index) != 3 or not all(isinstance(s, slice) for s in index):
            raise TypeError(f"BoxChannel supports slicing with 3 slices only, got {index!r}")
        ranges = [s.indices(n) for s, n in zip(index, self.shape)]
        if any(step != 1 for _, _, step in ranges):
            raise TypeError("BoxChannel supports contiguous slices only (step 1)")
        out = np.zeros([max(0, b - a) for a, b, _ in ranges], dtype=np.int16)
        for bit, lower, upper in self.boxes:
            region = tuple(slice(max(lo, a) - a, min(hi, b) - a) for (a, b, _), lo, hi in zip(ranges, lower, upper))
            if all(r.stop > r.start for r in region):
                out[region] |= np.int16(1 << bit)
        return out

    def __array__(self, dtype=None, copy=None):
        full = self[:, :, :]
        return full if dtype is None else full.astype(dtype)


class BoxMaskDataset:
    """An nnU-Net dataset whose ``load_case`` returns a :class:`BoxChannel` as ``seg_prev``.

    nnU-Net's ``nnUNetDataLoader`` crops ``seg_prev`` exactly like ``seg`` (padding -1, which its
    ``RemoveLabelTansform`` turns into 0) and appends it to the segmentation as channel 1, and every
    spatial transform treats it as a label map: so the boxes follow the case through cropping,
    resampling (here, from the properties) and augmentation without a custom preprocessor or loader.
    Every case gets the channel (an all-zero one without boxes): nnU-Net stacks the samples of a batch.
    Bit ``j`` stands for label value ``box_values[j]``. Everything else is the wrapped dataset's.
    """

    def __init__(self, dataset, annotations: PartialAnnotations, transpose_forward: Sequence[int], margin: int = 1):
        if getattr(dataset, "folder_with_segs_from_previous_stage", None) is not None:
            raise RuntimeError("bounding boxes use nnU-Net's previous-stage channel to travel with the case: the "
                               "cascade (3d_cascade_fullres) cannot be trained with 'boxes'; use 3d_fullres or 2d")
        self._inner = dataset
        self.annotations = annotations
        self.transpose_forward = tuple(int(a) for a in transpose_forward)
        self.margin = int(margin)
        self.box_values = annotations.box_label_values()
        if len(self.box_values) > BOX_BITS:
            names = [annotations.label_names[v - 1] for v in self.box_values]
            raise PartialLabelError(
                f"'boxes' are given for {len(names)} labels {names}; the box mask travels in one int16 channel of "
                f"nnU-Net's loader, {BOX_BITS} labels at most. Drop the boxes of the labels that need them least.")
        self.bit_of = {v: j for j, v in enumerate(self.box_values)}
        from batchgenerators.utilities.file_and_folder_operations import load_pickle
        for case in dataset.identifiers:  # fit the image: its raw shape is in the preprocessing properties
            if self.annotations.boxes.get(case):
                props = load_pickle(os.path.join(dataset.source_folder, case + ".pkl"))
                annotations.check_boxes_in_shape(case, raw_shape_of(props, self.transpose_forward),
                                                 where=f" ({dataset.source_folder})")

    def __getattr__(self, name):
        if name == "_inner":  # unpickling: not set yet
            raise AttributeError(name)
        return getattr(self._inner, name)

    def __len__(self):
        return len(self._inner)

    def __getitem__(self, item):
        return self._inner[item]

    def box_channel(self, case: str, properties: dict, shape: Sequence[int]) -> BoxChannel:
        boxes = []
        for value, case_boxes in self.annotations.boxes.get(case, {}).items():
            for box in case_boxes:
                mapped = preprocessed_box(box, properties, self.transpose_forward, shape, self.margin)
                if mapped is not None:
                    boxes.append((self.bit_of[value], *mapped))
        return BoxChannel(shape, boxes)

    def load_case(self, identifier):
        data, seg, seg_prev, properties = self._inner.load_case(identifier)
        return data, seg, self.box_channel(identifier, properties, seg.shape[1:]), properties


def split_box_channel(target: list) -> Tuple[list, Optional[torch.Tensor]]:
    """nnU-Net's deep-supervision target list -> (the list with the label map only, the (B, *S) box channel or
    None): a full-resolution target of shape (B, 2, *S) carries the boxes in channel 1."""
    if target[0].shape[1] == 1:
        return target, None
    return [target[0][:, :1], *target[1:]], target[0][:, 1]


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

    def make_training_loader(self, data, *args, **kwargs):
        """Mean Teacher's two-stream loader, on the dataset wrapped to carry the box channel when the dataset
        has ``boxes`` (:class:`BoxMaskDataset`)."""
        if self.annotations is not None and self.annotations.boxes:
            data = BoxMaskDataset(data, self.annotations, self.plans_manager.transpose_forward)
            self.print_to_log_file(f"Bounding boxes: {len(self.annotations.boxes)} case(s) with boxes restrict the "
                                   "pseudo labels")
        return nnUNetTrainerMeanTeacher.make_training_loader(self, data, *args, **kwargs)

    def batch_box_allowed(self, keys, box_channel: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """(B, C, *S) bool on the device: where each class's pseudo-foreground may stay by the cases' boxes
        (:func:`~nnunet_partial.losses.mlds.box_allowed`), or None when the dataset has no boxes."""
        if self.annotations is None or not self.annotations.boxes:
            return None
        if box_channel is None:
            raise RuntimeError(f"{self.__class__.__name__}: the dataset has 'boxes' but this batch carries no box "
                               "channel; batches must come from make_training_loader (BoxMaskDataset)")
        if getattr(self, "_box_restricted", None) is None:
            self._box_restricted = self.annotations.box_restricted()
            self._box_values = self.annotations.box_label_values()  # bit j <-> value, as BoxMaskDataset
        restricted = self.annotated_mask_table(self._box_restricted)(keys)
        return box_allowed(box_channel, restricted, self._box_values)

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
        labelled cases) and ``pseudo`` (pseudo head only). ``target[0]`` may carry the box channel."""
        target, box_channel = split_box_channel(target)
        *clean, pseudo_logits = self.network(data)
        labelled = self.labelled_cases(keys, annotated)
        supervised = self._supervised_part(clean, target, annotated, labelled)
        probabilities = self.pseudo_label_probabilities(data, clean)
        pseudo_target = pseudo_label_targets(probabilities, target[0], annotated, self.pseudo_threshold,
                                             self.batch_possible_classes(keys),
                                             self.batch_box_allowed(keys, box_channel))
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


class nnUNetTrainerMLDSMeanTaughtNoPseudo(nnUNetTrainerMLDSMeanTaught):
    """Benchmark ablation: mean-taught with the pseudo-label loss off. Same two-stream batches (half of each
    batch labelled cases) and the same EMA-teacher export, so a benchmark tells the pseudo labels' share of a
    gain from the batches' (nnU-Net plans supervised-only training on a few cases with a much smaller batch)
    and the weight averaging's."""
    pseudo_weight = 0.0
