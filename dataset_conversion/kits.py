"""KiTS19 / KiTS21 / KiTS23 (Kidney Tumor Segmentation challenge) -> nnU-Net v2 raw dataset.

Layout: ``[data/]case_XXXXX/imaging.nii.gz`` + ``segmentation.nii.gz``; the KiTS21 repository ships
``aggregated_MAJ_seg.nii.gz`` (majority vote of the annotators) instead. Labels: 0 background, 1 kidney,
2 tumor, and 3 cyst in KiTS21/23. KiTS19 ships test cases 210-299 with ``imaging.nii.gz`` only; they are
written to ``imagesTs``.

KiTS19 stores the slice axis first in the NIfTI file (numpy shape (slices, 512, 512)) with an affine that
maps it to the body's z axis. The converter reads and writes with SimpleITK and keeps the voxel order and
the direction matrix, so every voxel keeps its value and its world coordinate (``merge`` can then reorient
all sources to one common axis order without interpolation).
"""
from __future__ import annotations

import os
import re

from dataset_conversion.common import (ConversionError, DEFAULT_TOLERANCE, describe_folder, is_junk,
                                       run_pair_conversion, shorten)

KITS_LABELS = {
    19: {"background": 0, "kidney": 1, "tumor": 2},
    21: {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3},
    23: {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3},
}
KITS19_FIRST_TEST_CASE = 210
_CASE_RE = re.compile(r"^case_(\d{5})$")


def _case_root(src: str) -> str:
    for cand in (src, os.path.join(src, "data"), os.path.join(src, "dataset")):
        if os.path.isdir(cand) and any(_CASE_RE.match(d) for d in os.listdir(cand)):
            return cand
    raise ConversionError(f"{src} is not a KiTS release: no case_XXXXX folders in it or in its 'data' "
                          f"subfolder; {describe_folder(src)}")


def convert_kits(src: str, dataset_id: int, version: int = 19, name: str = None, root: str = None,
                 overwrite: bool = False, num_processes: int = 1, tolerance: float = DEFAULT_TOLERANCE) -> str:
    version = int(version)
    if version not in KITS_LABELS:
        raise ConversionError(f"unknown KiTS version {version}; choose 19, 21 or 23")
    src = os.path.abspath(src)
    if not os.path.isdir(src):
        raise ConversionError(f"KiTS source {src} is not a folder")
    case_root = _case_root(src)
    dataset = f"KiTS{version}"
    train, test = [], []
    no_image, no_label = [], []  # (case, message) of every case at fault: the error names the first and counts them
    for d in sorted(os.listdir(case_root)):
        m = _CASE_RE.match(d)
        if is_junk(d) or not m or not os.path.isdir(os.path.join(case_root, d)):
            continue
        folder = os.path.join(case_root, d)
        image = os.path.join(folder, "imaging.nii.gz")
        seg, maj = os.path.join(folder, "segmentation.nii.gz"), os.path.join(folder, "aggregated_MAJ_seg.nii.gz")
        if version == 19 and os.path.exists(maj) and not os.path.exists(seg):
            raise ConversionError(f"case '{d}': has aggregated_MAJ_seg.nii.gz, a KiTS21 file, but --version 19 was "
                                  "given; is this KiTS21? pass --version 21")
        label = seg if os.path.exists(seg) else (maj if version == 21 and os.path.exists(maj) else None)
        if not os.path.exists(image):
            hint = (" (the KiTS21/23 git repository ships only the labels: run its download script first)"
                    if version != 19 else "")
            no_image.append((d, f"case '{d}': image file {image} is missing{hint}"))
            continue
        if label is None:
            if version == 19 and int(m.group(1)) >= KITS19_FIRST_TEST_CASE:
                test.append({"case": d, "name": d, "image": image, "label": None})
                continue
            expected = "segmentation.nii.gz" + (" or aggregated_MAJ_seg.nii.gz" if version == 21 else "")
            no_label.append((d, f"case '{d}': label file {os.path.join(folder, expected)} is missing"))
            continue
        train.append({"case": d, "name": d, "image": image, "label": label})
    for faults, what in ((no_image, "imaging.nii.gz"), (no_label, "a segmentation")):
        if faults:
            more = (f"; {len(faults)} cases lack {what}: {shorten(c for c, _ in faults)}" if len(faults) > 1 else "")
            raise ConversionError(faults[0][1] + more)
    if not train:
        raise ConversionError(f"{src}: no KiTS training case (case_XXXXX with imaging.nii.gz and a segmentation)")
    hint = "; KiTS21/23 define 3 = cyst: if this is KiTS21 or KiTS23 pass --version 21 or 23" if version == 19 else ""
    return run_pair_conversion(
        src=src, train=train, test=test, root=root, dataset_id=dataset_id, name=name or dataset, overwrite=overwrite,
        num_processes=num_processes, labels=KITS_LABELS[version], dataset=dataset, tolerance=tolerance, hint=hint,
        description=f"{dataset} converted by nnunet-partial; labels " +
                    ", ".join(f"{v} {k}" for k, v in KITS_LABELS[version].items() if v))
