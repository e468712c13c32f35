"""scripts/benchmark_speed.py runs on CPU at a tiny size and writes its table and JSON (issue 17)."""
from __future__ import annotations

import json
import os
import sys

from nnunet_helpers import REPO_ROOT, run
from nnunet_partial.annotations import TEACHER_REGISTRY_FILE
from test_host_sync import PLANS, sync_dataset  # noqa: F401  (sync_dataset: fixture)

SCRIPT = os.path.join(REPO_ROOT, "scripts", "benchmark_speed.py")


def test_speed_script_pairs_every_trainer_with_stock(sync_dataset, nnunet_env, tmp_path):
    # the fixture registers (untrained) teachers, so nnUNetTrainerMSKD is timed too
    trainers = ["nnUNetTrainerPartial", "nnUNetTrainerMeanTeacher", "nnUNetTrainerMSKD"]
    out = tmp_path / "speed.json"
    proc = _speed_script(sync_dataset, nnunet_env, out, trainers, "planned", "toy")
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["size"], r["trainer"]) for r in rows] == [(s, t) for s in ("planned", "toy")
                                                          for t in trainers]
    assert result["settings"]["device"] == "cpu" and result["settings"]["steps"] == 2
    for r in rows:
        assert r["configuration"] == "2d" and r["compile"] == "off"   # nnU-Net never compiles on CPU
        if r["size"] == "toy":
            assert (r["patch"], r["batch"]) == ("16x16", 4)
        assert r["steps"] == 2 and r["peak_mib"] is None
        assert 0 < r["stock_s"] < 60 and 0 < r["trainer_s"] < 60 and r["ratio"] > 0
        assert abs(r["samples_per_s"] - r["batch"] / r["trainer_s"]) < 1e-6 * r["samples_per_s"]
        # the table line of the row
        assert (f"| 2d | {r['size']} ({r['patch']}, {r['batch']}) | off | {r['trainer']} | {r['trainer_s']:.3f} s | "
                f"{r['stock_s']:.3f} s | {r['ratio']:.2f}x |") in proc.stdout
    assert proc.stdout.count("| 2d |") == len(rows)


def _speed_script(ds, env, out, trainers, *sizes):
    return run([sys.executable, SCRIPT, "-d", str(ds.dataset_id), "-c", "2d", "-p", PLANS, "--trainers", *trainers,
                "--sizes", *sizes, "--toy-patch", "16", "16", "--toy-batch", "4", "--steps", "2", "--warmup", "1",
                "--threads", "1", "--json", str(out)], env=env, timeout=600)


def test_a_trainer_the_dataset_cannot_run_gets_a_row_saying_why(sync_dataset, nnunet_env, tmp_path):
    """Without its teacher registry nnUNetTrainerMSKD refuses this dataset; the script still times the others."""
    registry = os.path.join(sync_dataset.preprocessed, TEACHER_REGISTRY_FILE)
    os.rename(registry, registry + ".hidden")
    try:
        out = tmp_path / "speed.json"
        _speed_script(sync_dataset, nnunet_env, out, ["nnUNetTrainerMSKD", "nnUNetTrainerPartial"], "toy")
    finally:
        os.rename(registry + ".hidden", registry)
    refused, timed = json.loads(out.read_text())["rows"]
    assert refused["trainer"] == "nnUNetTrainerMSKD" and "teacher" in refused["error"].lower(), refused
    assert timed["trainer"] == "nnUNetTrainerPartial" and "error" not in timed and timed["ratio"] > 0
