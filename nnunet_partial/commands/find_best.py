"""``nnunet-partial find-best-configuration``: nnU-Net's find_best_configuration, partial-aware.

nnU-Net's own procedure runs as it is — accumulate the cross-validation results, evaluate every
configuration and every pairwise ensemble, pick the best, determine postprocessing, write
``inference_instructions.txt`` / ``inference_information.json`` — with two swaps made for the
duration of the call:

* the metric step: every ``compute_metrics_on_folder`` it calls becomes
  :func:`nnunet_partial.evaluation.compute_metrics_on_folder_partial_aware` (nnU-Net's per-case
  metrics, means over the cases that annotate each label; the stock summary is kept beside it as
  ``summary_all_labels_everywhere.json``);
* postprocessing: nnU-Net's ``determine_postprocessing`` runs on those metrics, so every per-label
  decision rests on the cases that annotate the label; a step touching a label scored on fewer
  than ``min_cases`` cases is made a no-op while it is tried, so nnU-Net keeps "no postprocessing".

The files it writes are nnU-Net's, so the stock ``nnUNetv2_predict`` / ``nnUNetv2_ensemble`` /
``nnUNetv2_apply_postprocessing`` lines it prints work unchanged.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import shutil
from typing import Callable, Iterator, Mapping

import numpy as np

from nnunet_partial.annotations import PartialAnnotations
from nnunet_partial.evaluation import compute_metrics_on_folder_partial_aware

FBC = "nnunetv2.evaluation.find_best_configuration"
ACC = "nnunetv2.evaluation.accumulate_cv_results"
RCC = "nnunetv2.postprocessing.remove_connected_components"
DEFAULT_MIN_CASES = 5


@contextlib.contextmanager
def _patched(replacements: Mapping[tuple, object]) -> Iterator[None]:
    """Replace ``module.name`` for each ``(module, name)`` key; restore the originals on exit."""
    saved = []
    try:
        for (module_name, attr), value in replacements.items():
            module = importlib.import_module(module_name)
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, value)
        yield
    finally:
        for module, attr, value in reversed(saved):
            setattr(module, attr, value)


def _labels_of_step(kwargs: dict) -> set:
    value = kwargs["labels_or_regions"]
    values = value if isinstance(value, (list, tuple)) else [value]
    return {int(v) for v in np.ravel(values)}


_STOCK: dict = {}


def _stock_load_postprocess_save() -> Callable:
    """nnU-Net's ``load_postprocess_save``, fetched before it is replaced (a spawned worker imports it unreplaced).

    Imported on first use: importing nnU-Net's postprocessing module would slow every ``nnunet-partial`` command.
    """
    if "fn" not in _STOCK:
        from nnunetv2.postprocessing.remove_connected_components import load_postprocess_save
        _STOCK["fn"] = load_postprocess_save
    return _STOCK["fn"]


class _SkipRefusedLabels:
    """``load_postprocess_save`` that copies the file unchanged for a step touching a refused label.

    The unchanged result cannot beat the baseline, so nnU-Net rejects the step. A picklable
    instance, not a closure: nnU-Net runs it in spawned worker processes.
    """

    def __init__(self, refused: frozenset):
        self.refused = refused

    def __call__(self, segmentation_file, output_fname, image_reader_writer, pp_fns, pp_fn_kwargs):
        if any(_labels_of_step(kw) & self.refused for kw in pp_fn_kwargs):
            shutil.copy(segmentation_file, output_fname)
        else:
            _stock_load_postprocess_save()(segmentation_file, output_fname, image_reader_writer, pp_fns, pp_fn_kwargs)


def cases_per_label(summary: dict) -> dict:
    """Label -> number of cases that annotate it and have a defined Dice (what a decision rests on)."""
    counts = {label: 0 for label in summary["mean"]}
    for entry in summary["metric_per_case"]:
        for label, m in entry["metrics"].items():
            if m.get("annotated", True) and not np.isnan(m["Dice"]):
                counts[label] += 1
    return counts


def determine_postprocessing_partial_aware(annotations: PartialAnnotations, min_cases: int, folder_predictions: str,
                                           folder_ref: str, plans_file_or_dict, dataset_json_file_or_dict,
                                           num_processes: int = 2, keep_postprocessed_files: bool = True,
                                           echo: Callable = print):
    """nnU-Net's ``determine_postprocessing`` (same arguments after ``annotations, min_cases``) deciding
    each label on the cases that annotate it, refusing labels scored on fewer than ``min_cases`` cases.

    ``folder_predictions/summary.json`` must hold the partial-aware evaluation of the folder (as
    written under :func:`partial_aware_nnunet`). Adds the case counts to ``postprocessing.json``.
    """
    from nnunetv2.evaluation.evaluate_predictions import load_summary_json
    from nnunetv2.postprocessing import remove_connected_components as rcc

    summary_file = os.path.join(folder_predictions, "summary.json")
    summary = load_summary_json(summary_file) if os.path.isfile(summary_file) else {}
    if not summary.get("partial_aware"):
        raise FileNotFoundError(f"{summary_file} is missing or not partial-aware; evaluate the folder with "
                                "compute_metrics_on_folder_partial_aware first")
    dataset_json = dataset_json_file_or_dict
    if not isinstance(dataset_json, dict):
        with open(dataset_json) as f:
            dataset_json = json.load(f)
    names = {int(v): k for k, v in dataset_json["labels"].items() if isinstance(v, int)}
    counts = cases_per_label(summary)
    refused = frozenset(label for label, n in counts.items() if n < min_cases)
    echo("Postprocessing is decided per label on the cases that annotate it; the decisions rest on "
         + ", ".join(f"{names.get(label, label)}: {n} case(s)" for label, n in counts.items()) + ".")
    for label in sorted(refused):
        echo(f"WARNING: {names.get(label, label)} is scored on {counts[label]} annotated case(s), fewer than "
             f"--min-cases {min_cases}: no postprocessing is decided for it (kept: none), nor the joint "
             "'largest foreground component' step that touches every label.")

    _stock_load_postprocess_save()  # fetch it before it is replaced
    metric = functools.partial(compute_metrics_on_folder_partial_aware, annotations)
    with _patched({(RCC, "compute_metrics_on_folder"): metric,
                   (RCC, "load_postprocess_save"): _SkipRefusedLabels(refused)}):
        pp_fns, pp_fn_kwargs = rcc.determine_postprocessing(
            folder_predictions, folder_ref, plans_file_or_dict, dataset_json, num_processes, keep_postprocessed_files)

    info_file = os.path.join(folder_predictions, "postprocessing.json")
    with open(info_file) as f:
        info = json.load(f)
    info["partial_aware"] = {"min_cases": min_cases, "cases_per_label": {str(k): v for k, v in counts.items()},
                             "refused_labels": sorted(int(x) for x in refused)}
    with open(info_file, "w") as f:
        json.dump(info, f, indent=4, sort_keys=True)
    return pp_fns, pp_fn_kwargs


@contextlib.contextmanager
def partial_aware_nnunet(annotations: PartialAnnotations, min_cases: int = DEFAULT_MIN_CASES,
                         echo: Callable = print) -> Iterator[None]:
    """Inside: nnU-Net's find_best_configuration and accumulate_cv_results score partial-aware."""
    metric = functools.partial(compute_metrics_on_folder_partial_aware, annotations)
    determine = functools.partial(determine_postprocessing_partial_aware, annotations, min_cases, echo=echo)
    with _patched({(ACC, "compute_metrics_on_folder"): metric,
                   (FBC, "compute_metrics_on_folder"): metric,
                   (FBC, "determine_postprocessing"): determine}):
        yield


