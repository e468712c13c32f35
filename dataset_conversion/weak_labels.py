"""Weak labels per source of ``nnunet-partial merge`` (docs/conversion.md, "Weak labels"): the files a source
names, read and validated here, in the source's own case ids; ``merge`` maps them to the merged ids and
writes ``image_labels``, ``boxes``, ``class_names`` / ``class_labels`` into the merged dataset.json.

- ``image_labels: FILE.csv`` — header ``case,labels``; ``labels`` are target label names separated by ``;``
  (the organs present in the image; empty: none of the target labels). Every other target label is absent.
- ``boxes: FILE.json`` — ``{"<case>": {"<target label>": [[z0, y0, x0, z1, y1, x1], ...]}}``: voxel
  coordinates of the source image as SimpleITK reads it (numpy order z, y, x), upper bound exclusive;
  ``[]`` = the label is absent. ``merge`` maps every box through its reorientation (no resampling happens).
- ``class_labels: FILE.csv`` — header ``case,class``: one image-level class per case
  (nnUNetTrainerMultiMix).

Case ids are the source's (an images folder: the file name without extension / channel suffix). Errors are
:class:`ConversionError` naming the file, the line and the fix.
"""
from __future__ import annotations

import csv
import difflib
import itertools
import os
from typing import Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from dataset_conversion.common import ConversionError, read_json_file, short_repr, shorten

WEAK_KEYS = ("image_labels", "boxes", "class_labels")


