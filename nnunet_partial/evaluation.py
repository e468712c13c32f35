"""Evaluation: per-case, per-label Dice and HD95, partial-aware when annotations are given.

A label is scored on a case only if it was annotated there (``annotated_labels``); without
metadata every label is scored everywhere. Dice follows nnU-Net's convention (NaN when the
label is absent from both reference and prediction, skipped by the means). HD95 (mm, world
spacing) comes from MedPy's ``hd95``; it is undefined — NaN, skipped by the means — when the
prediction or the reference of a label is empty (Dice already shows that failure as 0).
"""
from __future__ import annotations

import copy
import json
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Mapping, Optional

import numpy as np

from nnunet_partial.annotations import PartialAnnotations


def nanmean(values) -> float:
    """Mean of the non-NaN values; NaN (no warning) when there are none."""
    arr = np.asarray(list(values), dtype=float)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def predicted_label_voxels(prediction_folder: str, file_ending: str, label_values) -> Optional[dict]:
    """``{value: voxels predicted as it, summed over every file of the folder, "n_cases": files}``;
    None when the folder holds no prediction."""
    import SimpleITK as sitk
    if not os.path.isdir(prediction_folder):
        return None
    files = sorted(f for f in os.listdir(prediction_folder) if f.endswith(file_ending))
    if not files:
        return None
    counts = {int(v): 0 for v in label_values}
    for f in files:
        # a copy: a view would outlive its temporary image (SimpleITK frees the buffer with it)
        values, n = np.unique(sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(prediction_folder, f))),
                              return_counts=True)
        for v, c in zip(values.tolist(), n.tolist()):
            if v in counts:
                counts[v] += c
    counts["n_cases"] = len(files)
    return counts


# ---------------------------------------------------------------------- repeated runs
LOST_ORGAN_DICE = 0.1  # an organ whose test Dice is below this is "lost" by the run


def summarize_runs(runs: list, labels: list) -> dict:
    """Aggregate repeated runs (each an :func:`evaluate_folders` result, or its ``mean`` /
    ``foreground_mean`` part): per label and overall Dice/HD95 mean ± sd over runs, the lost-organ
    rate (run × label pairs with Dice < ``LOST_ORGAN_DICE``; a missing Dice counts as lost) and the
    number of runs that lost at least one organ."""
    out = {"n_runs": len(runs), "labels": {}}
    lost_pairs, runs_losing = 0, 0
    for metric in ("Dice", "HD95"):
        for label in labels + ["mean"]:
            vals = np.array([(r["foreground_mean"] if label == "mean" else r["mean"][label])[metric]
                             for r in runs], dtype=float)
            finite = vals[np.isfinite(vals)]
            out["labels"].setdefault(label, {})[metric] = (
                float(finite.mean()) if finite.size else float("nan"),
                float(finite.std(ddof=1)) if finite.size > 1 else float("nan"))
    for r in runs:
        lost = [lbl for lbl in labels if not (r["mean"][lbl]["Dice"] or 0) >= LOST_ORGAN_DICE]
        lost_pairs += len(lost)
        runs_losing += bool(lost)
    out["lost_pairs"], out["pairs"], out["runs_losing_an_organ"] = lost_pairs, len(runs) * len(labels), runs_losing
    if runs and "train_seconds" in runs[0]:
        out["train_seconds"] = nanmean(r.get("train_seconds") or float("nan") for r in runs)
    return out


