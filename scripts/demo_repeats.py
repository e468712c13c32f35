#!/usr/bin/env python
"""The demo's trainings, repeated: per-organ Dice mean ± sd and the lost-organ rate.

One run of ``nnunet-partial demo`` is one draw: nnU-Net does not seed its training (network
initialisation, sampling and augmentation differ every run), so whether an organ survives a short
schedule is a rate, not a fact. This script makes the demo's data once (the very same dataset and
test set ``nnunet-partial demo`` makes), plans it once, then trains every trainer ``--runs`` times
with the stock ``nnUNetv2_train`` (each run in its own ``nnUNet_results`` folder), predicts the test
set with ``nnUNetv2_predict`` and scores it.

    python scripts/demo_repeats.py --workdir demo_runs --runs 10                       # Partial, 2d, _demo
    python scripts/demo_repeats.py --workdir demo_runs --runs 10 --trainers nnUNetTrainer nnUNetTrainerPartial

Every finished run is written to ``<workdir>/repeats.json`` at once and reused on re-run (an
interrupted job resumes). An organ is *lost* in a run when its test Dice is below 0.1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from nnunet_partial.evaluation import LOST_ORGAN_DICE, evaluate_folders, format_run_summary, summarize_runs
from nnunet_partial.experiment import Workspace, default_device
from nnunet_partial.synthetic import LABELS, ORGANS, write_partial_dataset, write_test_set

# the demo's dataset (nnunet_partial/commands/demo.py)
from nnunet_partial.commands.demo import DEMO_DATASET_ID


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="demo_repeats")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--trainers", nargs="+", default=["nnUNetTrainerPartial"], help="base names; schedule appended")
    p.add_argument("--schedule", default="demo")
    p.add_argument("-c", "--configuration", default="2d")
    p.add_argument("--cases-per-source", type=int, default=4)
    p.add_argument("--n-test", type=int, default=4)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)

    device = args.device or default_device()
    ws = Workspace(args.workdir)
    name = f"Dataset{DEMO_DATASET_ID:03d}_DemoPartial"
    if not os.path.isdir(os.path.join(ws.raw, name)):
        write_partial_dataset(ws.raw, DEMO_DATASET_ID, "DemoPartial", cases_per_source=args.cases_per_source)
    test_images, test_labels = write_test_set(os.path.join(ws.root, "test"), args.n_test)
    if not os.path.isfile(os.path.join(ws.preprocessed, name, f"nnUNetPlans.json")) or not os.path.isdir(
            os.path.join(ws.preprocessed, name, f"nnUNetPlans_{args.configuration}")):
        ws.plan_and_preprocess(DEMO_DATASET_ID, [args.configuration])

    results_file = os.path.join(ws.root, "repeats.json")
    done = json.load(open(results_file)) if os.path.isfile(results_file) else {}
    todo = [(t, r) for r in range(args.runs) for t in args.trainers
            if f"{t}_{args.schedule}/{args.configuration}/run{r}" not in done]
    t0, finished = time.time(), 0
    for base, r in todo:
        trainer = f"{base}_{args.schedule}"
        key = f"{trainer}/{args.configuration}/run{r}"
        results = os.path.join(ws.root, "runs", f"run{r}")
        env = {"nnUNet_results": results}
        fold = os.path.join(results, name, f"{trainer}__nnUNetPlans__{args.configuration}", "fold_0")
        t_run, train_s = time.time(), None
        if not os.path.isfile(os.path.join(fold, "checkpoint_final.pth")):  # else: trained before an interruption
            ws.run(["nnUNetv2_train", str(DEMO_DATASET_ID), args.configuration, "0", "-tr", trainer, "-device",
                    device], f"train_{trainer}_{args.configuration}_run{r}", env_overrides=env)
            train_s = time.time() - t_run
        out = os.path.join(ws.root, "predictions", f"run{r}", f"{trainer}_{args.configuration}")
        ws.run(["nnUNetv2_predict", "-i", test_images, "-o", out, "-d", str(DEMO_DATASET_ID), "-c",
                args.configuration, "-f", "0", "-tr", trainer, "-device", device, "-npp", "1", "-nps", "1"],
               f"predict_{trainer}_{args.configuration}_run{r}", env_overrides=env)
        res = evaluate_folders(out, test_labels, {k: v for k, v in LABELS.items() if v})
        done[key] = {"mean": res["mean"], "foreground_mean": res["foreground_mean"], "train_seconds": train_s,
                     "lost_organ_warning": _warned_lost(fold)}
        with open(results_file, "w") as f:
            json.dump(done, f, indent=1, default=lambda o: None)
        finished += 1
        elapsed = time.time() - t0
        lost = [o for o in ORGANS if not res["mean"][o]["Dice"] >= LOST_ORGAN_DICE]
        print(f"[{finished}/{len(todo)}] {key}: mean Dice {res['foreground_mean']['Dice']:.3f}"
              f"{' LOST ' + ', '.join(lost) if lost else ''}; {elapsed / 60:.1f} min elapsed, "
              f"~{elapsed / finished * (len(todo) - finished) / 60:.0f} min left", flush=True)

    print(f"\n{args.configuration}, schedule '{args.schedule}', demo data ({args.cases_per_source} cases per "
          f"single-organ source), {args.n_test} fully labelled test cases, {device}")
    for base in args.trainers:
        trainer = f"{base}_{args.schedule}"
        runs = [v for k, v in done.items() if k.startswith(f"{trainer}/{args.configuration}/")]
        if runs:
            print(format_run_summary(trainer, summarize_runs(runs, list(ORGANS))))
    return 0


def _warned_lost(fold_folder: str):
    """Did the training log warn about a lost organ (None: no log found)?"""
    if not os.path.isdir(fold_folder):
        return None
    logs = [f for f in os.listdir(fold_folder) if f.startswith("training_log")]
    if not logs:
        return None
    return any("LOST ORGAN" in open(os.path.join(fold_folder, f)).read() for f in logs)


if __name__ == "__main__":
    sys.exit(main())
