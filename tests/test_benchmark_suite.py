"""scripts/benchmark_suite.py and the scenario support of nnunet_partial/synthetic.py: generator
determinism (defaults unchanged), scenarios sharing images with their oracle, the summary maths, and
the suite end to end at a tiny budget (real nnU-Net CLI), including resume."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_helpers import REPO_ROOT
from nnunet_partial.synthetic import (ANATOMIES, LABELS, SCENARIOS, make_phantom, write_partial_dataset,
                                      write_test_set)

SCRIPT = os.path.join(REPO_ROOT, "scripts", "benchmark_suite.py")


def _load_suite():
    spec = importlib.util.spec_from_file_location("benchmark_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


suite = _load_suite()


def _hash(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(a.tobytes())
        h.update(f"{a.dtype}{a.shape}".encode())
    return h.hexdigest()[:16]


def _read(folder: str, sub: str, name: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, sub, name)))


# ---------------------------------------------------------------------- generator
def test_default_phantoms_and_datasets_are_unchanged(tmp_path):
    # hashes taken before scenario support was added: the demo, the old benchmarks and the tests rely on them
    assert _hash(*make_phantom(0)) == "21c919ee65f50849"
    assert _hash(*make_phantom(7, (12, 24, 24))) == "c733ce6fc6330ff7"
    folder = write_partial_dataset(str(tmp_path), 77, "T", cases_per_source=1, n_full=1, n_unlabelled=1,
                                   shape=(12, 24, 24), seed=3)
    arrays = [_read(folder, sub, n) for sub in ("imagesTr", "labelsTr")
              for n in sorted(os.listdir(os.path.join(folder, sub)))]
    assert _hash(*arrays) == "fc9eddf1fe2ba01a"
    with open(os.path.join(folder, "dataset.json"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest()[:16] == "f4628c12544dab8b"


def test_hard_and_small_anatomies_change_only_their_organs():
    default_img, default_lab = make_phantom(5)
    for name in ("hard", "small"):
        img, lab = make_phantom(5, anatomy=name)
        assert np.array_equal(img, make_phantom(5, anatomy=name)[0])          # deterministic per seed
        outside = (lab == 0) & (default_lab == 0)
        assert np.array_equal(img[outside], default_img[outside])             # same body and noise draws
        assert set(np.unique(lab)) == {0, 1, 2, 3, 4}
        assert (lab == 4).sum() < 0.4 * (default_lab == 4).sum()              # small, thin pancreas
    img, lab = make_phantom(5, anatomy="hard")
    kidney, spleen = img[lab == 2].astype(float), img[lab == 3].astype(float)
    assert abs(kidney.mean() - spleen.mean()) < 0.5 * kidney.std()           # intensity does not tell them apart
    assert default_img[default_lab == 2].mean() > 120                        # unlike the default kidney
    img, lab = make_phantom(5, anatomy="small")
    assert (lab == 2).sum() < 0.3 * (default_lab == 2).sum()
    with pytest.raises(ValueError, match="unknown anatomy"):
        make_phantom(0, anatomy="nope")
    assert set(ANATOMIES) >= {"default", "hard", "small", "tiny"}


@pytest.mark.parametrize("seed", range(4))
def test_tiny_structures_are_below_the_coarsest_head_stride_and_visible(seed):
    """2d at the default shape: nnU-Net's coarsest deep-supervision head has stride 8 in-plane. Every kidney
    and the pancreas's thickness stay under it; the pancreas is brighter than everything around it."""
    from scipy.ndimage import find_objects
    from scipy.ndimage import label as components
    default_img, default_lab = make_phantom(seed)
    img, lab = make_phantom(seed, anatomy="tiny")
    outside = (lab == 0) & (default_lab == 0)
    assert np.array_equal(img[outside], default_img[outside])
    kidneys, n = components(lab == 2)
    assert n == 2
    for box in find_objects(kidneys):
        assert max(s.stop - s.start for s in box[1:]) <= 4                   # y, x extent in voxels
    pancreas = lab == 4
    assert pancreas.sum(axis=1).max() <= 4 and pancreas.any(axis=(0, 1)).sum() >= 8   # thin in y, long in x
    near = (default_lab == 0) & (np.abs(np.indices(lab.shape)[1] - 32) < 12)
    assert img[lab == 4].mean() > img[near].mean() + 60 and img[lab == 4].mean() > img[lab == 1].mean() + 40
    assert SCENARIOS["tiny-structures"]().anatomy == "tiny"


