"""Stage 1 of CoWAM (METHODS §1): single-organ teachers and the pseudo-labelled dataset D̂.

``nnunet-partial teachers`` and ``nnunet-partial pseudolabel`` are thin argparse layers over this module.

Teachers (:func:`setup_teachers`, :func:`train_teachers`). For every label ``k`` of a merged (parent)
dataset, a raw nnU-Net dataset of the cases that annotate ``k`` (images linked, never copied where
the filesystem allows; labels binarised to ``{0: background, 1: k}``; ``teacher_of`` in its
dataset.json). The teacher sees the student's geometry: the parent's plans are moved over with
nnU-Net's ``move_plans_between_datasets`` (after nnU-Net's fingerprint extraction, as nnU-Net's own
pretraining recipe does) and preprocessed with nnU-Net's preprocessor. Its ``splits_final.json`` is
the parent's restricted to its cases, so for every fold number ``f`` the teacher of fold ``f`` never
trains on a case in the student's validation of fold ``f``. ``teachers.json`` in the parent's
``nnUNet_preprocessed`` folder records label -> teacher dataset, trainer, plans, configurations, folds
(parsed by :class:`nnunet_partial.annotations.TeacherRegistry`; MS-KD reads the same file).

Pseudo labels (:func:`make_pseudo_labelled_dataset`). Each teacher runs (nnU-Net's ``nnUNetPredictor``)
over every training case of the parent that does not annotate its label — unlabelled cases included —
and :func:`combine_pseudo_labels` merges the teachers' foreground probabilities with the manual label
map (the rule is in its docstring). The result is a new raw dataset D̂ (images linked, new labels)
whose dataset.json keeps the parent's true ``annotated_labels`` and adds ``pseudo_labels`` (which
labels of which case a teacher filled) and ``pseudo_labels_from``; the parent's plans and
``splits_final.json`` are copied over and D̂ is preprocessed. Work is resumable: each case's combined
label is written to a work folder as soon as it exists, and a re-run predicts only what is missing.

Validation on D̂ (nnUNetTrainerCoWAMPseudo) scores label ``k`` on case ``i`` only if ``k`` is in the
case's manual ``annotated_labels``. On such a pair D̂'s label file *is* the manual label for ``k``
(a manual label always wins, and a pseudo label is never a label the case annotates), so the counts
``TP_k = |pred=k ∧ ref=k|``, ``FP_k = |pred=k ∧ ref≠k|``, ``FN_k = |pred≠k ∧ ref=k|`` are exactly
those against the parent's manual label file: pseudo voxels of other labels enter only as
"not k", which the manual annotation of ``k`` also says.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from nnunet_partial.annotations import (ANNOTATED_KEY, PSEUDO_KEY, PSEUDO_SOURCE_KEY, TEACHER_OF_KEY,
                                        PartialAnnotations, PartialLabelError, TeacherEntry, TeacherRegistry,
                                        check_pseudo_source, load_teacher_registry, save_teacher_registry)

DEFAULT_MIN_CASES = 5
DEFAULT_THRESHOLD = 0.5
DEFAULT_TEACHER_TRAINER = "nnUNetTrainer"
DEFAULT_PLANS = "nnUNetPlans"
SPLITS_FILE = "splits_final.json"
# plans entries that fix what a network sees: a teacher trained with other values looks at other voxels
GEOMETRY_KEYS = ("spacing", "patch_size", "normalization_schemes", "use_mask_for_norm")
GLOBAL_GEOMETRY_KEYS = ("transpose_forward", "foreground_intensity_properties_per_channel")


def nnunet_roots() -> tuple[str, str, str]:
    """(nnUNet_raw, nnUNet_preprocessed, nnUNet_results) as nnU-Net reads them now."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw, nnUNet_results
    return str(nnUNet_raw), str(nnUNet_preprocessed), str(nnUNet_results)


def _load_json(path: str):
    with open(path) as f:
        return json.load(f)


