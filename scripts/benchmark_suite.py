#!/usr/bin/env python
"""Benchmark suite: methods x scenarios x seeds on synthetic data, each scenario with its oracle.

A *run* is one trainer on one scenario's dataset for one seed and one configuration: trained with
nnU-Net's own ``nnUNetv2_train`` (seeded, see below), ``nnUNetv2_predict`` on the scenario's fully
labelled test set (the same for every method and seed), scored per organ with
``nnunet_partial.evaluation`` (Dice, HD95). Scenarios are ``nnunet_partial.synthetic.SCENARIOS``
(few-labels, hard-anatomy, semi, small-structures, tiny-structures, label-efficiency[-image-labels|-boxes],
multimix); the oracle row is stock ``nnUNetTrainer`` on the
same images with every organ labelled, the naive row stock ``nnUNetTrainer`` on the partial data.

    # a GPU session: the full comparison
    python scripts/benchmark_suite.py --workdir bench_suite --seeds 0 1 2 --configuration 2d 3d_fullres
    # several runs at once (a GPU fits many small ones; data, stage 1 and test sets are still made once)
    python scripts/benchmark_suite.py --workdir bench_suite --seeds 0 1 2 --jobs 12
    # CPU: fewer runs (3d_fullres then gets the shorter 'demo' schedule unless --schedule is given)
    python scripts/benchmark_suite.py --workdir bench_cpu --scenarios few-labels --seeds 0 --configuration 2d
    # sizes of a scenario: SCENARIO.ARG=VALUE (the keyword arguments of its function)
    python scripts/benchmark_suite.py --scenario-arg few-labels.cases_per_source=2 semi.n_unlabelled=10 ...

Trainers are given by base name (``--trainers``); the schedule suffix is appended (``_bench`` etc.,
see nnunet_partial/trainers/schedules.py), so any trainer with schedule variants plugs in by name.
``oracle`` is the oracle row; ``TRAINER@oracle`` trains TRAINER on the oracle's fully labelled dataset, a
second oracle row whose headroom is reported beside the stock oracle's (e.g. MLDS's loss on full labels; on
full labels nnUNetTrainerPartial is stock nnU-Net), and ``TRAINER@KEY`` any other dataset KEY of the scenario.
A scenario may send a trainer to another of its datasets (semi: ``nnUNetTrainerPartial`` = supervised-only on the
labelled cases) or mark it not applicable.

Methods with a stage 1 run CoWAM's stage 1 on the scenario's partial dataset first, as a user does:
``nnunet-partial teachers`` (at least 1 annotated case per organ here), one stock ``nnUNetTrainer`` teacher per
organ trained at the run's configuration, schedule and seed, then, for methods on D̂, ``nnunet-partial
pseudolabel``. ``nnUNetTrainerMSKD`` distils those teachers; ``nnUNetTrainerCoWAMPseudo`` (full CoWAM) trains on
D̂, and ``TRAINER@pseudo`` puts any trainer there (``nnUNetTrainer@pseudo``: pseudo labels taken as truth). Stage 1
is done once per scenario, seed, configuration and schedule; its wall time is reported beside the student's
("+ teachers s"): a method's total cost is the sum.

Seeds: seed s writes the scenario's training data with synthetic seed s, and the training process
seeds Python, NumPy and torch with s before nnU-Net starts (nnU-Net seeds nothing itself; CoWAM
initialises its two students from its own fixed ``student_seeds``, whatever s). NumPy's
global generator drives nnU-Net's case sampling and augmentation when augmentation runs in the
training process (``--da-workers 0``, the default on CPU); with worker processes
(``nnUNet_n_proc_DA`` > 0, the default on CUDA for speed) each worker reseeds itself from the OS, so
augmentation differs between repeats of a seed, as does cuDNN's autotuned arithmetic. The test set
does not depend on the seed.

Every training uses all cases of its dataset (fold 0 of a ``splits_final.json`` written here; its
validation cases, the first case annotating each organ, also train): method differences then come
from the labels, not from a held-out share.

Results: ``<workdir>/results.json`` gets each run as soon as it finishes; a re-run skips every run
already there (an interrupted suite resumes; an interrupted training continues with ``--c``), and a run
whose dataset, test set, configuration, schedule, seed and method equal a finished run of another scenario
takes that run's result (the label-efficiency variants and semi share their supervised-only and oracle
runs). A
progress line per run gives the elapsed time and an estimate of what is left. At the end: per
scenario and configuration a table of mean +- sd over seeds per organ and overall (Dice, HD95), the
lost-organ rate (runs x organs with Dice < 0.1), train seconds per run, the headroom (oracle - naive
and oracle - supervised baseline, in Dice points; < 5 points means methods cannot be ranked there), the
share of the oracle - supervised gap each other method closes; where test cases lack organs (anatomy "absent") also
the false organs (an organ predicted in a case without it) and the Dice over the cases holding each organ,
written to ``<workdir>/report.txt``, and a bar chart per configuration
(``<workdir>/benchmark_suite_<configuration>.png``).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Optional

import numpy as np

from nnunet_partial.annotations import PSEUDO_SOURCE_KEY, load_teacher_registry
from nnunet_partial.evaluation import evaluate_folders, nanmean, save_results
from nnunet_partial.experiment import Workspace, default_device
from nnunet_partial.teachers import find_raw_datasets
from nnunet_partial.synthetic import DEFAULT_SHAPE, LABELS, ORGANS, PSEUDO_DATASET, SCENARIOS, Scenario, write_test_set

ORACLE, NAIVE = "oracle", "nnUNetTrainer"
DEFAULT_TRAINERS = [NAIVE, "nnUNetTrainerPartial", "nnUNetTrainerPartialEMA", "nnUNetTrainerCoWAM",
                    "nnUNetTrainerMeanTeacher", ORACLE]
DEFAULT_SCENARIOS = ["few-labels", "hard-anatomy", "semi"]
LOST_DICE = 0.1          # an organ with a mean test Dice below this is lost
HEADROOM_POINTS = 5.0    # oracle - baseline below this (Dice points): the scenario cannot rank methods
FOLD = "0"
DATASET_ID_BASE = 900    # each (scenario, seed) has its own nnU-Net folders, so ids repeat across them
SEEDED_TRAIN = "_seeded-train"   # internal sub-command: nnUNetv2_train after seeding the process
DATASET_SEP = "@"       # --trainers TRAINER@DATASET: a trainer on another of the scenario's datasets
TEST_SEED = 10_000
TEACHER_MIN_CASES = 1    # the scenarios annotate an organ on 2-4 cases; nnunet-partial teachers refuses < 5 by default


# ---------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Run:
    scenario: Scenario
    configuration: str
    schedule: str
    seed: int
    method: str              # trainer base name, ORACLE, or TRAINER@DATASET (e.g. nnUNetTrainerPartial@oracle)

    @property
    def key(self) -> str:
        return f"{self.scenario.name}/{self.configuration}/{self.schedule}/seed{self.seed}/{self.method}"

    @property
    def trainer(self) -> str:
        return f"{trainer_of(self.method)}_{self.schedule}"

    @property
    def dataset_key(self) -> Optional[str]:
        return dataset_of(self.scenario, self.method)


def trainer_of(method: str) -> str:
    """The trainer base name of a method: NAIVE for ORACLE, TRAINER for TRAINER@DATASET."""
    return NAIVE if method == ORACLE else method.partition(DATASET_SEP)[0]


def dataset_of(scenario: Scenario, method: str) -> Optional[str]:
    """The scenario dataset a method trains on: ORACLE and TRAINER@oracle on the fully labelled one, TRAINER@KEY on
    dataset KEY, a plain trainer where the scenario sends it (None: not applicable there)."""
    if method == ORACLE:
        return "oracle"
    key = method.partition(DATASET_SEP)[2]
    if not key:
        return scenario.dataset_for(method)
    if key == PSEUDO_DATASET and "partial" in scenario.datasets:
        return key
    if key not in scenario.datasets:
        raise SystemExit(f"--trainers {method}: scenario {scenario.name} has no dataset {key!r} "
                         f"(it has {', '.join([*scenario.datasets, PSEUDO_DATASET])})")
    return key


def is_oracle(method: str) -> bool:
    """A row trained on the fully labelled dataset: an upper bound for the headroom."""
    return method == ORACLE or method.partition(DATASET_SEP)[2] == "oracle"


def run_identity(run: Run) -> tuple:
    """What fixes a run's result: its dataset (writer and arguments), the test set's anatomy, and configuration,
    schedule, seed and method. Scenarios share datasets (label-efficiency's three weak-label variants and semi
    have the same labelled-only and oracle datasets), so a run done for one is valid for the others."""
    # D̂ is made from the partial dataset by teachers trained at the run's configuration, schedule and seed
    spec = run.scenario.datasets["partial" if run.dataset_key == PSEUDO_DATASET else run.dataset_key]
    return (spec.writer.__module__, spec.writer.__qualname__, json.dumps(dict(spec.kwargs), sort_keys=True),
            run.scenario.anatomy, run.configuration, run.schedule, run.seed, run.method)


def uses_teachers(run: Run) -> bool:
    """Runs that need CoWAM's stage 1 on the partial dataset: trained single-organ teachers (MS-KD), or D̂."""
    from nnunet_partial.trainers import needs_teachers
    return run.dataset_key == PSEUDO_DATASET or needs_teachers(trainer_of(run.method))


