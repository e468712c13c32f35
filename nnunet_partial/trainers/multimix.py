"""``nnUNetTrainerMultiMix``: joint semi-supervised classification + segmentation with a saliency bridge
(METHODS §5; Haque et al., *MultiMix*, ISBI 2021 / MELBA 2021). Docs: docs/multimix.md.

- Network: nnU-Net's own U-Net for the plans (2D / 3D, PlainConvUNet / ResEnc) wrapped by
  :class:`~nnunet_partial.networks.MultiMixNetwork` (classification head on the deepest encoder
  features, saliency bridge into the first decoder stage), built in ``build_network_architecture``
  so ``nnUNetv2_predict -tr nnUNetTrainerMultiMix`` rebuilds and loads it unchanged.
- Data: ``class_names`` + ``class_labels`` in dataset.json (nnunet_partial/annotations.py
  :class:`ClassLabels`) beside ``annotated_labels``; a case may have a segmentation, a class label,
  both or neither. With unsegmented cases (``annotated_labels: []``) in the split, batches are
  Mean Teacher's two-stream batches (``labeled_batch_size`` segmented cases, the rest unsegmented).
- Loss (one backward, one forward call per step):
  ``α·DC+CE(segmented cases; marginal with annotated_labels) + β·KL(p̄_seg ‖ p̄_unseg)
  + w_cls·(CE(class-labelled cases) + λ·1[max ĉ_w ≥ t]·CE(ĉ_s, argmax ĉ_w))``.
  Weak view = the batch nnU-Net's pipeline delivers; strong view = :meth:`strong_view` of the same
  crops (class-unlabelled cases only), classified by the same forward call (``classify_also``).
- Validation: the inherited partial-aware segmentation validation plus patch-level classification
  accuracy / AUC per epoch; after training the validation cases are classified whole (sliding window,
  patch probabilities averaged) and accuracy / AUC go into ``validation/summary.json``
  (``"classification"``) and ``validation/classification.json``.

Variants are class attributes (``saliency_bridge``, ``use_pseudo_labels``; see scripts/benchmark_multimix.py).
"""
from __future__ import annotations

import functools
import json
import os
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

from nnunet_partial.annotations import ClassLabels, PartialLabelError
from nnunet_partial.augmentation import default_strong_transforms, strong_view
from nnunet_partial.losses.multimix import (pseudo_label_loss, segmentation_distribution_kl,
                                            supervised_classification_loss)
from nnunet_partial.networks import MultiMixNetwork, multimix_module
from nnunet_partial.trainers.common import (autocast_context, backward_and_step, batch_to_device, host_values,
                                            plot_logged_groups, register_log_keys)
from nnunet_partial.trainers.mean_teacher import (_full_resolution, _take_rows,
                                                  nnUNetTrainerMeanTeacher)
from nnunet_partial.trainers.partial import nnUNetTrainerPartial

TRAIN_LOG_KEYS = ("mm_segmentation_loss", "mm_kl_loss", "mm_classification_loss", "mm_pseudo_loss",
                  "mm_pseudo_usage", "mm_train_accuracy")
VAL_LOG_KEYS = ("mm_val_accuracy", "mm_val_auc")


# ---------------------------------------------------------------------- classification metrics
def classification_metrics(probabilities: np.ndarray, targets: np.ndarray) -> dict:
    """Accuracy and AUC of ``probabilities`` (N, n) against class indices ``targets`` (N,; -1 = no label,
    ignored). AUC: binary ROC AUC of class 1, one-vs-rest macro average for n > 2; NaN when the labelled
    cases hold fewer than two classes (AUC undefined)."""
    from sklearn.metrics import roc_auc_score
    probabilities, targets = np.asarray(probabilities, dtype=np.float64), np.asarray(targets)
    keep = targets >= 0
    p, y = probabilities[keep], targets[keep]
    out = {"n_cases": int(keep.sum()), "accuracy": float("nan"), "auc": float("nan")}
    if len(y) == 0:
        return out
    out["accuracy"] = float(np.mean(p.argmax(1) == y))
    if len(np.unique(y)) >= 2:
        if p.shape[1] == 2:
            out["auc"] = float(roc_auc_score(y, p[:, 1]))
        elif len(np.unique(y)) == p.shape[1]:
            out["auc"] = float(roc_auc_score(y, p / p.sum(1, keepdims=True), multi_class="ovr"))
    return out


