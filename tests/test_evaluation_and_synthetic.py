"""Evaluation maths (Dice, HD95, partial-aware means) and the synthetic phantom generator."""
import json
import os

import numpy as np
import pytest

from nnunet_partial.annotations import PartialAnnotations, PartialLabelError
from nnunet_partial.evaluation import (evaluate_folders, format_table, predicted_label_voxels,
                                       rewrite_summary_partial_aware)
from nnunet_partial.synthetic import LABELS, make_phantom, write_nifti, write_partial_dataset


def _write(folder, name, arr, spacing=(1.0, 1.0, 1.0)):
    os.makedirs(folder, exist_ok=True)
    write_nifti(arr.astype(np.uint8), os.path.join(folder, name), spacing)


def test_dice_hd95_and_partial_aware_means(tmp_path):
    ref = np.zeros((10, 20, 20), np.uint8)
    ref[2:8, 2:8, 2:8] = 1        # 216 voxels liver
    ref[2:8, 12:18, 12:18] = 2    # kidney
    pred = ref.copy()
    pred[2:8, 2:8, 2:5] = 0       # half the liver missed -> Dice 2*108/(108+216) = 2/3
    pred[2:8, 12:18, 12:18] = 0   # kidney missed entirely on case a
    _write(tmp_path / "ref", "a.nii.gz", ref, (2.0, 1.0, 1.0))
    _write(tmp_path / "pred", "a.nii.gz", pred, (2.0, 1.0, 1.0))
    _write(tmp_path / "ref", "b.nii.gz", ref)
    _write(tmp_path / "pred", "b.nii.gz", ref)
    labels = {"liver": 1, "kidney": 2}
    res = evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "ref"), labels, num_processes=1)
    a = res["per_case"]["a"]
    assert a["liver"]["Dice"] == pytest.approx(2 / 3)
    assert a["kidney"]["Dice"] == 0 and np.isnan(a["kidney"]["HD95"])  # undefined when prediction empty
    assert a["liver"]["HD95"] == pytest.approx(3.0)  # 3 voxels of 1 mm along x are missed
    assert res["per_case"]["b"]["liver"]["HD95"] == 0
    assert res["mean"]["kidney"]["Dice"] == pytest.approx(0.5)
    # partial-aware: kidney not annotated on case a -> scored on b only
    ann = PartialAnnotations.from_dataset_json({"labels": {"background": 0, **labels},
                                                "annotated_labels": {"a": ["liver"], "b": ["liver", "kidney"]}})
    res = evaluate_folders(str(tmp_path / "pred"), str(tmp_path / "ref"), labels, annotations=ann, num_processes=2)
    assert res["mean"]["kidney"] == {"Dice": 1.0, "HD95": 0.0, "n_cases": 1}
    assert res["mean"]["liver"]["n_cases"] == 2
    table = format_table({"model": res}, ["liver", "kidney"])
    assert "model" in table and "1.000" in table


def test_predicted_label_voxels_counts_exactly(tmp_path):
    """The LOST ORGAN check's counts. Regression: they came from a NumPy view of a temporary SimpleITK image,
    whose buffer is freed while np.unique copies it, so counts drifted and garbage values appeared (CI once
    found 'spleen' predicted in files that held none)."""
    rng = np.random.default_rng(0)
    arrays = []
    for i in range(3):
        arr = rng.integers(0, 5, (16, 32, 32)).astype(np.uint8)
        arr[arr == 3] = 0
        arrays.append(arr)
        write_nifti(arr, str(tmp_path / f"case{i}.nii.gz"))
    counts = predicted_label_voxels(str(tmp_path), ".nii.gz", [1, 2, 3, 4])
    assert counts == {**{v: int(sum((a == v).sum() for a in arrays)) for v in (1, 2, 3, 4)}, "n_cases": 3}
    assert counts[3] == 0 and predicted_label_voxels(str(tmp_path / "none"), ".nii.gz", [1]) is None


def test_rewrite_nnunet_summary_partial_aware(tmp_path):
    from nnunetv2.evaluation.evaluate_predictions import save_summary_json
    m = lambda d: {"Dice": d, "IoU": d, "FP": 0, "TP": 1, "FN": 0, "TN": 0, "n_pred": 1, "n_ref": 1}
    summary = {"metric_per_case": [
        {"reference_file": "/x/a.nii.gz", "prediction_file": "/y/a.nii.gz", "metrics": {1: m(0.8), 2: m(0.0)}},
        {"reference_file": "/x/b.nii.gz", "prediction_file": "/y/b.nii.gz", "metrics": {1: m(0.6), 2: m(0.9)}}],
        "mean": {1: m(0.7), 2: m(0.45)}, "foreground_mean": m(0.575)}
    path = str(tmp_path / "summary.json")
    save_summary_json(summary, path)
    ann = PartialAnnotations.from_dataset_json({"labels": {"background": 0, "liver": 1, "kidney": 2},
                                                "annotated_labels": {"a": ["liver"], "b": ["liver", "kidney"]}})
    out = rewrite_summary_partial_aware(path, ann, ".nii.gz")
    assert out["mean"][2]["Dice"] == pytest.approx(0.9) and out["mean"][2]["n_cases_annotated"] == 1
    assert out["foreground_mean"]["Dice"] == pytest.approx((0.7 + 0.9) / 2)
    on_disk = json.load(open(path))
    assert on_disk["partial_aware"] and on_disk["metric_per_case"][0]["metrics"]["2"]["annotated"] is False
    assert os.path.isfile(str(tmp_path / "summary_all_labels_everywhere.json"))