@pytest.mark.parametrize("name,kwargs", [("few-labels", {"cases_per_source": 2, "n_unlabelled": 1}),
                                         ("hard-anatomy", {"cases_per_source": 1}),
                                         ("semi", {"n_labelled": 1, "n_unlabelled": 2})])
def test_scenario_datasets_share_images_with_the_oracle(tmp_path, name, kwargs):
    scenario = SCENARIOS[name](**kwargs)
    folders = {key: spec.writer(str(tmp_path), 900 + i, name=f"S{key}", seed=2, shape=(8, 16, 16), **spec.kwargs)
               for i, (key, spec) in enumerate(scenario.datasets.items())}
    meta = {k: json.load(open(os.path.join(f, "dataset.json"))) for k, f in folders.items()}
    assert "annotated_labels" in meta["partial"] and "annotated_labels" not in meta["oracle"]
    partial_cases = sorted(os.listdir(os.path.join(folders["partial"], "imagesTr")))
    oracle_cases = sorted(os.listdir(os.path.join(folders["oracle"], "imagesTr")))
    assert len(partial_cases) == len(oracle_cases)
    # the same images in plan order (case names differ only in the semi oracle: full_00k for all)
    order = lambda names: sorted(names, key=lambda n: (not n.startswith(("liver", "kidney", "spleen", "pancreas",
                                                                            "full")), n))
    for p, o in zip(order(partial_cases), order(oracle_cases)):
        if name != "semi":
            assert p == o
        assert np.array_equal(_read(folders["partial"], "imagesTr", p), _read(folders["oracle"], "imagesTr", o))
    # oracle labels hold every organ of the image; partial labels a subset of them
    for p in partial_cases:
        lab_p = _read(folders["partial"], "labelsTr", p.replace("_0000", ""))
        annotated = meta["partial"]["annotated_labels"][p.replace("_0000.nii.gz", "")]
        assert set(np.unique(lab_p)) <= {0} | {LABELS[o] for o in annotated}
    if name == "semi":
        assert meta["partial"]["numTraining"] == 3 and meta["labelled"]["numTraining"] == 1
        assert np.array_equal(_read(folders["labelled"], "imagesTr", "full_001_0000.nii.gz"),
                              _read(folders["partial"], "imagesTr", "full_001_0000.nii.gz"))
        assert scenario.dataset_for("nnUNetTrainerPartial") == "labelled"
        assert scenario.dataset_for("nnUNetTrainerMeanTeacher") == "partial"
    if name == "hard-anatomy":
        assert scenario.dataset_for("nnUNetTrainerMeanTeacher") is None   # no unlabelled cases
        # the scenario's anatomy reaches the files: kidney_001 is case 1 of the plan (liver, kidney, ...)
        img, lab = make_phantom(2 * 100003 + 1, (8, 16, 16), "hard")
        assert np.array_equal(_read(folders["oracle"], "imagesTr", "kidney_001_0000.nii.gz"), img)
        assert np.array_equal(_read(folders["oracle"], "labelsTr", "kidney_001.nii.gz"), lab)


def test_test_set_follows_the_anatomy(tmp_path):
    write_test_set(str(tmp_path), 1, (8, 16, 16), anatomy="hard")
    expected = make_phantom(10_000, (8, 16, 16), "hard")[1]
    assert np.array_equal(_read(str(tmp_path), "labelsTs", "test_000.nii.gz"), expected)