def combine_patch_probabilities(patch_probabilities: Sequence[torch.Tensor]) -> np.ndarray:
    """One case's class probabilities (n,) from the softmax outputs (P_i, n) of every network call of its
    sliding-window prediction (patches, mirrorings, folds): their unweighted mean. nnU-Net's Gaussian
    weighting is per voxel and has no meaning for a patch-level score."""
    if not patch_probabilities:
        raise RuntimeError("no classification output was recorded: is the network a MultiMixNetwork?")
    return torch.cat([p.float() for p in patch_probabilities]).mean(0).numpy()


# ---------------------------------------------------------------------- trainer
class nnUNetTrainerMultiMix(nnUNetTrainerPartial):
    saliency_bridge: bool = True           # variant "no bridge": False
    use_pseudo_labels: bool = True         # variant "no pseudo labels": False
    segmentation_weight: float = 1.0       # α (nnU-Net's DC+CE, marginal with annotated_labels)
    kl_weight: float = 0.1                 # β (segmentation consistency KL)
    classification_weight: float = 1.0    # weight of the whole classification loss
    pseudo_threshold: float = 0.7          # t
    pseudo_weight: float = 0.25            # λ
    strong_num_ops: tuple = (1, 3)         # transforms per strong view
    labeled_batch_size: Optional[int] = None   # segmented cases per batch (two-stream); None = ceil(batch / 2)
    # test-time mirroring in the final validation's whole-image classification pass (a second sliding-window pass
    # after nnU-Net's: mirroring would multiply its cost by up to 8 for little change in an image-level score)
    validation_classification_mirroring: bool = False

    # Mean Teacher's two-stream batches and its selection of the segmented cases (rows known on the host)
    effective_labeled_batch_size = nnUNetTrainerMeanTeacher.effective_labeled_batch_size
    _supervised_part = nnUNetTrainerMeanTeacher._supervised_part
    labelled_cases = nnUNetTrainerMeanTeacher.labelled_cases   # the segmented cases, rows known on the host

    # ------------------------------------------------------------------ network
    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True,
                                   num_image_classes: int = 2) -> nn.Module:
        """nnU-Net's network for the plans inside :class:`MultiMixNetwork`. ``nnUNetv2_predict`` calls this
        without ``num_image_classes`` (it has no dataset metadata at that point); the network then takes the
        number of classes from the checkpoint when it loads it (``MultiMixNetwork.load_state_dict``)."""
        plain = nnUNetTrainerPartial.build_network_architecture(
            plans_manager, configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision)
        return MultiMixNetwork(plain, num_input_channels, num_image_classes, saliency_bridge=cls.saliency_bridge)

    def initialize(self):
        if self.was_initialized:
            return super().initialize()  # nnU-Net raises its own error
        self.class_labels = ClassLabels.from_dataset_json(self.dataset_json)
        if self.class_labels is None:
            raise PartialLabelError(
                f"{self.__class__.__name__} needs image-level classes in dataset.json: 'class_names' (at least two) "
                "and 'class_labels' (case id -> class name; cases without one are left out). Add them (nnunet-partial "
                "merge --class-labels CSV writes both) and re-run nnUNetv2_plan_and_preprocess, or train "
                "nnUNetTrainerPartial for segmentation only.")
        # nnU-Net's initialize calls self.build_network_architecture(...) without the class count: shadow it for
        # this one call on the instance (the class's method stays as the predictor needs it)
        self.build_network_architecture = functools.partial(type(self).build_network_architecture,
                                                            num_image_classes=self.class_labels.num_classes)
        try:
            super().initialize()
        finally:
            del self.build_network_architecture
        if self.preprocessed_dataset_folder is not None and os.path.isdir(self.preprocessed_dataset_folder):
            ClassLabels.from_dataset_json(self.dataset_json,
                                          self.dataset_class.get_identifiers(self.preprocessed_dataset_folder),
                                          source=f"dataset.json of {self.preprocessed_dataset_folder}")
        cases = sorted(self.class_labels.labels)
        self._class_row = {c: i for i, c in enumerate(cases)}
        # device-side table: a batch's targets are a stack of row views, no host->device copy per step
        self._class_rows = torch.tensor([self.class_labels.labels[c] for c in cases] + [-1], dtype=torch.long,
                                        device=self.device).unbind(0)
        self.strong_transforms = default_strong_transforms()
        register_log_keys(self.logger, TRAIN_LOG_KEYS + VAL_LOG_KEYS)
        counts = ", ".join(f"{n} {c}" for n, c in self.class_labels.counts().items())
        self.print_to_log_file(
            f"MultiMix: {self.class_labels.num_classes} image classes ({counts} class-labelled cases), saliency bridge "
            f"{'on' if self.saliency_bridge else 'off'}, pseudo labels {'on' if self.use_pseudo_labels else 'off'} "
            f"(t={self.pseudo_threshold}, λ={self.pseudo_weight}), α={self.segmentation_weight}, β={self.kl_weight}")

    def batch_class_targets(self, keys) -> torch.Tensor:
        """(B,) int64 class index per case on the device, -1 for a case without a class label."""
        missing = len(self._class_rows) - 1
        return torch.stack([self._class_rows[self._class_row.get(k, missing)] for k in keys])

    # ------------------------------------------------------------------ data
    def make_training_loader(self, data, *args, **kwargs):
        if self.annotations is not None and any(self.annotations.is_unlabelled(k) for k in data.identifiers):
            return nnUNetTrainerMeanTeacher.make_training_loader(self, data, *args, **kwargs)
        return super().make_training_loader(data, *args, **kwargs)  # every case segmented: Partial's sampling

    def strong_view(self, data: torch.Tensor) -> torch.Tensor:
        return strong_view(data, self.strong_transforms, self.strong_num_ops)

    # ------------------------------------------------------------------ training
    def multimix_losses(self, data: torch.Tensor, target, keys) -> dict:
        """The loss terms of one batch (with graphs) and the values to log (detached)."""
        annotated = self.batch_annotated_mask(keys)
        segmented = self.labelled_cases(keys, annotated)
        class_targets = self.batch_class_targets(keys)
        # strong views of the same crops of the cases without a class label
        pseudo_rows = tuple(i for i, k in enumerate(keys) if k not in self.class_labels.labels) \
            if self.use_pseudo_labels else ()
        strong = self.strong_view(_take_rows(data, pseudo_rows)) if pseudo_rows else None

        out = self.network(data, return_classification=True, classify_also=strong)
        seg_out, class_logits = out[0], out[1]
        zero = class_logits.sum() * 0.0
        terms = {"segmentation": self._supervised_part(seg_out, target, annotated, segmented),
                 "kl": segmentation_distribution_kl(_full_resolution(seg_out), segmented),
                 "classification": supervised_classification_loss(class_logits, class_targets)}
        if strong is not None:
            weak = _take_rows(class_logits, pseudo_rows)
            terms["pseudo"], usage = pseudo_label_loss(out[2], weak, torch.ones_like(weak[:, 0], dtype=torch.bool),
                                                       self.pseudo_threshold)
        else:
            terms["pseudo"], usage = zero, zero.detach()
        labelled = (class_targets >= 0).float()
        correct = ((class_logits.detach().argmax(1) == class_targets).float() * labelled).sum()
        terms["usage"] = usage.detach()
        terms["accuracy"] = correct / labelled.sum().clamp_min(1.0)
        return terms

    def total_loss(self, terms: dict) -> torch.Tensor:
        return (self.segmentation_weight * terms["segmentation"] + self.kl_weight * terms["kl"]
                + self.classification_weight * (terms["classification"] + self.pseudo_weight * terms["pseudo"]))

    def train_step(self, batch: dict) -> dict:
        data, target = batch_to_device(batch, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.device):
            terms = self.multimix_losses(data, target, batch["keys"])
            loss = self.total_loss(terms)
        backward_and_step(loss, [(self.network, self.optimizer)], self.grad_scaler)
        values = host_values([loss, terms["segmentation"], terms["kl"], terms["classification"], terms["pseudo"],
                              terms["usage"], terms["accuracy"]])  # one device->host copy, as nnU-Net's step
        return {"loss": values[0, ...], **{k: float(v) for k, v in zip(TRAIN_LOG_KEYS, values[1:])}}

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        means = {k: float(np.mean(self.all_ranks(float(np.mean([o[k] for o in train_outputs]))))) for k in TRAIN_LOG_KEYS}
        for k, v in means.items():
            self.logger.log(k, v, self.current_epoch)
        self.print_to_log_file(
            f"MultiMix: seg {means['mm_segmentation_loss']:.4f}, KL {means['mm_kl_loss']:.3e}, cls "
            f"{means['mm_classification_loss']:.4f} (train acc {means['mm_train_accuracy']:.3f}), pseudo "
            f"{means['mm_pseudo_loss']:.4f} (used on {100 * means['mm_pseudo_usage']:.0f} % of eligible cases)")

    # ------------------------------------------------------------------ online validation
    def validation_step(self, batch: dict) -> dict:
        data, target = batch_to_device(batch, self.device)
        annotated = self.batch_annotated_mask(batch["keys"])
        with autocast_context(self.device):
            output, class_logits = self.network(data, return_classification=True)
            loss = self.supervised_loss(output, target, annotated)
        out = {"loss": loss.detach().cpu().numpy(), **self.partial_tp_fp_fn(output, target, annotated)}
        out["class_probabilities"] = torch.softmax(class_logits.detach().float(), 1).cpu().numpy()
        out["class_targets"] = np.array([self.class_labels.index_of(k) for k in batch["keys"]])
        return out

    def on_validation_epoch_end(self, val_outputs):
        super().on_validation_epoch_end(val_outputs)
        probs = np.concatenate([o["class_probabilities"] for o in val_outputs])
        targets = np.concatenate([o["class_targets"] for o in val_outputs])
        gathered = self.all_ranks((probs, targets))
        m = classification_metrics(np.concatenate([g[0] for g in gathered]), np.concatenate([g[1] for g in gathered]))
        self.logger.log("mm_val_accuracy", m["accuracy"], self.current_epoch)
        self.logger.log("mm_val_auc", m["auc"], self.current_epoch)
        self.print_to_log_file(f"MultiMix online validation (patches of {m['n_cases']} class-labelled crops): "
                               f"accuracy {m['accuracy']:.3f}, AUC {m['auc']:.3f}")

    def on_epoch_end(self):
        super().on_epoch_end()
        if self.local_rank == 0:
            self.plot_multimix_progress()

    def plot_multimix_progress(self) -> None:
        groups = {"MultiMix loss terms (unweighted)": ["mm_segmentation_loss", "mm_kl_loss", "mm_classification_loss",
                                                       "mm_pseudo_loss"],
                  "classification": ["mm_train_accuracy", "mm_val_accuracy", "mm_val_auc", "mm_pseudo_usage"]}
        plot_logged_groups(self.logger, groups, os.path.join(self.output_folder, "progress_multimix.png"))

    # ------------------------------------------------------------------ final validation
    def perform_actual_validation(self, save_probabilities: bool = False):
        super().perform_actual_validation(save_probabilities)
        if self.local_rank != 0:
            return
        result = self.classify_validation_cases()
        summary_file = os.path.join(self.output_folder, "validation", "summary.json")
        if os.path.isfile(summary_file):
            with open(summary_file) as f:
                summary = json.load(f)
            summary["classification"] = result["metrics"]
            with open(summary_file, "w") as f:
                json.dump(summary, f, indent=2)
        m = result["metrics"]
        self.print_to_log_file(f"MultiMix validation classification ({m['n_cases']} class-labelled cases, whole images): "
                               f"accuracy {m['accuracy']:.4f}, AUC {m['auc']:.4f}", also_print_to_console=True)

    def classify_validation_cases(self) -> dict:
        """Class probabilities of every validation case from nnU-Net's sliding-window prediction of the whole
        preprocessed image (patch probabilities averaged); written to ``validation/classification.json``."""
        self.set_deep_supervision_enabled(False)
        self.network.eval()
        net = multimix_module(self.network)
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True,
                                    use_mirroring=self.validation_classification_mirroring,
                                    perform_everything_on_device=True, device=self.device, verbose=False,
                                    verbose_preprocessing=False, allow_tqdm=False)
        predictor.manual_initialization(self.network, self.plans_manager, self.configuration_manager, None,
                                        self.dataset_json, self.__class__.__name__,
                                        self.inference_allowed_mirroring_axes)
        _, val_keys = self.do_split()
        dataset_val = self.dataset_class(self.preprocessed_dataset_folder, val_keys)
        cases = {}
        net.record_classification = True
        try:
            for k in dataset_val.identifiers:
                data = torch.from_numpy(np.asarray(dataset_val.load_case(k)[0][:], dtype=np.float32))
                net.recorded_probabilities.clear()
                predictor.predict_sliding_window_return_logits(data)
                cases[k] = combine_patch_probabilities(net.recorded_probabilities)
        finally:
            net.record_classification = False
            net.recorded_probabilities.clear()
            self.set_deep_supervision_enabled(True)  # as nnU-Net leaves it after its validation
        keys = sorted(cases)
        probs = np.stack([cases[k] for k in keys]) if keys else np.zeros((0, self.class_labels.num_classes))
        metrics = classification_metrics(probs, np.array([self.class_labels.index_of(k) for k in keys]))
        out = {"class_names": list(self.class_labels.names), "metrics": metrics,
               "cases": {k: {"probabilities": dict(zip(self.class_labels.names, map(float, cases[k]))),
                             "predicted_class": self.class_labels.names[int(np.argmax(cases[k]))],
                             "class_label": (self.class_labels.names[self.class_labels.index_of(k)]
                                             if k in self.class_labels.labels else None)} for k in keys}}
        os.makedirs(os.path.join(self.output_folder, "validation"), exist_ok=True)
        with open(os.path.join(self.output_folder, "validation", "classification.json"), "w") as f:
            json.dump(out, f, indent=2)
        return out