def format_run_summary(name: str, summary: dict, labels: Optional[list] = None) -> str:
    """One block of text: Dice and HD95 mean ± sd per label, and the lost-organ counts."""
    labels = labels or [k for k in summary["labels"] if k != "mean"]
    cols = labels + ["mean"]
    lines = [f"{name}: {summary['n_runs']} runs; organs lost (Dice < {LOST_ORGAN_DICE}): "
             f"{summary['lost_pairs']} of {summary['pairs']} run x organ pairs, in "
             f"{summary['runs_losing_an_organ']} of {summary['n_runs']} runs"
             + (f"; train {summary['train_seconds']:.0f} s per run" if np.isfinite(summary.get("train_seconds", np.nan))
                else "")]
    lines.append("  " + f"{'':6}" + "".join(f"{c:>16}" for c in cols))
    for metric, digits in (("Dice", 3), ("HD95", 1)):
        cells = []
        for c in cols:
            m, s = summary["labels"][c][metric]
            cells.append("n/a" if not np.isfinite(m) else f"{m:.{digits}f} ± {s:.{digits}f}" if np.isfinite(s)
                         else f"{m:.{digits}f}")
        lines.append("  " + f"{metric:6}" + "".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------- training curves (why organs get lost)
EMERGED_DICE = 0.5  # an organ has emerged in a run at the first epoch whose pseudo Dice reaches this


def emergence_epoch(pseudo_dice, threshold: float = EMERGED_DICE) -> Optional[int]:
    """First epoch (0-based) whose pseudo Dice reaches ``threshold``; None when none does. ``pseudo_dice``: one
    value per epoch, NaN where the epoch's validation could not score the organ (never counts as emerged)."""
    for epoch, value in enumerate(np.asarray(list(pseudo_dice), dtype=float)):
        if np.isfinite(value) and value >= threshold:
            return epoch
    return None


def read_training_curves(fold_folder: str) -> dict:
    """Per-epoch curves of one nnU-Net training from its checkpoint (``checkpoint_final.pth``, else
    ``checkpoint_latest.pth``): ``trainer`` (class name), ``labels`` (foreground label names in value order),
    ``pseudo_dice`` (epochs, labels), ``train_loss`` / ``val_loss`` (epochs,), and our trainers' diagnostics
    ``predicted_fraction`` / ``mean_probability`` (epochs, 1 + labels; background first) or None where the
    trainer does not log them (stock nnU-Net)."""
    import torch
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        path = os.path.join(fold_folder, name)
        if os.path.isfile(path):
            break
    else:
        raise FileNotFoundError(f"no checkpoint_final.pth or checkpoint_latest.pth in {fold_folder}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    log = ckpt["logging"]
    labels = {k: v for k, v in ckpt["init_args"]["dataset_json"]["labels"].items() if k != "background"}
    names = [k for k, _ in sorted(labels.items(), key=lambda kv: kv[1] if isinstance(kv[1], int) else max(kv[1]))]
    n = len(log["dice_per_class_or_region"])

    def optional(key):
        return np.asarray(log[key][:n], dtype=float) if len(log.get(key, [])) >= n and n else None

    return {"labels": names, "trainer": ckpt.get("trainer_name"),
            "pseudo_dice": np.asarray(log["dice_per_class_or_region"], dtype=float).reshape(n, -1),
            "train_loss": np.asarray(log["train_losses"][:n], dtype=float),
            "val_loss": np.asarray(log["val_losses"][:n], dtype=float),
            "predicted_fraction": optional("predicted_fraction_per_class"),
            "mean_probability": optional("mean_probability_per_class")}


# ---------------------------------------------------------------------- nnU-Net's summary.json
def partial_aware_summary(summary: dict, annotations: PartialAnnotations, file_ending: str) -> dict:
    """The partial-aware rule on an nnU-Net summary dict (as ``compute_metrics_on_folder`` returns it).

    Means per label are taken over the cases that annotate the label only (``n_cases_annotated``
    says how many); per-case entries gain ``"annotated": true/false``. Changes ``summary`` in place.
    """
    per_label: dict = {}
    for entry in summary["metric_per_case"]:
        case = os.path.basename(entry["reference_file"])[: -len(file_ending)]
        annotated = annotations.annotated.get(case, annotations.all_labels)
        for label, metrics in entry["metrics"].items():
            metrics["annotated"] = label in annotated
            if metrics["annotated"]:
                per_label.setdefault(label, []).append(metrics)
    means = {}
    for label in summary["mean"]:
        rows = per_label.get(label, [])
        keys = [k for k in summary["mean"][label]]
        means[label] = {k: nanmean(r[k] for r in rows) for k in keys}
        means[label]["n_cases_annotated"] = len(rows)
    summary["mean"] = means
    fg = [m for lbl, m in means.items() if lbl != 0]
    summary["foreground_mean"] = {k: nanmean(m[k] for m in fg) for k in fg[0]} if fg else {}
    summary["partial_aware"] = True
    return summary


def rewrite_summary_partial_aware(summary_file: str, annotations: PartialAnnotations, file_ending: str) -> dict:
    """Recompute the means of an nnU-Net ``summary.json`` over annotated (case, label) pairs only.

    The stock file is kept beside it as ``summary_all_labels_everywhere.json``; per-case entries
    gain ``"annotated": true/false`` for each label.
    """
    from nnunetv2.evaluation.evaluate_predictions import load_summary_json, save_summary_json

    summary = load_summary_json(summary_file)
    save_summary_json(summary, summary_file.replace(".json", "_all_labels_everywhere.json"))
    summary = partial_aware_summary(summary, annotations, file_ending)
    save_summary_json(summary, summary_file)
    return summary


def compute_metrics_on_folder_partial_aware(annotations: PartialAnnotations, folder_ref: str, folder_pred: str,
                                            output_file: Optional[str], image_reader_writer, file_ending: str,
                                            regions_or_labels, ignore_label=None, num_processes: int = 2,
                                            chill: bool = True) -> dict:
    """nnU-Net's ``compute_metrics_on_folder`` (same arguments after ``annotations``, same file layout)
    with the partial-aware means; the stock summary is kept beside as ``*_all_labels_everywhere.json``.

    Bind ``annotations`` with ``functools.partial`` to drop it into nnU-Net code in place of the stock function.
    """
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder, save_summary_json

    stock = compute_metrics_on_folder(folder_ref, folder_pred, None, image_reader_writer, file_ending,
                                      regions_or_labels, ignore_label, num_processes, chill)
    if output_file is not None:
        save_summary_json(stock, output_file[: -len(".json")] + "_all_labels_everywhere.json")
    summary = partial_aware_summary(copy.deepcopy(stock), annotations, file_ending)
    if output_file is not None:
        save_summary_json(summary, output_file)
    return summary


# ---------------------------------------------------------------------- folder evaluation
def _case_metrics(pred_file: str, ref_file: str, labels: Mapping[str, int]) -> dict:
    import SimpleITK as sitk
    from medpy.metric.binary import hd95

    ref_img, pred_img = sitk.ReadImage(ref_file), sitk.ReadImage(pred_file)
    if ref_img.GetSize() != pred_img.GetSize():
        raise ValueError(f"{pred_file}: size {pred_img.GetSize()} differs from reference {ref_img.GetSize()} "
                         f"({ref_file})")
    ref, pred = sitk.GetArrayViewFromImage(ref_img), sitk.GetArrayViewFromImage(pred_img)
    spacing = tuple(reversed(ref_img.GetSpacing()))  # numpy (z, y, x) order
    out = {}
    for name, value in labels.items():
        r, p = ref == value, pred == value
        tp = int(np.count_nonzero(r & p))
        fp, fn = int(np.count_nonzero(p)) - tp, int(np.count_nonzero(r)) - tp
        dice = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
        hd = float(hd95(p, r, voxelspacing=spacing)) if p.any() and r.any() else float("nan")
        out[name] = {"Dice": dice, "HD95": hd, "n_ref": tp + fn, "n_pred": tp + fp}
    return out


def evaluate_folders(pred_folder: str, ref_folder: str, labels: Mapping[str, int], file_ending: str = ".nii.gz",
                     annotations: Optional[PartialAnnotations] = None, num_processes: int = 2) -> dict:
    """Score every reference case that has a prediction of the same file name.

    Returns ``{"per_case": {case: {label: {Dice, HD95, n_ref, n_pred, annotated}}},
    "mean": {label: {Dice, HD95, n_cases}}, "foreground_mean": {Dice, HD95}, "missing_predictions": [...]}``.
    """
    labels = {k: int(v) for k, v in labels.items() if int(v) != 0}
    refs = sorted(f for f in os.listdir(ref_folder) if f.endswith(file_ending))
    if not refs:
        raise FileNotFoundError(f"no reference files ending in {file_ending} in {ref_folder}")
    present = [f for f in refs if os.path.isfile(os.path.join(pred_folder, f))]
    missing = [f for f in refs if f not in present]
    if not present:
        raise FileNotFoundError(f"none of the {len(refs)} reference files of {ref_folder} has a prediction in "
                                f"{pred_folder} (same file name expected, e.g. {refs[0]})")
    cases = [f[: -len(file_ending)] for f in present]
    jobs = [(os.path.join(pred_folder, f), os.path.join(ref_folder, f), labels) for f in present]
    if num_processes > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(num_processes) as pool:
            results = list(pool.map(_case_metrics, *zip(*jobs)))
    else:
        results = [_case_metrics(*j) for j in jobs]

    per_case = {}
    for case, metrics in zip(cases, results):
        annotated = annotations.annotated.get(case) if annotations is not None else None
        for name, m in metrics.items():
            m["annotated"] = annotated is None or labels[name] in annotated
        per_case[case] = metrics
    mean = {}
    for name in labels:
        rows = [per_case[c][name] for c in cases if per_case[c][name]["annotated"]]
        mean[name] = {"Dice": nanmean(r["Dice"] for r in rows), "HD95": nanmean(r["HD95"] for r in rows),
                      "n_cases": len(rows)}
    fg = {k: nanmean(m[k] for m in mean.values()) for k in ("Dice", "HD95")}
    return {"per_case": per_case, "mean": mean, "foreground_mean": fg,
            "missing_predictions": missing, "partial_aware": annotations is not None}


def format_table(results: Mapping[str, dict], labels: list[str], metric: str = "Dice", digits: int = 3) -> str:
    """A plain-text table: one row per model/result, one column per label plus the mean."""
    name_w = max([len("model")] + [len(n) for n in results])
    cols = labels + ["mean"]
    widths = [max(len(c), digits + 3) for c in cols]
    lines = [f"{'model':<{name_w}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cols, widths))]
    lines.append("-" * len(lines[0]))
    for model, res in results.items():
        values = [res["mean"][lbl][metric] for lbl in labels] + [res["foreground_mean"][metric]]
        cells = [("n/a" if v is None or np.isnan(v) else f"{v:.{digits}f}") for v in values]
        lines.append(f"{model:<{name_w}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    return "\n".join(lines)


def save_results(results: dict, path: str) -> None:
    def fix(o):
        if isinstance(o, float) and np.isnan(o):
            return None
        if isinstance(o, dict):
            return {k: fix(v) for k, v in o.items()}
        if isinstance(o, list):
            return [fix(v) for v in o]
        return o

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(fix(results), f, indent=2)