# ---------------------------------------------------------------------- summary maths
def _record(method, seed, dice, scenario="few-labels"):
    return {"scenario": scenario, "configuration": "2d", "schedule": "bench", "seed": seed, "method": method,
            "label": method, "supervised_baseline": "nnUNetTrainerPartial",
            "dice": dict(zip(("liver", "kidney", "spleen", "pancreas"), dice)),
            "hd95": dict(zip(("liver", "kidney", "spleen", "pancreas"), (2.0, 3.0, None, 4.0))),
            "mean_dice": float(np.mean([d for d in dice if d is not None])), "mean_hd95": 3.0, "train_seconds": 100.0 + seed}


def test_summary_headroom_and_lost_organs():
    records = [_record("nnUNetTrainer", 0, (0.9, 0.05, 0.0, 0.0)), _record("nnUNetTrainer", 1, (0.8, 0.5, 0.2, None)),
               _record("nnUNetTrainerPartial", 0, (0.9, 0.9, 0.8, 0.6)),
               _record("nnUNetTrainerPartial", 1, (0.9, 0.9, 0.8, 0.76)),
               _record("oracle", 0, (0.95, 0.95, 0.9, 0.8)), _record("oracle", 1, (0.95, 0.95, 0.9, 0.8))]
    summary = suite.summarise(records)
    methods = summary[("few-labels", "2d", "bench")]
    assert list(methods) == ["nnUNetTrainer", "nnUNetTrainerPartial", "oracle"]
    naive = methods["nnUNetTrainer"]
    assert naive["lost"] == 4 and naive["of"] == 8          # 0.05, 0.0, 0.0 and a missing (None) organ
    assert naive["dice"]["liver"] == pytest.approx((0.85, np.std([0.9, 0.8], ddof=1)))
    assert np.isnan(naive["hd95"]["spleen"][0]) and naive["train_seconds"] == pytest.approx(100.5)
    assert methods["oracle"]["lost"] == 0 and methods["oracle"]["mean_dice"][1] == pytest.approx(0.0)
    gaps = suite.headroom(methods)
    assert gaps["naive"]["points"] == pytest.approx(100 * (0.9 - np.mean([0.2375, 0.5])))
    assert gaps["supervised"]["points"] == pytest.approx(100 * (0.9 - 0.82))
    text = suite.format_group(("few-labels", "2d", "bench"), methods, None, {"nnUNetTrainerX": "why"})
    assert "4/8" in text and "0.850±0.071" in text and "nnUNetTrainerX: not run here (why)" in text
    assert "oracle - supervised (nnUNetTrainerPartial): +8.0 Dice points, ok" in text
    assert "LOW" not in text
    naive_mean = np.mean([np.mean([0.9, 0.05, 0.0, 0.0]), np.mean([0.8, 0.5, 0.2])])
    assert suite.gap_closed(methods) == {"nnUNetTrainer": pytest.approx((naive_mean - 0.82) / 0.08)}
    assert "nnUNetTrainer closes -564 % of the oracle - supervised gap" in text   # worse than supervised
    # a scenario without headroom says so
    close = [_record("nnUNetTrainerPartial", 0, (0.9, 0.9, 0.8, 0.6)), _record("oracle", 0, (0.9, 0.9, 0.8, 0.62))]
    text = suite.format_group(("few-labels", "2d", "bench"), suite.summarise(close)[("few-labels", "2d", "bench")],
                              None, {})
    assert "+0.5 Dice points, LOW" in text and "oracle - naive (nnUNetTrainer): n/a" in text
    # a gap within the seeds' spread (an oracle that lost an organ in one seed) is no headroom: no shares then
    noisy = [_record("nnUNetTrainerPartial", 0, (0.9, 0.9, 0.8, 0.0)), _record("nnUNetTrainerPartial", 1, (0.9, 0.9, 0.8, 0.0)),
             _record("oracle", 0, (0.95, 0.95, 0.95, 0.9)), _record("oracle", 1, (0.95, 0.95, 0.1, 0.0)),
             _record("nnUNetTrainerX", 0, (0.9, 0.9, 0.9, 0.9)), _record("nnUNetTrainerX", 1, (0.9, 0.9, 0.9, 0.9))]
    noisy_methods = suite.summarise(noisy)[("few-labels", "2d", "bench")]
    h = suite.headroom(noisy_methods)["supervised"]
    assert h["points"] == pytest.approx(100 * (np.mean([0.9375, 0.5]) - 0.65))          # 6.9 >= 5 points
    assert h["spread"] == pytest.approx(100 * np.std([0.9375, 0.5], ddof=1))
    text = suite.format_group(("few-labels", "2d", "bench"), noisy_methods, None, {})
    assert "WITHIN THE SEEDS' SPREAD (sd up to 30.9 points: no clear headroom)" in text and "closes" not in text
    # no gap, no share of it
    below = close + [_record("nnUNetTrainerX", 0, (1.0, 1.0, 1.0, 1.0)), _record("oracle", 1, (0.5, 0.5, 0.5, 0.5))]
    assert suite.gap_closed(suite.summarise(below)[("few-labels", "2d", "bench")]) == {}


