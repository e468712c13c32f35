"""``nnunet-partial find-best-configuration``: nnU-Net's procedure with partial-aware metrics.

The postprocessing tests build tiny label maps by hand where the partial-aware decision and nnU-Net's
stock one differ; the integration test trains 2d and 3d_fullres (tiny schedule) and runs the command
and the inference lines it prints.
"""
from __future__ import annotations

import glob
import json
import os
import pickle
import re
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_helpers import cli, run

LABELS = {"background": 0, "liver": 1, "kidney": 2}
SHAPE = (8, 24, 24)


def _blocks():
    def block(z, y, x):
        m = np.zeros(SHAPE, bool)
        m[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = True
        return m
    return {"liver": block((2, 6), (2, 12), (2, 12)),           # 400 voxels
            "kidney_touching": block((2, 6), (2, 12), (12, 16)),  # one foreground component with the liver
            "kidney_apart": block((2, 6), (16, 22), (16, 22)),    # 144 voxels, its own component
            "liver_speck": block((7, 8), (20, 22), (2, 4)),
            "kidney_speck": block((0, 1), (20, 22), (8, 10))}


def _write(folder, case, parts):
    b = _blocks()
    seg = np.zeros(SHAPE, np.uint8)
    for name in parts:
        seg[b[name]] = LABELS[name.split("_")[0]]
    os.makedirs(folder, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(seg), os.path.join(folder, f"{case}.nii.gz"))


# case: (annotated labels, reference, prediction). The three liver-only cases see the kidney, correctly
# predicted but not annotated: nnU-Net scores it as a false positive on them.
CASES = {
    "both_a": (["liver", "kidney"], ["liver", "kidney_touching"], ["liver", "kidney_touching"]),
    "both_b": (["liver", "kidney"], ["liver", "kidney_apart"], ["liver", "kidney_apart", "kidney_speck"]),
    "liver_a": (["liver"], ["liver"], ["liver", "kidney_apart", "liver_speck"]),
    "liver_b": (["liver"], ["liver"], ["liver", "kidney_apart"]),
    "liver_c": (["liver"], ["liver"], ["liver", "kidney_apart"]),
}


@pytest.fixture
def handmade(tmp_path, nnunet_env):
    ref, pred = str(tmp_path / "ref"), str(tmp_path / "pred")
    for case, (_, r, p) in CASES.items():
        _write(ref, case, r)
        _write(pred, case, p)
    dataset_json = {"labels": LABELS, "file_ending": ".nii.gz",
                    "annotated_labels": {c: v[0] for c, v in CASES.items()}}
    return ref, pred, dataset_json, {"image_reader_writer": "SimpleITKIO"}


def _steps(folder):
    with open(os.path.join(folder, "postprocessing.pkl"), "rb") as f:
        fns, kwargs = pickle.load(f)
    assert all(fn.__module__ == "nnunetv2.postprocessing.remove_connected_components" for fn in fns)
    return [kw["labels_or_regions"] for kw in kwargs]


def _partial_postprocessing(ref, pred, dataset_json, plans, min_cases):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_partial.annotations import PartialAnnotations
    from nnunet_partial.commands.find_best import determine_postprocessing_partial_aware
    from nnunet_partial.evaluation import compute_metrics_on_folder_partial_aware

    annotations = PartialAnnotations.from_dataset_json(dataset_json)
    summary = compute_metrics_on_folder_partial_aware(annotations, ref, pred, os.path.join(pred, "summary.json"),
                                                      SimpleITKIO(), ".nii.gz", [1, 2], None, 1)
    printed = []
    determine_postprocessing_partial_aware(annotations, min_cases, pred, ref, plans, dataset_json, 1,
                                           echo=printed.append)
    return summary, printed


def test_postprocessing_decided_on_annotated_cases(handmade):
    from nnunetv2.postprocessing.remove_connected_components import determine_postprocessing

    ref, pred, dataset_json, plans = handmade
    stock_pred = pred + "_stock"
    shutil.copytree(pred, stock_pred)

    summary, printed = _partial_postprocessing(ref, pred, dataset_json, plans, min_cases=1)
    # kidney: both_a 1, both_b 2*144/(2*144+4); the three liver-only cases do not count
    assert summary["mean"][2]["Dice"] == pytest.approx((1 + 288 / 292) / 2)
    assert summary["mean"][2]["n_cases_annotated"] == 2
    with open(os.path.join(pred, "summary_all_labels_everywhere.json")) as f:
        assert json.load(f)["mean"]["2"]["Dice"] == pytest.approx((1 + 288 / 292) / 5)
    assert "liver: 5 case(s), kidney: 2 case(s)" in printed[0]
    # keeping only the largest foreground component deletes the correct kidney of both_b: refused; the
    # per-label steps remove the specks
    assert _steps(pred) == [1, 2]

    # nnU-Net's rule: deleting the unannotated kidneys turns three zeros into NaN and "improves" kidney
    determine_postprocessing(stock_pred, ref, plans, dataset_json, 1)
    assert _steps(stock_pred) == [[1, 2]]


def test_postprocessing_refused_below_min_cases(handmade):
    ref, pred, dataset_json, plans = handmade
    _, printed = _partial_postprocessing(ref, pred, dataset_json, plans, min_cases=3)
    assert _steps(pred) == [1]  # kidney rests on 2 annotated cases: no decision
    assert any(line.startswith("WARNING: kidney is scored on 2 annotated case(s)") for line in printed)
    with open(os.path.join(pred, "postprocessing.json")) as f:
        info = json.load(f)["partial_aware"]
    assert info == {"min_cases": 3, "cases_per_label": {"1": 5, "2": 2}, "refused_labels": [2]}


# ---------------------------------------------------------------------- end to end
DATASET_ID = 560
TRAINER = "nnUNetTrainerPartial_tiny"
# fold 0 validation: liver annotated on 3 cases, kidney and spleen on 2, pancreas on 1
VAL = ["full_001", "liver_001", "liver_002", "kidney_001", "spleen_001"]


def _dice_table(pred_folder, ref_folder, annotated):
    """Hand computation: {label: mean Dice}, partial-aware when ``annotated`` (case -> label names) is given."""
    per_label = {v: [] for v in range(1, 5)}
    for f in sorted(glob.glob(os.path.join(pred_folder, "*.nii.gz"))):
        case = os.path.basename(f)[:-7]
        p = sitk.GetArrayFromImage(sitk.ReadImage(f))
        r = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(ref_folder, os.path.basename(f))))
        names = annotated[case] if annotated is not None else ("liver", "kidney", "spleen", "pancreas")
        for v, name in enumerate(("liver", "kidney", "spleen", "pancreas"), start=1):
            tp, fp, fn = np.sum((p == v) & (r == v)), np.sum((p == v) & (r != v)), np.sum((p != v) & (r == v))
            if name in names and tp + fp + fn:
                per_label[v].append(2 * tp / (2 * tp + fp + fn))
    means = {v: float(np.mean(d)) if d else float("nan") for v, d in per_label.items()}
    return means, float(np.nanmean(list(means.values())))


