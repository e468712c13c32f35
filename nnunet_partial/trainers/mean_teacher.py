"""``nnUNetTrainerMeanTeacher``: semi-supervised Mean Teacher (METHODS §3; Tarvainen & Valpola,
NeurIPS 2017, as in the UA-MT / SSL4MIS code for 3D segmentation).

- Batches: ``labeled_batch_size`` labelled cases + unlabelled cases (``annotated_labels: []``)
  for the rest, drawn by :class:`~nnunet_partial.dataloading.TwoStreamDataLoader` inside nnU-Net's
  own data pipeline (crops, foreground oversampling, augmentation unchanged).
- Teacher: EMA of the student (``EMATwin``, α = 0.99, warm-up ``min(1 − 1/(t+1), α)``), updated
  after every optimiser step; it sees the student's augmented crops plus
  ``clamp(N(0,1)·0.1, −0.2, 0.2)``; it is never trained, compiled or DDP-wrapped.
- Loss (one backward): nnU-Net's DC+CE — marginal for partially labelled cases — on the labelled
  cases, plus ``w_max·sigmoid_rampup(step, T)·consistency`` between the softmax outputs of student
  and teacher on the unlabelled cases (``consistency_on = "all"``: every case). Consistency uses the
  full-resolution output only, as the reference (which has no deep supervision): the
  lower-resolution heads stay supervised by nnU-Net's deep supervision on the labelled cases.
- Ramp-up length ``T = consistency_rampup_fraction × num_epochs × num_iterations_per_epoch``: the
  reference ramps up over 40 × 150 = 6000 iterations of its 6000, i.e. the whole run (fraction 1).
- Student and teacher are validated every epoch; the better one is exported (CandidateExportMixin).

Change a default with a two-line subclass::

    class nnUNetTrainerMeanTeacherKL(nnUNetTrainerMeanTeacher):
        consistency_type = "kl"
"""
from __future__ import annotations

import math
from typing import List, Optional

import numpy as np
import torch

from nnunet_partial.dataloading import TwoStreamDataLoader, split_labelled_unlabelled
from nnunet_partial.losses.consistency import ConsistencyLoss
from nnunet_partial.trainers.candidates import CandidateExportMixin
from nnunet_partial.trainers.common import (EMATwin, autocast_context, backward_and_step, batch_to_device,
                                            host_values, sigmoid_rampup)
from nnunet_partial.trainers.partial import nnUNetTrainerPartial

LOG_KEYS = ("supervised_loss", "consistency_loss", "consistency_weight")