def test_organs_missing_from_test_cases_are_counted_as_false_organs_and_left_out_of_present_dice():
    """Anatomy "absent": a test case without the spleen scores Dice 0 for any spleen voxel predicted (NaN for none);
    the report counts those false organs and gives the Dice over the cases that hold the organ."""
    def case(spleen_ref, spleen_pred, spleen_dice):
        m = {o: {"Dice": 0.9, "n_ref": 100, "n_pred": 100} for o in ("liver", "kidney", "pancreas")}
        return {**m, "spleen": {"Dice": spleen_dice, "n_ref": spleen_ref, "n_pred": spleen_pred}}

    records = []
    # seed 0 predicts 5 spleen voxels in case b, which has none: its spleen Dice is the mean of 0.8 and 0
    for seed, (missing_pred, missing_dice, spleen) in enumerate(((5, 0.0, 0.4), (0, None, 0.8))):
        r = _record("nnUNetTrainerX", seed, (0.9, 0.9, spleen, 0.9))
        r["evaluation"] = {"per_case": {"a": case(100, 90, 0.8), "b": case(0, missing_pred, missing_dice)}}
        records.append(r)
    methods = suite.summarise(records)[("few-labels", "2d", "bench")]
    x = methods["nnUNetTrainerX"]
    assert x["absent"] == 2 and x["false_organs"] == 1
    assert x["dice"]["spleen"][0] == pytest.approx(np.mean([0.4, 0.8]))     # the false organ costs seed 0
    assert x["present_dice"]["spleen"] == pytest.approx((0.8, 0.0))         # not here
    assert x["mean_present_dice"][0] == pytest.approx(np.mean([0.9, 0.9, 0.8, 0.9]))
    text = suite.format_group(("few-labels", "2d", "bench"), methods, None, {})
    assert "false organs" in text and "1/2" in text and "Dice, test cases holding the organ" in text
    # test sets holding every organ (and records without per-case counts): no such columns
    plain = suite.format_group(("few-labels", "2d", "bench"),
                               suite.summarise([_record("oracle", 0, (0.9,) * 4)])[("few-labels", "2d", "bench")], None, {})
    assert "false organs" not in plain and "holding" not in plain


