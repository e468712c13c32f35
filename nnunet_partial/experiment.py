"""Run nnU-Net's real command line on synthetic data: the engine of ``nnunet-partial demo`` and of
the benchmarks in ``scripts/``.

Every step is a stock nnU-Net command (``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train``,
``nnUNetv2_predict``) run as a subprocess with its full output in a log file, so what the demo
does is exactly what a user types.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from nnunet_partial.commands.env import ext_trainer_value


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class Workspace:
    """A self-contained nnU-Net environment (raw / preprocessed / results) under one folder."""

    root: str
    echo: Callable[[str], None] = print
    env: dict = field(default_factory=dict)

    def __post_init__(self):
        self.root = os.path.abspath(self.root)
        self.raw = os.path.join(self.root, "nnUNet_raw")
        self.preprocessed = os.path.join(self.root, "nnUNet_preprocessed")
        self.results = os.path.join(self.root, "nnUNet_results")
        self.logs = os.path.join(self.root, "logs")
        for d in (self.raw, self.preprocessed, self.results, self.logs):
            os.makedirs(d, exist_ok=True)
        self.env = {**os.environ, "nnUNet_raw": self.raw, "nnUNet_preprocessed": self.preprocessed,
                    "nnUNet_results": self.results, "nnUNet_extTrainer": ext_trainer_value(),
                    "nnUNet_compile": os.environ.get("nnUNet_compile", "false"), **self.env}
        self.env.setdefault("nnUNet_n_proc_DA", "1")
        self.env["PYTHONUNBUFFERED"] = "1"  # nnU-Net's epoch lines reach the log (and the demo's echo) at once

    # -------------------------------------------------------------- running commands
    def run(self, cmd: Sequence[str], log_name: str, env_overrides: Optional[dict] = None,
            show: Callable[[str], bool] = lambda line: False) -> float:
        """Run ``cmd``, log all output to ``logs/<log_name>.log``; echo lines for which ``show`` is true.

        Returns the wall time. On failure raises RuntimeError with the log's tail.
        """
        log_path = os.path.join(self.logs, f"{log_name}.log")
        env = {**self.env, **(env_overrides or {})}
        t0 = time.time()
        with open(log_path, "w") as log:
            log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
            log.flush()
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    bufsize=1)
            for line in proc.stdout:
                log.write(line)
                if show(line):
                    self.echo("    " + line.rstrip())
            rc = proc.wait()
        if rc != 0:
            with open(log_path) as f:
                tail = "".join(f.readlines()[-40:])
            raise RuntimeError(f"'{' '.join(cmd)}' failed with exit code {rc}. Full log: {log_path}\n{tail}")
        return time.time() - t0

    def plan_and_preprocess(self, dataset_id: int, configurations: Sequence[str], num_processes: int = 2) -> float:
        # the planner calls torch.set_num_threads(nnUNet_n_proc_DA); 0 would crash it. -npfp: the fingerprint's
        # own process count (nnU-Net's default is 8 spawned workers, each importing torch: ~30 s on 2 cores)
        return self.run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", *configurations,
                         "-np", str(num_processes), "-npfp", str(num_processes)], f"plan_{dataset_id}",
                        env_overrides={"nnUNet_n_proc_DA": str(max(1, int(self.env["nnUNet_n_proc_DA"])))})

    def train(self, dataset_id: int, configuration: str, trainer: str, fold="0", device: Optional[str] = None,
              extra: Sequence[str] = ()) -> float:
        device = device or default_device()
        return self.run(["nnUNetv2_train", str(dataset_id), configuration, str(fold), "-tr", trainer,
                         "-device", device, *extra], f"train_{dataset_id}_{trainer}_{configuration}_{fold}",
                        show=_is_epoch_summary)

    def predict(self, dataset_id: int, configuration: str, trainer: str, images: str, output: str,
                fold="0", device: Optional[str] = None, extra: Sequence[str] = ()) -> float:
        device = device or default_device()
        return self.run(["nnUNetv2_predict", "-i", images, "-o", output, "-d", str(dataset_id),
                         "-c", configuration, "-f", str(fold), "-tr", trainer, "-device", device,
                         "-npp", "1", "-nps", "1", *extra],
                        f"predict_{dataset_id}_{trainer}_{configuration}")


def open_workspace(workdir: str) -> Workspace:
    """A :class:`Workspace` whose nnU-Net folders are also exported to this process (nnU-Net reads them at
    import), for benchmark scripts that build trainers in-process as well as through the CLI."""
    ws = Workspace(workdir)
    os.environ.update({k: ws.env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results",
                                              "nnUNet_extTrainer", "nnUNet_compile")})
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    return ws


def load_trainer(trainer_cls, dataset_name: str, configuration: str = "3d_fullres", fold=0,
                 device: str = "cpu", initialize: bool = True, plans_identifier: str = "nnUNetPlans"):
    """Construct a trainer as ``nnUNetv2_train`` does (plans + dataset.json from nnUNet_preprocessed).

    For step-level tests and speed benchmarks that drive ``train_step`` directly.
    """
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed

    folder = join(str(nnUNet_preprocessed), dataset_name)
    plans = load_json(join(folder, f"{plans_identifier}.json"))
    plans["continue_training"] = False  # nnUNetv2_train puts this flag into the plans (nnU-Net 2.8)
    trainer = trainer_cls(plans=plans, configuration=configuration, fold=fold,
                          dataset_json=load_json(join(folder, "dataset.json")), device=torch.device(device))
    if initialize:
        trainer.initialize()
    return trainer


def _is_epoch_summary(line: str) -> bool:
    return any(k in line for k in ("Epoch time", "Pseudo dice", "Mean Validation Dice", "Partial-aware mean",
                                   "WARNING"))
