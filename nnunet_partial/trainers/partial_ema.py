"""``nnUNetTrainerPartialEMA``: the partial-label baseline plus weight averaging, nothing else.

An ablation (benchmark issue): CoWAM and Mean Teacher export EMA twins, so part of their stability
may come from averaging alone. This trainer is ``nnUNetTrainerPartial`` (marginal DC+CE, same
sampling, same validation) whose one network keeps an EMA twin with CoWAM's settings
(:class:`WeightAveragingSchedule`: decay 0.999, warm-up, horizon ≤ 5 % of the run), updated after
every optimiser step. Twin and network are both validated each epoch; the twin is the default and
wins ties (CandidateExportMixin), the better one is exported as ``network_weights``, so
``nnUNetv2_predict -tr nnUNetTrainerPartialEMA`` runs one plain network. No co-training, no
consistency loss: whatever CoWAM gains over this row is what co-training adds.
"""
from __future__ import annotations

from typing import Dict

from torch import nn

from nnunet_partial.trainers.candidates import CandidateExportMixin
from nnunet_partial.trainers.common import EMATwin, WeightAveragingSchedule
from nnunet_partial.trainers.partial import FixedBatchSize, nnUNetTrainerPartial


class nnUNetTrainerPartialEMA(WeightAveragingSchedule, CandidateExportMixin, nnUNetTrainerPartial):
    def build_extra_networks(self) -> None:
        decay = self.effective_ema_decay()
        self.ema = EMATwin(self.network, decay, warmup=self.ema_warmup)
        self.print_to_log_file(f"Partial + EMA: decay {decay:.5g} (ema_decay {self.ema_decay}, horizon at most "
                               f"{self.ema_horizon_fraction} of {self.total_iterations()} iterations), "
                               f"warm-up {self.ema_warmup}")

    def candidate_networks(self) -> Dict[str, nn.Module]:
        return {"ema": self.ema.module, "network": self.network}

    def extra_checkpoint_state(self) -> dict:
        return {"ema": self.ema.state_dict()}

    def load_extra_checkpoint_state(self, state: dict) -> None:
        self.ema.load_state_dict(state["ema"])

    def train_step(self, batch: dict) -> dict:
        out = super().train_step(batch)
        self.ema.update(self.network)
        self.global_step += 1
        return out


class nnUNetTrainerPartialEMABatch16(FixedBatchSize, nnUNetTrainerPartialEMA):
    """Benchmark ablation: nnUNetTrainerPartialEMA with 16 cases per batch (see nnUNetTrainerPartialBatch16)."""
    fixed_batch_size = 16
