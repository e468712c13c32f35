"""scripts/benchmark_speed.py runs on CPU at a tiny size and writes its table and JSON (issue 17)."""
from __future__ import annotations

import json
import os
import sys

from nnunet_helpers import REPO_ROOT, run
from nnunet_partial.trainers import TRAINERS
from test_host_sync import PLANS, sync_dataset  # noqa: F401  (sync_dataset: fixture)

SCRIPT = os.path.join(REPO_ROOT, "scripts", "benchmark_speed.py")


def test_speed_script_pairs_every_trainer_with_stock(sync_dataset, nnunet_env, tmp_path):
    trainers = ["nnUNetTrainerPartial", "nnUNetTrainerMeanTeacher"]
    # a trainer this dataset cannot run (no teachers) gets a row saying why, and the others still run
    unrunnable = ["nnUNetTrainerMSKD"] if "nnUNetTrainerMSKD" in TRAINERS else []
    out = tmp_path / "speed.json"
    proc = run([sys.executable, SCRIPT, "-d", str(sync_dataset.dataset_id), "-c", "2d", "-p", PLANS,
                "--trainers", *trainers, *unrunnable, "--sizes", "planned", "toy", "--toy-patch", "16", "16",
                "--toy-batch", "4", "--steps", "2", "--warmup", "1", "--threads", "1", "--json", str(out)],
               env=nnunet_env, timeout=600)
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["size"], r["trainer"]) for r in rows] == [(s, t) for s in ("planned", "toy")
                                                          for t in trainers + unrunnable]
    assert result["settings"]["device"] == "cpu" and result["settings"]["steps"] == 2
    for r in rows:
        assert r["configuration"] == "2d" and r["compile"] == "off"   # nnU-Net never compiles on CPU
        if r["size"] == "toy":
            assert (r["patch"], r["batch"]) == ("16x16", 4)
        if r["trainer"] in unrunnable:
            assert "teacher" in r["error"].lower(), r
            continue
        assert r["steps"] == 2 and r["peak_mib"] is None
        assert 0 < r["stock_s"] < 60 and 0 < r["trainer_s"] < 60 and r["ratio"] > 0
        assert abs(r["samples_per_s"] - r["batch"] / r["trainer_s"]) < 1e-6 * r["samples_per_s"]
        # the table line of the row
        assert (f"| 2d | {r['size']} ({r['patch']}, {r['batch']}) | off | {r['trainer']} | {r['trainer_s']:.3f} s | "
                f"{r['stock_s']:.3f} s | {r['ratio']:.2f}x |") in proc.stdout
    assert proc.stdout.count("| 2d |") == len(rows)