# ---------------------------------------------------------------------- command
def _check_trained(dataset: str, models: list, folds, allow_ensembling: bool) -> list:
    """nnU-Net's model filter, with its errors turned into one line naming the fix."""
    from nnunetv2.evaluation.find_best_configuration import filter_available_models
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    try:
        available = filter_available_models(models, dataset)
    except RuntimeError as e:
        raise FileNotFoundError(f"{str(e).splitlines()[0]} Train it (nnUNetv2_train ... --npz) or leave it out "
                                "with -c/-tr/-p.") from None
    if not available:
        raise FileNotFoundError(f"none of the configurations {sorted({m['configuration'] for m in models})} is in "
                                "the plans; choose existing ones with -c")
    for m in available:
        folder = get_output_folder(dataset, m["trainer"], m["plans"], m["configuration"])
        for fold in folds:
            val = os.path.join(folder, f"fold_{fold}", "validation")
            train = f"nnUNetv2_train {dataset} {m['configuration']} {fold} -tr {m['trainer']} -p {m['plans']}"
            if not os.path.isdir(val):
                raise FileNotFoundError(f"{val} is missing: train that fold ({train} --npz) or choose folds with -f")
            if allow_ensembling and len(available) > 1 and not any(f.endswith(".npz") for f in os.listdir(val)):
                raise FileNotFoundError(f"{val} has no .npz probabilities, needed to ensemble: rerun its "
                                        f"validation with '{train} --val --npz', or pass --disable_ensembling")
    return available


def _result_sources(dataset_name: str, info: dict) -> dict:
    """Result key of find_best_configuration -> the folder holding its summary.json."""
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.file_path_utilities import folds_tuple_to_string, get_output_folder

    sources = {}
    for m in info["considered_models"]:
        folder = get_output_folder(dataset_name, m["trainer"], m["plans"], m["configuration"])
        sources[os.path.basename(folder)] = os.path.join(
            folder, f"crossval_results_folds_{folds_tuple_to_string(info['folds'])}")
    for key in info["all_results"]:
        sources.setdefault(key, os.path.join(nnUNet_results, dataset_name, "ensembles", key))
    return sources


