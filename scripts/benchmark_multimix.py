#!/usr/bin/env python
"""Benchmark of nnUNetTrainerMultiMix (issue 13): classification accuracy / AUC and segmentation Dice on
synthetic data where 10 % of the cases have segmentations, 50 % class labels (lesion / no lesion in the
liver, visible in the image; nnunet_partial/synthetic.py ``class_task="lesion"``), the rest nothing.

Rows, same schedule (``--schedule``), same data, ``--seeds`` independent datasets (different images):

  (a) segmentation only  nnUNetTrainerPartial: nnU-Net's DC+CE on the segmented cases, no classifier
  (b) MultiMix, no bridge        nnUNetTrainerMultiMixNoBridge
  (c) MultiMix, no pseudo labels nnUNetTrainerMultiMixNoPseudo
  (d) MultiMix (full)            nnUNetTrainerMultiMix

Each run is the real ``nnUNetv2_train`` (fold 0 of a fixed split: every case trains, two segmented
class-labelled cases are watched) and ``nnunet-partial predict-class`` (nnU-Net's predictor + the class
output; ``nnUNetv2_predict`` for row a) on a separate fully labelled test set with known classes,
without TTA. Dice by ``nnunet_partial.evaluation.evaluate_folders``; accuracy / AUC by
``nnunet_partial.trainers.multimix.classification_metrics``. Step time: seconds per training iteration
from nnU-Net's epoch timestamps (epoch time incl. its validation iterations / iterations), as a ratio to
row (a) of the same seed.

    python scripts/benchmark_multimix.py --configuration 2d --seeds 0 1 2 --schedule _bench
    python scripts/benchmark_multimix.py --smoke      # tiny sizes, one seed: checks the pipeline only
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROWS = {  # row label -> base trainer
    "(a) segmentation only (Partial)": "nnUNetTrainerPartial",
    "(b) MultiMix w/o bridge": "nnUNetTrainerMultiMixNoBridge",
    "(c) MultiMix w/o pseudo labels": "nnUNetTrainerMultiMixNoPseudo",
    "(d) MultiMix (full)": "nnUNetTrainerMultiMix",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/nnunet_partial_bench_multimix")
    p.add_argument("--configuration", default="2d", help="2d or 3d_fullres")
    p.add_argument("--schedule", default="_bench", help="trainer suffix: _tiny, _demo (12x25), _bench (10x50), ...")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-cases", type=int, default=20, help="training cases per dataset (10 %% segmented, 50 %% class-labelled)")
    p.add_argument("--n-test", type=int, default=10)
    p.add_argument("--shape", type=int, nargs=3, default=[32, 64, 64])
    p.add_argument("--rows", nargs="+", default=list("abcd"), help="which rows (a b c d)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--first-id", type=int, default=630, help="dataset id of the first seed (one id per seed)")
    p.add_argument("--toy-plans", type=int, default=None, metavar="BATCH",
                   help="train with a small copy of nnU-Net's plans (8-16-32... features, at most 32; this batch size) "
                        "instead of nnUNetPlans: CPU-sized runs")
    p.add_argument("--smoke", action="store_true", help="one seed, 6 cases of 8x32x32, _tiny schedule")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.n_cases, args.n_test, args.shape, args.schedule = [0], 10, 2, [8, 32, 32], "_tiny"
        args.toy_plans = args.toy_plans or 4
    args.plans = "nnUNetPlans" if args.toy_plans is None else TOY_PLANS
    return args


TOY_PLANS = "nnUNetPlansMultiMixBenchToy"


def write_toy_plans(preprocessed_folder: str, configuration: str, batch: int) -> None:
    """nnUNetPlans with narrow features (8, 16, 32, 32, ...) and ``batch`` for ``configuration``; same
    preprocessed data (data_identifier unchanged)."""
    with open(os.path.join(preprocessed_folder, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    plans["plans_name"] = TOY_PLANS
    config = plans["configurations"][configuration]
    arch = config["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [min(8 * 2 ** i, 32) for i in range(arch["n_stages"])]
    config["batch_size"] = int(batch)
    with open(os.path.join(preprocessed_folder, f"{TOY_PLANS}.json"), "w") as f:
        json.dump(plans, f)



# ---------------------------------------------------------------------- data
def write_lesion_test_set(folder: str, n: int, shape, seed: int) -> tuple[str, str, dict]:
    """Fully labelled test cases with the lesion class of each: (imagesTs, labelsTs, {case: class index})."""
    from nnunet_partial.synthetic import lesion_present, make_phantom, write_nifti
    images, labels = os.path.join(folder, "imagesTs"), os.path.join(folder, "labelsTs")
    os.makedirs(images, exist_ok=True)
    os.makedirs(labels, exist_ok=True)
    classes = {}
    for i in range(n):
        s = 10_000 + 1000 * seed + i
        has = lesion_present(s)
        image, label = make_phantom(s, shape, lesion=has)
        write_nifti(image, os.path.join(images, f"test_{i:03d}_0000.nii.gz"))
        write_nifti(label, os.path.join(labels, f"test_{i:03d}.nii.gz"))
        classes[f"test_{i:03d}"] = int(has)
    return images, labels, classes


def prepare(args, ws, seed: int) -> str:
    from nnunet_partial.synthetic import write_partial_dataset
    did = args.first_id + seed
    name = f"MultiMixBench{seed}"
    full = f"Dataset{did:03d}_{name}"
    n_seg = max(1, int(round(0.1 * args.n_cases)))
    if not os.path.isdir(os.path.join(ws.raw, full)):
        write_partial_dataset(ws.raw, did, name=name, sources={}, n_full=n_seg, n_unlabelled=args.n_cases - n_seg,
                              shape=args.shape, seed=seed, class_task="lesion", class_labelled_fraction=0.5)
    pre = os.path.join(ws.preprocessed, full)
    if not os.path.isdir(os.path.join(pre, f"nnUNetPlans_{args.configuration}")):
        ws.plan_and_preprocess(did, [args.configuration])
    cases = sorted(f[:-len(".nii.gz")] for f in os.listdir(os.path.join(ws.raw, full, "labelsTr")))
    watched = [c for c in cases if c.startswith("full")][:2]
    with open(os.path.join(pre, "splits_final.json"), "w") as f:
        json.dump([{"train": cases, "val": watched}], f)
    if args.toy_plans is not None:
        write_toy_plans(pre, args.configuration, args.toy_plans)
    return full


# ---------------------------------------------------------------------- one run
def seconds_per_iteration(results_folder: str, iterations: int) -> float:
    import torch
    ckpt = torch.load(os.path.join(results_folder, "fold_0", "checkpoint_final.pth"), map_location="cpu",
                      weights_only=False)
    log = ckpt["logging"]
    times = np.array(log["epoch_end_timestamps"]) - np.array(log["epoch_start_timestamps"])
    return float(np.median(times) / iterations)


def run_one(args, ws, seed: int, dataset: str, row: str, test) -> dict:
    from nnunet_partial.evaluation import evaluate_folders
    from nnunet_partial.synthetic import LABELS
    from nnunet_partial.trainers import get_trainer
    from nnunet_partial.trainers.multimix import classification_metrics
    images, labels, classes = test
    trainer = ROWS[row] + args.schedule
    did = args.first_id + seed
    out = os.path.join(args.workdir, "pred", f"{did}_{trainer}_{args.configuration}")
    results_folder = os.path.join(ws.results, dataset, f"{trainer}__{args.plans}__{args.configuration}")
    if not os.path.isfile(os.path.join(results_folder, "fold_0", "checkpoint_final.pth")):
        print(f"  training {trainer} on {dataset} ({args.configuration}; logs in {ws.logs})", flush=True)
        ws.train(did, args.configuration, trainer, device=args.device, extra=["-p", args.plans])
    if not os.path.isdir(out):
        if ROWS[row] == "nnUNetTrainerPartial":
            ws.predict(did, args.configuration, trainer, images, out, device=args.device,
                       extra=["--disable_tta", "-p", args.plans])
        else:
            ws.run([sys.executable, "-m", "nnunet_partial.cli", "predict-class", "-i", images, "-o", out, "-d",
                    str(did), "-c", args.configuration, "-tr", trainer, "-p", args.plans, "-f", "0", "-device",
                    args.device, "-npp", "1", "-nps", "1", "--disable_tta"],
                   f"predict_class_{did}_{trainer}_{args.configuration}")
    dice = evaluate_folders(out, labels, LABELS, num_processes=1)["foreground_mean"]["Dice"]
    result = {"dice": dice, "accuracy": float("nan"), "auc": float("nan")}
    cls_file = os.path.join(out, "classification.json")
    if os.path.isfile(cls_file):
        with open(cls_file) as f:
            cases = json.load(f)["cases"]
        keys = sorted(classes)
        probs = np.array([[cases[k]["probabilities"][n] for n in ("no_lesion", "lesion")] for k in keys])
        m = classification_metrics(probs, np.array([classes[k] for k in keys]))
        result.update(accuracy=m["accuracy"], auc=m["auc"])
    cls = get_trainer(trainer)
    result["s_per_iteration"] = seconds_per_iteration(results_folder, _iterations(cls))
    return result


def _iterations(cls) -> int:
    """Training iterations per epoch of a schedule variant (the epoch timestamps also hold its validation
    iterations, the same for every row of a schedule)."""
    from nnunet_partial.trainers.schedules import SHORT_SCHEDULES
    suffix = cls.__name__.rsplit("_", 1)[-1]
    if suffix in SHORT_SCHEDULES:
        return SHORT_SCHEDULES[suffix][1]
    return 250


# ---------------------------------------------------------------------- table
def format_results(runs: dict) -> str:
    """``runs``: row -> list of per-seed dicts (dice, accuracy, auc, ratio). A mean ± sd table."""
    def cell(values, digits=3):
        v = np.array([x for x in values if np.isfinite(x)], dtype=float)
        if len(v) == 0:
            return "n/a"
        return f"{v.mean():.{digits}f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.{digits}f}"
    header = f"{'row':34s} {'n':>2s} {'accuracy':>15s} {'AUC':>15s} {'Dice (fg mean)':>15s} {'step time / (a)':>16s}"
    lines = [header, "-" * len(header)]
    for row, results in runs.items():
        lines.append(f"{row:34s} {len(results):2d} {cell([r['accuracy'] for r in results]):>15s} "
                     f"{cell([r['auc'] for r in results]):>15s} {cell([r['dice'] for r in results]):>15s} "
                     f"{cell([r.get('ratio', float('nan')) for r in results], 2):>16s}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from nnunet_partial.experiment import open_workspace
    ws = open_workspace(args.workdir)
    rows = [r for r in ROWS if r[1] in args.rows]
    runs = {r: [] for r in rows}
    for seed in args.seeds:
        dataset = prepare(args, ws, seed)
        test = write_lesion_test_set(os.path.join(args.workdir, f"test_{seed}"), args.n_test, args.shape, seed)
        per_seed = {}
        for row in rows:
            per_seed[row] = run_one(args, ws, seed, dataset, row, test)
            print(f"  seed {seed} {row}: {per_seed[row]}", flush=True)
        base = per_seed.get(rows[0], {}).get("s_per_iteration")
        for row, r in per_seed.items():
            r["ratio"] = r["s_per_iteration"] / base if base else float("nan")
            runs[row].append(r)
    with open(os.path.join(args.workdir, f"results_{args.configuration}{args.schedule}.json"), "w") as f:
        json.dump(runs, f, indent=1)
    print(f"\nMultiMix benchmark, {args.configuration}, schedule {args.schedule}, seeds {args.seeds}, {args.n_cases} "
          f"training cases ({max(1, round(0.1 * args.n_cases))} segmented, {round(0.5 * args.n_cases)} class-labelled), "
          f"{args.n_test} test cases, mean ± sd over seeds:")
    print(format_results(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
