"""CoWAM stage 1: ``nnunet-partial teachers`` / ``pseudolabel`` and ``nnUNetTrainerCoWAMPseudo``.

Unit tests for the combination rule, the metadata (``pseudo_labels``, ``teacher_of``, the registry),
the split restriction, the validation rule and every refusal; one integration test runs the whole
pipeline through the real nnU-Net (teachers -> train -> pseudolabel -> train the student -> predict).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from nnunet_helpers import SHARED_MR, cli, load_trainer, run
from nnunet_partial import teachers as T
from nnunet_partial.annotations import (PartialAnnotations, PartialLabelError, TeacherEntry, TeacherRegistry,
                                        check_pseudo_source, check_teacher_of, load_teacher_registry,
                                        save_teacher_registry)
from nnunet_partial.cli import main as cli_main
from nnunet_partial.synthetic import write_nifti, write_partial_dataset

LABELS = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}


# ---------------------------------------------------------------------------------- the combination rule
def test_manual_label_wins_and_teachers_of_annotated_labels_are_ignored():
    manual = np.array([[1, 1, 0, 0]])
    probs = {1: np.array([[0.0, 0.0, 0.9, 0.9]]),      # liver teacher: the case annotates liver -> ignored
             2: np.array([[0.99, 0.99, 0.8, 0.2]])}    # kidney teacher
    out = T.combine_pseudo_labels(manual, {1}, probs)
    assert out.tolist() == [[1, 1, 2, 0]]               # manual liver kept, kidney only on stored background


def test_threshold_is_strict_and_configurable():
    manual = np.zeros((1, 4), np.uint8)
    probs = {2: np.array([[0.5, 0.51, 0.7, 0.2]])}
    assert T.combine_pseudo_labels(manual, set(), probs).tolist() == [[0, 2, 2, 0]]
    assert T.combine_pseudo_labels(manual, set(), probs, threshold=0.6).tolist() == [[0, 0, 2, 0]]
    assert T.combine_pseudo_labels(manual, set(), probs, threshold=0.0).tolist() == [[2, 2, 2, 2]]


def test_overlapping_teachers_are_resolved_by_probability_ties_to_the_lower_label():
    manual = np.zeros((1, 4), np.uint8)
    probs = {2: np.array([[0.9, 0.6, 0.7, 0.3]]), 3: np.array([[0.8, 0.7, 0.7, 0.4]])}
    assert T.combine_pseudo_labels(manual, {1}, probs).tolist() == [[2, 3, 2, 0]]


def test_unlabelled_case_takes_every_teacher_and_fully_labelled_case_none():
    manual = np.zeros((2, 2), np.uint8)
    probs = {1: np.array([[0.9, 0.1], [0.1, 0.1]]), 2: np.array([[0.1, 0.9], [0.1, 0.1]])}
    assert T.combine_pseudo_labels(manual, set(), probs).tolist() == [[1, 2], [0, 0]]
    full = np.array([[0, 0], [1, 2]])
    assert T.combine_pseudo_labels(full, {1, 2}, probs).tolist() == full.tolist()
    with pytest.raises(ValueError, match="shape"):
        T.combine_pseudo_labels(manual, set(), {1: np.zeros((3, 3))})


# ---------------------------------------------------------------------------------- metadata
def _dj(annotated, pseudo=None, **extra):
    dj = {"labels": LABELS, "annotated_labels": annotated, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}
    if pseudo is not None:
        dj["pseudo_labels"] = pseudo
    return {**dj, **extra}


def test_pseudo_labels_are_parsed_and_give_a_training_view():
    ann = PartialAnnotations.from_dataset_json(_dj({"a": ["liver"], "u": []}, {"a": ["kidney"], "u": ["liver", "spleen"]}))
    assert ann.annotated["a"] == {1} and ann.pseudo["a"] == {2} and ann.pseudo_names_of("u") == ["liver", "spleen"]
    view = ann.with_pseudo_as_annotated()
    assert view.annotated == {"a": {1, 2}, "u": {1, 3}} and not view.pseudo
    assert view.annotated_mask(["u"]).tolist() == [[True, True, False, True]]   # background known once pseudo-labelled
    # check (raw files) accepts pseudo voxels; trainers reading annotated_labels only refuse them, naming the fix
    ann.check_present_labels("a", [0, 1, 2], allow_pseudo=True)
    with pytest.raises(PartialLabelError, match=r"\['kidney'\] are pseudo labels.*nnUNetTrainerCoWAMPseudo"):
        ann.check_present_labels("a", [0, 1, 2])
    with pytest.raises(PartialLabelError, match="lists only"):
        ann.check_present_labels("a", [0, 1, 3], allow_pseudo=True)


@pytest.mark.parametrize("pseudo, message", [
    ({"a": ["liver"]}, "case 'a' lists \\['liver'\\] both as annotated and as pseudo labels"),
    ({"zz": ["kidney"]}, "names case 'zz', which is not in 'annotated_labels'"),
    ({"a": ["lung"]}, "case 'a' lists unknown label 'lung'"),
    ({"a": "kidney"}, "case 'a': pseudo labels must be a list"),
])
def test_bad_pseudo_labels_are_refused(pseudo, message):
    with pytest.raises(PartialLabelError, match=message):
        PartialAnnotations.from_dataset_json(_dj({"a": ["liver"]}, pseudo))


def test_pseudo_source_and_teacher_of_are_validated():
    good = {"parent": "Dataset570_X", "configuration": "2d", "fold": "0", "trainer": "nnUNetTrainer",
            "plans": "nnUNetPlans", "threshold": 0.5, "teachers": {"liver": "Dataset571_XTeacherLiver"}}
    assert check_pseudo_source(good) == good
    with pytest.raises(PartialLabelError, match="pseudo_labels_from.threshold"):
        check_pseudo_source({**good, "threshold": 1.5})
    with pytest.raises(PartialLabelError, match="pseudo_labels_from.fold' must be a str"):
        PartialAnnotations.from_dataset_json(_dj({"a": []}, {"a": ["liver"]}, pseudo_labels_from={**good, "fold": 0}))
    dj = {"labels": {"background": 0, "liver": 1}, "teacher_of": {"dataset": "Dataset570_X", "label": "liver",
                                                                   "label_value": 1}}
    assert check_teacher_of(dj)["label"] == "liver" and check_teacher_of({"labels": LABELS}) is None
    with pytest.raises(PartialLabelError, match="must have the labels"):
        check_teacher_of({**dj, "labels": LABELS})


def _entry(label="liver", value=1, dataset_id=571, **kw):
    fields = dict(label=label, label_value=value, dataset=f"Dataset{dataset_id}_XTeacher{label.title()}",
                  dataset_id=dataset_id, trainer="nnUNetTrainer", plans="nnUNetPlans", configurations=("2d",),
                  folds=("0",), n_cases=3)
    return TeacherEntry(**{**fields, **kw})


def test_registry_round_trip_and_refusals(tmp_path):
    folder = tmp_path / "Dataset570_X"
    folder.mkdir()
    registry = TeacherRegistry("Dataset570_X", {"liver": _entry(), "kidney": _entry("kidney", 2, 572)})
    save_teacher_registry(registry, str(folder))
    assert load_teacher_registry(str(folder), _dj({})) == registry
    assert list(json.loads((folder / "teachers.json").read_text())["teachers"]) == ["liver", "kidney"]
    assert load_teacher_registry(str(tmp_path)) is None
    data = registry.to_json()
    for bad, message in [({**data, "format": 2}, "not a teacher registry"),
                         ({**data, "teachers": {"liver": {**data["teachers"]["liver"], "label_value": 3}}},
                          "has no label 'liver' of value 3"),
                         ({**data, "teachers": {"liver": {**data["teachers"]["liver"], "dataset_id": 599}}},
                          "does not match id 599"),
                         ({**data, "teachers": {"liver": {**data["teachers"]["liver"], "folds": ["x"]}}},
                          "folds must be integers or 'all'"),
                         ({**data, "teachers": {"liver": {"dataset": "x"}}}, "missing or malformed")]:
        with pytest.raises(PartialLabelError, match=message):
            TeacherRegistry.from_json(bad, _dj({}))
    other = tmp_path / "Dataset580_Y"
    other.mkdir()
    shutil.copy(folder / "teachers.json", other / "teachers.json")
    with pytest.raises(PartialLabelError, match="for 'Dataset570_X', not 'Dataset580_Y'"):
        load_teacher_registry(str(other))


def _write_case(folder, case, seg):
    for sub in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    write_nifti(np.zeros(seg.shape, np.int16), os.path.join(folder, "imagesTr", f"{case}_0000.nii.gz"))
    write_nifti(seg.astype(np.uint8), os.path.join(folder, "labelsTr", f"{case}.nii.gz"))


def test_check_validates_pseudo_labelled_datasets_and_the_registry(roots, capsys):
    source = {"parent": "Dataset570_X", "configuration": "2d", "fold": "0", "trainer": "nnUNetTrainer",
              "plans": "nnUNetPlans", "threshold": 0.5, "teachers": {"kidney": "Dataset572_XTeacherKidney"}}
    folder = str(roots["nnUNet_raw"] / "Dataset573_XPseudo")
    seg = np.zeros((2, 4, 4), np.uint8)
    seg[0, :2, :2], seg[1, :2, :2] = 1, 2          # manual liver + a pseudo kidney
    _write_case(folder, "a", seg)
    json.dump({**_dj({"a": ["liver"]}, {"a": ["kidney"]}, pseudo_labels_from=source), "numTraining": 1},
              open(os.path.join(folder, "dataset.json"), "w"))
    assert cli_main(["check", folder, "--skip-nnunet"]) == 0
    out = capsys.readouterr().out
    assert "kidney: annotated on 0 case(s), pseudo-labelled on 1" in out and "nnUNetTrainerCoWAMPseudo" in out
    seg[1, :2, :2] = 3                              # spleen: neither annotated nor pseudo
    _write_case(folder, "a", seg)
    assert cli_main(["check", folder, "--skip-nnunet"]) == 2
    assert "contains ['spleen']" in capsys.readouterr().err
    # the parent: its registry is validated against its labels
    parent = str(roots["nnUNet_raw"] / "Dataset570_X")
    _write_case(parent, "a", seg * 0)
    json.dump({**_dj({"a": ["liver"]}), "numTraining": 1}, open(os.path.join(parent, "dataset.json"), "w"))
    pre = roots["nnUNet_preprocessed"] / "Dataset570_X"
    pre.mkdir()
    save_teacher_registry(TeacherRegistry("Dataset570_X", {"liver": _entry()}), str(pre))
    assert cli_main(["check", parent, "--skip-nnunet"]) == 0
    assert "teacher of 'liver': Dataset571_XTeacherLiver (nnUNetTrainer, nnUNetPlans, 2d, fold(s) 0)" in \
        capsys.readouterr().out
    save_teacher_registry(TeacherRegistry("Dataset570_X", {"lung": _entry("lung", 9)}), str(pre))
    assert cli_main(["check", parent, "--skip-nnunet"]) == 2
    assert "has no label 'lung'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- split restriction
def test_teacher_split_is_the_parents_restricted_so_no_teacher_trains_on_a_student_validation_case():
    from nnunet_partial.splits import stratified_crossval_split
    annotated = {f"liver_{i}": ["liver"] for i in range(7)} | {f"kidney_{i}": ["kidney"] for i in range(6)} \
        | {"full_0": ["liver", "kidney"], "unl_0": []}
    ann = PartialAnnotations.from_dataset_json(_dj(annotated))
    parent = stratified_crossval_split(list(annotated), ann)
    for value, label in ((1, "liver"), (2, "kidney")):
        cases = [c for c in annotated if value in ann.annotated[c]]
        teacher = T.restrict_splits(parent, cases)
        for f, (t, s) in enumerate(zip(teacher, parent)):
            assert set(t["train"]) | set(t["val"]) == set(cases)
            assert not set(t["train"]) & set(s["val"]), f"teacher of {label} trains on student val of fold {f}"
            assert set(t["val"]) <= set(s["val"])


def test_folds_that_nnunet_cannot_train_are_refused():
    splits = [{"train": ["a"], "val": ["b"]}, {"train": ["a", "b"], "val": []}, {"train": [], "val": ["a"]}]
    T.check_fold(splits, "0", "teacher", "fix")
    T.check_fold(splits, "all", "teacher", "fix")
    with pytest.raises(PartialLabelError, match="no validation case in fold 1.*fix"):
        T.check_fold(splits, "1", "teacher", "fix")
    with pytest.raises(PartialLabelError, match="no training case in fold 2"):
        T.check_fold(splits, "2", "teacher", "fix")
    with pytest.raises(PartialLabelError, match="fold 5 does not exist"):
        T.check_fold(splits, "5", "teacher", "fix")


# ---------------------------------------------------------------------------------- planning teachers
@pytest.fixture()
def roots(tmp_path, monkeypatch):
    """Empty nnU-Net folders for tests that must not see the session's datasets."""
    out = {k: tmp_path / k for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for k, v in out.items():
        v.mkdir()
        monkeypatch.setenv(k, str(v))
    return out


def _parent(annotated, dataset_id=570):
    name = f"Dataset{dataset_id}_X"
    dj = _dj(annotated)
    return T.Parent(dataset_id, name, "", "", dj, {c: {"images": [], "label": ""} for c in annotated},
                    PartialAnnotations.from_dataset_json(dj))


def test_teacher_ids_are_the_next_free_ones_and_too_rare_labels_are_refused(roots):
    (roots["nnUNet_results"] / "Dataset571_Other").mkdir()   # taken in any nnU-Net folder counts
    parent = _parent({"a": ["liver"], "b": ["liver"], "c": ["kidney", "liver"], "d": ["kidney"], "u": []})
    with pytest.raises(PartialLabelError, match=r"'spleen' is annotated on 0 case\(s\).*--labels liver kidney"):
        T.plan_teachers(parent, min_cases=2)
    specs = T.plan_teachers(parent, ["liver", "kidney"], min_cases=2)
    assert [(s.label, s.dataset_id, s.cases) for s in specs] == [("liver", 572, ["a", "b", "c"]),
                                                                 ("kidney", 573, ["c", "d"])]
    assert specs[1].name(parent) == "Dataset573_XTeacherKidney"
    assert [s.dataset_id for s in T.plan_teachers(parent, ["liver"], ids=[580], min_cases=2)] == [580]
    with pytest.raises(PartialLabelError, match="--ids gives 1 id"):
        T.plan_teachers(parent, ["liver", "kidney"], ids=[580], min_cases=2)
    with pytest.raises(PartialLabelError, match="has no label \\['lung'\\]"):
        T.plan_teachers(parent, ["lung"], min_cases=1)
    with pytest.raises(PartialLabelError, match="dataset id 571 is taken by .*Dataset571_Other; choose another id"):
        T.check_id_free(571, "Dataset571_XTeacherLiver")
    T.check_id_free(572, "Dataset572_XTeacherLiver")
    registry = TeacherRegistry(parent.name, {"liver": _entry(dataset_id=585)})
    assert T.plan_teachers(parent, ["liver"], min_cases=2, registry=registry)[0].dataset_id == 585


def test_linked_dataset_leaves_the_linked_files_modes_alone(tmp_path):
    src = tmp_path / "image.nii.gz"
    src.write_bytes(b"x")
    os.chmod(src, 0o600)
    with T.linked_dataset(str(tmp_path / "raw"), 571, "T") as (tmp, target):
        kind = T.link_or_copy(str(src), os.path.join(tmp, "image.nii.gz"))
        (open(os.path.join(tmp, "own.txt"), "w")).close()
    from dataset_conversion.common import current_umask
    assert kind in ("hard link", "symlink", "copy")
    assert os.stat(src).st_mode & 0o777 == 0o600                 # the parent's file: untouched
    final = tmp_path / "raw" / "Dataset571_T"
    assert os.stat(final / "own.txt").st_mode & 0o777 == 0o666 & ~current_umask()
    assert os.stat(final).st_mode & 0o777 == 0o777 & ~current_umask()


# ---------------------------------------------------------------------------------- teacher models
def _fake_teacher(roots, entry, conf="2d", patch=(48, 48), channels=None, labels=None, checkpoint=True):
    folder = entry.results_folder(str(roots["nnUNet_results"]), conf)
    os.makedirs(os.path.join(folder, "fold_0"))
    (roots["nnUNet_raw"] / entry.dataset).mkdir(exist_ok=True)
    plans = {"plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
             "configurations": {conf: {"spacing": [1.5, 1.5], "patch_size": list(patch),
                                       "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False]}}}
    json.dump(plans, open(os.path.join(folder, "plans.json"), "w"))
    json.dump({"channel_names": channels or {"0": "CT"}, "labels": labels or {"background": 0, entry.label: 1}},
              open(os.path.join(folder, "dataset.json"), "w"))
    if checkpoint:
        open(os.path.join(folder, "fold_0", "checkpoint_final.pth"), "w").close()
    return folder, {**plans, "configurations": {conf: dict(plans["configurations"][conf], patch_size=[48, 48])}}


@pytest.mark.parametrize("problem, error, message", [
    ({}, None, None),
    ({"checkpoint": False}, FileNotFoundError, "no checkpoint_final.pth in .* \\(it is not trained\\): run "
                                               "nnUNetv2_train 571 2d 0 -tr nnUNetTrainer -p nnUNetPlans"),
    ({"patch": (32, 32)}, PartialLabelError, "trained with patch_size \\[32, 32\\] but Dataset570_X's nnUNetPlans 2d "
                                             "has \\[48, 48\\]"),
    ({"channels": {"0": "T1", "1": "T2"}}, PartialLabelError, "takes channels .*T2.*it is no teacher"),
    ({"labels": {"background": 0, "liver": 1, "tumour": 2}}, PartialLabelError, "a teacher predicts"),
])
def test_teacher_model_checks(roots, problem, error, message):
    entry = _entry()
    folder, parent_plans = _fake_teacher(roots, entry, **problem)
    parent = _parent({"a": ["liver"]})
    if error is None:
        assert T.check_teacher_model(entry, parent, "2d", "0", parent_plans=parent_plans) == folder
    else:
        with pytest.raises(error, match=message):
            T.check_teacher_model(entry, parent, "2d", "0", parent_plans=parent_plans)


def test_missing_and_interrupted_teachers_are_named(roots):
    entry = _entry()
    with pytest.raises(FileNotFoundError, match="teacher of 'liver' \\(Dataset571_XTeacherLiver\\) is missing"):
        T.check_teacher_model(entry, _parent({"a": ["liver"]}), "2d", "0", parent_plans={})
    folder, parent_plans = _fake_teacher(roots, entry, checkpoint=False)
    open(os.path.join(folder, "fold_0", "checkpoint_latest.pth"), "w").close()
    with pytest.raises(FileNotFoundError, match="training was interrupted.*-p nnUNetPlans --c"):
        T.check_teacher_model(entry, _parent({"a": ["liver"]}), "2d", "0", parent_plans=parent_plans)


def test_commands_refuse_with_one_line(roots, capsys):
    write_partial_dataset(str(roots["nnUNet_raw"]), 575, name="Tiny", sources={"liver": ("liver",)},
                          cases_per_source=2, shape=(4, 16, 16))
    assert cli_main(["teachers", "575", "-c", "2d"]) == 2
    assert "nnUNetPlans.json is missing: plan the parent first (nnUNetv2_plan_and_preprocess -d 575 -c 2d)" \
        in capsys.readouterr().err
    assert cli_main(["pseudolabel", "575", "-c", "2d"]) == 2
    err = capsys.readouterr().err
    assert "has no teachers" in err and "nnunet-partial teachers 575 -c 2d first" in err and "Traceback" not in err
    assert cli_main(["pseudolabel", "575", "--threshold", "1.0"]) == 2
    assert "--threshold must be in [0, 1)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- validation rule
def test_scoring_on_pseudo_labelled_targets_with_the_manual_mask_equals_scoring_the_manual_labels():
    from nnunet_partial.trainers import get_trainer
    from nnunet_partial.trainers.partial import nnUNetTrainerPartial
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 8, 8)
    manual = torch.randint(0, 2, (3, 1, 8, 8)) * torch.tensor([1, 2, 0]).view(3, 1, 1, 1)  # liver / kidney / none
    annotated = PartialAnnotations.from_dataset_json(_dj({"a": ["liver"], "b": ["kidney"], "u": []},
                                                         {"a": ["kidney", "spleen"], "b": ["liver"], "u": ["liver"]}))
    pseudo_target = manual.clone()
    noise = torch.randint(1, 4, manual.shape)
    for i, case in enumerate("abu"):
        allowed = torch.tensor(sorted(annotated.pseudo[case]))
        fill = (manual[i] == 0) & torch.isin(noise[i], allowed) & (torch.rand(manual[i].shape) > 0.5)
        pseudo_target[i][fill] = noise[i][fill]
    keys = ["a", "b", "u"]
    training_mask = annotated.with_pseudo_as_annotated().annotated_mask(keys)
    manual_mask = annotated.annotated_mask(keys)
    trainer = object.__new__(get_trainer("nnUNetTrainerCoWAMPseudo"))
    trainer._scoring_mask = manual_mask
    got = trainer.partial_tp_fp_fn(logits, pseudo_target, training_mask)
    want = nnUNetTrainerPartial.partial_tp_fp_fn(trainer, logits, manual, manual_mask)
    for k in ("tp_hard", "fp_hard", "fn_hard"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # and the training view would have scored the pseudo labels: different counts
    trainer._scoring_mask = None
    assert not np.array_equal(trainer.partial_tp_fp_fn(logits, pseudo_target, training_mask)["tp_hard"], want["tp_hard"])


# ---------------------------------------------------------------------------------- end to end
def _dice(a, b):
    return 2 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


@pytest.mark.integration
@pytest.mark.timeout(1800)   # five nnU-Net stages; ~10 min on the loaded 2-core CI machine
def test_teachers_pseudolabel_student_predict_end_to_end(make_dataset, nnunet_env, tmp_path, capsys):
    import SimpleITK as sitk
    from nnunet_partial.synthetic import write_test_set
    from nnunet_partial.trainers import get_trainer

    def read(path):
        return sitk.GetArrayFromImage(sitk.ReadImage(path))

    sources = {"liver": ("liver",), "kidney": ("kidney",)}
    shape = (16, 48, 48)
    parent = make_dataset(570, configurations=("2d",), name="PseudoE2E", sources=sources, cases_per_source=3,
                          shape=shape)
    raw, pre, res = (nnunet_env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))

    # ---- teachers: datasets, plans, splits, registry; trained with --train
    out = run(cli("teachers", "570", "-c", "2d", "--labels", "liver", "kidney", "--ids", "571", "572",
                  "--min-cases", "3", "-tr", "nnUNetTrainer_tiny", "--train", "-device", "cpu", "-np", "1"),
              env=nnunet_env).stdout
    assert "nnUNetv2_train 571 2d 0 -tr nnUNetTrainer_tiny -p nnUNetPlans" in out
    assert "nnUNetv2_train 572 2d 0 -tr nnUNetTrainer_tiny -p nnUNetPlans" in out
    registry = load_teacher_registry(parent.preprocessed)
    assert {k: (e.dataset, e.trainer, e.configurations, e.folds) for k, e in registry.teachers.items()} == {
        "liver": ("Dataset571_PseudoE2ETeacherLiver", "nnUNetTrainer_tiny", ("2d",), ("0",)),
        "kidney": ("Dataset572_PseudoE2ETeacherKidney", "nnUNetTrainer_tiny", ("2d",), ("0",))}
    parent_split = json.load(open(os.path.join(parent.preprocessed, "splits_final.json")))
    parent_plans = json.load(open(os.path.join(parent.preprocessed, "nnUNetPlans.json")))
    for label, value in (("liver", 1), ("kidney", 2)):
        entry = registry.teachers[label]
        traw = os.path.join(raw, entry.dataset)
        dj = json.load(open(os.path.join(traw, "dataset.json")))
        assert dj["teacher_of"] == {"dataset": parent.name, "label": label, "label_value": value}
        cases = sorted(f[:-7] for f in os.listdir(os.path.join(traw, "labelsTr")))
        assert cases == [f"{label}_00{i}" for i in (1, 2, 3)]
        for case in cases:
            img = os.path.join(traw, "imagesTr", f"{case}_0000.nii.gz")
            assert os.path.samefile(img, os.path.join(parent.raw, "imagesTr", f"{case}_0000.nii.gz"))  # linked
            expected = read(os.path.join(parent.raw, "labelsTr", f"{case}.nii.gz")) == value
            np.testing.assert_array_equal(read(os.path.join(traw, "labelsTr", f"{case}.nii.gz")), expected)
        tplans = json.load(open(os.path.join(pre, entry.dataset, "nnUNetPlans.json")))
        assert tplans["configurations"]["2d"]["patch_size"] == parent_plans["configurations"]["2d"]["patch_size"]
        tsplit = json.load(open(os.path.join(pre, entry.dataset, "splits_final.json")))
        assert tsplit == T.restrict_splits(parent_split, cases)
        validated = sorted(f[:-7] for f in os.listdir(os.path.join(T.fold_folder(entry, "2d", "0"), "validation"))
                           if f.endswith(".nii.gz"))
        assert validated == tsplit[0]["val"] and not set(tsplit[0]["train"]) & set(parent_split[0]["val"])

    # re-running skips finished work
    T.train_teachers(T.setup_teachers(570, ["2d"], trainer="nnUNetTrainer_tiny", labels=["liver", "kidney"],
                                      min_cases=3), ["2d"], ["0"], device="cpu")
    assert "2d fold 0 already trained" in capsys.readouterr().out

    # ---- pseudolabel (in-process: the console script's code path), scored against the synthetic truth
    truth = write_partial_dataset(str(tmp_path), 570, name="Truth", sources=sources, cases_per_source=3,
                                  shape=shape, partial=False)
    assert cli_main(["pseudolabel", "570", "-c", "2d", "-f", "0", "--id", "573", "-device", "cpu", "-np", "1",
                     "--disable-tta", "--save-probabilities", "--truth", os.path.join(truth, "labelsTr")]) == 0
    printed = capsys.readouterr().out
    print(printed)   # the teacher-quality table, in the test log
    assert "Teacher quality" in printed and "Dataset571_PseudoE2ETeacherLiver" in printed
    assert "nnUNetv2_train 573 2d 0 -tr nnUNetTrainerCoWAMPseudo" in printed
    d_name = "Dataset573_PseudoE2EPseudo"
    d_raw = os.path.join(raw, d_name)
    dj = json.load(open(os.path.join(d_raw, "dataset.json")))
    parent_dj = json.load(open(os.path.join(parent.raw, "dataset.json")))
    assert dj["annotated_labels"] == parent_dj["annotated_labels"]
    assert dj["pseudo_labels"] == {**{f"liver_00{i}": ["kidney"] for i in (1, 2, 3)},
                                   **{f"kidney_00{i}": ["liver"] for i in (1, 2, 3)}}
    assert dj["pseudo_labels_from"]["fold"] == "0" and dj["pseudo_labels_from"]["threshold"] == 0.5
    for case, (value, other) in {f"liver_00{i}": (1, 2) for i in (1, 2, 3)}.items() | \
            {f"kidney_00{i}": (2, 1) for i in (1, 2, 3)}.items():
        manual = read(os.path.join(parent.raw, "labelsTr", f"{case}.nii.gz"))
        pseudo = read(os.path.join(d_raw, "labelsTr", f"{case}.nii.gz"))
        np.testing.assert_array_equal(pseudo == value, manual == value)      # manual label wins, untouched
        assert set(np.unique(pseudo)) <= {0, value, other}
        assert os.path.samefile(os.path.join(d_raw, "imagesTr", f"{case}_0000.nii.gz"),
                                os.path.join(parent.raw, "imagesTr", f"{case}_0000.nii.gz"))
    work = os.path.join(parent.preprocessed, "pseudolabels_2d_fold_0")
    assert set(np.load(os.path.join(work, "probabilities", "liver_001.npz"))) == {"kidney"}
    assert json.load(open(os.path.join(pre, d_name, "splits_final.json"))) == parent_split
    assert cli_main(["check", "573", "--skip-nnunet"]) == 0
    quality = T.pseudo_label_quality(d_raw, os.path.join(truth, "labelsTr"))
    assert quality["mean"]["liver"]["n_cases"] == 3 and quality["mean"]["spleen"]["n_cases"] == 0
    # a re-run reuses D̂
    assert cli_main(["pseudolabel", "570", "-c", "2d", "-f", "0", "-device", "cpu", "-np", "1", "--disable-tta",
                     "--save-probabilities"]) == 0
    assert "pseudo-labelled dataset exists" in capsys.readouterr().out

    # ---- the trainers on D̂: CoWAMPseudo's views; the others refuse pseudo labels; CoWAMPseudo refuses the parent
    student = load_trainer(get_trainer("nnUNetTrainerCoWAMPseudo_tiny"), d_name, "2d", initialize=False)
    assert student.annotations.annotated["liver_001"] == {1, 2} and student.manual_annotations.annotated["liver_001"] == {1}
    assert student.hard_loss == "focal" and (student.lambda_focal, student.lambda_dice) == (1.0, 0.1)
    with pytest.raises(PartialLabelError, match="pseudo labels.*nnUNetTrainerCoWAMPseudo"):
        load_trainer(get_trainer("nnUNetTrainerPartial_tiny"), d_name, "2d", initialize=True)
    with pytest.raises(PartialLabelError, match="has none.*nnUNetTrainerCoWAM"):
        load_trainer(get_trainer("nnUNetTrainerCoWAMPseudo_tiny"), parent.name, "2d", initialize=False)

    # ---- the full CoWAM on D̂, validated against the manual labels only; then nnUNetv2_predict
    run(["nnUNetv2_train", "573", "2d", "0", "-tr", "nnUNetTrainerCoWAMPseudo_tiny", "-device", "cpu"], env=nnunet_env)
    fold = os.path.join(res, d_name, "nnUNetTrainerCoWAMPseudo_tiny__nnUNetPlans__2d", "fold_0")
    summary = json.load(open(os.path.join(fold, "validation", "summary.json")))
    assert sorted(os.path.basename(e["reference_file"])[:-7] for e in summary["metric_per_case"]) == parent_split[0]["val"]
    for e in summary["metric_per_case"]:
        case = os.path.basename(e["reference_file"])[:-7]
        manual_values = {1} if case.startswith("liver") else {2}
        assert {int(k) for k, m in e["metrics"].items() if m["annotated"]} == manual_values
        pred = read(os.path.join(fold, "validation", f"{case}.nii.gz"))
        manual = read(os.path.join(parent.raw, "labelsTr", f"{case}.nii.gz"))
        for k in manual_values:   # D̂'s reference on an annotated label = the manual label
            assert e["metrics"][str(k)]["Dice"] == pytest.approx(_dice(pred == k, manual == k))
    images, _ = write_test_set(str(tmp_path / "test"), 1, shape=shape)
    run(["nnUNetv2_predict", "-i", images, "-o", str(tmp_path / "pred"), "-d", "573", "-c", "2d", "-f", "0",
         "-tr", "nnUNetTrainerCoWAMPseudo_tiny", "-device", "cpu", "-npp", "1", "-nps", "1"], env=nnunet_env)
    assert read(str(tmp_path / "pred" / "test_000.nii.gz")).shape == tuple(shape)


@pytest.mark.integration
@pytest.mark.skipif(not os.environ.get("NNUNET_PARTIAL_SLOW"), reason="slow (several minutes on CPU): set "
                    "NNUNET_PARTIAL_SLOW=1 to run stage 1 on the real MR scan")
@pytest.mark.skipif(not os.path.isdir(SHARED_MR), reason=f"{SHARED_MR} is absent")
@pytest.mark.timeout(5400)
def test_stage1_on_the_real_mr_scan_split_into_single_organ_cases(nnunet_env, tmp_path):
    """The real MR of ../shared/data as a partial dataset: four sub-volumes (left/right halves, two slabs),
    each annotating one of liver / spleen, teachers trained, pseudo labels scored against the full labels."""
    import SimpleITK as sitk
    from nnunet_helpers import plan_and_preprocess
    from nnunet_partial.annotations import validate_raw_dataset

    img = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(SHARED_MR, "mr_image.nii.gz")))
    seg = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(SHARED_MR, "mr_labels.nii.gz")))
    organs = np.where(seg == 5, 1, np.where(seg == 1, 2, 0)).astype(np.uint8)   # liver, spleen (TotalSegmentator MR)
    raw = os.path.join(nnunet_env["nnUNet_raw"], "Dataset576_MRStage1")
    truth = tmp_path / "truth"
    for d in ("imagesTr", "labelsTr"):
        os.makedirs(os.path.join(raw, d))
    truth.mkdir()
    annotated = {}
    z = img.shape[0]
    crops = [(slice(0, z), slice(None), slice(None)), (slice(0, z), slice(None, None, -1), slice(None)),
             (slice(0, z), slice(None), slice(None, None, -1)), (slice(0, z), slice(None, None, -1), slice(None, None, -1)),
             (slice(2, z), slice(None), slice(None)), (slice(0, z - 2), slice(None, None, -1), slice(None))]
    for i, crop in enumerate(crops):
        case, organ = f"mr_{i:03d}", ("liver", "spleen")[i % 2]
        image, full = np.ascontiguousarray(img[crop]), np.ascontiguousarray(organs[crop])
        write_nifti(image, os.path.join(raw, "imagesTr", f"{case}_0000.nii.gz"), (3.0, 3.0, 3.0))
        write_nifti(np.where(full == i % 2 + 1, full, 0).astype(np.uint8),
                    os.path.join(raw, "labelsTr", f"{case}.nii.gz"), (3.0, 3.0, 3.0))
        write_nifti(full, str(truth / f"{case}.nii.gz"), (3.0, 3.0, 3.0))
        annotated[case] = [organ]
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    generate_dataset_json(raw, {0: "MR"}, {"background": 0, "liver": 1, "spleen": 2}, len(crops), ".nii.gz",
                          dataset_name="Dataset576_MRStage1", annotated_labels=annotated)
    validate_raw_dataset(raw)
    plan_and_preprocess(576, ("2d",), env=nnunet_env)
    run(cli("teachers", "576", "-c", "2d", "--ids", "577", "578", "--min-cases", "3", "-tr", "nnUNetTrainer_tiny",
            "--train", "-device", "cpu", "-np", "1"), env=nnunet_env)
    out = run(cli("pseudolabel", "576", "-c", "2d", "--id", "579", "-device", "cpu", "-np", "1", "--disable-tta",
                  "--truth", str(truth)), env=nnunet_env).stdout
    print(out)
    assert "Dataset579_MRStage1Pseudo" in out and "pseudo Dice" in out