def _save_json(obj, path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ the parent
@dataclass
class Parent:
    """The merged, partially labelled dataset the teachers and D̂ derive from."""
    dataset_id: int
    name: str                    # DatasetXXX_Name
    raw: str
    preprocessed: str
    dataset_json: dict
    cases: dict                  # case id -> {"images": [...], "label": path} (nnU-Net's lookup)
    annotations: Optional[PartialAnnotations]

    @property
    def short_name(self) -> str:
        return self.name.split("_", 1)[1]

    @property
    def label_values(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.dataset_json["labels"].items() if k != "background"}

    def annotated(self, case: str) -> frozenset:
        """Label values annotated on ``case`` (every label on a stock, fully annotated dataset)."""
        if self.annotations is None:
            return frozenset(self.label_values.values())
        return self.annotations.annotated[case]

    def plans_file(self, plans: str) -> str:
        return os.path.join(self.preprocessed, f"{plans}.json")


def dataset_name_of(dataset) -> str:
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        return maybe_convert_to_dataset_name(str(dataset))
    except RuntimeError as e:
        raise FileNotFoundError(f"dataset {dataset!r}: {e}") from None


def load_parent(dataset) -> Parent:
    from nnunet_partial.annotations import raw_training_cases
    raw_root, pre_root, _ = nnunet_roots()
    name = dataset_name_of(dataset)
    raw = os.path.join(raw_root, name)
    if not os.path.isfile(os.path.join(raw, "dataset.json")):
        raise FileNotFoundError(f"{raw}: no dataset.json; the parent dataset must be in nnUNet_raw")
    dataset_json = _load_json(os.path.join(raw, "dataset.json"))
    if PSEUDO_KEY in dataset_json or TEACHER_OF_KEY in dataset_json:
        kind = "pseudo-labelled" if PSEUDO_KEY in dataset_json else "teacher"
        raise PartialLabelError(f"{name} is a {kind} dataset made by nnunet-partial; run this on the merged dataset "
                                "it was made from")
    cases = raw_training_cases(raw, dataset_json)
    annotations = PartialAnnotations.from_dataset_json(dataset_json, cases.keys(), source=f"{raw}/dataset.json")
    return Parent(int(name[7:10]), name, raw, os.path.join(pre_root, name), dataset_json, cases, annotations)


def require_plans(parent: Parent, plans: str, configurations: Sequence[str]) -> dict:
    path = parent.plans_file(plans)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: plan the parent first (nnUNetv2_plan_and_preprocess -d "
                                f"{parent.dataset_id} -c {' '.join(configurations)})")
    plans_json = _load_json(path)
    missing = [c for c in configurations if c not in plans_json["configurations"]]
    if missing:
        raise PartialLabelError(f"{path} has no configuration {missing} (it has {sorted(plans_json['configurations'])}); "
                                "choose one of those with -c")
    return plans_json


def parent_splits(parent: Parent) -> list[dict]:
    """The parent's ``splits_final.json``, written first if missing — the split its students will use.

    Written as the student's first training would write it: nnunet-partial's stratified split on a
    partially labelled dataset, nnU-Net's own seeded 5-fold split otherwise.
    """
    path = os.path.join(parent.preprocessed, SPLITS_FILE)
    if os.path.isfile(path):
        return _load_json(path)
    cases = sorted(parent.cases)
    if parent.annotations is not None:
        from nnunet_partial.annotations import PROVENANCE_KEY
        from nnunet_partial.splits import stratified_crossval_split
        try:
            splits = stratified_crossval_split(cases, parent.annotations, parent.dataset_json.get(PROVENANCE_KEY))
        except ValueError as e:
            raise PartialLabelError(f"{parent.name}: {e}; write a {SPLITS_FILE} yourself or train fold 'all'") from None
    else:
        from nnunetv2.utilities.crossval_split import generate_crossval_split
        splits = generate_crossval_split(cases, seed=12345, n_splits=5)
    os.makedirs(parent.preprocessed, exist_ok=True)
    _save_json(splits, path)
    return splits


def restrict_splits(splits: Sequence[Mapping], cases: Iterable[str]) -> list[dict]:
    """The parent's folds restricted to ``cases``: fold ``f``'s train/val are the cases' share of the parent's."""
    keep = set(cases)
    return [{"train": [c for c in s["train"] if c in keep], "val": [c for c in s["val"] if c in keep]} for s in splits]


def check_fold(splits: Sequence[Mapping], fold: str, what: str, fix: str) -> None:
    """Refuse a fold whose training or validation part is empty (nnU-Net cannot train it)."""
    if fold == "all":
        return
    f = int(fold)
    if f >= len(splits):
        raise PartialLabelError(f"{what}: fold {f} does not exist (the split has {len(splits)} folds)")
    for part in ("train", "val"):
        if not splits[f][part]:
            raise PartialLabelError(f"{what}: no {'training' if part == 'train' else 'validation'} case in fold {f} "
                                    f"of the parent's split; {fix}")


# ------------------------------------------------------------------------------------------ dataset ids
def dataset_ids_in_use() -> set[int]:
    ids = set()
    for root in nnunet_roots():
        if os.path.isdir(root):
            ids |= {int(d[7:10]) for d in os.listdir(root) if re.match(r"^Dataset\d{3}_", d)}
    return ids


def next_free_ids(after: int, n: int, taken: Iterable[int] = ()) -> list[int]:
    """The ``n`` smallest dataset ids above ``after`` used in no nnU-Net folder and not in ``taken``."""
    used = dataset_ids_in_use() | set(taken)
    out = [i for i in range(after + 1, 1000) if i not in used][:n]
    if len(out) < n:
        raise PartialLabelError(f"fewer than {n} free dataset ids above {after}; give ids with --ids")
    return out


def check_id_free(dataset_id: int, name: str) -> None:
    """Refuse an id that another dataset holds in any nnU-Net folder (nnU-Net could not tell them apart)."""
    prefix = f"Dataset{int(dataset_id):03d}_"
    for root in nnunet_roots():
        others = [d for d in (os.listdir(root) if os.path.isdir(root) else []) if d.startswith(prefix) and d != name]
        if others:
            raise PartialLabelError(f"dataset id {dataset_id} is taken by {os.path.join(root, others[0])}; choose "
                                    "another id (--ids / --id) or leave it out to get the next free one")


def camel(label: str) -> str:
    """'kidney_right' -> 'KidneyRight' (a dataset-name-safe form of a label name)."""
    return "".join(p[:1].upper() + p[1:] for p in re.split(r"[^A-Za-z0-9]+", label) if p) or "Label"


def find_raw_datasets(key: str, match: Callable[[dict], bool], raw_root: Optional[str] = None) -> list[str]:
    """Raw dataset folders whose dataset.json has ``key`` and satisfies ``match``; ``raw_root``: default
    nnU-Net's ``nnUNet_raw``."""
    raw_root = raw_root or nnunet_roots()[0]
    out = []
    for d in sorted(os.listdir(raw_root)) if os.path.isdir(raw_root) else []:
        path = os.path.join(raw_root, d, "dataset.json")
        if re.match(r"^Dataset\d{3}_", d) and os.path.isfile(path):
            try:
                dj = _load_json(path)
            except (OSError, ValueError):
                continue
            if key in dj and match(dj):
                out.append(os.path.join(raw_root, d))
    return out


# ------------------------------------------------------------------------------------------ writing datasets
def link_or_copy(src: str, dst: str, symlink: bool = True) -> str:
    """A hard link, else a symbolic link (``symlink``), else a copy (different filesystems, no link support)."""
    try:
        os.link(src, dst)
        return "hard link"
    except OSError:
        pass
    try:
        if symlink:
            os.symlink(os.path.realpath(src), dst)
            return "symlink"
    except OSError:
        pass
    shutil.copy2(src, dst)
    return "copy"


def _own_files_umask_modes(folder: str) -> None:
    """The converters' umask modes, applied only to what this dataset wrote itself: a chmod through a link
    would change (or, not being its owner, fail on) the parent's image files."""
    from dataset_conversion.common import current_umask
    mask = current_umask()
    os.chmod(folder, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o777 & ~mask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path) and os.stat(path).st_nlink == 1:
                os.chmod(path, 0o666 & ~mask)


@contextlib.contextmanager
def linked_dataset(root: str, dataset_id: int, name: str):
    """The converters' :class:`AtomicDataset` (temporary folder, moved into place only on success) for a
    dataset whose images are links to another dataset's files."""
    from dataset_conversion import common
    target = common.AtomicDataset(root, dataset_id, name)
    stock = common.apply_umask_modes
    common.apply_umask_modes = _own_files_umask_modes
    try:
        with target as tmp:
            yield tmp, target
    finally:
        common.apply_umask_modes = stock


def _reader_writer(dataset_json: Mapping, example_file: str):
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    return determine_reader_writer_from_dataset_json(dict(dataset_json), example_file,
                                                     allow_nonmatching_filename=True, verbose=False)()


def _link_images(images: Sequence[str], case: str, folder: str, file_ending: str) -> list[str]:
    kinds = []
    for channel, src in enumerate(images):
        kinds.append(link_or_copy(src, os.path.join(folder, f"{case}_{channel:04d}{file_ending}")))
    return kinds


def binarise_case(job: dict) -> list[str]:
    """One case of a teacher dataset: link its images, write ``label == value`` as {0, 1} (nnU-Net's reader/writer)."""
    rw = _reader_writer(job["dataset_json"], job["label"])
    seg, props = rw.read_seg(job["label"])
    rw.write_seg((seg[0] == job["value"]).astype(np.uint8), job["out_label"], props)
    return _link_images(job["images"], job["case"], job["images_folder"], job["file_ending"])


def _generate_dataset_json(folder: str, parent: Parent, labels: Mapping[str, int], num_training: int, name: str,
                           description: str, **extra) -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    dj = parent.dataset_json
    rw = {"overwrite_image_reader_writer": dj["overwrite_image_reader_writer"]} \
        if "overwrite_image_reader_writer" in dj else {}
    generate_dataset_json(folder, dict(dj["channel_names"]), dict(labels), num_training, dj["file_ending"],
                          dataset_name=name, description=description, converted_by="nnunet-partial", **rw, **extra)


# ------------------------------------------------------------------------------------------ preprocessing
def preprocessed_cases(dataset_name: str, plans: str, configuration: str) -> set:
    """Case ids of one preprocessed configuration (empty when it is not preprocessed)."""
    pre = nnunet_roots()[1]
    plans_file = os.path.join(pre, dataset_name, f"{plans}.json")
    if not os.path.isfile(plans_file):
        return set()
    conf = _load_json(plans_file)["configurations"].get(configuration, {})
    folder = os.path.join(pre, dataset_name, conf.get("data_identifier", f"{plans}_{configuration}"))
    if not os.path.isdir(folder):
        return set()
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    try:
        return set(infer_dataset_class(folder).get_identifiers(folder))
    except Exception:  # nnU-Net refuses a folder of unknown format: treat it as not preprocessed
        return set()


def preprocess_like_parent(parent: Parent, dataset_id: int, dataset_name: str, cases: Iterable[str], plans: str,
                           configurations: Sequence[str], num_processes: int, echo: Callable = print) -> None:
    """nnU-Net's recipe for a dataset that must share another's plans: fingerprint, move the parent's plans,
    preprocess. Configurations already preprocessed for exactly ``cases`` are skipped."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset, preprocess_dataset
    from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import \
        move_plans_between_datasets
    cases = set(cases)
    todo = [c for c in configurations if preprocessed_cases(dataset_name, plans, c) != cases]
    if not todo:
        echo(f"  {dataset_name}: {', '.join(configurations)} already preprocessed with {parent.name}'s {plans}")
        return
    echo(f"  {dataset_name}: fingerprint, {parent.name}'s {plans} moved over, preprocessing {', '.join(todo)}")
    fingerprint = os.path.join(nnunet_roots()[1], dataset_name, "dataset_fingerprint.json")
    extract_fingerprint_dataset(dataset_id, num_processes=num_processes, clean=not os.path.isfile(fingerprint),
                                verbose=False)
    move_plans_between_datasets(parent.dataset_id, dataset_id, plans, plans)
    # nnU-Net's planner copies dataset.json next to the plans, and the preprocessor reads it from there;
    # with moved plans the planner does not run
    raw_root, pre_root, _ = nnunet_roots()
    shutil.copy(os.path.join(raw_root, dataset_name, "dataset.json"), os.path.join(pre_root, dataset_name, "dataset.json"))
    preprocess_dataset(dataset_id, plans, todo, [num_processes], verbose=False)


# ------------------------------------------------------------------------------------------ teachers
@dataclass
class TeacherSpec:
    label: str
    value: int
    dataset_id: int
    cases: list

    def name(self, parent: Parent) -> str:
        return f"Dataset{self.dataset_id:03d}_{parent.short_name}Teacher{camel(self.label)}"


def plan_teachers(parent: Parent, labels: Optional[Sequence[str]] = None, ids: Optional[Sequence[int]] = None,
                  min_cases: int = DEFAULT_MIN_CASES, registry: Optional[TeacherRegistry] = None) -> list[TeacherSpec]:
    """One :class:`TeacherSpec` per label (all labels, or ``labels``), with its cases and dataset id.

    Ids: ``ids`` if given, else the registry's, else an existing teacher dataset of this parent and label
    (re-runs reuse them), else the next free ids above the parent's.
    """
    values = parent.label_values
    labels = list(labels) if labels else sorted(values, key=values.get)
    unknown = [n for n in labels if n not in values]
    if unknown:
        raise PartialLabelError(f"{parent.name} has no label {unknown}; its labels: {sorted(values)}")
    specs = [TeacherSpec(label, values[label], 0, sorted(c for c in parent.cases if values[label] in parent.annotated(c)))
             for label in labels]
    few = [s for s in specs if len(s.cases) < min_cases]
    if few:
        ok = [s.label for s in specs if s not in few]
        raise PartialLabelError(
            f"{parent.name}: " + ", ".join(f"'{s.label}' is annotated on {len(s.cases)} case(s)" for s in few)
            + f", fewer than --min-cases {min_cases}: a teacher trained on so few cases would mostly add noise. "
            + (f"Leave {'it' if len(few) == 1 else 'them'} out (--labels {' '.join(ok)}), add cases" if ok else "Add cases")
            + ", or lower --min-cases.")
    if ids is not None:
        if len(ids) != len(specs):
            raise PartialLabelError(f"--ids gives {len(ids)} id(s) for {len(specs)} teacher(s) ({', '.join(labels)})")
        for spec, i in zip(specs, ids):
            spec.dataset_id = int(i)
        return specs
    known = {e.label: e.dataset_id for e in registry.teachers.values()} if registry else {}
    for spec in specs:
        spec.dataset_id = known.get(spec.label, 0)
        if not spec.dataset_id:
            found = find_raw_datasets(TEACHER_OF_KEY, lambda dj, s=spec: dj[TEACHER_OF_KEY].get("dataset") == parent.name
                                      and dj[TEACHER_OF_KEY].get("label") == s.label)
            spec.dataset_id = int(os.path.basename(found[0])[7:10]) if found else 0
    missing = [s for s in specs if not s.dataset_id]
    taken = {s.dataset_id for s in specs}
    for spec, i in zip(missing, next_free_ids(parent.dataset_id, len(missing), taken)):
        spec.dataset_id = i
    return specs


def write_teacher_dataset(parent: Parent, spec: TeacherSpec, num_processes: int = 1, echo: Callable = print) -> str:
    """The raw teacher dataset of ``spec`` (skipped when it exists for this parent and label)."""
    from dataset_conversion.common import run_cases
    from nnunet_partial.annotations import check_teacher_of
    raw_root = nnunet_roots()[0]
    name = spec.name(parent)
    final = os.path.join(raw_root, name)
    if os.path.isfile(os.path.join(final, "dataset.json")):
        dj = _load_json(os.path.join(final, "dataset.json"))
        of = check_teacher_of(dj, source=final) or {}
        if of.get("dataset") != parent.name or of.get("label") != spec.label:
            raise PartialLabelError(f"{final} exists and is not the teacher of '{spec.label}' for {parent.name}; "
                                    "choose other ids with --ids")
        if dj.get("numTraining") != len(spec.cases):
            raise PartialLabelError(f"{final} holds {dj.get('numTraining')} cases but {parent.name} annotates "
                                    f"'{spec.label}' on {len(spec.cases)}: the parent changed; delete the teacher "
                                    "dataset (raw, preprocessed, results) and re-run")
        echo(f"  {name}: exists ({len(spec.cases)} cases)")
        return final
    check_id_free(spec.dataset_id, name)
    ending = parent.dataset_json["file_ending"]
    with linked_dataset(raw_root, spec.dataset_id, name.split("_", 1)[1]) as (tmp, _):
        for sub in ("imagesTr", "labelsTr"):
            os.makedirs(os.path.join(tmp, sub))
        jobs = [{"case": c, "images": parent.cases[c]["images"], "label": parent.cases[c]["label"],
                 "value": spec.value, "dataset_json": parent.dataset_json, "file_ending": ending,
                 "images_folder": os.path.join(tmp, "imagesTr"),
                 "out_label": os.path.join(tmp, "labelsTr", c + ending)} for c in spec.cases]
        kinds = run_cases(binarise_case, jobs, num_processes, f"teacher {spec.label}")
        _generate_dataset_json(tmp, parent, {"background": 0, spec.label: 1}, len(spec.cases), name,
                               f"single-organ teacher of '{spec.label}' for {parent.name} (nnunet-partial teachers)",
                               **{TEACHER_OF_KEY: {"dataset": parent.name, "label": spec.label,
                                                   "label_value": spec.value}})
    linked = sorted({k for ks in kinds for k in ks})
    echo(f"  {name}: {len(spec.cases)} cases annotating '{spec.label}' (images: {', '.join(linked)})")
    return final


def write_teacher_splits(parent_split: Sequence[Mapping], spec: TeacherSpec, dataset_name: str) -> list[dict]:
    """The teacher's ``splits_final.json``: the parent's restricted to its cases. An existing different one is
    refused (the parent's split changed after the teacher was set up: its folds no longer match the student's)."""
    path = os.path.join(nnunet_roots()[1], dataset_name, SPLITS_FILE)
    splits = restrict_splits(parent_split, spec.cases)
    if os.path.isfile(path) and _load_json(path) != splits:
        raise PartialLabelError(f"{path} differs from the parent's split restricted to the teacher's cases: the "
                                "parent's splits_final.json changed after the teachers were set up, so a teacher "
                                "could have trained on a student validation case. Delete the teacher's "
                                f"{SPLITS_FILE} and its trained folds, then re-run.")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _save_json(splits, path)
    return splits


def setup_teachers(dataset, configurations: Sequence[str] = ("3d_fullres",), plans: str = DEFAULT_PLANS,
                   trainer: str = DEFAULT_TEACHER_TRAINER, folds: Sequence[str] = ("0",),
                   ids: Optional[Sequence[int]] = None, labels: Optional[Sequence[str]] = None,
                   min_cases: int = DEFAULT_MIN_CASES, num_processes: int = 2,
                   echo: Callable = print) -> TeacherRegistry:
    """Everything of ``nnunet-partial teachers`` but the training; returns the (updated) registry."""
    parent = load_parent(dataset)
    require_plans(parent, plans, configurations)
    folds = [str(f) for f in folds]
    old = load_teacher_registry(parent.preprocessed, parent.dataset_json)
    if old is not None and ids is not None:
        clash = {e.label: e.dataset_id for e in old.teachers.values() if e.label in (labels or old.teachers)}
        given = dict(zip(labels or sorted(parent.label_values, key=parent.label_values.get), map(int, ids)))
        if any(given.get(k, v) != v for k, v in clash.items()):
            raise PartialLabelError(f"{os.path.join(parent.preprocessed, 'teachers.json')} already names teacher "
                                    f"datasets {clash}; drop --ids or delete the registry and those datasets")
    specs = plan_teachers(parent, labels, ids, min_cases, old)
    split = parent_splits(parent)
    echo(f"{parent.name}: {len(specs)} teacher(s), plans {plans}, {', '.join(configurations)}, fold(s) "
         f"{', '.join(folds)}")
    entries = dict(old.teachers) if old is not None else {}
    for spec in specs:
        name = spec.name(parent)
        write_teacher_dataset(parent, spec, num_processes, echo)
        preprocess_like_parent(parent, spec.dataset_id, name, spec.cases, plans, configurations, num_processes, echo)
        teacher_split = write_teacher_splits(split, spec, name)
        for f in folds:
            check_fold(teacher_split, f, f"teacher of '{spec.label}' ({name})",
                       f"train another fold (-f), or edit {parent.name}'s {SPLITS_FILE} so that fold {f} has "
                       f"cases annotating '{spec.label}' on both sides, then delete the teachers' splits and re-run")
        prev = entries.get(spec.label)
        keep = prev is not None and prev.dataset_id == spec.dataset_id and prev.plans == plans
        entries[spec.label] = TeacherEntry(
            label=spec.label, label_value=spec.value, dataset=name, dataset_id=spec.dataset_id, trainer=trainer,
            plans=plans, configurations=tuple(sorted(set(configurations) | (set(prev.configurations) if keep else set()))),
            folds=tuple(sorted(set(folds) | (set(prev.folds) if keep else set()))), n_cases=len(spec.cases))
    registry = TeacherRegistry(parent=parent.name, teachers=entries)
    path = save_teacher_registry(registry, parent.preprocessed)
    echo(f"teacher registry: {path}")
    return registry


def write_untrained_teacher(raw: str, preprocessed: str, results: str, parent: str, label: str, value: int,
                            dataset_id: int, plans_name: str = "nnUNetPlans", configuration: str = "2d",
                            edit_plans=None, labels=None, channels=None, checkpoint: bool = True, seed: int = 0):
    """A single-organ teacher of ``parent`` as ``nnunet-partial teachers`` + ``nnUNetv2_train`` leave it (results
    folder with plans.json, dataset.json and a checkpoint), holding an untrained network of the parent's plans
    ``plans_name`` (``edit_plans(configuration_dict)`` may change them). The registry entry.

    For timing and tests only: a teacher's forward costs the same trained or not, so MS-KD's train step can be
    measured (scripts/benchmark_speed.py) and exercised without training teachers first. A teacher already
    written with the same plans and dataset.json is kept as it is (no new checkpoint)."""
    import copy

    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    name = f"Dataset{dataset_id:03d}_{parent.split('_', 1)[1]}Teacher{label.title()}"
    check_id_free(dataset_id, name)
    with open(os.path.join(preprocessed, parent, f"{plans_name}.json")) as f:
        plans = copy.deepcopy(json.load(f))
    plans["dataset_name"] = name
    if edit_plans:
        edit_plans(plans["configurations"][configuration])
    with open(os.path.join(preprocessed, parent, "dataset.json")) as f:
        parent_dj = json.load(f)
    dj = {"channel_names": channels or parent_dj["channel_names"], "labels": labels or {"background": 0, label: 1},
          "numTraining": 3, "file_ending": parent_dj["file_ending"]}
    folder = os.path.join(results, name, f"nnUNetTrainer__{plans_name}__{configuration}")
    checkpoint_file = os.path.join(folder, "fold_0", "checkpoint_final.pth")
    entry = TeacherEntry(label, value, name, dataset_id, "nnUNetTrainer", plans_name, (configuration,), ("0",), 3)
    written = [os.path.join(folder, "plans.json"), os.path.join(folder, "dataset.json")]
    if (checkpoint and os.path.isfile(checkpoint_file) and all(os.path.isfile(f) for f in written)
            and [_load_json(f) for f in written] == [plans, dj]):
        return entry   # the same teacher again (a re-run, a second test module): its weights are as arbitrary as new ones
    os.makedirs(os.path.join(folder, "fold_0"), exist_ok=True)
    os.makedirs(os.path.join(raw, name), exist_ok=True)
    for obj, file in zip((plans, dj), written):
        with open(file, "w") as f:
            json.dump(obj, f)
    if checkpoint:
        pm = PlansManager(plans)
        torch.manual_seed(seed)
        net = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration(configuration),
                                                       len(dj["channel_names"]), len(dj["labels"]),
                                                       enable_deep_supervision=False)
        torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
                    "init_args": {"configuration": configuration}}, checkpoint_file)
    return entry


def train_command(entry: TeacherEntry, configuration: str, fold: str, device: Optional[str] = None) -> list[str]:
    cmd = ["nnUNetv2_train", str(entry.dataset_id), configuration, str(fold), "-tr", entry.trainer, "-p", entry.plans]
    return cmd + (["-device", device] if device else [])


def teacher_runs(registry: TeacherRegistry, configurations: Sequence[str], folds: Sequence[str]) -> list[tuple]:
    return [(e, c, str(f)) for e in sorted(registry.teachers.values(), key=lambda e: e.label_value)
            for c in configurations for f in folds]


def fold_folder(entry: TeacherEntry, configuration: str, fold: str, trainer: Optional[str] = None) -> str:
    return os.path.join(entry.results_folder(nnunet_roots()[2], configuration, trainer), f"fold_{fold}")


def train_teachers(registry: TeacherRegistry, configurations: Sequence[str], folds: Sequence[str],
                   device: Optional[str] = None, echo: Callable = print) -> float:
    """Run the ``nnUNetv2_train`` lines one after the other (finished folds skipped, interrupted ones resumed
    with ``--c``), each with a progress bar of its epochs and its full output in a log beside its results."""
    from tqdm import tqdm
    from nnunet_partial.commands.env import ext_trainer_value
    from nnunet_partial.experiment import default_device
    device = device or default_device()
    env = {**os.environ, "nnUNet_extTrainer": ext_trainer_value(), "PYTHONUNBUFFERED": "1"}
    runs = teacher_runs(registry, configurations, folds)
    t0 = time.time()
    for i, (entry, conf, fold) in enumerate(runs, 1):
        out = fold_folder(entry, conf, fold)
        if os.path.isfile(os.path.join(out, "checkpoint_final.pth")):
            echo(f"[{i}/{len(runs)}] {entry.label}: {entry.dataset} {conf} fold {fold} already trained")
            continue
        cmd = train_command(entry, conf, fold, device)
        if os.path.isfile(os.path.join(out, "checkpoint_latest.pth")):
            cmd.append("--c")
        log = os.path.join(os.path.dirname(out), f"nnunet_partial_teachers_fold_{fold}.log")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        echo(f"[{i}/{len(runs)}] {' '.join(cmd)}   (log: {log})")
        with open(log, "a") as f, tqdm(desc=f"teacher {entry.label} {conf} f{fold}", unit="epoch",
                                       file=sys.stderr, dynamic_ncols=True) as bar:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    bufsize=1)
            for line in proc.stdout:
                f.write(line)
                if re.search(r"\bEpoch \d+\s*$", line):   # nnU-Net's "<time>: Epoch N" at each epoch start
                    bar.update()
                elif "Pseudo dice" in line:
                    bar.set_postfix_str("pseudo Dice " + " ".join(re.findall(r"\d\.\d+", line.split("Pseudo dice", 1)[1])))
            rc = proc.wait()
        if rc != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit code {rc}); its output: {log}")
    return time.time() - t0


# ------------------------------------------------------------------------------------------ combination rule
def combine_pseudo_labels(manual: np.ndarray, annotated: Iterable[int],
                          foreground_probabilities: Mapping[int, np.ndarray],
                          threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """One case's label map of D̂ from its manual label map and the teachers' foreground probabilities.

    - A manual label always wins: a voxel of a label the case annotates keeps it, and a teacher of a
      label the case annotates is ignored (its manual map already says where that organ is and is not).
    - Every other voxel (the stored background: true background or an organ nobody annotated here) takes
      the teacher label whose probability is the highest **above** ``threshold`` (strictly), background
      when none is. Overlapping teachers are resolved by the higher probability; an exact tie goes to
      the lower label value.

    ``manual`` (any integer dtype), ``annotated`` = label values of ``A_i`` (empty for an unlabelled case),
    ``foreground_probabilities`` = label value -> teacher probability of that organ, shaped as ``manual``.
    """
    annotated = set(int(v) for v in annotated)
    out = np.array(manual, dtype=np.uint8 if max([int(np.max(manual, initial=0)), *foreground_probabilities, 0]) < 256
                   else np.uint16)
    best_p = np.full(out.shape, float(threshold), dtype=np.float32)
    best_k = np.zeros(out.shape, dtype=out.dtype)
    for k in sorted(foreground_probabilities):
        if k in annotated:
            continue
        p = np.asarray(foreground_probabilities[k], dtype=np.float32)
        if p.shape != out.shape:
            raise ValueError(f"teacher probability of label {k} has shape {p.shape}, the label map {out.shape}")
        take = p > best_p          # strict: above the threshold, and above every lower label's probability
        best_k[take] = k
        best_p[take] = p[take]
    fill = (best_k > 0) & (out == 0)
    out[fill] = best_k[fill]
    return out


# ------------------------------------------------------------------------------------------ teacher models
def check_teacher_model(entry: TeacherEntry, parent: Parent, configuration: str, fold: str,
                        trainer: Optional[str] = None, checkpoint: str = "checkpoint_final.pth",
                        parent_plans: Optional[dict] = None) -> str:
    """The teacher's trained model folder for ``configuration``/``fold``; one clear error for every way it
    cannot serve as a teacher of this parent (missing, untrained, other plans or geometry, other channels)."""
    trainer = trainer or entry.trainer
    raw_root, pre_root, res_root = nnunet_roots()
    what = f"teacher of '{entry.label}' ({entry.dataset})"
    if not os.path.isdir(os.path.join(raw_root, entry.dataset)) and not os.path.isdir(os.path.join(pre_root, entry.dataset)):
        raise FileNotFoundError(f"{what} is missing from nnUNet_raw and nnUNet_preprocessed: re-run nnunet-partial "
                                f"teachers {parent.dataset_id} -c {configuration}")
    folder = entry.results_folder(res_root, configuration, trainer)
    fold_dir = os.path.join(folder, f"fold_{fold}")
    train_line = " ".join(train_command(dataclasses.replace(entry, trainer=trainer), configuration, fold))
    if not os.path.isfile(os.path.join(fold_dir, checkpoint)):
        state = "training was interrupted" if os.path.isfile(os.path.join(fold_dir, "checkpoint_latest.pth")) \
            else "it is not trained"
        raise FileNotFoundError(f"{what}: no {checkpoint} in {fold_dir} ({state}): run {train_line}"
                                + (" --c" if "interrupted" in state else "")
                                + f" (or nnunet-partial teachers {parent.dataset_id} -c {configuration} -f {fold} "
                                  f"-tr {trainer} --train)")
    tplans, tdj = _load_json(os.path.join(folder, "plans.json")), _load_json(os.path.join(folder, "dataset.json"))
    if tplans.get("plans_name") != entry.plans:
        raise PartialLabelError(f"{what} was trained with plans '{tplans.get('plans_name')}', the registry names "
                                f"'{entry.plans}': retrain it with -p {entry.plans}")
    pplans = parent_plans or _load_json(parent.plans_file(entry.plans))
    pconf = pplans["configurations"][configuration]
    tconf = tplans["configurations"].get(configuration, {})
    for key in GEOMETRY_KEYS:
        if tconf.get(key) != pconf.get(key):
            raise PartialLabelError(f"{what} was trained with {key} {tconf.get(key)} but {parent.name}'s {entry.plans} "
                                    f"{configuration} has {pconf.get(key)}: it was not trained on the parent's plans. "
                                    f"Re-run nnunet-partial teachers {parent.dataset_id} (moves the plans over), "
                                    f"then {train_line}")
    for key in GLOBAL_GEOMETRY_KEYS:
        if tplans.get(key) != pplans.get(key):
            raise PartialLabelError(f"{what} was trained with another {key} than {parent.name}'s {entry.plans}: "
                                    f"re-run nnunet-partial teachers {parent.dataset_id}, then {train_line}")
    if dict(tdj.get("channel_names", {})) != dict(parent.dataset_json["channel_names"]):
        raise PartialLabelError(f"{what} takes channels {tdj.get('channel_names')}, {parent.name} has "
                                f"{parent.dataset_json['channel_names']}: it is no teacher of this dataset")
    if {k: v for k, v in tdj.get("labels", {}).items()} != {"background": 0, entry.label: 1}:
        raise PartialLabelError(f"{what} predicts labels {tdj.get('labels')}; a teacher predicts "
                                f"{{'background': 0, '{entry.label}': 1}}: re-run nnunet-partial teachers")
    return folder


def _teacher_predictor(model_folder: str, fold: str, checkpoint: str, device, use_mirroring: bool):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    device = torch.device(device)
    with contextlib.redirect_stdout(sys.stderr):  # nnU-Net's set-up and lookup messages: not on our stdout
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
                                    perform_everything_on_device=device.type == "cuda", device=device,
                                    verbose=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(model_folder, (fold,), checkpoint)
    return predictor


def teacher_probability(predictor, data: np.ndarray, properties: dict) -> np.ndarray:
    """The teacher's foreground probability on one case, in the case's original voxel grid (float32)."""
    import copy
    _, probabilities = predictor.predict_single_npy_array(data.copy(), copy.deepcopy(properties), None, None, True)
    probabilities = np.asarray(probabilities)
    return probabilities[1].astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------ pseudo labels
def _work_folder(parent: Parent, configuration: str, fold: str) -> str:
    return os.path.join(parent.preprocessed, f"pseudolabels_{configuration}_fold_{fold}")


def pseudo_label_map(parent: Parent, teacher_values: Iterable[int]) -> dict[str, list[str]]:
    """Case -> label names a teacher fills: every teacher label the case does not annotate."""
    names = {v: k for k, v in parent.label_values.items()}
    values = sorted(set(teacher_values))
    return {c: [names[v] for v in values if v not in parent.annotated(c)] for c in sorted(parent.cases)}


def predict_pseudo_labels(parent: Parent, teachers: Mapping[int, tuple], work: str, threshold: float,
                          save_probabilities: bool, device, use_mirroring: bool, echo: Callable = print) -> dict:
    """Combined label files for every case into ``work/labels``; cases already there are skipped.

    ``teachers``: label value -> (model folder, fold, checkpoint). Returns per-label pseudo voxel counts.
    """
    from tqdm import tqdm
    ending = parent.dataset_json["file_ending"]
    labels_dir = os.path.join(work, "labels")
    prob_dir = os.path.join(work, "probabilities")
    os.makedirs(labels_dir, exist_ok=True)
    if save_probabilities:
        os.makedirs(prob_dir, exist_ok=True)
    todo = [c for c in sorted(parent.cases) if not os.path.isfile(os.path.join(labels_dir, c + ending))
            or (save_probabilities and not os.path.isfile(os.path.join(prob_dir, c + ".npz")))]
    if len(todo) < len(parent.cases):
        echo(f"  {len(parent.cases) - len(todo)} of {len(parent.cases)} case(s) already pseudo-labelled in {work}")
    if not todo:
        return {}
    predictors = {v: _teacher_predictor(folder, fold, chk, device, use_mirroring)
                  for v, (folder, fold, chk) in teachers.items()}
    names = {v: k for k, v in parent.label_values.items()}
    counts: dict = {names[v]: 0 for v in teachers}
    first = parent.cases[todo[0]]
    rw = _reader_writer(parent.dataset_json, first["images"][0])
    for case in tqdm(todo, desc="pseudo labels", unit="case", file=sys.stderr, dynamic_ncols=True):
        files = parent.cases[case]
        manual, label_props = rw.read_seg(files["label"])
        annotated = parent.annotated(case)
        needed = [v for v in sorted(teachers) if v not in annotated]
        probabilities = {}
        if needed:
            data, props = rw.read_images(files["images"])
            for v in needed:
                p = teacher_probability(predictors[v], data, props)
                if p.shape != manual.shape[1:]:
                    raise PartialLabelError(f"case '{case}': the teacher of '{names[v]}' returned a {p.shape} "
                                            f"probability map for a {manual.shape[1:]} label map")
                probabilities[v] = p
        combined = combine_pseudo_labels(manual[0], annotated, probabilities, threshold)
        for v in needed:
            counts[names[v]] += int(np.count_nonzero((combined == v) & (manual[0] == 0)))
        if save_probabilities:
            np.savez_compressed(os.path.join(prob_dir, case + ".tmp.npz"),
                                **{names[v]: p.astype(np.float16) for v, p in probabilities.items()})
            os.replace(os.path.join(prob_dir, case + ".tmp.npz"), os.path.join(prob_dir, case + ".npz"))
        tmp = os.path.join(labels_dir, f".{case}.{os.getpid()}.tmp{ending}")
        rw.write_seg(combined, tmp, label_props)
        os.replace(tmp, os.path.join(labels_dir, case + ending))  # a case file exists only once complete
    return counts


def _assemble_case(job: dict) -> list[str]:
    # never a symlink into the work folder, which a later run with other settings empties
    link_or_copy(job["label"], job["out_label"], symlink=False)
    return _link_images(job["images"], job["case"], job["images_folder"], job["file_ending"])


def write_pseudo_dataset(parent: Parent, work: str, dataset_id: int, name: str, pseudo: Mapping[str, list],
                         source: dict, num_processes: int = 1) -> str:
    """D̂ in nnUNet_raw: the parent's images linked, the combined labels from ``work``, the parent's metadata
    plus ``pseudo_labels`` and ``pseudo_labels_from``."""
    from dataset_conversion.common import run_cases
    check_id_free(dataset_id, f"Dataset{dataset_id:03d}_{name}")
    ending = parent.dataset_json["file_ending"]
    with linked_dataset(nnunet_roots()[0], dataset_id, name) as (tmp, target):
        for sub in ("imagesTr", "labelsTr"):
            os.makedirs(os.path.join(tmp, sub))
        jobs = [{"case": c, "images": parent.cases[c]["images"], "label": os.path.join(work, "labels", c + ending),
                 "file_ending": ending, "images_folder": os.path.join(tmp, "imagesTr"),
                 "out_label": os.path.join(tmp, "labelsTr", c + ending)} for c in sorted(parent.cases)]
        run_cases(_assemble_case, jobs, num_processes, "D̂ (links)")
        skip = {"labels", "channel_names", "numTraining", "file_ending", "name", "description", "dataset",
                "overwrite_image_reader_writer", "converted_by"}
        extra = {k: v for k, v in parent.dataset_json.items() if k not in skip}
        extra[ANNOTATED_KEY] = parent.dataset_json.get(ANNOTATED_KEY) or {
            c: sorted(parent.label_values, key=parent.label_values.get) for c in parent.cases}
        extra[PSEUDO_KEY] = dict(pseudo)
        extra[PSEUDO_SOURCE_KEY] = source
        _generate_dataset_json(tmp, parent, parent.dataset_json["labels"], len(parent.cases), target.name,
                               f"{parent.name} with pseudo labels from its single-organ teachers "
                               "(nnunet-partial pseudolabel)", **extra)
    return target.final


@dataclass
class PseudoResult:
    raw: str
    dataset_id: int
    name: str
    teacher_dice: dict       # label -> {"dataset", "val_cases", "Dice"} from the teacher's own validation
    pseudo_voxels: dict      # label -> voxels filled by its teacher (this run's new cases only)


def teacher_validation_dice(entry: TeacherEntry, configuration: str, fold: str,
                            trainer: Optional[str] = None) -> dict:
    """Dice of a teacher on its own validation cases (nnU-Net's final validation, ``summary.json``)."""
    path = os.path.join(fold_folder(entry, configuration, fold, trainer), "validation", "summary.json")
    if not os.path.isfile(path):
        return {"dataset": entry.dataset, "val_cases": 0, "Dice": float("nan")}
    summary = _load_json(path)
    return {"dataset": entry.dataset, "val_cases": len(summary.get("metric_per_case", [])),
            "Dice": float(summary["mean"]["1"]["Dice"]) if "1" in summary.get("mean", {}) else float("nan")}


def make_pseudo_labelled_dataset(dataset, configuration: str = "3d_fullres", fold: str = "0",
                                 dataset_id: Optional[int] = None, name: Optional[str] = None,
                                 threshold: float = DEFAULT_THRESHOLD, trainer: Optional[str] = None,
                                 checkpoint: str = "checkpoint_final.pth", save_probabilities: bool = False,
                                 use_mirroring: bool = True, device: Optional[str] = None,
                                 preprocess_configurations: Optional[Sequence[str]] = None,
                                 labels: Optional[Sequence[str]] = None,
                                 num_processes: int = 2, echo: Callable = print) -> PseudoResult:
    """Everything of ``nnunet-partial pseudolabel``: teachers checked, pseudo labels predicted (resumable),
    D̂ written, planned with the parent's plans, preprocessed, the parent's split copied over."""
    from nnunet_partial.experiment import default_device
    if not 0.0 <= threshold < 1.0:
        raise PartialLabelError(f"--threshold must be in [0, 1), got {threshold}")
    fold = str(fold)
    parent = load_parent(dataset)
    registry = load_teacher_registry(parent.preprocessed, parent.dataset_json)
    if registry is None or not registry.teachers:
        raise FileNotFoundError(f"{parent.name} has no teachers ({os.path.join(parent.preprocessed, 'teachers.json')} "
                                f"missing): run nnunet-partial teachers {parent.dataset_id} -c {configuration} first")
    if labels:
        unknown = [n for n in labels if n not in registry.teachers]
        if unknown:
            raise PartialLabelError(f"{parent.name} has no teacher for {unknown} (registered: "
                                    f"{sorted(registry.teachers)}); make them with nnunet-partial teachers --labels")
        registry = TeacherRegistry(registry.parent, {n: registry.teachers[n] for n in labels})
    plans_names = {e.plans for e in registry.teachers.values()}
    if len(plans_names) != 1:
        raise PartialLabelError(f"the teachers of {parent.name} use different plans {sorted(plans_names)}; re-run "
                                "nnunet-partial teachers with one -p")
    plans = plans_names.pop()
    parent_plans = require_plans(parent, plans, [configuration] + list(preprocess_configurations or []))
    split = parent_splits(parent)
    check_fold(split, fold, parent.name, "choose another fold")
    teachers = {}
    for entry in sorted(registry.teachers.values(), key=lambda e: e.label_value):
        folder = check_teacher_model(entry, parent, configuration, fold, trainer, checkpoint, parent_plans)
        teachers[entry.label_value] = (folder, fold, checkpoint)
    trainers = {e.trainer for e in registry.teachers.values()}
    if trainer is None and len(trainers) > 1:
        raise PartialLabelError(f"the teachers of {parent.name} are registered with different trainers "
                                f"{sorted(trainers)}; name the one to use with -tr")
    source = {"parent": parent.name, "configuration": configuration, "fold": fold,
              "trainer": trainer or trainers.pop(), "plans": plans,
              "threshold": float(threshold), "checkpoint": checkpoint,
              "teachers": {e.label: e.dataset for e in registry.teachers.values()}}
    check_pseudo_source(source)
    pseudo = pseudo_label_map(parent, teachers)
    quality = {e.label: teacher_validation_dice(e, configuration, fold, trainer) for e in registry.teachers.values()}

    # an existing D̂ made the same way is reused (resume); otherwise a new id
    def same(dj):
        return {k: v for k, v in dj[PSEUDO_SOURCE_KEY].items()} == source
    existing = find_raw_datasets(PSEUDO_SOURCE_KEY, same)
    counts = {}
    if existing:
        raw = existing[0]
        echo(f"{os.path.basename(raw)}: pseudo-labelled dataset exists (made the same way); checking preprocessing")
    else:
        work = _work_folder(parent, configuration, fold)
        run_file = os.path.join(work, "run.json")
        signature = {**source, "tta": use_mirroring,
                     "checkpoints": {str(v): os.path.getmtime(os.path.join(f, f"fold_{fd}", c))
                                     for v, (f, fd, c) in teachers.items()}}
        if os.path.isfile(run_file) and _load_json(run_file) != signature:
            echo(f"  {work}: made with other teachers or settings; starting over")
            shutil.rmtree(work)
        os.makedirs(work, exist_ok=True)
        _save_json(signature, run_file)
        echo(f"{parent.name}: {len(teachers)} teacher(s) ({configuration}, fold {fold}) over {len(parent.cases)} "
             f"training case(s); threshold {threshold}")
        counts = predict_pseudo_labels(parent, teachers, work, threshold, save_probabilities,
                                       device or default_device(), use_mirroring, echo)
        if dataset_id is None:
            dataset_id = next_free_ids(max([parent.dataset_id] + [e.dataset_id for e in registry.teachers.values()]), 1)[0]
        raw = write_pseudo_dataset(parent, work, int(dataset_id), name or f"{parent.short_name}Pseudo", pseudo, source,
                                   num_processes)
    d_name = os.path.basename(raw)
    d_id = int(d_name[7:10])
    preprocess_like_parent(parent, d_id, d_name, parent.cases, plans,
                           list(dict.fromkeys([configuration] + list(preprocess_configurations or []))),
                           num_processes, echo)
    # the student on D̂ must validate on the parent's folds: the ones its teachers were kept away from
    _save_json(split, os.path.join(nnunet_roots()[1], d_name, SPLITS_FILE))
    return PseudoResult(raw, d_id, d_name, quality, counts)


def pseudo_label_quality(pseudo_raw: str, truth_folder: str, num_processes: int = 1) -> dict:
    """Dice of the pseudo labels of D̂ against fully labelled truth files (``<case><file_ending>``, e.g. the
    synthetic oracle): per label over the (case, label) pairs that are pseudo only."""
    from nnunet_partial.evaluation import evaluate_folders
    dj = _load_json(os.path.join(pseudo_raw, "dataset.json"))
    ann = PartialAnnotations.from_dataset_json(dj)
    if ann is None or not ann.pseudo:
        raise PartialLabelError(f"{pseudo_raw} has no '{PSEUDO_KEY}': not a pseudo-labelled dataset")
    scored = PartialAnnotations(ann.label_names, {c: ann.pseudo.get(c, frozenset()) for c in ann.annotated})
    labels = {k: v for k, v in dj["labels"].items() if k != "background"}
    return evaluate_folders(os.path.join(pseudo_raw, "labelsTr"), truth_folder, labels, dj["file_ending"],
                            annotations=scored, num_processes=num_processes)


def format_quality_table(result: PseudoResult, pseudo_dice: Optional[dict] = None) -> str:
    """Teacher-quality table: each teacher's Dice on its own validation fold (and, with ``pseudo_dice`` from
    :func:`pseudo_label_quality`, the pseudo labels' Dice against the truth)."""
    head = f"{'label':>16} {'teacher dataset':>40} {'val cases':>9} {'teacher Dice':>12}"
    if pseudo_dice is not None:
        head += f" {'pseudo cases':>12} {'pseudo Dice':>11}"
    lines = [head, "-" * len(head)]
    for label, q in result.teacher_dice.items():
        row = f"{label:>16} {q['dataset']:>40} {q['val_cases']:>9} {q['Dice']:>12.3f}"
        if pseudo_dice is not None:
            m = pseudo_dice["mean"].get(label, {})
            row += f" {m.get('n_cases', 0):>12} {m.get('Dice', float('nan')):>11.3f}"
        lines.append(row)
    return "\n".join(lines)
