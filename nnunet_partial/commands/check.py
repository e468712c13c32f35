"""``nnunet-partial check``: validate a raw dataset's partial-label metadata and files."""
from __future__ import annotations

import os


def _raw_folder(dataset: str) -> str:
    if os.path.isdir(dataset):
        return dataset
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.paths import nnUNet_raw
    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        raise FileNotFoundError(f"dataset {dataset!r} not found in nnUNet_raw={nnUNet_raw!r}: {e}") from None
    return os.path.join(str(nnUNet_raw), name)


def run(args) -> int:
    from nnunet_partial.annotations import validate_raw_dataset

    folder = _raw_folder(args.dataset)
    annotations = validate_raw_dataset(folder)
    if annotations is None:
        print(f"{folder}: no 'annotated_labels' — a stock, fully annotated dataset.")
    else:
        n = len(annotations.annotated)
        unl = sum(annotations.is_unlabelled(c) for c in annotations.annotated)
        full = sum(annotations.is_fully_annotated(c) for c in annotations.annotated)
        print(f"{folder}: annotated_labels OK for {n} cases ({full} fully labelled, {n - full - unl} partially, "
              f"{unl} unlabelled).")
        for i, name in enumerate(annotations.label_names, start=1):
            k = sum(i in v for v in annotations.annotated.values())
            p = sum(i in v for v in annotations.pseudo.values())
            print(f"  {name:>20s}: annotated on {k} case(s)" + (f", pseudo-labelled on {p}" if annotations.pseudo else ""))
    _report_class_labels(folder)
    _check_stage1_keys(folder)
    if not args.skip_nnunet:
        from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
        verify_dataset_integrity(folder, num_processes=args.np)
        print("nnU-Net's dataset integrity check passed.")
    return 0


def _report_class_labels(folder: str) -> None:
    """Image-level classes (``class_names`` / ``class_labels``, nnUNetTrainerMultiMix): cases per class.
    validate_raw_dataset has validated them already."""
    import json
    from nnunet_partial.annotations import ClassLabels
    with open(os.path.join(folder, "dataset.json")) as f:
        classes = ClassLabels.from_dataset_json(json.load(f))
    if classes is not None:
        counts = ", ".join(f"{n} {c}" for n, c in classes.counts().items())
        print(f"  class_labels OK: {len(classes.labels)} case(s) with a class label ({counts}); "
              f"{classes.num_classes} classes")


def _check_stage1_keys(folder: str) -> None:
    """CoWAM stage 1 metadata: ``teacher_of``, ``pseudo_labels_from`` and the parent's teacher registry."""
    import json
    from nnunet_partial.annotations import (PSEUDO_SOURCE_KEY, check_pseudo_source, check_teacher_of,
                                            load_teacher_registry)
    json_path = os.path.join(folder, "dataset.json")
    with open(json_path) as f:
        dataset_json = json.load(f)
    teacher_of = check_teacher_of(dataset_json, source=json_path)
    if teacher_of is not None:
        print(f"  teacher of '{teacher_of['label']}' for {teacher_of['dataset']}")
    if PSEUDO_SOURCE_KEY in dataset_json:
        source = check_pseudo_source(dataset_json[PSEUDO_SOURCE_KEY], source=json_path)
        print(f"  pseudo labels from the teachers of {source['parent']} ({source['configuration']}, fold "
              f"{source['fold']}, threshold {source['threshold']}): train with nnUNetTrainerCoWAMPseudo")
    from nnunetv2.paths import nnUNet_preprocessed
    if nnUNet_preprocessed.is_set():
        registry = load_teacher_registry(os.path.join(str(nnUNet_preprocessed), os.path.basename(os.path.normpath(folder))),
                                         dataset_json)
        for label, e in (registry.teachers.items() if registry else ()):
            print(f"  teacher of {label!r}: {e.dataset} ({e.trainer}, {e.plans}, {', '.join(e.configurations)}, "
                  f"fold(s) {', '.join(e.folds)})")


def register(sub) -> None:
    p = sub.add_parser("check", help="validate annotated_labels (and run nnU-Net's integrity check) on a raw dataset",
                       description="Validate a raw nnU-Net dataset: annotated_labels lists every case, names known "
                                   "labels, and no label file holds an organ its case does not list (nor, on a "
                                   "pseudo-labelled dataset, pseudo-label); pseudo_labels, pseudo_labels_from, "
                                   "teacher_of and the teacher registry (teachers.json) are validated too.")
    p.add_argument("dataset", help="dataset id, name (in nnUNet_raw) or a path to the raw dataset folder")
    p.add_argument("--skip-nnunet", action="store_true", help="skip nnU-Net's own verify_dataset_integrity")
    p.add_argument("-np", type=int, default=2, help="processes for nnU-Net's integrity check (default 2)")
    p.set_defaults(func=run)