def method_label(method: str, dataset_key: Optional[str]) -> str:
    if method == ORACLE:
        return "oracle (nnUNetTrainer, full labels)"
    if method == NAIVE:
        return "naive (nnUNetTrainer)"
    trainer = trainer_of(method)
    if dataset_key == "oracle":
        return f"oracle ({trainer}, full labels)"
    if dataset_key == PSEUDO_DATASET:
        return f"{trainer} [D̂: teachers' pseudo labels]"
    return trainer if dataset_key in (None, "partial") else f"{trainer} [{dataset_key} cases]"


def resolve_schedule(schedule: Optional[str], configuration: str, device: str) -> str:
    """Default budget: 'bench' (10 x 50); on CPU 3d_fullres gets 'demo' (12 x 25), ~40 % less time."""
    if schedule:
        return schedule
    return "demo" if device == "cpu" and configuration.startswith("3d") else "bench"


def unknown_trainers(names) -> list:
    """Trainer names that neither nnunet-partial nor nnU-Net's own trainer folder define."""
    from nnunet_partial.trainers import TRAINERS
    missing = [n for n in names if n not in TRAINERS]
    if not missing:
        return []
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    folder = os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer")
    return [n for n in missing if recursive_find_python_class(folder, n, "nnunetv2.training.nnUNetTrainer") is None]