def test_phantoms_are_deterministic_varied_and_not_separable_by_threshold():
    a1, l1 = make_phantom(3)
    a2, l2 = make_phantom(3)
    b, lb = make_phantom(4)
    assert np.array_equal(a1, a2) and np.array_equal(l1, l2)
    assert not np.array_equal(l1, lb)
    assert set(np.unique(l1)) == {0, 1, 2, 3, 4}
    sizes = np.bincount(l1.ravel(), minlength=5)[1:]
    assert len(set(sizes)) == 4  # organs differ in size
    # liver (1) and spleen (3) have nearly the same intensity: means less than one noise std apart,
    # so any intensity threshold misclassifies a large share of voxels
    for seed in range(5):
        img, lab = make_phantom(seed)
        liver, spleen = img[lab == 1].astype(float), img[lab == 3].astype(float)
        assert abs(liver.mean() - spleen.mean()) < liver.std()


def test_partial_dataset_stores_only_annotated_organs(tmp_path):
    import SimpleITK as sitk
    folder = write_partial_dataset(str(tmp_path), 77, "T", cases_per_source=1, n_full=1, n_unlabelled=1,
                                   shape=(12, 24, 24))
    dj = json.load(open(os.path.join(folder, "dataset.json")))
    assert dj["labels"] == LABELS and dj["numTraining"] == 6
    assert dj["annotated_labels"]["kidney_001"] == ["kidney"] and dj["annotated_labels"]["unlabelled_001"] == []
    seg = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, "labelsTr", "kidney_001.nii.gz")))
    assert set(np.unique(seg)) == {0, 2}
    seg = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, "labelsTr", "unlabelled_001.nii.gz")))
    assert not seg.any()
    with pytest.raises(PartialLabelError, match="already exists"):  # any DatasetXXX_ folder of that id
        write_partial_dataset(str(tmp_path), 77, "Other", cases_per_source=1)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_pseudo_labelled_dataset_keeps_manual_annotation_and_names_the_filled_organs(tmp_path):
    """pseudo_labelled=True: a D̂ of perfect teachers — every label file holds every organ, annotated_labels is the
    manual annotation, pseudo_labels the rest; the metadata module accepts it."""
    import SimpleITK as sitk
    folder = write_partial_dataset(str(tmp_path), 78, "P", cases_per_source=1, n_full=1, n_unlabelled=1,
                                   shape=(12, 24, 24), pseudo_labelled=True)
    dj = json.load(open(os.path.join(folder, "dataset.json")))
    assert dj["annotated_labels"]["kidney_001"] == ["kidney"] and dj["annotated_labels"]["unlabelled_001"] == []
    assert dj["pseudo_labels"]["kidney_001"] == ["liver", "spleen", "pancreas"]
    assert dj["pseudo_labels"]["unlabelled_001"] == ["liver", "kidney", "spleen", "pancreas"]
    assert "full_001" not in dj["pseudo_labels"]
    for case in ("kidney_001", "unlabelled_001"):
        seg = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, "labelsTr", f"{case}.nii.gz")))
        assert set(np.unique(seg)) == set(LABELS.values())
    annotations = PartialAnnotations.from_dataset_json(dj)
    assert annotations.pseudo_names_of("kidney_001") == ["liver", "spleen", "pancreas"]


def test_evaluate_command_writes_nnunet_summary_layout(tmp_path):
    """`nnunet-partial evaluate` writes nnU-Net's summary.json layout (readable by nnU-Net's loader) with
    partial-aware means and per-case `annotated` flags, beside its own evaluation.json."""
    import json
    import subprocess
    import sys
    from nnunetv2.evaluation.evaluate_predictions import load_summary_json

    ref = np.zeros((10, 20, 20), np.uint8)
    ref[2:8, 2:8, 2:8] = 1
    ref[2:8, 12:18, 12:18] = 2
    pred = ref.copy()
    pred[2:8, 12:18, 12:18] = 0   # kidney missed on case a, which does not annotate it
    for case, p in (("a", pred), ("b", ref)):
        _write(tmp_path / "ref", f"{case}.nii.gz", ref)
        _write(tmp_path / "pred", f"{case}.nii.gz", p)
    _write(tmp_path / "ref", "c.nii.gz", ref)  # no prediction: left out, as nnUNetv2_evaluate_folder would refuse it
    dj = {"labels": {"background": 0, "liver": 1, "kidney": 2}, "file_ending": ".nii.gz",
          "annotated_labels": {"a": ["liver"], "b": ["liver", "kidney"], "c": ["liver"]}}
    (tmp_path / "dataset.json").write_text(json.dumps(dj))
    proc = subprocess.run([sys.executable, "-m", "nnunet_partial.cli", "evaluate", "-pred", str(tmp_path / "pred"),
                           "-ref", str(tmp_path / "ref"), "-dj", str(tmp_path / "dataset.json"), "-np", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    summary = load_summary_json(str(tmp_path / "pred" / "summary.json"))
    assert set(summary) >= {"metric_per_case", "mean", "foreground_mean"}
    assert len(summary["metric_per_case"]) == 2
    case_a = [c for c in summary["metric_per_case"] if c["reference_file"].endswith("a.nii.gz")][0]
    assert case_a["metrics"][2]["annotated"] is False and case_a["metrics"][2]["Dice"] == 0
    assert summary["mean"][2]["Dice"] == pytest.approx(1.0) and summary["mean"][2]["n_cases_annotated"] == 1
    assert os.path.isfile(tmp_path / "pred" / "summary_all_labels_everywhere.json")
    assert os.path.isfile(tmp_path / "pred" / "evaluation.json")
