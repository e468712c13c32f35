"""``nnUNetTrainerMSKD``: multi-teacher single-student knowledge distillation (METHODS §2).

The frozen single-organ teachers made by ``nnunet-partial teachers`` (their registry ``teachers.json``
in the student's ``nnUNet_preprocessed`` folder says which nnU-Net results folder teaches which
label) are distilled into one multi-organ nnU-Net student:

``L = Σ_k L^k_logit + λ1·L^B_logit + λ2·Σ_k L^{k,l}_feature [+ w_gt·marginal DC+CE on annotated labels]``

(the terms: nnunet_partial/losses/mskd.py). Behaviour, with the decisions (docs/mskd.md):

- **Teachers** are loaded once in ``initialize`` (every DDP rank loads its own), before nnU-Net builds
  the student, so every refusal comes before training: missing registry, missing or untrained
  teacher, a label the student does not have, other patch size / spacing / normalisation / input
  channels (``check_teacher_model`` of nnunet_partial/teachers.py), other pooling (``strides``),
  another width at the feature stage, more than two output channels. Each is built with its own
  trainer class's ``build_network_architecture`` from **its** plans (as ``nnUNetv2_predict`` builds
  it), without deep supervision, in eval mode with ``requires_grad_(False)``, and runs under
  ``torch.inference_mode()`` (+ autocast on CUDA) on the student's very batch. Teachers are not
  checkpointed: ``--c`` reloads them (the checkpoint records which were used).
- **Features** at the encoder output after ``feature_level`` downsamplings come from forward hooks
  on the encoder stage of student and teachers (no copy of any forward). Sorting compares channel
  distributions of equal length only: a teacher of another width there is refused (pooling channels
  to the smaller count would compare averages of unrelated channels; with the teachers of
  ``nnunet-partial teachers``, which share the student's plans, widths are always equal).
- **Deep supervision**: distillation at the full-resolution output only — the paper defines it at
  the input resolution, the teachers run without their low-resolution heads, and nnU-Net's
  lower heads exist to feed gradient into the decoder stages, which the ground-truth term does at
  every head with nnU-Net's weights. Without the ground-truth term nothing would train those heads,
  so deep supervision is then switched off and the unused heads are frozen before nnU-Net's DDP wrap
  (DDP stops on trainable parameters without a gradient).
  The student is nnU-Net's network, unchanged: the exported checkpoint is a plain nnU-Net one.
- **Ground-truth term** (``use_ground_truth_loss``; default on where the dataset has
  ``annotated_labels``): nnUNetTrainerPartial's marginal DC+CE on the annotated labels, weight 1.
- Validation (online, final) is nnUNetTrainerPartial's partial-aware one; the per-epoch means of the
  logit, background, feature and ground-truth terms (unweighted) are logged and plotted in
  ``progress_partial.png`` (CandidateExportMixin, with the student as its only candidate).

Change a default with a two-line subclass::

    class nnUNetTrainerMSKDNoGT(nnUNetTrainerMSKD):
        use_ground_truth_loss = False
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from nnunetv2.utilities.collate_outputs import collate_outputs

from nnunet_partial.annotations import PartialLabelError, TEACHER_REGISTRY_FILE, load_teacher_registry
from nnunet_partial.losses.mskd import feature_loss, logit_losses, teacher_masks
from nnunet_partial.trainers.candidates import CandidateExportMixin
from nnunet_partial.trainers.common import autocast_context, backward_and_step, batch_to_device, host_values, unwrap
from nnunet_partial.trainers.partial import nnUNetTrainerPartial

LOG_KEYS = ("mskd_logit_loss", "mskd_background_loss", "mskd_feature_loss", "mskd_gt_loss")


def encoder_stage_after(strides: Sequence, downsamplings: int) -> int:
    """Index of the encoder stage whose output lies after ``downsamplings`` pooling steps (the last
    stage at that resolution). ``strides``: nnU-Net's per-stage strides (an int or one per axis)."""
    count, found = 0, None
    for i, s in enumerate(strides):
        count += int(any(int(v) > 1 for v in np.atleast_1d(s)))
        if count == downsamplings:
            found = i
    if found is None:
        raise ValueError(f"the encoder has no stage after {downsamplings} downsampling(s): its strides are "
                         f"{list(strides)} ({count} downsamplings)")
    return found


