"""Shared test helpers: run nnU-Net's real CLI, build synthetic preprocessed datasets, construct
trainers in-process on CPU."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from nnunet_partial.experiment import load_trainer  # noqa: F401  (re-exported for the tests)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_MR = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "totalseg_mr")


def run(cmd: list[str], env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a command, fail the test with the tail of its output if it fails."""
    proc = subprocess.run(cmd, env=env or os.environ.copy(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + "\n" + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc


def cli(*args: str) -> list[str]:
    """``nnunet-partial ARGS`` through the current interpreter (works without the console script)."""
    return [sys.executable, "-m", "nnunet_partial.cli", *args]


@dataclass
class PreprocessedDataset:
    dataset_id: int
    name: str              # DatasetXXX_Name
    raw: str
    preprocessed: str


def plan_and_preprocess(dataset_id: int, configurations=("3d_fullres",), env: dict | None = None) -> None:
    env = dict(env or os.environ)
    # nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA): 0 would crash it
    env["nnUNet_n_proc_DA"] = "1"
    run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", *configurations, "-np", "2"], env=env)