def parse_scenario_args(items) -> dict:
    """``["few-labels.cases_per_source=2", ...]`` -> ``{"few-labels": {"cases_per_source": 2}}``."""
    out: dict = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        scenario, dot, arg = name.rpartition(".")
        if not (sep and dot) or scenario not in SCENARIOS:
            raise SystemExit(f"--scenario-arg {item!r}: expected SCENARIO.ARG=VALUE with SCENARIO in {sorted(SCENARIOS)}")
        try:
            out.setdefault(scenario, {})[arg] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out.setdefault(scenario, {})[arg] = value
    return out


# ---------------------------------------------------------------------- results file
class ResultStore:
    """``results.json``: the settings that fix the data, and one record per finished run. Written
    atomically after every run, so an interruption never leaves half a file."""

    def __init__(self, path: str):
        self.path = path
        self.data = {"settings": {}, "runs": {}}
        if os.path.isfile(path):
            with open(path) as f:
                self.data = json.load(f)

    @property
    def runs(self) -> dict:
        return self.data["runs"]

    def check_settings(self, settings: dict, scenario_args: dict) -> None:
        """Cached data and runs are only valid for the settings they were made with."""
        stored = self.data["settings"]
        clashes = [f"{k}: {stored[k]} (stored) vs {v}" for k, v in settings.items() if k in stored and stored[k] != v]
        old_args = stored.get("scenario_args", {})
        clashes += [f"{s} arguments: {old_args[s]} (stored) vs {a}" for s, a in scenario_args.items()
                    if s in old_args and old_args[s] != a]
        if clashes:
            raise SystemExit(f"{self.path} was made with other settings ({'; '.join(clashes)}): its data and runs "
                             "do not apply; use another --workdir (or the stored settings)")
        stored.update(settings)
        stored["scenario_args"] = {**old_args, **scenario_args}

    def identities(self) -> dict:
        """:func:`run_identity` -> key, for every stored run whose scenario still exists."""
        out = {}
        for key, r in self.runs.items():
            if r["scenario"] not in SCENARIOS or r.get("reused_from"):
                continue
            scenario = SCENARIOS[r["scenario"]](**self.data["settings"].get("scenario_args", {}).get(r["scenario"], {}))
            run = Run(scenario, r["configuration"], r["schedule"], r["seed"], r["method"])
            if run.dataset_key is not None:
                out[run_identity(run)] = key
        return out

    def add(self, key: str, record: dict) -> None:
        self.runs[key] = record
        self.save()

    def save(self) -> None:
        tmp = self.path + ".tmp"
        save_results(self.data, tmp)     # NaN -> null, as every results file of this package
        os.replace(tmp, self.path)


# ---------------------------------------------------------------------- data
_locks: dict = {}
_locks_guard = threading.Lock()


def _lock(*name) -> threading.Lock:
    """One lock per name. With ``--jobs`` > 1 runs share a workspace's data and stage 1, and a scenario's test
    set: one run at a time prepares them, the others wait and then find them done."""
    with _locks_guard:
        return _locks.setdefault(name, threading.Lock())


def dataset_id_and_name(scenario: Scenario, key: str) -> tuple[int, str]:
    did = DATASET_ID_BASE + list(scenario.datasets).index(key)
    return did, f"Dataset{did:03d}_Suite{key.capitalize()}"


def _cases(raw_dataset: str) -> list:
    return sorted(f[: -len(".nii.gz")] for f in os.listdir(os.path.join(raw_dataset, "labelsTr")))


def validation_cases(ws: Workspace, scenario: Scenario) -> list:
    """The first case annotating each organ in the scenario's partial dataset (case names are shared
    by its datasets whose plans match)."""
    _, partial = dataset_id_and_name(scenario, "partial")
    with open(os.path.join(ws.raw, partial, "dataset.json")) as f:
        annotated = json.load(f).get("annotated_labels", {})
    cases = _cases(os.path.join(ws.raw, partial))
    val = []
    for organ in ORGANS:
        first = next((c for c in cases if organ in annotated.get(c, ORGANS)), None)
        if first is not None and first not in val:
            val.append(first)
    return val


def write_datasets(ws: Workspace, scenario: Scenario, seed: int, shape) -> None:
    for key, spec in scenario.datasets.items():
        did, full = dataset_id_and_name(scenario, key)
        if not os.path.isdir(os.path.join(ws.raw, full)):   # written atomically by the writers
            spec.writer(ws.raw, did, name=full.split("_", 1)[1], seed=seed, shape=shape, **spec.kwargs)


def preprocess(ws: Workspace, scenario: Scenario, key: str, configuration: str) -> tuple[int, str]:
    did, full = dataset_id_and_name(scenario, key)
    folder = os.path.join(ws.preprocessed, full)
    marker = os.path.join(folder, f".suite_preprocessed_{configuration}")
    if not os.path.isfile(marker):   # the marker is written last: an interrupted preprocessing is redone
        ws.plan_and_preprocess(did, [configuration])
        cases = _cases(os.path.join(ws.raw, full))
        val = [c for c in validation_cases(ws, scenario) if c in cases] or cases[:1]
        with open(os.path.join(folder, "splits_final.json"), "w") as f:
            json.dump([{"train": cases, "val": val}], f, indent=1)
        open(marker, "w").close()
    return did, full


