"""`nnunet-partial demo` end to end (tiny schedule, so it finishes in a few minutes on CPU)."""
import glob
import json
import os
import sys

import pytest

from nnunet_helpers import run


@pytest.mark.integration
def test_demo_runs_end_to_end(tmp_path, nnunet_env):
    workdir = tmp_path / "demo"
    out = run([sys.executable, "-m", "nnunet_partial.cli", "demo", "-w", str(workdir), "--schedule", "tiny",
               "--cases-per-source", "2", "--n-test", "1", "--device", "cpu"], env=nnunet_env, timeout=1500,
              fresh_process=True).stdout  # the README's command, as a user runs it
    assert "nnUNetv2_plan_and_preprocess" in out and "nnUNetv2_predict" in out
    table = out[out.index("Dice on 1 fully labelled test cases"):]
    for row in ("nnUNetTrainer_tiny", "nnUNetTrainerPartial_tiny"):
        assert row in table
    for trainer in ("nnUNetTrainer_tiny", "nnUNetTrainerPartial_tiny"):
        res = json.load(open(os.path.join(workdir, "predictions", trainer, "evaluation.json")))
        assert set(res["mean"]) == {"liver", "kidney", "spleen", "pancreas"}
        assert all(v["Dice"] is None or 0.0 <= v["Dice"] <= 1.0 for v in res["mean"].values())
    # both trainers validated on the stratified split, written before the stock baseline could write nnU-Net's
    # random one (which Partial would then have kept)
    from nnunet_partial.annotations import PartialAnnotations
    from nnunet_partial.splits import stratified_crossval_split
    dataset = glob.glob(str(workdir / "nnUNet_raw" / "Dataset*"))[0]
    annotations = PartialAnnotations.from_dataset_json(json.load(open(os.path.join(dataset, "dataset.json"))))
    splits = json.load(open(workdir / "nnUNet_preprocessed" / os.path.basename(dataset) / "splits_final.json"))
    assert splits == stratified_crossval_split(sorted(annotations.annotated), annotations)
