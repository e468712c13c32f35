"""LiTS (Liver Tumor Segmentation challenge) release -> nnU-Net v2 raw dataset.

Release layout: ``volume-N.nii`` + ``segmentation-N.nii`` (training), usually split over the folders
``Training Batch 1`` (0-27) and ``Training Batch 2`` (28-130); the test release holds ``test-volume-N.nii``.
``.nii.gz`` copies are accepted too. Labels: 0 background, 1 liver, 2 tumor.

Case ids: ``lits_NNNN`` (``volume-3.nii`` -> ``lits_0003``); test volumes go to ``imagesTs`` as
``lits_test_NNNN``.
"""
from __future__ import annotations

import os
import re

from dataset_conversion.common import (ConversionError, DEFAULT_TOLERANCE, describe_folder, is_junk,
                                       run_pair_conversion, shorten)

LITS_LABELS = {"background": 0, "liver": 1, "tumor": 2}
_FILE_RE = re.compile(r"^(volume|segmentation|test-volume)-(\d+)\.nii(\.gz)?$")


def find_lits_files(src: str) -> dict[str, dict[int, str]]:
    """{'volume': {N: path}, 'segmentation': {...}, 'test-volume': {...}} found under ``src`` (3 levels)."""
    found: dict[str, dict[int, str]] = {"volume": {}, "segmentation": {}, "test-volume": {}}
    base_depth = src.rstrip(os.sep).count(os.sep)
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not is_junk(d))
        if dirpath.count(os.sep) - base_depth >= 3:
            dirnames[:] = []
        for f in sorted(filenames):
            m = _FILE_RE.match(f)
            if is_junk(f) or not m:
                continue
            kind, n = m.group(1), int(m.group(2))
            path = os.path.join(dirpath, f)
            if n in found[kind]:
                raise ConversionError(f"LiTS {kind}-{n} appears twice: {found[kind][n]} and {path}; keep one copy")
            found[kind][n] = path
    return found


def _more(numbers: list[int], kind: str, what: str) -> str:
    """'; 12 volumes lack their segmentation: volume-3, volume-5, ... (12 in all)' when several cases are at fault."""
    if len(numbers) < 2:
        return ""
    return f"; {len(numbers)} {kind}s {what}: {shorten(f'{kind}-{n}' for n in numbers)}"


def convert_lits(src: str, dataset_id: int, name: str = "LiTS", root: str = None, overwrite: bool = False,
                 num_processes: int = 1, tolerance: float = DEFAULT_TOLERANCE) -> str:
    src = os.path.abspath(src)
    if not os.path.isdir(src):
        raise ConversionError(f"LiTS source {src} is not a folder")
    found = find_lits_files(src)
    vols, segs, tests = found["volume"], found["segmentation"], found["test-volume"]
    if not vols and not segs:
        raise ConversionError(f"{src} is not the LiTS release: no volume-N.nii / segmentation-N.nii found "
                              f"(expected e.g. 'Training Batch 1/volume-0.nii'); {describe_folder(src)}")
    no_seg, no_vol = sorted(set(vols) - set(segs)), sorted(set(segs) - set(vols))
    if no_seg:
        n = no_seg[0]
        raise ConversionError(f"case 'volume-{n}': segmentation-{n}.nii is missing (image {vols[n]} has no label "
                              "file in the release folders)" + _more(no_seg, "volume", "lack their segmentation"))
    if no_vol:
        n = no_vol[0]
        raise ConversionError(f"case 'volume-{n}': volume-{n}.nii is missing (label {segs[n]} has no image)"
                              + _more(no_vol, "segmentation", "lack their volume"))
    train = [{"case": f"lits_{n:04d}", "name": f"volume-{n}", "image": vols[n], "label": segs[n]}
             for n in sorted(vols)]
    test = [{"case": f"lits_test_{n:04d}", "name": f"test-volume-{n}", "image": tests[n], "label": None}
            for n in sorted(tests)]
    return run_pair_conversion(
        src=src, train=train, test=test, root=root, dataset_id=dataset_id, name=name, overwrite=overwrite,
        num_processes=num_processes, labels=LITS_LABELS, dataset="LiTS", tolerance=tolerance,
        description="LiTS (Bilic et al. 2019) converted by nnunet-partial; labels 1 liver, 2 tumor")
