"""Partial-label metadata: parsing, masks and every refusal (with the case and the fix named)."""
import json
import os

import numpy as np
import pytest
import torch

from nnunet_partial.annotations import PartialAnnotations, PartialLabelError, validate_raw_dataset
from nnunet_partial.cli import main as cli_main
from nnunet_partial.synthetic import write_nifti

LABELS = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}


def _dj(annotated, labels=LABELS):
    return {"labels": labels, "annotated_labels": annotated, "channel_names": {"0": "CT"},
            "numTraining": len(annotated), "file_ending": ".nii.gz"}


def test_no_key_means_stock_dataset():
    assert PartialAnnotations.from_dataset_json({"labels": LABELS}) is None


def test_mask_for_partial_full_and_unlabelled_cases():
    ann = PartialAnnotations.from_dataset_json(
        _dj({"a": ["liver"], "b": ["liver", "kidney", "spleen"], "c": []}))
    mask = ann.annotated_mask(["a", "b", "c"])
    expected = torch.tensor([[True, True, False, False], [True, True, True, True], [False, False, False, False]])
    assert torch.equal(mask, expected)
    assert ann.is_fully_annotated("b") and ann.is_unlabelled("c") and not ann.is_fully_annotated("a")
    assert ann.names_of("b") == ["liver", "kidney", "spleen"]


@pytest.mark.parametrize("annotated, case_ids, message", [
    ({"a": ["lung"]}, None, "case 'a' lists unknown label 'lung'"),
    ({"a": ["background"]}, None, "case 'a' lists 'background'"),
    ({"a": "liver"}, None, "case 'a': annotated labels must be a list"),
    ({"a": ["liver"]}, ["a", "b"], "missing from 'annotated_labels', e.g. 'b'"),
    ({"a": ["liver"], "zz": []}, ["a"], "names case 'zz'"),
])
def test_bad_metadata_is_refused_with_case_and_fix(annotated, case_ids, message):
    with pytest.raises(PartialLabelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PartialAnnotations.from_dataset_json(_dj(annotated), case_ids)


def test_region_and_ignore_labels_are_refused():
    with pytest.raises(PartialLabelError, match="region"):
        PartialAnnotations.from_dataset_json(_dj({"a": []}, {"background": 0, "liver": [1, 2], "tumour": 2}))
    with pytest.raises(PartialLabelError, match="ignore"):
        PartialAnnotations.from_dataset_json(_dj({"a": []}, {**LABELS, "ignore": 4}))


def test_label_map_with_unlisted_organ_is_refused():
    ann = PartialAnnotations.from_dataset_json(_dj({"a": ["liver"]}))
    ann.check_present_labels("a", [0, 1])
    with pytest.raises(PartialLabelError, match=r"case 'a'.*contains \['kidney'\].*lists only \['liver'\]"):
        ann.check_present_labels("a", [0, 1, 2])


def _write_raw(folder, annotated, label_values):
    os.makedirs(os.path.join(folder, "imagesTr"))
    os.makedirs(os.path.join(folder, "labelsTr"))
    for case, values in label_values.items():
        img = np.zeros((4, 8, 8), np.int16)
        seg = np.zeros((4, 8, 8), np.uint8)
        for i, v in enumerate(values):
            seg[i, :2, :2] = v
        write_nifti(img, os.path.join(folder, "imagesTr", f"{case}_0000.nii.gz"))
        write_nifti(seg, os.path.join(folder, "labelsTr", f"{case}.nii.gz"))
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(_dj(annotated), f)


def test_raw_dataset_validation_reads_label_files(tmp_path):
    good = tmp_path / "Dataset001_Good"
    _write_raw(str(good), {"a": ["liver"], "b": []}, {"a": [1], "b": []})
    assert validate_raw_dataset(str(good)).names_of("a") == ["liver"]
    bad = tmp_path / "Dataset002_Bad"
    _write_raw(str(bad), {"a": ["liver"], "b": []}, {"a": [1, 3], "b": []})
    with pytest.raises(PartialLabelError, match=r"case 'a'.*a\.nii\.gz.*\['spleen'\]"):
        validate_raw_dataset(str(bad))


def test_check_command_prints_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "Dataset003_Bad"
    _write_raw(str(bad), {"a": ["liver"]}, {"a": [1], "b": [2]})
    assert cli_main(["check", str(bad), "--skip-nnunet"]) == 2
    err = capsys.readouterr().err
    assert "nnunet-partial check: error:" in err and "'b'" in err and "Traceback" not in err