def test_set(workdir: str, scenario: Scenario, n: int, shape) -> tuple[str, str]:
    folder = os.path.join(workdir, "test", scenario.name)
    if not os.path.isdir(folder):
        tmp = folder + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        write_test_set(tmp, n, shape, seed=TEST_SEED, anatomy=scenario.anatomy)
        os.replace(tmp, folder)
    return os.path.join(folder, "imagesTs"), os.path.join(folder, "labelsTs")


def _seeded_train_command(seed: int, dataset_id: int, configuration: str, trainer: str, device: str, out: str,
                          extra=()) -> list:
    """``nnUNetv2_train`` in a seeded process; ``--c`` when ``out`` (the fold folder) holds an interrupted run."""
    resume = ["--c"] if os.path.isfile(os.path.join(out, "checkpoint_latest.pth")) else []
    return [sys.executable, os.path.abspath(__file__), SEEDED_TRAIN, str(seed), str(dataset_id), configuration, FOLD,
            "-tr", trainer, *extra, "-device", device, *resume]


def pseudo_dataset_of(ws: Workspace, parent: str, configuration: str, teacher_trainer: str) -> tuple[int, str]:
    """The D̂ that ``nnunet-partial pseudolabel`` made in this workspace from ``parent``'s teachers."""
    made_here = lambda dj: ({k: dj[PSEUDO_SOURCE_KEY].get(k) for k in ("parent", "configuration", "trainer")} ==
                            {"parent": parent, "configuration": configuration, "trainer": teacher_trainer})
    for folder in find_raw_datasets(PSEUDO_SOURCE_KEY, made_here, ws.raw):
        name = os.path.basename(folder)
        return int(name[len("Dataset"):len("Dataset") + 3]), name
    raise RuntimeError(f"nnunet-partial pseudolabel made no D̂ of {parent} ({configuration}, {teacher_trainer}) "
                       f"in {ws.raw}")


def teacher_stage(ws: Workspace, scenario: Scenario, run: Run, args) -> dict:
    """CoWAM's stage 1 on the scenario's partial dataset, as a user runs it: ``nnunet-partial teachers`` (one
    binary dataset per organ with the parent's plans and split), each teacher trained by stock nnU-Net at the
    run's configuration, schedule and seed, and, for runs on D̂, ``nnunet-partial pseudolabel``. Done once per
    workspace (scenario, seed), configuration and schedule; later runs reuse it. Returns ``{"seconds": teacher
    training (+ pseudo labelling) wall time, "dataset": (id, name) of D̂ or None}``."""
    did, full = preprocess(ws, scenario, "partial", run.configuration)
    teacher_trainer = f"{NAIVE}_{run.schedule}"
    cli = [sys.executable, "-m", "nnunet_partial.cli"]
    tag = f"{did}_{run.configuration}_{run.schedule}"
    # run every time: it skips finished work, and names this schedule's trainer in the registry that MS-KD reads
    ws.run(cli + ["teachers", str(did), "-c", run.configuration, "-tr", teacher_trainer,
                  "--min-cases", str(TEACHER_MIN_CASES), "-np", "1"], f"teachers_{tag}")
    registry = load_teacher_registry(os.path.join(ws.preprocessed, full))
    timing_file = os.path.join(ws.root, f"stage1_seconds_{tag}.json")
    timing = {}
    if os.path.isfile(timing_file):
        with open(timing_file) as f:
            timing = json.load(f)

    def timed(key: str, cmd: list, log_name: str) -> None:   # wall time of a stage-1 command, kept across re-runs
        seconds = ws.run(cmd, log_name)
        with _lock("timing", timing_file):
            timing[key] = timing.get(key, 0.0) + seconds
            with open(timing_file, "w") as f:
                json.dump(timing, f)

    def train_teacher(entry) -> None:
        out = os.path.join(entry.results_folder(ws.results, run.configuration, teacher_trainer), f"fold_{FOLD}")
        if not os.path.isfile(os.path.join(out, "checkpoint_final.pth")):
            cmd = _seeded_train_command(run.seed, entry.dataset_id, run.configuration, teacher_trainer, args.device,
                                        out, ["-p", entry.plans])
            timed(entry.label, cmd, f"teacher_{entry.dataset_id}_{tag}")

    teachers = sorted(registry.teachers.values(), key=lambda e: e.label_value)
    with ThreadPoolExecutor(max(1, min(args.jobs, len(teachers)))) as pool:   # --jobs teachers at once
        list(pool.map(train_teacher, teachers))    # list(): a failed teacher raises here
    seconds = sum(timing.get(label, float("nan")) for label in registry.teachers)
    if run.dataset_key != PSEUDO_DATASET:
        return {"seconds": seconds, "dataset": None}
    if "pseudolabel" not in timing:
        timed("pseudolabel", cli + ["pseudolabel", str(did), "-c", run.configuration, "-f", FOLD, "-tr", teacher_trainer,
                                    "-device", args.device, "-np", "1", *([] if args.tta else ["--disable-tta"])],
              f"pseudolabel_{tag}")
    return {"seconds": seconds + timing["pseudolabel"],
            "dataset": pseudo_dataset_of(ws, full, run.configuration, teacher_trainer)}