def test_a_trainer_on_the_oracle_dataset_is_a_second_oracle_row():
    """TRAINER@oracle: a trainer of ours on the fully labelled dataset, an upper bound beside stock nnU-Net's;
    TRAINER@KEY any dataset of the scenario, an unknown KEY a clear error."""
    tiny = SCENARIOS["tiny-structures"]()
    run = suite.Run(tiny, "2d", "bench", 1, "nnUNetTrainerPartial@oracle")
    assert (run.trainer, run.dataset_key) == ("nnUNetTrainerPartial_bench", "oracle")
    assert run.key == "tiny-structures/2d/bench/seed1/nnUNetTrainerPartial@oracle"
    assert suite.run_identity(run) != suite.run_identity(suite.Run(tiny, "2d", "bench", 1, suite.ORACLE))
    assert suite.method_label(run.method, run.dataset_key) == "oracle (nnUNetTrainerPartial, full labels)"
    semi = SCENARIOS["semi"]()
    assert suite.dataset_of(semi, "nnUNetTrainerMeanTeacher@labelled") == "labelled"
    assert suite.dataset_of(semi, "nnUNetTrainerPartial") == "labelled"
    with pytest.raises(SystemExit, match="semi has no dataset 'nope'"):
        suite.dataset_of(semi, "nnUNetTrainerPartial@nope")
    assert suite.is_oracle("oracle") and suite.is_oracle("nnUNetTrainerMLDS@oracle")
    assert not suite.is_oracle("nnUNetTrainerMLDS") and not suite.is_oracle("nnUNetTrainerPartial@labelled")

    records = [_record("nnUNetTrainerPartial", 0, (0.9, 0.9, 0.8, 0.6)), _record("nnUNetTrainerPartial", 1, (0.9, 0.9, 0.8, 0.6)),
               _record("oracle", 0, (0.9, 0.0, 0.8, 0.0)), _record("oracle", 1, (0.9, 0.0, 0.8, 0.1)),
               _record("nnUNetTrainerPartial@oracle", 0, (0.95, 0.95, 0.9, 0.9)),
               _record("nnUNetTrainerPartial@oracle", 1, (0.95, 0.95, 0.9, 0.9)),
               _record("nnUNetTrainerX", 0, (0.95, 0.95, 0.9, 0.75)), _record("nnUNetTrainerX", 1, (0.95, 0.95, 0.9, 0.75))]
    methods = suite.summarise(records)[("few-labels", "2d", "bench")]
    assert suite.headroom(methods, "nnUNetTrainerPartial@oracle")["supervised"]["points"] == pytest.approx(12.5)
    assert suite.gap_closed(methods, "nnUNetTrainerPartial@oracle") == {"nnUNetTrainerX": pytest.approx(0.0875 / 0.125)}
    text = suite.format_group(("few-labels", "2d", "bench"), methods, None, {})
    assert "headroom oracle - supervised (nnUNetTrainerPartial): -36.2 Dice points, LOW" in text
    assert "headroom nnUNetTrainerPartial@oracle - supervised (nnUNetTrainerPartial): +12.5 Dice points, ok" in text
    assert "nnUNetTrainerX closes 70 % of the nnUNetTrainerPartial@oracle - supervised gap" in text
    assert "oracle - supervised gap" not in text.replace("@oracle - supervised gap", "")   # stock oracle: no shares


def test_stage_one_methods_train_on_the_pseudo_labelled_dataset_or_use_the_teachers():
    """Full CoWAM trains on D̂ (derived from the partial dataset, so its identity is the partial dataset's plus the
    method), MS-KD on the partial dataset with its teachers; only those runs need stage 1, whose seconds get a
    column of their own."""
    few = SCENARIOS["few-labels"]()
    full_cowam = suite.Run(few, "2d", "bench", 0, "nnUNetTrainerCoWAMPseudo")
    pseudo_only = suite.Run(few, "2d", "bench", 0, "nnUNetTrainer@pseudo")
    mskd = suite.Run(few, "2d", "bench", 0, "nnUNetTrainerMSKD")
    partial = suite.Run(few, "2d", "bench", 0, "nnUNetTrainerPartial")
    assert full_cowam.dataset_key == pseudo_only.dataset_key == "pseudo"
    assert mskd.dataset_key == partial.dataset_key == "partial"
    assert [suite.uses_teachers(r) for r in (full_cowam, pseudo_only, mskd, partial)] == [True, True, True, False]
    assert suite.run_identity(pseudo_only)[:4] == suite.run_identity(partial)[:4]      # D̂ = the partial images
    assert suite.run_identity(pseudo_only) != suite.run_identity(suite.Run(few, "2d", "bench", 0, "nnUNetTrainer"))
    assert suite.method_label(pseudo_only.method, "pseudo") == "nnUNetTrainer [D̂: teachers' pseudo labels]"
    with pytest.raises(SystemExit, match="it has partial, oracle, pseudo"):
        suite.dataset_of(few, "nnUNetTrainer@nope")

    records = [_record("nnUNetTrainerPartial", 0, (0.9, 0.9, 0.8, 0.6)),
               {**_record("nnUNetTrainerMSKD", 0, (0.9, 0.9, 0.8, 0.7)), "teacher_seconds": 400.0}]
    text = suite.format_group(("few-labels", "2d", "bench"), suite.summarise(records)[("few-labels", "2d", "bench")],
                              None, {})
    header, _, partial_row, mskd_row = text.splitlines()[1:5]
    assert header.split()[-3:] == ["teachers", "s", "runs"] and "+ teachers s" in header
    assert partial_row.split()[-3:] == ["100", "n/a", "1"] and mskd_row.split()[-3:] == ["100", "400", "1"]
    without = suite.format_group(("few-labels", "2d", "bench"), suite.summarise(records[:1])[("few-labels", "2d", "bench")],
                                 None, {})
    assert "teachers" not in without


