#!/usr/bin/env python
"""Benchmark of nnUNetTrainerMeanTeacher: accuracy (few labelled + many unlabelled synthetic cases)
and step time against stock nnUNetTrainer. Prints tables; writes nothing outside --workdir.

Accuracy (--part accuracy): one synthetic image pool, three datasets built from it
  - semi:       4 fully labelled + 16 unlabelled cases  -> nnUNetTrainerMeanTeacher<schedule>
  - supervised: the same 4 labelled cases only          -> nnUNetTrainerPartial<schedule>
  - oracle:     all 20 cases fully labelled             -> nnUNetTrainerPartial<schedule>
each trained with the real ``nnUNetv2_train`` (every case in training; validation on two labelled
cases), predicted with ``nnUNetv2_predict`` on a separate fully labelled test set and scored with
``nnunet_partial.evaluation.evaluate_folders`` (Dice per organ).

Speed (--part speed): nnUNetTrainerPartial and nnUNetTrainerMeanTeacher against stock nnUNetTrainer on the
semi dataset, paired steps on the same batches, by scripts/benchmark_speed.py (the one speed script).

    python scripts/benchmark_mean_teacher.py --part all --configuration 2d --schedule _demo
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/nnunet_partial_bench_mean_teacher")
    p.add_argument("--part", choices=("accuracy", "speed", "all"), default="all")
    p.add_argument("--configuration", default="2d", help="accuracy runs (2d is ~10x faster than 3d_fullres on CPU)")
    p.add_argument("--schedule", default="_demo", help="trainer suffix: _tiny, _demo (12x25), _bench (10x50), ...")
    p.add_argument("--n-labelled", type=int, default=4)
    p.add_argument("--n-unlabelled", type=int, default=16)
    p.add_argument("--n-test", type=int, default=8)
    p.add_argument("--speed-configurations", nargs="+", default=["3d_fullres", "2d"])
    p.add_argument("--speed-steps", type=int, default=6)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=3)
    return p.parse_args()



DATASETS = {  # id: (name, n_full, n_unlabelled) as functions of the labelled / unlabelled counts
    527: ("MTBenchSemi", lambda a: a.n_labelled, lambda a: a.n_unlabelled),
    528: ("MTBenchSupervised", lambda a: a.n_labelled, lambda a: 0),
    529: ("MTBenchOracle", lambda a: a.n_labelled + a.n_unlabelled, lambda a: 0),
}


def prepare(args, ws, configurations):
    """Write and preprocess the three datasets (same images: case i is phantom seed*100003+i in each)."""
    from nnunet_partial.synthetic import write_partial_dataset
    names = {}
    for did, (name, n_full, n_unl) in DATASETS.items():
        full_name = f"Dataset{did:03d}_{name}"
        names[did] = full_name
        pre = os.path.join(ws.preprocessed, full_name)
        if not os.path.isdir(os.path.join(ws.raw, full_name)):
            write_partial_dataset(ws.raw, did, name=name, sources={}, n_full=n_full(args),
                                  n_unlabelled=n_unl(args), seed=args.seed)
        missing = [c for c in configurations if not os.path.isdir(os.path.join(pre, f"nnUNetPlans_{c}"))]
        if missing:
            ws.plan_and_preprocess(did, missing)
        # every case trains; two labelled cases are watched during training (overlap is allowed)
        cases = sorted(f[:-len(".nii.gz")] for f in os.listdir(os.path.join(ws.raw, full_name, "labelsTr")))
        labelled = [c for c in cases if not c.startswith("unlabelled")]
        with open(os.path.join(pre, "splits_final.json"), "w") as f:
            json.dump([{"train": cases, "val": labelled[:2]}], f)
    return names


# ---------------------------------------------------------------------- accuracy
def accuracy(args, ws, names):
    from nnunet_partial.evaluation import evaluate_folders, format_table, save_results
    from nnunet_partial.synthetic import LABELS, ORGANS, write_test_set

    test_dir = os.path.join(args.workdir, "test")
    if not os.path.isdir(os.path.join(test_dir, "labelsTs")):
        write_test_set(test_dir, args.n_test)
    runs = {
        f"supervised only ({args.n_labelled} labelled)": (528, "nnUNetTrainerPartial"),
        f"Mean Teacher ({args.n_labelled} + {args.n_unlabelled} unlabelled)": (527, "nnUNetTrainerMeanTeacher"),
        f"oracle ({args.n_labelled + args.n_unlabelled} labelled)": (529, "nnUNetTrainerPartial"),
    }
    results, times = {}, {}
    for label, (did, trainer) in runs.items():
        tr = trainer + args.schedule
        out = os.path.join(args.workdir, "pred", f"{did}_{tr}_{args.configuration}")
        if not os.path.isdir(out):
            print(f"training {tr} on {names[did]} ({args.configuration}, log: {ws.logs})", flush=True)
            times[label] = ws.train(did, args.configuration, tr, device=args.device)
            ws.predict(did, args.configuration, tr, os.path.join(test_dir, "imagesTs"), out, device=args.device,
                       extra=["--disable_tta"])
        results[label] = evaluate_folders(out, os.path.join(test_dir, "labelsTs"), LABELS)
        print(f"{label}: {tr} {args.configuration}" + (f", trained in {times[label] / 60:.1f} min" if label in times
                                                      else " (cached)"), flush=True)
    save_results(results, os.path.join(args.workdir, f"accuracy_{args.configuration}{args.schedule}.json"))
    print(f"\nDice on {args.n_test} fully labelled synthetic test cases ({args.configuration}, "
          f"schedule {args.schedule}, nnUNetv2_predict without TTA):")
    print(format_table(results, list(ORGANS)))


# ---------------------------------------------------------------------- speed
def speed(args, names):
    """Stock, Partial and Mean Teacher on the semi dataset, paired steps: scripts/benchmark_speed.py."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from benchmark_speed import main as benchmark_speed
    benchmark_speed(["-d", names[527], "-c", *args.speed_configurations, "--sizes", "planned",
                     "--trainers", "nnUNetTrainerPartial", "nnUNetTrainerMeanTeacher", "--steps", str(args.speed_steps),
                     "--warmup", "1", "--device", args.device,
                     "--json", os.path.join(args.workdir, "speed_mean_teacher.json")])


def main():
    args = parse_args()
    from nnunet_partial.experiment import open_workspace
    ws = open_workspace(args.workdir)
    configurations = sorted(set(([args.configuration] if args.part in ("accuracy", "all") else [])
                                + (args.speed_configurations if args.part in ("speed", "all") else [])))
    names = prepare(args, ws, configurations)
    if args.part in ("speed", "all"):
        speed(args, names)
    if args.part in ("accuracy", "all"):
        accuracy(args, ws, names)


if __name__ == "__main__":
    sys.exit(main())