class StageOutput:
    """The output of ``module`` at its latest forward, taken by a forward hook."""

    def __init__(self, module: nn.Module):
        self.value = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.value = output

    def pop(self) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("the hooked encoder stage did not run in the last forward")
        return value


@dataclass
class Teacher:
    label: str
    label_value: int
    channel: int                 # the student's output channel of this label
    dataset: str
    folder: str                  # nnU-Net results folder (trainer__plans__configuration)
    fold: str
    network: nn.Module
    features: StageOutput


def _same_strides(a: Sequence, b: Sequence) -> bool:
    return len(a) == len(b) and all(np.array_equal(np.atleast_1d(x), np.atleast_1d(y)) for x, y in zip(a, b))


def _trainer_class(name: str) -> type:
    """The trainer class a teacher was trained with (for its build_network_architecture), as
    nnUNetv2_predict finds it."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunet_partial.trainers import TRAINERS
    if name == nnUNetTrainer.__name__:
        return nnUNetTrainer
    if name in TRAINERS:
        return TRAINERS[name]
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    return recursive_find_trainer_class_by_name(name)


class nnUNetTrainerMSKD(CandidateExportMixin, nnUNetTrainerPartial):
    # ---- defaults: the paper's (METHODS §2); override in a subclass
    lambda_background: float = 1.0          # λ1
    lambda_feature: float = 10.0            # λ2
    feature_level: int = 1                  # l: encoder output after l downsamplings
    feature_mask_downsampling: str = "max"  # M^k to the feature resolution: "max" or "nearest"
    use_ground_truth_loss: Optional[bool] = None   # None: on where the dataset has annotated_labels
    ground_truth_weight: float = 1.0
    teacher_checkpoint: str = "checkpoint_final.pth"
    teacher_fold: Optional[str] = None      # None: the student's fold (its validation never trained a teacher)
    teacher_trainer: Optional[str] = None   # None: the registry's

    extra_plot_groups = {"MS-KD loss terms (unweighted; gt: marginal DC+CE)": list(LOG_KEYS)}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if not self.ground_truth_loss_enabled():
            # only the full-resolution output is distilled: no loss would reach the other heads
            self.enable_deep_supervision = False

    def ground_truth_loss_enabled(self) -> bool:
        if self.use_ground_truth_loss is None:
            return self.annotations is not None
        return bool(self.use_ground_truth_loss)

    # ------------------------------------------------------------------ teachers
    def initialize(self):
        if not self.was_initialized:
            self.teachers = self.load_teachers()   # every refusal before nnU-Net builds the student
        super().initialize()

    def teacher_registry_path(self) -> str:
        return os.path.join(self.preprocessed_dataset_folder_base, TEACHER_REGISTRY_FILE)

    def feature_stage(self, arch_kwargs: dict, what: str) -> int:
        try:
            return encoder_stage_after(arch_kwargs["strides"], self.feature_level)
        except (KeyError, ValueError) as e:
            raise PartialLabelError(f"{what}: no feature stage for feature_level {self.feature_level} ({e}); "
                                    "set feature_level to a number of downsamplings the network has") from None

    def load_teachers(self) -> List[Teacher]:
        """The registry's teachers for this configuration and fold, checked, built and frozen."""
        from nnunet_partial.teachers import Parent, check_teacher_model
        name = self.plans_manager.dataset_name
        if self.label_manager.has_regions or self.label_manager.ignore_label is not None:
            raise PartialLabelError(f"{self.__class__.__name__} needs plain integer labels: region-based labels and "
                                    "the ignore label have no single-organ teachers.")
        registry = load_teacher_registry(self.preprocessed_dataset_folder_base, self.dataset_json)
        if registry is None or not registry.teachers:
            raise FileNotFoundError(
                f"{self.__class__.__name__}: {name} has no teachers ({self.teacher_registry_path()} is missing or "
                f"empty): run nnunet-partial teachers {int(name[7:10])} -c {self.configuration_name} --train "
                "first (it makes, trains and registers one single-organ teacher per label)")
        parent = Parent(int(name[7:10]), name, "", self.preprocessed_dataset_folder_base, self.dataset_json, {},
                        self.annotations)
        fold = str(self.teacher_fold) if self.teacher_fold is not None else str(self.fold)
        student_arch = self.configuration_manager.network_arch_init_kwargs
        stage = self.feature_stage(student_arch, f"student {name}")
        teachers = []
        for entry in sorted(registry.teachers.values(), key=lambda e: e.label_value):
            folder = check_teacher_model(entry, parent, self.configuration_name, fold, self.teacher_trainer,
                                         self.teacher_checkpoint, self.plans_manager.plans)
            teachers.append(self.build_teacher(entry, folder, fold, stage, student_arch))
        missing = [n for n, v in self.dataset_json["labels"].items() if v not in [t.label_value for t in teachers]
                   and n != "background"]
        self.print_to_log_file(
            f"MS-KD: {len(teachers)} teacher(s) of fold {fold} ({self.teacher_checkpoint}): "
            + ", ".join(f"{t.label} -> channel {t.channel} ({t.dataset})" for t in teachers)
            + f"; λ1 {self.lambda_background}, λ2 {self.lambda_feature}, features after {self.feature_level} "
              f"downsampling(s) (encoder stage {stage}, {student_arch['features_per_stage'][stage]} channels, "
              f"mask {self.feature_mask_downsampling}-downsampled); ground-truth term "
              f"{'on, weight %g' % self.ground_truth_weight if self.ground_truth_loss_enabled() else 'off'}; deep "
              f"supervision {'on (ground truth only)' if self.enable_deep_supervision else 'off'}"
            + (f". No teacher for {missing}: learnt from the ground-truth term only" if missing else ""),
            also_print_to_console=True)
        return teachers

    def build_teacher(self, entry, folder: str, fold: str, stage: int, student_arch: dict) -> Teacher:
        from batchgenerators.utilities.file_and_folder_operations import load_json
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        what = f"teacher of '{entry.label}' ({entry.dataset})"
        fix = f"re-run nnunet-partial teachers {int(self.plans_manager.dataset_name[7:10])} (it moves the " \
              f"student's plans over) and retrain the teacher"
        plans_manager = PlansManager(load_json(os.path.join(folder, "plans.json")))
        dataset_json = load_json(os.path.join(folder, "dataset.json"))
        config = plans_manager.get_configuration(self.configuration_name)
        arch = config.network_arch_init_kwargs
        if not _same_strides(arch.get("strides", []), student_arch["strides"]):
            raise PartialLabelError(
                f"{what} pools with strides {arch.get('strides')} ({len(arch.get('strides', [])) - 1} pooling steps), "
                f"the student with {student_arch['strides']} ({len(student_arch['strides']) - 1}): its features "
                f"cannot be compared; {fix}")
        teacher_stage = self.feature_stage(arch, what)
        widths = (arch["features_per_stage"][teacher_stage], student_arch["features_per_stage"][stage])
        if widths[0] != widths[1]:
            raise PartialLabelError(
                f"{what} has {widths[0]} channels after {self.feature_level} downsampling(s), the student {widths[1]}: "
                "sorted channel distributions compare only at equal widths; train the teacher with the student's "
                f"plans ({fix}), or choose a feature_level at which the widths agree (a subclass)")
        # binary: check_teacher_model refused any teacher whose labels are not {background, its label}
        outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
        checkpoint = torch.load(os.path.join(folder, f"fold_{fold}", self.teacher_checkpoint), map_location="cpu",
                                weights_only=False)
        trainer_class = _trainer_class(checkpoint["trainer_name"])
        network = trainer_class.build_network_architecture(
            plans_manager, config, determine_num_input_channels(plans_manager, config, dataset_json), outputs,
            enable_deep_supervision=False)
        network.load_state_dict(checkpoint["network_weights"])
        network.to(self.device).eval().requires_grad_(False)
        features = StageOutput(network.encoder.stages[teacher_stage])
        return Teacher(entry.label, entry.label_value, self.label_manager.all_labels.index(entry.label_value),
                       entry.dataset, folder, fold, network, features)

    def configure_optimizers(self):
        # nnU-Net calls this between building the student and wrapping it in DDP. Without deep supervision the
        # lower heads (decoder.seg_layers[:-1]) produce no output: frozen here, so that DDP, which stops on
        # trainable parameters without a gradient, never sees them (inference does not use them either)
        if not self.enable_deep_supervision:
            for head in unwrap(self.network).decoder.seg_layers[:-1]:
                head.requires_grad_(False)
        return super().configure_optimizers()

    def build_extra_networks(self) -> None:
        # after nnU-Net's compile / DDP wrap, before the first forward (torch.compile traces the hook then)
        stage = encoder_stage_after(self.configuration_manager.network_arch_init_kwargs["strides"], self.feature_level)
        self.student_features = StageOutput(unwrap(self.network).encoder.stages[stage])

    def candidate_networks(self) -> Dict[str, nn.Module]:
        return {"student": self.network}

    def extra_checkpoint_state(self) -> dict:
        # the teachers' weights are not saved (--c reloads them); which ones taught is recorded
        return {"mskd_teachers": {t.label: [t.folder, t.fold, self.teacher_checkpoint] for t in self.teachers}}

    def load_extra_checkpoint_state(self, state: dict) -> None:
        now = self.extra_checkpoint_state()["mskd_teachers"]
        if state.get("mskd_teachers", now) != now:
            self.print_to_log_file(f"WARNING: resuming with other teachers ({now}) than the checkpoint was trained "
                                   f"with ({state['mskd_teachers']})", also_print_to_console=True)

    # ------------------------------------------------------------------ training
    def teacher_outputs(self, data: torch.Tensor):
        """(K, B, 2, *S) teacher probabilities and (K, B, F, *S_l) features on ``data``, as plain tensors."""
        with torch.inference_mode(), autocast_context(self.device):
            probs = torch.stack([torch.softmax(t.network(data).float(), 1) for t in self.teachers])
            features = torch.stack([t.features.pop() for t in self.teachers])
        # inference tensors cannot be saved for backward: the loss gets ordinary copies
        return probs.clone(), features.clone()

    def mskd_losses(self, output, student_features: torch.Tensor, teacher_probs: torch.Tensor,
                    teacher_features: torch.Tensor, target, annotated: torch.Tensor) -> dict:
        """All terms of one step (unweighted, with graph) and ``loss``, their weighted sum."""
        full = output[0] if isinstance(output, (list, tuple)) else output
        logit, background = logit_losses(teacher_probs, full, [t.channel for t in self.teachers])
        feature = feature_loss(teacher_features, student_features, teacher_masks(teacher_probs)[0],
                               self.feature_mask_downsampling)
        loss = logit + self.lambda_background * background + self.lambda_feature * feature
        terms = {"logit": logit, "background": background, "feature": feature}
        if self.ground_truth_loss_enabled():
            terms["gt"] = self.supervised_loss(output, target, annotated)
            loss = loss + self.ground_truth_weight * terms["gt"]
        return {"loss": loss, **terms}

    def train_step(self, batch: dict) -> dict:
        data, target = batch_to_device(batch, self.device)
        annotated = self.batch_annotated_mask(batch["keys"])
        teacher_probs, teacher_features = self.teacher_outputs(data)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.device):
            output = self.network(data)
            terms = self.mskd_losses(output, self.student_features.pop(), teacher_probs, teacher_features, target,
                                     annotated)
        backward_and_step(terms["loss"], [(self.network, self.optimizer)], self.grad_scaler)
        self.global_step += 1
        # one device-to-host copy for the loss and its terms (a term that is off is NaN)
        names = [k for k in ("loss", "logit", "background", "feature", "gt") if k in terms]
        values = dict(zip(names, host_values([terms[k] for k in names])))
        return {"loss": values["loss"], **{f"mskd_{k}_loss": float(values.get(k, np.nan))
                                           for k in ("logit", "background", "feature", "gt")}}

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        collated = collate_outputs(train_outputs)
        means = {k: float(np.mean(self.all_ranks(float(np.mean(collated[k]))))) for k in LOG_KEYS}
        for k, v in means.items():
            self.logger.log(k, v, self.current_epoch)
        self.print_to_log_file("MS-KD terms (unweighted): " + ", ".join(f"{k[5:-5]} {v:.4g}" for k, v in means.items()))


class nnUNetTrainerMSKDNoGroundTruth(nnUNetTrainerMSKD):
    """Benchmark ablation: distillation alone (the paper's loss), without the marginal ground-truth term that
    ``nnUNetTrainerMSKD`` adds where the dataset has ``annotated_labels``."""
    use_ground_truth_loss = False
