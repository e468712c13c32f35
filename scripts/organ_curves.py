#!/usr/bin/env python
"""When does each organ emerge in a short nnU-Net training? Per-organ curves of repeated runs.

A lost organ (test Dice < 0.1) is the end of a curve; this script shows the curves. For every nnU-Net fold
folder given (its ``checkpoint_final.pth``, else ``checkpoint_latest.pth``) it reads the per-epoch pseudo
Dice per organ (nnU-Net's own validation log) and, for our trainers, the share of validation voxels
predicted as each class. An organ *emerges* at the first epoch whose pseudo Dice reaches 0.5
(``EMERGED_DICE``); "never" means it did not within the run. Prints, per group of runs, the emergence
epoch of every organ in every run and a summary per organ, and saves a figure (one panel per organ, one
line per run) when ``--png`` is given.

    python scripts/organ_curves.py --group after="/tmp/exp/after2d/runs/run*/*/nnUNetTrainerPartial_demo__*/fold_0" \\
        --group before="/tmp/exp/before2d/runs/run*/*/nnUNetTrainerPartial_demo__*/fold_0" --png curves.png

A run counts only if its folder holds a checkpoint; a label the validation fold never scored (NaN every
epoch) is shown as "n/a", not "never".
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np

from nnunet_partial.evaluation import EMERGED_DICE, emergence_epoch, read_training_curves


def load_groups(groups: list[str]) -> dict:
    """``["name=glob", ...]`` -> ``{name: [(folder, curves), ...]}`` (folders sorted; ones without a
    checkpoint skipped)."""
    out = {}
    for spec in groups:
        name, sep, pattern = spec.partition("=")
        if not sep or not name or not pattern:
            raise SystemExit(f"--group wants NAME=GLOB, got {spec!r}")
        runs = []
        for folder in sorted(glob.glob(pattern)):
            try:
                runs.append((folder, read_training_curves(folder)))
            except FileNotFoundError:
                continue
        if not runs:
            raise SystemExit(f"--group {name}: no fold folder with a checkpoint matches {pattern!r}")
        out[name] = runs
    return out


def iterations_per_epoch(trainer: str | None) -> int | None:
    """Training steps per epoch of one of our schedule variants (``..._demo``, ``..._bench``, ``..._tiny``) or
    ``..._<N>epochs`` / a plain trainer (nnU-Net's 250); None for a name we cannot tell (a user's own trainer)."""
    from nnunet_partial.trainers.schedules import SHORT_SCHEDULES
    if not trainer:
        return None
    suffix = trainer.rsplit("_", 1)[-1] if "_" in trainer else ""
    if suffix in SHORT_SCHEDULES:
        return SHORT_SCHEDULES[suffix][1]
    if suffix.endswith("epochs") or trainer.startswith("nnUNetTrainer") and "_" not in trainer:
        return 250
    return None


def _run_names(folders: list[str]) -> list[str]:
    """What tells the folders apart: each path without the prefix and suffix they all share."""
    if len(folders) == 1:
        return [folders[0] if len(folders[0]) <= 40 else "…" + folders[0][-39:]]
    prefix = len(os.path.commonprefix(folders))
    suffix = len(os.path.commonprefix([f[::-1] for f in folders]))
    return [f[prefix:len(f) - suffix] or f for f in folders]


def _cell(curve) -> str:
    if not np.isfinite(curve).any():
        return "n/a"
    e = emergence_epoch(curve)
    return "never" if e is None else str(e)


def format_group(name: str, runs: list) -> str:
    labels = runs[0][1]["labels"]
    epochs = sorted({c["pseudo_dice"].shape[0] for _, c in runs})
    lines = [f"{name}: {len(runs)} runs, {'/'.join(map(str, epochs))} epochs; epoch (0-based) at which each organ's "
             f"pseudo Dice first reaches {EMERGED_DICE}",
             f"  {'run':<40}" + "".join(f"{lbl:>10}" for lbl in labels)]
    for short, (_, c) in zip(_run_names([f for f, _ in runs]), runs):
        lines.append(f"  {short:<40}" + "".join(f"{_cell(c['pseudo_dice'][:, i]):>10}" for i in range(len(labels))))
    ipe = {iterations_per_epoch(c["trainer"]) for _, c in runs}
    ipe = ipe.pop() if len(ipe) == 1 else None   # runs of different schedules: epochs only
    summary = []
    for i, lbl in enumerate(labels):
        scored = [c["pseudo_dice"][:, i] for _, c in runs if np.isfinite(c["pseudo_dice"][:, i]).any()]
        found = [e for e in (emergence_epoch(v) for v in scored) if e is not None]
        if not scored:
            summary.append(f"{lbl}: not scored by validation")
            continue
        steps = f", i.e. after {(min(found) + 1) * ipe}-{(max(found) + 1) * ipe} steps" if found and ipe else ""
        summary.append(f"{lbl}: " + (f"median {np.median(found):g} (range {min(found)}-{max(found)}{steps})" if found
                                      else "-") + f", never in {len(scored) - len(found)} of {len(scored)}")
    lines += ["  emerged: " + line for line in summary]
    return "\n".join(lines)


def plot(groups: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    labels = next(iter(groups.values()))[0][1]["labels"]
    fig, axes = plt.subplots(1, len(labels), figsize=(3.6 * len(labels), 3.4), squeeze=False, sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # x = training steps where every run's schedule is known (groups of different schedules line up), else epochs
    steps = all(iterations_per_epoch(c["trainer"]) for runs in groups.values() for _, c in runs)
    for g, (name, runs) in enumerate(groups.items()):
        for r, (_, c) in enumerate(runs):
            n = c["pseudo_dice"].shape[0]
            x = (np.arange(n) + 1) * iterations_per_epoch(c["trainer"]) if steps else np.arange(n)
            for i, ax in enumerate(axes[0]):
                ax.plot(x, c["pseudo_dice"][:, i], color=colours[g % len(colours)], alpha=0.6, lw=1,
                        label=name if (r == 0 and i == 0) else None)
    for ax, lbl in zip(axes[0], labels):
        ax.axhline(EMERGED_DICE, color="grey", ls=":", lw=1)
        ax.set_title(lbl)
        ax.set_xlabel("training steps" if steps else "epoch")
    axes[0][0].set_ylabel("pseudo Dice (validation)")
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--group", action="append", required=True, metavar="NAME=GLOB",
                   help="a name and a glob of nnU-Net fold folders (repeat for several groups)")
    p.add_argument("--png", help="save the curves figure here")
    args = p.parse_args(argv)
    groups = load_groups(args.group)
    print("\n\n".join(format_group(name, runs) for name, runs in groups.items()))
    if args.png:
        plot(groups, args.png)
        print(f"\nfigure: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
