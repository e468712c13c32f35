"""scripts/benchmark_speed.py runs on CPU at a tiny size and writes its table and JSON (issue 17). Dataset ids 660-669
here (the script's own synthetic set); 620-622 come from test_host_sync."""
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


def test_the_synthetic_speed_set_lets_every_trainer_run(nnunet_env, tmp_path):
    """--make-synthetic writes what the trainers beyond annotated_labels need: a D̂ for nnUNetTrainerCoWAMPseudo
    (id + 1, same plans), registered untrained teachers of the timed plans for MS-KD, class labels for MultiMix.
    A re-run reuses the datasets."""
    from nnunet_partial.annotations import PSEUDO_KEY

    trainers = ["nnUNetTrainerCoWAMPseudo", "nnUNetTrainerMSKD", "nnUNetTrainerMultiMix"]
    out = tmp_path / "speed.json"
    argv = [sys.executable, SCRIPT, "--make-synthetic", "small", "-d", "660", "-c", "2d", "--sizes", "toy",
            "--toy-patch", "16", "16", "--toy-batch", "4", "--steps", "1", "--warmup", "1", "--threads", "1",
            "--trainers", *trainers, "--json", str(out)]
    for _ in range(2):
        run(argv, env=nnunet_env, timeout=600)
        rows = json.loads(out.read_text())["rows"]
        assert [r["trainer"] for r in rows] == trainers and not [r for r in rows if "error" in r], rows
    assert rows[0]["dataset"] == "Dataset661_SyntheticSpeedPseudo" and rows[1]["dataset"] == "Dataset660_SyntheticSpeed"
    pre = nnunet_env["nnUNet_preprocessed"]
    with open(os.path.join(pre, "Dataset661_SyntheticSpeedPseudo", "dataset.json")) as f:
        assert "unlabelled_001" in json.load(f)[PSEUDO_KEY]
    with open(os.path.join(pre, "Dataset660_SyntheticSpeed", TEACHER_REGISTRY_FILE)) as f:
        registry = json.load(f)
    assert sorted(e["dataset_id"] for e in registry["teachers"].values()) == [662, 663, 664, 665]
    assert {e["plans"] for e in registry["teachers"].values()} == {"nnUNetPlansSpeedToy"}
    assert len([d for d in os.listdir(nnunet_env["nnUNet_raw"]) if d.startswith("Dataset66")]) == 6