def _summary_dice(path):
    with open(path) as f:
        s = json.load(f)
    return {int(k): m["Dice"] for k, m in s["mean"].items()}, s["foreground_mean"]["Dice"]


@pytest.mark.integration
@pytest.mark.timeout(1800)  # two trainings, their final validations and two predictions: ~12 min on a busy 2-core box
def test_find_best_configuration_end_to_end(make_dataset, nnunet_env, tmp_path):
    from nnunet_partial.synthetic import write_test_set

    ds = make_dataset(DATASET_ID, configurations=("2d", "3d_fullres"), name="FindBest", cases_per_source=3, n_full=1)
    with open(os.path.join(ds.raw, "dataset.json")) as f:
        annotated = json.load(f)["annotated_labels"]
    with open(os.path.join(ds.preprocessed, "splits_final.json"), "w") as f:
        json.dump([{"train": sorted(set(annotated) - set(VAL)), "val": VAL}], f)
    for configuration in ("2d", "3d_fullres"):
        out = run(["nnUNetv2_train", str(DATASET_ID), configuration, "0", "-tr", TRAINER, "-device", "cpu", "--npz"],
                  env=nnunet_env)
        assert f"Next: nnunet-partial find-best-configuration {ds.name} -c {configuration} -tr {TRAINER}" in out.stdout

    printed = run(cli("find-best-configuration", str(DATASET_ID), "-c", "2d", "3d_fullres", "-tr", TRAINER,
                      "-f", "0", "-np", "1", "--min-cases", "2"), env=nnunet_env).stdout
    print(printed)
    results = os.path.join(nnunet_env["nnUNet_results"], ds.name)
    with open(os.path.join(results, "inference_information.json")) as f:
        info = json.load(f)
    models = {f"{TRAINER}__nnUNetPlans__{c}": os.path.join(results, f"{TRAINER}__nnUNetPlans__{c}",
                                                           "crossval_results_folds_0") for c in ("2d", "3d_fullres")}
    ensemble = f"ensemble___{TRAINER}__nnUNetPlans__2d___{TRAINER}__nnUNetPlans__3d_fullres___0"
    sources = {**models, ensemble: os.path.join(results, "ensembles", ensemble)}
    assert set(info["all_results"]) == set(sources)  # both configurations and their ensemble were evaluated

    ref = os.path.join(ds.raw, "labelsTr")
    for key, folder in sources.items():
        assert sorted(os.listdir(folder)) and len(glob.glob(os.path.join(folder, "*.nii.gz"))) == len(VAL)
        means, fg = _dice_table(folder, ref, annotated)
        summary_means, summary_fg = _summary_dice(os.path.join(folder, "summary.json"))
        np.testing.assert_allclose([summary_means[v] for v in range(1, 5)], [means[v] for v in range(1, 5)])
        assert summary_fg == pytest.approx(fg) and info["all_results"][key] == pytest.approx(fg)
        stock_means, stock_fg = _dice_table(folder, ref, None)
        assert _summary_dice(os.path.join(folder, "summary_all_labels_everywhere.json"))[1] == pytest.approx(stock_fg)
        assert f"{fg:.4f}  (nnU-Net's rule: {stock_fg:.4f})  {key}\n" in printed

    best = info["best_model_or_ensemble"]
    best_folder = os.path.dirname(best["postprocessing_file"])
    with open(os.path.join(best_folder, "postprocessing.json")) as f:
        pp = json.load(f)
    assert pp["partial_aware"]["cases_per_label"] == {"1": 3, "2": 2, "3": 2, "4": 1}
    assert pp["partial_aware"]["refused_labels"] == [4]
    assert "liver: 3 case(s), kidney: 2 case(s), spleen: 2 case(s), pancreas: 1 case(s)" in printed
    assert "WARNING: pancreas is scored on 1 annotated case(s)" in printed
    for step in _steps(best_folder):
        assert step in (1, 2, 3)  # neither pancreas nor the joint step (it touches pancreas)

    # the printed inference lines, run as they are (plus CPU flags: no GPU here, one worker)
    images, _ = write_test_set(str(tmp_path / "test"), 1)
    with open(os.path.join(results, "inference_instructions.txt")) as f:
        lines = [line.strip() for line in f if line.startswith("nnUNetv2_")]
    assert lines[-1].startswith("nnUNetv2_apply_postprocessing")
    for line in lines:
        line = re.sub(r"\bOUTPUT_FOLDER\w*", lambda m: str(tmp_path / m.group(0)), line.replace("INPUT_FOLDER", images))
        cpu = ["-device", "cpu", "-npp", "1", "-nps", "1"]
        cmd = line.split() + (cpu if line.startswith("nnUNetv2_predict") else [])
        run(cmd, env=nnunet_env)
    assert len(glob.glob(str(tmp_path / "OUTPUT_FOLDER_PP" / "*.nii.gz"))) == 1