# ---------------------------------------------------------------------- one run
def execute(run: Run, args, workdir: str) -> dict:
    scenario = run.scenario
    ws = Workspace(os.path.join(workdir, "runs", scenario.name, f"seed{run.seed}"),
                   env={"nnUNet_n_proc_DA": str(args.da_workers)})
    with _lock("data", ws.root):
        write_datasets(ws, scenario, run.seed, tuple(args.shape))
        for key in {"partial" if run.dataset_key == PSEUDO_DATASET else run.dataset_key} | (
                {"partial"} if uses_teachers(run) else set()):
            preprocess(ws, scenario, key, run.configuration)
    if uses_teachers(run):
        with _lock("stage 1", ws.root, run.configuration, run.schedule):
            stage1 = teacher_stage(ws, scenario, run, args)
    else:
        stage1 = None
    if run.dataset_key == PSEUDO_DATASET:
        did, full = stage1["dataset"]
    else:
        did, full = dataset_id_and_name(scenario, run.dataset_key)
    with _lock("test", workdir, scenario.name):
        images, labels = test_set(workdir, scenario, args.n_test, tuple(args.shape))

    out = os.path.join(ws.results, full, f"{run.trainer}__nnUNetPlans__{run.configuration}", f"fold_{FOLD}")
    timing = os.path.join(out, "suite_train_seconds.json")
    if not os.path.isfile(os.path.join(out, "checkpoint_final.pth")):
        cmd = _seeded_train_command(run.seed, did, run.configuration, run.trainer, args.device, out)
        seconds = ws.run(cmd, f"train_{did}_{run.trainer}_{run.configuration}")
        with open(timing, "w") as f:
            json.dump({"train_seconds": seconds, "resumed": "--c" in cmd}, f)
    with open(timing) as f:
        trained = json.load(f)

    pred = os.path.join(ws.root, "predictions", f"{run.configuration}_{run.trainer}_{run.dataset_key}")
    shutil.rmtree(pred, ignore_errors=True)
    predict_seconds = ws.predict(did, run.configuration, run.trainer, images, pred, fold=FOLD, device=args.device,
                                 extra=[] if args.tta else ["--disable_tta"])
    scores = evaluate_folders(pred, labels, {o: LABELS[o] for o in ORGANS})
    return {
        "scenario": scenario.name, "configuration": run.configuration, "schedule": run.schedule, "seed": run.seed,
        "method": run.method, "label": method_label(run.method, run.dataset_key), "trainer": run.trainer,
        "dataset": full, "supervised_baseline": scenario.supervised, "device": args.device,
        "augmentation_seeded": args.da_workers == 0,
        "dice": {o: scores["mean"][o]["Dice"] for o in ORGANS},
        "hd95": {o: scores["mean"][o]["HD95"] for o in ORGANS},
        "mean_dice": scores["foreground_mean"]["Dice"], "mean_hd95": scores["foreground_mean"]["HD95"],
        "train_seconds": trained["train_seconds"], "train_resumed": trained["resumed"],
        # stage 1 (teachers, pseudo labels) of the methods that need it: their total cost is train + this
        "teacher_seconds": stage1["seconds"] if stage1 else None,
        "predict_seconds": predict_seconds, "n_test": len(scores["per_case"]), "evaluation": scores,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def seeded_train(argv) -> int:
    """``SEED <nnUNetv2_train arguments>``: seed this process, then run nnU-Net's training entry point."""
    import random

    import torch

    seed = int(argv[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    sys.argv = ["nnUNetv2_train", *argv[1:]]
    from nnunetv2.run.run_training import run_training_entry
    run_training_entry()
    return 0


# ---------------------------------------------------------------------- summary
def _mean_sd(values) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")


def _test_cases(record: dict, organs=ORGANS):
    """(organ, n_ref, n_pred, Dice) for every test case and organ of a run."""
    for metrics in record.get("evaluation", {}).get("per_case", {}).values():
        for o in organs:
            m = metrics.get(o, {})
            if "n_ref" in m:
                yield o, m["n_ref"], m["n_pred"], m["Dice"]


def present_dice(record: dict, organ: str) -> Optional[float]:
    """A run's mean test Dice of ``organ`` over the test cases that hold it (None: no such case). Differs from the
    run's Dice only where organs are missing from test cases, which score 0 there for any voxel predicted."""
    values = [d for o, ref, _, d in _test_cases(record) if o == organ and ref > 0 and d is not None]
    return float(np.mean(values)) if values else None


def summarise(records, organs=ORGANS) -> dict:
    """``{(scenario, configuration, schedule): {method: stats}}`` over seeds; methods in record order.

    stats: n, seeds, label, dice/hd95 per organ and mean_dice/mean_hd95 as (mean, sd), lost (runs x
    organs with Dice < LOST_DICE), of (runs x organs), train_seconds (mean), supervised_baseline; where test cases
    lack organs (anatomy "absent"): absent (runs x test cases x organs missing), false_organs (how many of those got a
    prediction), present_dice per organ and mean_present_dice (Dice over the cases holding the organ).
    """
    groups: dict = {}
    for r in records:
        groups.setdefault((r["scenario"], r["configuration"], r["schedule"]), {}).setdefault(r["method"], []).append(r)
    out = {}
    for group, methods in groups.items():
        out[group] = {}
        for method, runs in methods.items():
            dice = {o: [r["dice"][o] for r in runs] for o in organs}
            out[group][method] = {
                "n": len(runs), "seeds": sorted(r["seed"] for r in runs), "label": runs[0]["label"],
                "supervised_baseline": runs[0]["supervised_baseline"],
                "dice": {o: _mean_sd(v) for o, v in dice.items()},
                "hd95": {o: _mean_sd(r["hd95"][o] for r in runs) for o in organs},
                "mean_dice": _mean_sd(r["mean_dice"] for r in runs),
                "mean_hd95": _mean_sd(r["mean_hd95"] for r in runs),
                # None (NaN in the file) = the organ is in neither prediction nor reference: not found either
                "lost": sum(1 for v in dice.values() for d in v if d is None or not d >= LOST_DICE),
                "of": len(runs) * len(organs),
                "train_seconds": nanmean(r["train_seconds"] for r in runs if r["train_seconds"] is not None),
                "teacher_seconds": nanmean(r.get("teacher_seconds") for r in runs
                                           if r.get("teacher_seconds") is not None),
                "absent": sum(1 for r in runs for _, ref, _, _ in _test_cases(r, organs) if ref == 0),
                "false_organs": sum(1 for r in runs for _, ref, pred, _ in _test_cases(r, organs) if ref == 0 < pred),
                "present_dice": {o: _mean_sd(present_dice(r, o) for r in runs) for o in organs},
                "mean_present_dice": _mean_sd(nanmean(present_dice(r, o) for o in organs) for r in runs),
            }
    return out


def headroom(methods: dict, oracle_method: str = ORACLE) -> dict:
    """Oracle minus naive and oracle minus the scenario's supervised baseline, in Dice points, and the larger
    of the two rows' sd over seeds (``spread``, points; NaN with one seed): a gap within it is not headroom.
    ``oracle_method``: which fully labelled row is the oracle (stock nnU-Net by default)."""
    out = {}
    oracle = methods.get(oracle_method)
    for name, method in (("naive", NAIVE), ("supervised", next(iter(methods.values()))["supervised_baseline"])):
        other = methods.get(method)
        gap = spread = None
        if oracle is not None and other is not None:
            gap = 100 * (oracle["mean_dice"][0] - other["mean_dice"][0])
            sds = [sd for sd in (oracle["mean_dice"][1], other["mean_dice"][1]) if np.isfinite(sd)]
            spread = 100 * max(sds) if sds else float("nan")
        out[name] = {"method": method, "points": gap, "spread": spread}
    return out


def headroom_verdict(h: dict) -> str:
    if h["points"] < HEADROOM_POINTS:
        return f"LOW (< {HEADROOM_POINTS:g}: methods cannot be ranked here)"
    if np.isfinite(h["spread"]) and h["points"] <= h["spread"]:
        return f"WITHIN THE SEEDS' SPREAD (sd up to {h['spread']:.1f} points: no clear headroom)"
    return "ok"


def _cell(mean_sd, digits: int) -> str:
    m, s = mean_sd
    if not np.isfinite(m):
        return "n/a"
    return f"{m:.{digits}f}" + (f"±{s:.{digits}f}" if np.isfinite(s) else "")


def format_group(group, methods: dict, scenario: Optional[Scenario], skipped: dict, organs=ORGANS) -> str:
    name, configuration, schedule = group
    seeds = sorted({s for m in methods.values() for s in m["seeds"]})
    title = f"{name} ({scenario.description})" if scenario else name
    lines = [f"== {title}; {configuration}, schedule {schedule}, seeds {' '.join(map(str, seeds))}"]
    seconds = lambda t: "n/a" if not np.isfinite(t) else f"{t:.0f}"
    with_teachers = any(np.isfinite(m.get("teacher_seconds", float("nan"))) for m in methods.values())
    with_absent = any(m.get("absent") for m in methods.values())   # test cases missing organs
    tables = [("dice", 3, "Dice"), ("hd95", 1, "HD95 [mm], over the organs found")]
    tables += [("present_dice", 3, "Dice, test cases holding the organ")] if with_absent else []
    for metric, digits, unit in tables:
        cols = list(organs) + ["mean"] + (["lost"] + (["false organs"] if with_absent else []) + ["train s"]
                                          + (["+ teachers s"] if with_teachers else []) + ["runs"]
                                          if metric == "dice" else [])
        rows = []
        for m in methods.values():
            cells = [_cell(m[metric][o], digits) for o in organs] + [_cell(m[f"mean_{metric}"], digits)]
            if metric == "dice":
                cells += [f"{m['lost']}/{m['of']}"] + ([f"{m['false_organs']}/{m['absent']}"] if with_absent else [])
                cells += [seconds(m["train_seconds"])]
                cells += [seconds(m.get("teacher_seconds", float("nan")))] if with_teachers else []
                cells += [str(m["n"])]
            rows.append([m["label"]] + cells)
        header = [f"{unit} (mean±sd over seeds)"] + cols
        widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
        fmt = lambda r: "  ".join(f"{c:<{widths[0]}}" if i == 0 else f"{c:>{widths[i]}}" for i, c in enumerate(r))
        lines += [fmt(header), "-" * len(fmt(header))] + [fmt(r) for r in rows] + [""]
    if with_absent:
        lines.append("false organs: (run, test case, organ) with the organ missing from the case but predicted, of "
                     "those missing; such a case scores Dice 0 for the organ in the first table, and is left out of "
                     "the last")
    for trainer, reason in skipped.items():
        lines.append(f"{trainer}: not run here ({reason})")
    for oracle in [m for m in methods if is_oracle(m)] or [ORACLE]:
        name_of_oracle = "oracle" if oracle == ORACLE else oracle
        gaps = headroom(methods, oracle)
        for name, h in gaps.items():
            if h["points"] is None:
                lines.append(f"headroom {name_of_oracle} - {name} ({h['method']}): n/a (needs both rows)")
            else:
                lines.append(f"headroom {name_of_oracle} - {name} ({h['method']}): {h['points']:+.1f} Dice points, "
                             f"{headroom_verdict(h)}")
        if gaps["supervised"]["points"] is not None and headroom_verdict(gaps["supervised"]) == "ok":
            for method, share in gap_closed(methods, oracle).items():
                lines.append(f"{methods[method]['label']} closes {100 * share:.0f} % of the {name_of_oracle} - "
                             "supervised gap")
    return "\n".join(lines)


def gap_closed(methods: dict, oracle_method: str = ORACLE) -> dict:
    """method -> (its mean Dice - supervised) / (oracle - supervised), for every method but the supervised and
    oracle rows; empty when either row is missing or the gap is not positive (nothing to close)."""
    oracle, supervised = methods.get(oracle_method), methods.get(next(iter(methods.values()))["supervised_baseline"])
    if oracle is None or supervised is None:
        return {}
    base, gap = supervised["mean_dice"][0], oracle["mean_dice"][0] - supervised["mean_dice"][0]
    if not gap > 0:
        return {}
    return {m: (stats["mean_dice"][0] - base) / gap for m, stats in methods.items()
            if not is_oracle(m) and stats is not supervised}


def plot(summary: dict, path_for, organs=ORGANS) -> list:
    """One PNG per configuration: a panel per scenario, a bar per method (mean Dice, sd error bar),
    the lost-organ count above each bar."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    by_config: dict = {}
    for (scenario, configuration, schedule), methods in summary.items():
        by_config.setdefault(configuration, []).append((scenario, schedule, methods))
    paths = []
    for configuration, panels in by_config.items():
        width = max(5.0, 1.0 + 0.9 * max(len(m) for *_, m in panels) * len(panels))
        fig, axes = plt.subplots(1, len(panels), figsize=(width, 4.8), squeeze=False)
        for ax, (scenario, schedule, methods) in zip(axes[0], panels):
            names = list(methods)
            means = [methods[n]["mean_dice"][0] for n in names]
            sds = [np.nan_to_num(methods[n]["mean_dice"][1]) for n in names]
            bars = ax.bar(range(len(names)), means, yerr=sds, capsize=4, color=[f"C{i}" for i in range(len(names))])
            for bar, n in zip(bars, names):
                ax.text(bar.get_x() + bar.get_width() / 2, 1.02, f"lost {methods[n]['lost']}/{methods[n]['of']}",
                        ha="center", fontsize=7)
            ax.set_xticks(range(len(names)), [n.replace("nnUNetTrainer", "") or "naive" for n in names],
                          rotation=35, ha="right", fontsize=8)
            ax.set_ylim(0, 1.1)
            ax.set_title(f"{scenario} ({schedule})", fontsize=10)
            ax.set_ylabel("mean Dice over organs (± sd over seeds)")
        fig.suptitle(f"nnunet-partial benchmark suite, {configuration}")
        fig.tight_layout(rect=(0, 0, 1, 0.95))
        path = path_for(configuration)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------- main
def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bench_suite")
    p.add_argument("--scenarios", nargs="+", default=DEFAULT_SCENARIOS, choices=sorted(SCENARIOS))
    p.add_argument("--scenario-arg", nargs="+", default=[], metavar="SCENARIO.ARG=VALUE",
                   help="keyword arguments of a scenario function, e.g. few-labels.cases_per_source=2")
    p.add_argument("--trainers", nargs="+", default=DEFAULT_TRAINERS,
                   help=f"trainer base names (schedule suffix appended), '{ORACLE}', and TRAINER{DATASET_SEP}DATASET for a "
                        f"trainer on another dataset of the scenario (TRAINER{DATASET_SEP}oracle: an oracle row with "
                        "that trainer); default: %(default)s")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("-c", "--configuration", nargs="+", default=["2d", "3d_fullres"])
    p.add_argument("--schedule", default=None,
                   help="schedule suffix (tiny, demo, bench, 10epochs, ...); default bench, on CPU demo for 3d")
    p.add_argument("--shape", nargs=3, type=int, default=list(DEFAULT_SHAPE), metavar=("Z", "Y", "X"))
    p.add_argument("--n-test", type=int, default=6)
    p.add_argument("--tta", action="store_true", help="mirroring test-time augmentation when predicting")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--da-workers", type=int, default=None,
                   help="nnUNet_n_proc_DA for training; 0 (default on CPU) keeps augmentation seeded")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs (and stage-1 teachers) trained at once; >1 on a GPU, where several small runs cost "
                        "what one does (set --da-workers to about cores / jobs); 1 on a small CPU")
    p.add_argument("--report-only", action="store_true", help="print the report from results.json, run nothing")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    args.device = args.device or default_device()
    if args.da_workers is None:
        env = os.environ.get("nnUNet_n_proc_DA")
        args.da_workers = int(env) if env else (
            0 if args.device == "cpu" else min(8, max(1, (os.cpu_count() or 1) // args.jobs)))
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == SEEDED_TRAIN:
        return seeded_train(argv[1:])
    args = parse_args(argv)
    scenario_args = parse_scenario_args(args.scenario_arg)
    try:
        scenarios = {s: SCENARIOS[s](**scenario_args.get(s, {})) for s in args.scenarios}
    except TypeError as e:
        raise SystemExit(f"--scenario-arg: {e}")
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    store = ResultStore(os.path.join(workdir, "results.json"))
    store.check_settings({"shape": list(args.shape), "n_test": args.n_test, "tta": args.tta,
                          "test_seed": TEST_SEED}, {s: scenario_args.get(s, {}) for s in args.scenarios})

    runs, skipped = [], {}
    for scenario in scenarios.values():
        for configuration in args.configuration:
            schedule = resolve_schedule(args.schedule, configuration, args.device)
            group = (scenario.name, configuration, schedule)
            skipped[group] = {t: scenario.not_applicable[t] for t in args.trainers if dataset_of(scenario, t) is None}
            runs += [Run(scenario, configuration, schedule, seed, t) for seed in args.seeds for t in args.trainers
                     if dataset_of(scenario, t) is not None]
    missing = unknown_trainers(sorted({r.trainer for r in runs}))
    if missing:
        raise SystemExit(f"no trainer class named {', '.join(missing)} (nnunet_partial.trainers or nnU-Net); "
                         "drop it from --trainers or pick another --schedule")

    failures = []
    if not args.report_only:
        store.save()
        trained = store.identities()     # run identity -> key of the run that trained it; grows as runs finish
        todo = [r for r in runs if r.key not in store.runs and run_identity(r) not in trained]
        print(f"{len(runs)} runs, {len(runs) - len(todo)} already in {store.path}; device {args.device}, "
              f"augmentation workers {args.da_workers}", flush=True)
        t_start, done = time.time(), 0
        pending, twins = [], {}   # runs to train; runs waiting for a pending run of the same identity
        for i, run in enumerate(runs, 1):
            head = f"[{i}/{len(runs)}] {run.scenario.name} {run.configuration} seed {run.seed} {run.trainer}"
            if run.key in store.runs:
                print(f"{head}: reused from results.json", flush=True)
                continue
            same = trained.get(run_identity(run))
            if same is not None:
                store.add(run.key, {**store.runs[same], "scenario": run.scenario.name, "reused_from": same})
                print(f"{head}: same dataset and settings as {same}, its result reused", flush=True)
            elif any(run_identity(p) == run_identity(run) for p, _ in pending):
                twins.setdefault(run_identity(run), []).append((run, head))
            else:
                pending.append((run, head))

        def start(run: Run, head: str) -> tuple[dict, float]:
            print(f"{head}: running ({run.dataset_key} dataset)", flush=True)
            t0 = time.time()
            return execute(run, args, workdir), time.time() - t0

        with ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(start, run, head): (run, head) for run, head in pending}
            for future in as_completed(futures):
                run, head = futures[future]
                try:
                    record, run_seconds = future.result()
                except RuntimeError as e:   # a failed nnU-Net command: note it, go on with the others
                    failures += [run.key] + [twin.key for twin, _ in twins.pop(run_identity(run), [])]
                    print(f"{head}: FAILED {str(e).splitlines()[0]}", flush=True)
                    continue
                store.add(run.key, record)
                trained[run_identity(run)] = run.key
                for twin, twin_head in twins.pop(run_identity(run), []):
                    store.add(twin.key, {**record, "scenario": twin.scenario.name, "reused_from": run.key})
                    print(f"{twin_head}: same dataset and settings as {run.key}, its result reused", flush=True)
                done += 1
                elapsed = time.time() - t_start
                left = len(pending) - done
                print(f"{head}: mean Dice {record['mean_dice']:.3f}, train {record['train_seconds']:.0f} s, "
                      f"run {run_seconds:.0f} s; elapsed {_duration(elapsed)}, about "
                      f"{_duration(elapsed / done * left)} left ({left} runs)", flush=True)

    records = [store.runs[r.key] for r in runs if r.key in store.runs]
    summary = summarise(records)
    report = "\n\n".join(format_group(g, m, scenarios.get(g[0]), skipped.get(g, {})) for g, m in summary.items())
    report += f"\n\nlost organ: mean test Dice < {LOST_DICE}; runs x organs counted. Results: {store.path}"
    if summary:
        pngs = plot(summary, lambda c: os.path.join(workdir, f"benchmark_suite_{c}.png"))
        report += "\nFigures: " + ", ".join(pngs)
    with open(os.path.join(workdir, "report.txt"), "w") as f:
        f.write(report + "\n")
    print("\n" + report)
    if failures:
        print(f"\n{len(failures)} runs failed (logs under {workdir}/runs/*/*/logs): {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