def _open_table(path: str, source: str, what: str, columns: Sequence[str]) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV whose header holds ``columns`` (extra columns are ignored)."""
    if not os.path.isfile(path):
        raise ConversionError(f"source '{source}': {what} file {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in columns if c not in header]
            if missing:
                raise ConversionError(f"source '{source}': {what} file {path} needs a header line with the columns "
                                      f"{','.join(columns)}; found {short_repr(header)}")
            rows = [(i + 2, {(k or "").strip(): (v or "").strip() for k, v in r.items() if k is not None})
                    for i, r in enumerate(reader)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConversionError(f"source '{source}': {what} file {path} cannot be read: {e}") from None
    seen: dict[str, int] = {}
    for line, row in rows:
        case = row["case"]
        if not case:
            raise ConversionError(f"source '{source}': {path} line {line}: the 'case' column is empty")
        if case in seen:
            raise ConversionError(f"source '{source}': {path} line {line}: case '{case}' is listed again (first on "
                                  f"line {seen[case]}); give one row per case")
        seen[case] = line
    return rows


def _unknown_label(path: str, source: str, where: str, name: str, targets: Sequence[str]) -> ConversionError:
    close = difflib.get_close_matches(name, list(targets), 1)
    return ConversionError(f"source '{source}': {path} {where}: unknown label '{name}'; the merged dataset's labels "
                           f"are {list(targets)}" + (f" (did you mean '{close[0]}'?)" if close else ""))


def read_image_labels_csv(path: str, source: str, targets: Sequence[str]) -> dict[str, list[str]]:
    """``case,labels`` CSV -> source case id -> target label names present (in ``targets`` order)."""
    out = {}
    for line, row in _open_table(path, source, "image_labels", ("case", "labels")):
        names = [n.strip() for n in row["labels"].split(";") if n.strip()]
        for n in names:
            if n not in targets:
                raise _unknown_label(path, source, f"line {line} (case '{row['case']}')", n, targets)
        out[row["case"]] = [t for t in targets if t in names]
    return out


def read_class_labels_csv(path: str, source: str) -> dict[str, str]:
    """``case,class`` CSV -> source case id -> class name (non-empty)."""
    out = {}
    for line, row in _open_table(path, source, "class_labels", ("case", "class")):
        if not row["class"]:
            raise ConversionError(f"source '{source}': {path} line {line}: case '{row['case']}' has an empty class; "
                                  "leave cases without a class label out of the file")
        out[row["case"]] = row["class"]
    return out


def read_boxes_json(path: str, source: str, targets: Sequence[str]) -> dict[str, dict[str, list[list[int]]]]:
    """``{case: {target label: [[z0, y0, x0, z1, y1, x1], ...]}}`` JSON, structure and values checked (whether a
    box fits its image is checked when the image is read, :func:`check_box_in_image`)."""
    if not os.path.isfile(path):
        raise ConversionError(f"source '{source}': boxes file {path} does not exist")
    data = read_json_file(path, f"source '{source}': boxes file {path}")
    form = '{"<case>": {"<label>": [[z0, y0, x0, z1, y1, x1], ...]}}'
    if not isinstance(data, dict):
        raise ConversionError(f"source '{source}': boxes file {path} must hold {form}, got {short_repr(data)}")
    out = {}
    for case, per_label in data.items():
        if not isinstance(per_label, dict):
            raise ConversionError(f"source '{source}': {path}: case '{case}' must map label names to lists of boxes "
                                  f"({form}), got {short_repr(per_label)}")
        out[case] = {}
        for name, boxes in per_label.items():
            if name not in targets:
                raise _unknown_label(path, source, f"case '{case}'", name, targets)
            if not isinstance(boxes, list) or not all(
                    isinstance(b, list) and len(b) == 6 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                for v in b) for b in boxes):
                raise ConversionError(f"source '{source}': {path}: case '{case}', label '{name}': expected a list of "
                                      f"boxes [z0, y0, x0, z1, y1, x1] (6 integers each; [] = absent), got "
                                      f"{short_repr(boxes)}")
            for b in boxes:
                if any(v < 0 for v in b) or any(lo >= hi for lo, hi in zip(b[:3], b[3:])):
                    raise ConversionError(f"source '{source}': {path}: case '{case}', label '{name}': box {b} is "
                                          "inverted, empty or negative; write 0 <= lower < upper per axis (upper "
                                          "bound exclusive)")
            out[case][name] = [list(b) for b in boxes]
    return out


def map_case_ids(weak: Mapping[str, object], known: Iterable[str], source: str, path: str) -> None:
    """Refuse a case id of a weak-label file that the source does not have (with the nearest known ids)."""
    known = list(known)
    unknown = sorted(set(weak) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, 1)
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConversionError(f"source '{source}': {path} names case '{unknown[0]}'{more}, which source '{source}' does "
                              f"not have{hint}; its cases: {shorten(sorted(known), 5)}. Use the source's own case ids.")


def check_box_in_image(boxes: Mapping[str, Sequence[Sequence[int]]], image: sitk.Image, case: str, path: str) -> None:
    """Refuse a box reaching outside ``image`` (array shape z, y, x = reversed ``GetSize()``)."""
    shape = tuple(reversed(image.GetSize()))
    for name, bxs in boxes.items():
        for b in bxs:
            if any(hi > s for hi, s in zip(b[3:], shape)):
                raise ConversionError(f"case '{case}': box {list(b)} of '{name}' reaches outside its image {path} of "
                                      f"shape {list(shape)} (z, y, x; upper bound exclusive); fix the boxes file")


def reorient_box(box: Sequence[int], src: sitk.Image, dst: sitk.Image) -> list[int]:
    """A box ``[z0, y0, x0, z1, y1, x1]`` of ``src`` -> the same voxels in ``dst``, a permuted / flipped copy of
    ``src`` on the same world grid (:func:`dataset_conversion.common.reorient`): the corner voxels are mapped
    through their world coordinates, so the box is exact (it still covers the same voxels)."""
    corners = itertools.product(*[(lo, hi - 1) for lo, hi in zip(box[:3], box[3:])])
    mapped = []
    for z, y, x in corners:
        world = src.TransformIndexToPhysicalPoint((int(x), int(y), int(z)))
        i, j, k = dst.TransformPhysicalPointToContinuousIndex(world)
        mapped.append((int(round(k)), int(round(j)), int(round(i))))
    mapped = np.array(mapped)
    return [*map(int, mapped.min(0)), *map(int, mapped.max(0) + 1)]