def test_cli_helpers(tmp_path):
    assert suite.parse_scenario_args(["few-labels.cases_per_source=2", "semi.n_unlabelled=10"]) == \
        {"few-labels": {"cases_per_source": 2}, "semi": {"n_unlabelled": 10}}
    with pytest.raises(SystemExit, match="SCENARIO.ARG=VALUE"):
        suite.parse_scenario_args(["nope.x=1"])
    assert suite.resolve_schedule(None, "3d_fullres", "cpu") == "demo"
    assert suite.resolve_schedule(None, "3d_fullres", "cuda") == suite.resolve_schedule(None, "2d", "cpu") == "bench"
    assert suite.resolve_schedule("tiny", "3d_fullres", "cpu") == "tiny"
    assert suite.unknown_trainers(["nnUNetTrainerPartial_bench", "nnUNetTrainer_5epochs", "nnUNetTrainerNope_bench"]) \
        == ["nnUNetTrainerNope_bench"]
    store = suite.ResultStore(str(tmp_path / "results.json"))
    store.check_settings({"shape": [8, 16, 16]}, {"semi": {}})
    store.add("a", {"x": float("nan")})
    again = suite.ResultStore(str(tmp_path / "results.json"))
    assert again.runs == {"a": {"x": None}}
    again.check_settings({"shape": [8, 16, 16]}, {"few-labels": {"cases_per_source": 2}})   # new scenario: fine
    with pytest.raises(SystemExit, match="other settings"):
        again.check_settings({"shape": [16, 32, 32]}, {})
    with pytest.raises(SystemExit, match="semi arguments"):
        again.check_settings({}, {"semi": {"n_labelled": 3}})