def labelled_per_rank(global_batch: int, labelled: int, world_size: int) -> int:
    """Labelled cases in each DDP rank's part of nnU-Net's global batch: ``ceil(labelled / world_size)``,
    the same on every rank (the batch Dice gathers per-case tensors over the ranks, so every rank's
    labelled sub-batch needs one shape), so the ranks together never hold fewer labelled cases than one
    process would. Every rank also needs an unlabelled case."""
    sizes = [global_batch // world_size + (1 if r < global_batch % world_size else 0) for r in range(world_size)]
    share = math.ceil(labelled / world_size)
    if not 1 <= share <= min(sizes) - 1:
        raise ValueError(
            f"Mean Teacher under DDP needs a labelled and an unlabelled case in every GPU's part of the batch: the "
            f"batch of {global_batch} over {world_size} GPUs gives {sizes} cases per GPU, {labelled} of them "
            f"labelled ({share} per GPU). Use fewer GPUs, a larger batch size (plans) or a smaller "
            f"labeled_batch_size.")
    return share


def _full_resolution(output):
    return output[0] if isinstance(output, (list, tuple)) else output


def with_host_rows(mask: torch.Tensor, rows) -> torch.Tensor:
    """``mask`` (a (B,) bool device tensor) with the positions of its True entries, known on the host from
    the batch's keys, attached as ``mask.host_rows``. The helpers below then test and select cases from
    those rows instead of reading the mask back from the device (``if mask.any()`` and ``x[mask]`` wait
    for the GPU every step). A mask without rows takes the tensor path, as before."""
    mask.host_rows = tuple(rows)
    return mask


def _host_rows(mask: torch.Tensor):
    return getattr(mask, "host_rows", None)


def _any(mask: torch.Tensor) -> bool:
    rows = _host_rows(mask)
    return bool(mask.any()) if rows is None else len(rows) > 0


def _all(mask: torch.Tensor) -> bool:
    rows = _host_rows(mask)
    return bool(mask.all()) if rows is None else len(rows) == mask.shape[0]


def _take_rows(t: torch.Tensor, rows: tuple) -> torch.Tensor:
    """``t[rows]`` for host-known rows, in order: a view for consecutive rows (Mean Teacher's batches put
    the labelled cases last), else one concatenation of views; no index tensor crosses to the device."""
    if not rows or rows == tuple(range(rows[0], rows[0] + len(rows))):
        return t[rows[0]:rows[0] + len(rows)] if rows else t[:0]
    return torch.cat([t[i:i + 1] for i in rows])


def _select_cases(x, mask: torch.Tensor):
    rows = _host_rows(mask)
    if rows is None:
        return [t[mask] for t in x] if isinstance(x, (list, tuple)) else x[mask]
    return [_take_rows(t, rows) for t in x] if isinstance(x, (list, tuple)) else _take_rows(x, rows)


class nnUNetTrainerMeanTeacher(CandidateExportMixin, nnUNetTrainerPartial):
    labeled_batch_size: Optional[int] = None      # labelled cases per (global) batch; None = ceil(batch_size / 2)
    ema_decay: float = 0.99                       # α of the teacher (with the warm-up rule)
    teacher_noise_std: float = 0.1                # teacher input noise: clamp(N(0,1)·std, ±clamp)
    teacher_noise_clamp: float = 0.2
    consistency_type: str = "mse"                 # "mse" (softmax MSE) or "kl"
    consistency_on: str = "unlabelled"            # "unlabelled" or "all" cases of the batch
    consistency_weight: float = 0.1               # w_max
    consistency_rampup_fraction: float = 1.0      # ramp-up length / total optimiser steps (reference: 1)

    extra_plot_groups = {"Mean Teacher loss terms (consistency unweighted)": ["supervised_loss", "consistency_loss"],
                         "consistency weight": ["consistency_weight"]}

    # ------------------------------------------------------------------ set-up
    def build_extra_networks(self) -> None:
        if self.consistency_on not in ("unlabelled", "all"):
            raise ValueError(f"consistency_on must be 'unlabelled' or 'all', got {self.consistency_on!r}")
        self.consistency_loss = ConsistencyLoss(self.consistency_type)
        self.teacher = EMATwin(self.network, decay=self.ema_decay, warmup=True)
        self.print_to_log_file(
            f"Mean Teacher: {self.effective_labeled_batch_size()} labelled of {self.batch_size} cases per batch, "
            f"EMA decay {self.ema_decay} (warm-up), {self.consistency_type} consistency on {self.consistency_on} "
            f"cases, weight {self.consistency_weight} ramped up over {self.consistency_rampup_steps()} steps")

    def candidate_networks(self):
        # teacher first: exported whenever validation cannot tell them apart (no scored label, a tie);
        # the average is the more stable network at short schedules
        return {"teacher": self.teacher.module, "student": self.network}

    def extra_checkpoint_state(self) -> dict:
        return {"teacher": self.teacher.state_dict()}

    def load_extra_checkpoint_state(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])

    def effective_labeled_batch_size(self) -> int:
        """Labelled cases per batch of this process. ``labeled_batch_size`` counts in nnU-Net's batch, which
        under DDP is the global one, split over the ranks: the labelled share is split with it
        (:func:`labelled_per_rank`) and a rank too small for both kinds of case stops with the fix."""
        if not self.is_ddp:
            return self.labeled_batch_size if self.labeled_batch_size is not None else math.ceil(self.batch_size / 2)
        global_batch = self.configuration_manager.batch_size
        labelled = self.labeled_batch_size if self.labeled_batch_size is not None else math.ceil(global_batch / 2)
        return labelled_per_rank(global_batch, labelled, torch.distributed.get_world_size())

    def consistency_rampup_steps(self) -> int:
        return int(round(self.consistency_rampup_fraction * self.total_iterations()))

    def current_consistency_weight(self) -> float:
        return self.consistency_weight * sigmoid_rampup(self.global_step, self.consistency_rampup_steps())

    # ------------------------------------------------------------------ data
    def make_training_loader(self, data, *args, **kwargs):
        labelled, unlabelled = split_labelled_unlabelled(data.identifiers, self.annotations, type(self).__name__)
        self.print_to_log_file(f"Two-stream sampling: {len(labelled)} labelled and {len(unlabelled)} "
                               f"unlabelled training cases, {self.effective_labeled_batch_size()} labelled "
                               f"per batch of {self.batch_size}")
        return TwoStreamDataLoader(data, *args, labelled_keys=labelled, unlabelled_keys=unlabelled,
                                   labeled_batch_size=self.effective_labeled_batch_size(), **kwargs)

    # ------------------------------------------------------------------ training
    def train_step(self, batch: dict) -> dict:
        data, target = batch_to_device(batch, self.device)
        keys = batch["keys"]
        annotated = self.batch_annotated_mask(keys)
        labelled = self.labelled_cases(keys, annotated)
        if self.consistency_on == "unlabelled":
            counted = with_host_rows(~labelled, [i for i in range(len(keys)) if i not in labelled.host_rows])
        else:
            counted = with_host_rows(torch.ones_like(labelled), range(len(keys)))
        weight = self.current_consistency_weight()

        self.optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.device):
            output = self.network(data)
            supervised = self._supervised_part(output, target, annotated, labelled)
            consistency = self._consistency_part(output, data, counted)
            loss = supervised + weight * consistency
        backward_and_step(loss, [(self.network, self.optimizer)], self.grad_scaler)
        self.teacher.update(self.network)
        self.global_step += 1
        values = host_values([loss, supervised, consistency])   # one device->host copy, as nnU-Net's step
        return {"loss": values[0, ...], "supervised_loss": float(values[1]),
                "consistency_loss": float(values[2]), "consistency_weight": weight}

    def labelled_cases(self, keys, annotated: torch.Tensor) -> torch.Tensor:
        """(B,) bool device mask of the batch's labelled cases (``annotated.any(1)``: an unlabelled case has no
        annotated column, not even background) carrying their rows, known on the host from the keys
        (:func:`with_host_rows`): ``_supervised_part`` / ``_consistency_part`` then select cases without a sync."""
        rows = [i for i, k in enumerate(keys) if self.annotations is None or not self.annotations.is_unlabelled(k)]
        return with_host_rows(annotated.any(1), rows)

    def _supervised_part(self, output, target, annotated: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        # on the labelled cases only: unlabelled ones would add zero-loss voxels to the CE mean
        if not _any(labelled):
            return _full_resolution(output).sum() * 0.0
        if not _all(labelled):
            output, target, annotated = (_select_cases(output, labelled), _select_cases(target, labelled),
                                         _select_cases(annotated, labelled))
        return self.supervised_loss(output, target, annotated)

    def _consistency_part(self, output, data: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        student = _full_resolution(output)
        if not _any(counted):
            return student.sum() * 0.0
        with torch.no_grad():
            # the teacher runs only on the cases that count: same augmented crops, plus noise
            x = _select_cases(data, counted)
            noise = torch.clamp(torch.randn_like(x) * self.teacher_noise_std,
                                -self.teacher_noise_clamp, self.teacher_noise_clamp)
            teacher = _full_resolution(self.teacher(x + noise))
        return self.consistency_loss(_select_cases(student, counted), teacher)

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        means = {k: float(np.mean(self.all_ranks(float(np.mean([o[k] for o in train_outputs])))))
                 for k in LOG_KEYS}
        for k, v in means.items():
            self.logger.log(k, v, self.current_epoch)
        self.print_to_log_file(f"supervised loss {means['supervised_loss']:.4f}, consistency "
                               f"{means['consistency_loss']:.3e} x weight {means['consistency_weight']:.4f}")


class nnUNetTrainerMeanTeacherNoConsistency(nnUNetTrainerMeanTeacher):
    """Benchmark ablation: Mean Teacher with the consistency loss weighted 0. Same two-stream batches (half of
    each batch labelled cases) and the same EMA-teacher export, so a benchmark tells the consistency's share of
    a gain over supervised-only from the batches' (nnU-Net plans a much smaller batch for a few labelled cases)
    and the weight averaging's."""
    consistency_weight = 0.0


class nnUNetTrainerMeanTeacherStrongConsistency(nnUNetTrainerMeanTeacher):
    """Benchmark variant: the consistency ramped in over the first 30 % of the run (reference: the whole run) up to
    w_max = 1 (reference 0.1). At a short budget the reference weight stays below 0.03 for half of training; this
    row tells whether the unlabelled cases can add anything there once the consistency actually weighs."""
    consistency_weight = 1.0
    consistency_rampup_fraction = 0.3