def find_best_configuration_partial(dataset: str, models: list, allow_ensembling: bool = True,
                                    num_processes: int = 2, folds=(0, 1, 2, 3, 4),
                                    min_cases: int = DEFAULT_MIN_CASES, echo: Callable = print) -> dict:
    """Run nnU-Net's ``find_best_configuration`` partial-aware; return its result dict (plus our keys)."""
    from nnunetv2.evaluation.evaluate_predictions import load_summary_json
    from nnunetv2.evaluation.find_best_configuration import find_best_configuration
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        dataset_name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError:
        raise FileNotFoundError(f"dataset {dataset!r} not found in nnUNet_preprocessed/nnUNet_results; check the id "
                                "and the nnUNet_* variables") from None
    dataset_json_file = os.path.join(str(nnUNet_preprocessed), dataset_name, "dataset.json")
    if not os.path.isfile(dataset_json_file):
        raise FileNotFoundError(f"{dataset_json_file} is missing: run nnUNetv2_plan_and_preprocess -d {dataset} first")
    with open(dataset_json_file) as f:
        dataset_json = json.load(f)
    annotations = PartialAnnotations.from_dataset_json(dataset_json, source=dataset_json_file)
    folds = tuple(folds)
    models = _check_trained(dataset_name, list(models), folds, allow_ensembling)

    if annotations is None:
        echo(f"{dataset_name} has no 'annotated_labels': a fully annotated dataset, running nnU-Net's "
             "find_best_configuration unchanged.")
        return find_best_configuration(dataset_name, models, allow_ensembling, num_processes, True, folds)

    with partial_aware_nnunet(annotations, min_cases, echo):
        info = find_best_configuration(dataset_name, models, allow_ensembling, num_processes, True, folds)

    stock = {}
    for key, folder in _result_sources(dataset_name, info).items():
        stock_file = os.path.join(folder, "summary_all_labels_everywhere.json")
        stock[key] = load_summary_json(stock_file)["foreground_mean"]["Dice"] if os.path.isfile(stock_file) else None
    echo("\n***Foreground Dice, partial-aware (a label scored only on the cases that annotate it), and by nnU-Net's "
         "rule (every label on every case, as nnUNetv2_find_best_configuration scores):***")
    for key, value in info["all_results"].items():
        echo(f"{value:.4f}  (nnU-Net's rule: {'n/a' if stock[key] is None else f'{stock[key]:.4f}'})  {key}")
    info["partial_aware"] = {"min_cases_postprocessing": min_cases, "all_results_all_labels_everywhere": stock}
    info_file = os.path.join(str(nnUNet_results), dataset_name, "inference_information.json")
    with open(info_file, "w") as f:
        json.dump(info, f, indent=4)
    return info


def run(args) -> int:
    from nnunetv2.evaluation.find_best_configuration import dumb_trainer_config_plans_to_trained_models_dict

    models = dumb_trainer_config_plans_to_trained_models_dict(args.tr, args.c, args.p)
    find_best_configuration_partial(args.dataset_name_or_id, models, allow_ensembling=not args.disable_ensembling,
                                    num_processes=args.np, folds=args.f, min_cases=args.min_cases)
    return 0


def register(sub) -> None:
    from nnunetv2.configuration import default_num_processes

    p = sub.add_parser(
        "find-best-configuration", help="nnUNetv2_find_best_configuration with partial-aware metrics",
        description="nnU-Net's find_best_configuration (cross-validation results, pairwise ensembles, best model, "
                    "postprocessing, inference_instructions.txt) with every metric partial-aware: a label is scored "
                    "on a case only where the case annotates it. Use it instead of nnUNetv2_find_best_configuration "
                    "on datasets with annotated_labels; the printed nnUNetv2_* inference lines work unchanged.")
    p.add_argument("dataset_name_or_id", help="dataset name or id")
    p.add_argument("-p", nargs="+", default=["nnUNetPlans"], help="plans identifiers (default: nnUNetPlans)")
    p.add_argument("-c", nargs="+", default=["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"],
                   help="configurations (default: those of 2d 3d_fullres 3d_lowres 3d_cascade_fullres in the plans)")
    p.add_argument("-tr", nargs="+", default=["nnUNetTrainer"], help="trainers (default: nnUNetTrainer)")
    p.add_argument("-np", type=int, default=default_num_processes,
                   help=f"processes for ensembling, postprocessing etc. (default {default_num_processes})")
    p.add_argument("-f", nargs="+", type=int, default=(0, 1, 2, 3, 4), help="folds (default: 0 1 2 3 4)")
    p.add_argument("--disable_ensembling", action="store_true", help="do not evaluate ensembles")
    p.add_argument("--min-cases", type=int, default=DEFAULT_MIN_CASES,
                   help="decide postprocessing for a label only if it is scored on at least this many annotated "
                        f"cases (default {DEFAULT_MIN_CASES})")
    p.set_defaults(func=run)
