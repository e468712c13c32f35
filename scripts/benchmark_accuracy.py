#!/usr/bin/env python
"""Accuracy benchmark on synthetic partial-label data at a fixed training budget.

Four single-organ sources (each case annotates one organ, the others are stored as
background) are merged into one dataset; every trainer below trains on it with the same
schedule (``_bench`` by default: see nnunet_partial/trainers/schedules.py), predicts the same
fully labelled test set with ``nnUNetv2_predict`` and is scored per organ. The oracle is stock
``nnUNetTrainer`` on the very same images with all organs labelled.

    python scripts/benchmark_accuracy.py --workdir bench_acc            # naive, partial, oracle
    python scripts/benchmark_accuracy.py --trainers nnUNetTrainer nnUNetTrainerPartial nnUNetTrainerCoWAM

Prints a Dice table (and HD95) and writes ``<workdir>/accuracy.json``. Re-running reuses data,
plans and finished trainings.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from nnunet_partial.evaluation import evaluate_folders, format_table, save_results
from nnunet_partial.experiment import Workspace, default_device
from nnunet_partial.synthetic import LABELS, ORGANS, write_partial_dataset, write_test_set

PARTIAL_ID, ORACLE_ID = 991, 992


def row_name(trainer: str) -> str:
    return "naive (stock nnUNetTrainer)" if trainer == "nnUNetTrainer" else trainer.replace("nnUNetTrainer", "").lower()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bench_accuracy")
    p.add_argument("--trainers", nargs="+", default=["nnUNetTrainer", "nnUNetTrainerPartial"],
                   help="trainers on the partial dataset (schedule suffix added); default naive + partial")
    p.add_argument("--schedule", default="bench", help="schedule suffix: tiny, demo, bench, 10epochs, ...")
    p.add_argument("-c", "--configuration", default="2d")
    p.add_argument("--cases-per-source", type=int, default=6)
    p.add_argument("--n-test", type=int, default=6)
    p.add_argument("--no-oracle", action="store_true")
    p.add_argument("--fold", default="0")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)

    device = args.device or default_device()
    ws = Workspace(args.workdir)
    t0 = time.time()
    sources = {"partial": PARTIAL_ID} if args.no_oracle else {"partial": PARTIAL_ID, "oracle": ORACLE_ID}
    for kind, dataset_id in sources.items():
        name = f"Dataset{dataset_id:03d}_Bench{kind.capitalize()}"
        if not os.path.isdir(os.path.join(ws.raw, name)):
            write_partial_dataset(ws.raw, dataset_id, f"Bench{kind.capitalize()}",
                                  cases_per_source=args.cases_per_source, partial=kind == "partial")
        if not os.path.isfile(os.path.join(ws.preprocessed, name, "nnUNetPlans.json")):
            print(f"planning + preprocessing {name}", flush=True)
            ws.plan_and_preprocess(dataset_id, [args.configuration])
    test_images, test_labels = write_test_set(os.path.join(ws.root, "test"), args.n_test)

    runs = [(t, PARTIAL_ID, row_name(t)) for t in args.trainers]
    if not args.no_oracle:
        runs.append(("nnUNetTrainer", ORACLE_ID, "oracle (full labels)"))
    results, timings = {}, {}
    for base, dataset_id, label in runs:
        trainer = f"{base}_{args.schedule}"
        dataset_name = f"Dataset{dataset_id:03d}_Bench{'Partial' if dataset_id == PARTIAL_ID else 'Oracle'}"
        final = os.path.join(ws.results, dataset_name, f"{trainer}__nnUNetPlans__{args.configuration}",
                             f"fold_{args.fold}", "checkpoint_final.pth")
        if not os.path.isfile(final):
            print(f"training {trainer} on {dataset_name} ({args.configuration}, fold {args.fold}, {device})", flush=True)
            timings[label] = ws.train(dataset_id, args.configuration, trainer, fold=args.fold, device=device)
        out = os.path.join(ws.root, "predictions", f"{dataset_id}_{trainer}")
        ws.predict(dataset_id, args.configuration, trainer, test_images, out, fold=args.fold, device=device)
        results[label] = evaluate_folders(out, test_labels, {k: v for k, v in LABELS.items() if v})
        results[label]["train_seconds"] = timings.get(label)

    print(f"\nDice on {args.n_test} fully labelled synthetic test cases; {args.configuration}, schedule "
          f"'{args.schedule}', {args.cases_per_source} cases per single-organ source, fold {args.fold}, {device}; "
          f"{time.time() - t0:.0f} s")
    print(format_table(results, list(ORGANS), "Dice"))
    print("\nHD95 [mm]")
    print(format_table(results, list(ORGANS), "HD95", digits=1))
    save_results(results, os.path.join(ws.root, "accuracy.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
