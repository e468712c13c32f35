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
            print(f"  {name:>20s}: annotated on {k} case(s)")
    if not args.skip_nnunet:
        from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
        verify_dataset_integrity(folder, num_processes=args.np)
        print("nnU-Net's dataset integrity check passed.")
    return 0


def register(sub) -> None:
    p = sub.add_parser("check", help="validate annotated_labels (and run nnU-Net's integrity check) on a raw dataset",
                       description="Validate a raw nnU-Net dataset: annotated_labels lists every case, names known "
                                   "labels, and no label file holds an organ its case does not list.")
    p.add_argument("dataset", help="dataset id, name (in nnUNet_raw) or a path to the raw dataset folder")
    p.add_argument("--skip-nnunet", action="store_true", help="skip nnU-Net's own verify_dataset_integrity")
    p.add_argument("-np", type=int, default=2, help="processes for nnU-Net's integrity check (default 2)")
    p.set_defaults(func=run)