def test_runs_on_the_same_dataset_are_shared_between_scenarios(tmp_path, capsys):
    """label-efficiency's weak-label variants and semi train supervised-only and the oracle on the same
    datasets: those runs are done once; runs on the weak-label datasets are not shared."""
    boxes, none, semi = (SCENARIOS[s]() for s in ("label-efficiency-boxes", "label-efficiency", "semi"))
    run = lambda sc, method, seed=0: suite.Run(sc, "2d", "bench", seed, method)
    for method in ("nnUNetTrainerPartial", suite.ORACLE):
        assert suite.run_identity(run(boxes, method)) == suite.run_identity(run(none, method)) \
            == suite.run_identity(run(semi, method))
        assert suite.run_identity(run(boxes, method)) != suite.run_identity(run(boxes, method, seed=1))
    assert suite.run_identity(run(boxes, "nnUNetTrainerMLDSMeanTaught")) != \
        suite.run_identity(run(none, "nnUNetTrainerMLDSMeanTaught"))

    workdir = tmp_path / "suite"
    workdir.mkdir()
    store = suite.ResultStore(str(workdir / "results.json"))
    store.check_settings({"shape": list(suite.DEFAULT_SHAPE), "n_test": 6, "tta": False, "test_seed": suite.TEST_SEED},
                         {"label-efficiency-boxes": {}})
    for method, dice in (("nnUNetTrainerPartial", 0.5), (suite.ORACLE, 0.9)):
        store.add(run(boxes, method).key, _record(method, 0, (dice,) * 4, scenario="label-efficiency-boxes"))
    argv = ["--workdir", str(workdir), "--scenarios", "label-efficiency", "semi", "--trainers", "nnUNetTrainerPartial",
            "oracle", "--seeds", "0", "-c", "2d", "--device", "cpu"]
    assert suite.main(argv) == 0        # nothing to train: every run is shared
    out = capsys.readouterr().out
    assert "4 runs, 4 already in" in out
    assert "[1/4] label-efficiency 2d seed 0 nnUNetTrainerPartial_bench: same dataset and settings as " \
           "label-efficiency-boxes/2d/bench/seed0/nnUNetTrainerPartial, its result reused" in out
    runs = json.load(open(workdir / "results.json"))["runs"]
    shared = runs["semi/2d/bench/seed0/oracle"]
    assert shared["reused_from"] == "label-efficiency-boxes/2d/bench/seed0/oracle"
    assert shared["scenario"] == "semi" and shared["mean_dice"] == 0.9
    assert "headroom oracle - supervised (nnUNetTrainerPartial): +40.0 Dice points, ok" in out


# ---------------------------------------------------------------------- end to end
def _suite(workdir, trainers, env, extra=()) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, SCRIPT, *extra, "--workdir", str(workdir), "--scenarios", "few-labels",
           "--scenario-arg", "few-labels.cases_per_source=1", "few-labels.n_unlabelled=1",
           "--trainers", *trainers, "--seeds", "0", "-c", "2d", "--schedule", "tiny", "--shape", "16", "32", "32",
           "--n-test", "2", "--device", "cpu"]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, time.time() - t0