class nnUNetTrainerMultiMixNoBridge(nnUNetTrainerMultiMix):
    """Benchmark variant (b): no saliency bridge (classification head and pseudo labels kept)."""
    saliency_bridge = False


class nnUNetTrainerMultiMixNoPseudo(nnUNetTrainerMultiMix):
    """Benchmark variant (c): no pseudo labels (class-labelled cases only for classification)."""
    use_pseudo_labels = False


# ---------------------------------------------------------------------- prediction (nnunet-partial predict-class)
CLASSIFICATION_FILE = "classification.json"


class ClassRecordingPredictor(nnUNetPredictor):
    """nnU-Net's predictor that also collects the class probabilities of each case it predicts."""

    def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                   num_processes_segmentation_export: int = 2):
        net = multimix_module(self.network)
        if net is None:
            raise RuntimeError(f"predict-class needs a model trained with nnUNetTrainerMultiMix (or a variant); this "
                               f"one's network is {type(self.network).__name__}. Use nnUNetv2_predict.")
        self.class_probabilities, self._current_case = {}, None

        def tagged(iterator):
            # the predictor finishes one case before it asks for the next: the case being predicted is known
            for item in iterator:
                self._current_case = item["ofile"]
                yield item

        net.record_classification = True
        try:
            result = super().predict_from_data_iterator(tagged(data_iterator), save_probabilities,
                                                        num_processes_segmentation_export)
        finally:
            net.record_classification = False
            net.recorded_probabilities.clear()
        self.write_classification()
        return result

    def predict_logits_from_preprocessed_data(self, data):
        net = multimix_module(self.network)
        net.recorded_probabilities.clear()
        logits = super().predict_logits_from_preprocessed_data(data)
        if self._current_case is not None:
            self.class_probabilities[self._current_case] = combine_patch_probabilities(net.recorded_probabilities)
        return logits

    def class_names(self) -> list:
        classes = ClassLabels.from_dataset_json(self.dataset_json)
        n = len(next(iter(self.class_probabilities.values()))) if self.class_probabilities else 0
        return list(classes.names) if classes is not None and classes.num_classes == n else [str(j) for j in range(n)]

    def write_classification(self) -> None:
        folders = {os.path.dirname(f) for f in self.class_probabilities}
        names = self.class_names()
        for folder in folders:
            path = os.path.join(folder, CLASSIFICATION_FILE)
            existing = {}
            if os.path.isfile(path):  # cases predicted earlier into the same folder stay
                with open(path) as f:
                    existing = json.load(f).get("cases", {})
            for ofile, p in self.class_probabilities.items():
                if os.path.dirname(ofile) == folder:
                    existing[os.path.basename(ofile)] = {"probabilities": dict(zip(names, map(float, p))),
                                                         "predicted_class": names[int(p.argmax())]}
            out = {"class_names": names,
                   "combination": "mean of the softmax class probabilities of every sliding-window patch, mirroring "
                                  "(TTA) and fold",
                   "cases": dict(sorted(existing.items()))}
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(out, f, indent=2)
            os.replace(tmp, path)
