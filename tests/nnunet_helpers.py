"""Shared test helpers: run nnU-Net's real CLI, build synthetic preprocessed datasets, construct
trainers in-process on CPU."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from nnunet_partial.experiment import load_trainer  # noqa: F401  (re-exported for the tests)
from nnunet_partial.teachers import write_untrained_teacher  # noqa: F401  (re-exported for the tests)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_MR = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "totalseg_mr")


def run(cmd: list[str], env: dict | None = None, timeout: int = 900,
        fresh_process: bool = False) -> subprocess.CompletedProcess:
    """Run a command; fail the test with the tail of its output if it fails.

    A console script of nnU-Net (``nnUNetv2_*``) or ``nnunet-partial`` (``cli(...)``) runs in this
    process: its entry-point function, called as the console script calls it, with ``sys.argv`` and
    ``env`` set and the output captured at the file descriptors. That is the same code as the
    command, without the import of torch and nnU-Net per call (about 8 s on the 2-core machine, and
    as much again in each worker nnU-Net spawns, since a spawned worker re-imports its parent's main
    script). ``fresh_process=True`` runs it as a new process instead, as a user does: the tests of
    the stock CLI path keep that. ``timeout`` bounds a new process only; in-process commands run
    under the test's pytest-timeout.
    """
    entry = None if fresh_process else _entry_point(cmd)
    if entry is None:
        proc = subprocess.run(cmd, env=env or os.environ.copy(), capture_output=True, text=True, timeout=timeout)
    else:
        proc = _run_in_process(cmd, *entry, env=env or os.environ.copy())
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + "\n" + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc


def _entry_point(cmd: list[str]):
    """(function, argv) of a console script of nnU-Net or ours, or None for any other command."""
    if cmd[:3] == [sys.executable, "-m", "nnunet_partial.cli"]:
        from nnunet_partial.cli import main
        return main, ["nnunet-partial", *cmd[3:]]
    from importlib.metadata import entry_points

    name = os.path.basename(cmd[0])
    scripts = entry_points(group="console_scripts", name=name)
    script = next((s for s in scripts if s.value.startswith(("nnunetv2.", "nnunet_partial."))), None)
    return None if script is None else (script.load(), [name, *cmd[1:]])


def _run_in_process(cmd: list[str], function, argv: list[str], env: dict) -> subprocess.CompletedProcess:
    import tempfile
    import traceback

    saved_env, saved_argv, saved_streams = dict(os.environ), sys.argv, (sys.stdout, sys.stderr)
    saved_fds = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out.fileno(), 1)   # file descriptors: the commands' own subprocesses print there too
        os.dup2(err.fileno(), 2)
        streams = [open(fd, "w", buffering=1, closefd=False) for fd in (1, 2)]
        sys.stdout, sys.stderr = streams
        os.environ.clear()
        os.environ.update(env)
        sys.argv = argv
        try:
            result = function()
            returncode = result if isinstance(result, int) else 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                returncode = e.code or 0
            else:   # sys.exit("message"): Python prints it and exits with 1
                print(e.code, file=sys.stderr)
                returncode = 1
        except Exception:
            traceback.print_exc()
            returncode = 1
        finally:
            for stream in streams:
                stream.close()
            sys.stdout, sys.stderr = saved_streams
            os.dup2(saved_fds[0], 1)
            os.dup2(saved_fds[1], 2)
            for fd in saved_fds:
                os.close(fd)
            os.environ.clear()
            os.environ.update(saved_env)
            sys.argv = saved_argv
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode(errors="replace"))
    return subprocess.CompletedProcess(cmd, returncode, stdout=texts[0], stderr=texts[1])


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
    # one worker each for the fingerprint (-npfp: nnU-Net's default is 8) and preprocessing: on these tiny
    # datasets a spawned worker's start-up costs more than the work it would share
    run(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", *configurations, "-np", "1", "-npfp", "1"],
        env=env)


def resume_after_epoch_0(fold: str, train_cmd: list[str], env: dict) -> dict:
    """Turn ``fold``'s final checkpoint into the one an interruption after epoch 0 leaves, run
    ``train_cmd --c`` and return the new final checkpoint."""
    import torch

    final = os.path.join(fold, "checkpoint_final.pth")
    ckpt = torch.load(final, map_location="cpu", weights_only=False)
    ckpt["current_epoch"] = 1
    torch.save(ckpt, os.path.join(fold, "checkpoint_latest.pth"))
    os.remove(final)
    run(train_cmd + ["--c"], env=env)
    return torch.load(final, map_location="cpu", weights_only=False)


def predict_one_test_case(folder: str, dataset_id: int, configuration: str, trainer: str, shape, env: dict):
    """``nnUNetv2_predict`` (fold 0, CPU, no TTA) on one synthetic test image of ``shape``; the prediction array."""
    import SimpleITK as sitk

    from nnunet_partial.synthetic import write_test_set

    images, _ = write_test_set(os.path.join(folder, "test"), 1, shape=shape)
    out = os.path.join(folder, "pred")
    run(["nnUNetv2_predict", "-i", images, "-o", out, "-d", str(dataset_id), "-c", configuration, "-tr", trainer,
         "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"], env=env)
    return sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, "test_000.nii.gz")))