@pytest.mark.integration
def test_suite_end_to_end_tiny_and_resume(tmp_path):
    env = {**os.environ, "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "nnUNet_compile": "false"}
    workdir = tmp_path / "suite"
    # two runs at once (as on a GPU): they share the workspace's data and the test set, made once under a lock
    first, _ = _suite(workdir, ["nnUNetTrainerPartial", "oracle"], env, ["--jobs", "2"])
    assert "[1/2] few-labels 2d seed 0 nnUNetTrainerPartial_tiny: running (partial dataset)" in first.stdout
    assert "[2/2] few-labels 2d seed 0 nnUNetTrainer_tiny: running (oracle dataset)" in first.stdout
    assert "elapsed" in first.stdout and "left (1 runs)" in first.stdout and "left (0 runs)" in first.stdout
    results = json.load(open(workdir / "results.json"))
    keys = ["few-labels/2d/tiny/seed0/nnUNetTrainerPartial", "few-labels/2d/tiny/seed0/oracle"]
    assert sorted(results["runs"]) == keys      # in the order they finished
    partial, oracle = (results["runs"][k] for k in keys)
    assert partial["dataset"] == "Dataset900_SuitePartial" and oracle["dataset"] == "Dataset901_SuiteOracle"
    assert oracle["trainer"] == "nnUNetTrainer_tiny"
    for record in (partial, oracle):
        assert record["n_test"] == 2 and record["train_seconds"] > 0 and record["augmentation_seeded"]
        assert set(record["dice"]) == {"liver", "kidney", "spleen", "pancreas"}
        assert all(d is None or 0 <= d <= 1 for d in record["dice"].values())
    report = (workdir / "report.txt").read_text()
    assert "nnUNetTrainerPartial" in report and "oracle (nnUNetTrainer, full labels)" in report
    assert "headroom oracle - supervised (nnUNetTrainerPartial): " in report and "/4" in report   # lost organs
    assert report.strip() in first.stdout
    assert (workdir / "benchmark_suite_2d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # an interruption after the oracle's training, before its result was recorded: the re-run reuses the
    # finished run, and for the oracle only predicts again (its checkpoint stays as it was)
    checkpoint = (workdir / "runs" / "few-labels" / "seed0" / "nnUNet_results" / "Dataset901_SuiteOracle" /
                  "nnUNetTrainer_tiny__nnUNetPlans__2d" / "fold_0" / "checkpoint_final.pth")
    mtime = checkpoint.stat().st_mtime
    del results["runs"][keys[1]]
    json.dump(results, open(workdir / "results.json", "w"))
    second, _ = _suite(workdir, ["nnUNetTrainerPartial", "oracle"], env)
    assert "[1/2] few-labels 2d seed 0 nnUNetTrainerPartial_tiny: reused from results.json" in second.stdout
    assert "[2/2] few-labels 2d seed 0 nnUNetTrainer_tiny: running" in second.stdout
    assert checkpoint.stat().st_mtime == mtime
    again = json.load(open(workdir / "results.json"))["runs"]
    assert again[keys[0]] == partial
    assert again[keys[1]]["train_seconds"] == oracle["train_seconds"]      # the training was not redone
    assert again[keys[1]]["dice"] == oracle["dice"]                        # same checkpoint, same test set


@pytest.mark.integration
@pytest.mark.skipif(not os.environ.get("NNUNET_PARTIAL_SLOW"), reason="slow (about 5 min on 2 CPU cores: 4 teachers "
                    "are trained): set NNUNET_PARTIAL_SLOW=1 to run the suite's stage 1")
def test_suite_runs_stage_one_once_for_mskd_and_the_pseudo_labelled_dataset(tmp_path):
    """MS-KD and a trainer on D̂ in one suite: the teachers are made and trained once (seeded, at the run's
    schedule), D̂ is made from them, and both runs report the stage's seconds."""
    env = {**os.environ, "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "nnUNet_compile": "false"}
    workdir = tmp_path / "suite"
    # --jobs 2: both runs wait for one stage 1, whose teachers train two at a time
    proc, _ = _suite(workdir, ["nnUNetTrainerMSKD", "nnUNetTrainer@pseudo"], env, ["--jobs", "2"])
    assert "nnUNetTrainer_tiny: running (pseudo dataset)" in proc.stdout
    runs = json.load(open(workdir / "results.json"))["runs"]
    mskd, pseudo = runs["few-labels/2d/tiny/seed0/nnUNetTrainerMSKD"], runs["few-labels/2d/tiny/seed0/nnUNetTrainer@pseudo"]
    assert mskd["dataset"] == "Dataset900_SuitePartial" and pseudo["dataset"].endswith("Pseudo")
    assert 0 < mskd["teacher_seconds"] < pseudo["teacher_seconds"]       # + pseudo labelling
    ws = workdir / "runs" / "few-labels" / "seed0"
    registry = json.load(open(ws / "nnUNet_preprocessed" / "Dataset900_SuitePartial" / "teachers.json"))["teachers"]
    assert sorted(registry) == ["kidney", "liver", "pancreas", "spleen"]
    assert {t["trainer"] for t in registry.values()} == {"nnUNetTrainer_tiny"}
    stage1 = json.load(open(ws / "stage1_seconds_900_2d_tiny.json"))
    assert sorted(stage1) == ["kidney", "liver", "pancreas", "pseudolabel", "spleen"]
    # trained once, before the MS-KD student; the run on D̂ reused them
    student = ws / "nnUNet_results" / "Dataset900_SuitePartial" / "nnUNetTrainerMSKD_tiny__nnUNetPlans__2d" / "fold_0"
    for t in registry.values():
        teacher = ws / "nnUNet_results" / t["dataset"] / "nnUNetTrainer_tiny__nnUNetPlans__2d" / "fold_0"
        assert (teacher / "checkpoint_final.pth").stat().st_mtime < (student / "checkpoint_final.pth").stat().st_mtime
    assert "+ teachers s" in (workdir / "report.txt").read_text()
