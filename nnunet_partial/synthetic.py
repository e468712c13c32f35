"""Deterministic abdomen-like 3D phantoms and partial-label nnU-Net datasets built from them.

A phantom is a CT-like volume (HU-ish int16, z-y-x order, 3 x 1.5 x 1.5 mm) with a body, a
spine and four organs. Liver and spleen have nearly the same intensity (60 vs 64 HU under
25 HU noise): position and shape, not a threshold, separate them. Every case varies in body
size, organ position, size and intensity.

Label values: 1 liver, 2 kidney (both kidneys), 3 spleen, 4 pancreas.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

ORGANS = ("liver", "kidney", "spleen", "pancreas")
LABELS = {"background": 0, **{name: i + 1 for i, name in enumerate(ORGANS)}}
SPACING_ZYX = (3.0, 1.5, 1.5)
DEFAULT_SHAPE = (32, 64, 64)


@dataclass(frozen=True)
class _Ellipsoid:
    label: int
    center: tuple  # fractions of the shape (z, y, x)
    radii: tuple   # fractions of the shape (z, y, x)
    hu: float


# Anatomy in image coordinates: x grows to the patient's left, y to posterior.
_ORGAN_TEMPLATE = (
    _Ellipsoid(1, (0.40, 0.42, 0.30), (0.30, 0.22, 0.20), 60.0),   # liver, big, patient right
    _Ellipsoid(3, (0.40, 0.52, 0.72), (0.20, 0.12, 0.10), 64.0),   # spleen, patient left
    _Ellipsoid(2, (0.62, 0.66, 0.31), (0.17, 0.08, 0.07), 160.0),  # right kidney
    _Ellipsoid(2, (0.62, 0.66, 0.69), (0.17, 0.08, 0.07), 160.0),  # left kidney
    _Ellipsoid(4, (0.52, 0.50, 0.52), (0.11, 0.07, 0.17), 30.0),   # pancreas, thin and long
)


def make_phantom(seed: int, shape: Sequence[int] = DEFAULT_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """One case: (image int16 (z, y, x), label uint8 (z, y, x)), fully labelled."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    zz, yy, xx = np.meshgrid(*[np.linspace(0, 1, s, endpoint=False) + 0.5 / s for s in shape], indexing="ij")

    image = np.full(shape, -1000.0, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)

    scale = rng.uniform(0.9, 1.05)
    body = ((yy - 0.5) / (0.42 * scale)) ** 2 + ((xx - 0.5) / (0.47 * scale)) ** 2 <= 1
    image[body] = -80.0                                                    # fat
    muscle = body & ~(((yy - 0.5) / (0.38 * scale)) ** 2 + ((xx - 0.5) / (0.43 * scale)) ** 2 <= 1)
    image[muscle] = 45.0
    spine = ((yy - 0.80) / 0.07) ** 2 + ((xx - 0.5) / 0.07) ** 2 <= 1
    image[spine] = 400.0

    for organ in _ORGAN_TEMPLATE:
        c = np.array(organ.center) + rng.normal(0, 0.025, 3)
        r = np.array(organ.radii) * scale * rng.uniform(0.85, 1.15, 3)
        # a random tilt in the axial plane makes shapes less uniform
        theta = rng.uniform(-0.35, 0.35)
        dy, dx = yy - c[1], xx - c[2]
        ry = np.cos(theta) * dy - np.sin(theta) * dx
        rx = np.sin(theta) * dy + np.cos(theta) * dx
        inside = ((zz - c[0]) / r[0]) ** 2 + (ry / r[1]) ** 2 + (rx / r[2]) ** 2 <= 1
        inside &= body & ~spine
        label[inside] = organ.label
        image[inside] = organ.hu + rng.normal(0, 4)

    # smooth texture + white noise; no clean intensity threshold separates liver from spleen
    texture = gaussian_filter(rng.normal(0, 1, shape).astype(np.float32), sigma=1.5)
    image += 40.0 * texture + rng.normal(0, 18.0, shape).astype(np.float32)
    return np.clip(image, -1024, 3000).astype(np.int16), label


def write_nifti(array_zyx: np.ndarray, path: str, spacing_zyx: Sequence[float] = SPACING_ZYX) -> None:
    img = sitk.GetImageFromArray(array_zyx)
    img.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    sitk.WriteImage(img, path, useCompression=True)


def _keep_labels(label: np.ndarray, keep_values: Sequence[int]) -> np.ndarray:
    """Zero every organ that was not annotated (stored as background, as in a real partial set)."""
    return np.where(np.isin(label, list(keep_values)), label, 0).astype(np.uint8)


# Default partial setting: four single-organ sources, like LiTS / KiTS / MSD Spleen / MSD Pancreas.
SINGLE_ORGAN_SOURCES = {name: (name,) for name in ORGANS}


def write_partial_dataset(raw_root: str, dataset_id: int, name: str = "SyntheticPartial",
                          sources: Mapping[str, Sequence[str]] = SINGLE_ORGAN_SOURCES,
                          cases_per_source: int = 4, n_full: int = 0, n_unlabelled: int = 0,
                          shape: Sequence[int] = DEFAULT_SHAPE, seed: int = 0,
                          partial: bool = True) -> str:
    """Write a merged nnU-Net raw dataset ``Dataset{id:03d}_{name}`` and return its folder.

    ``sources`` maps a source name to the organs it annotates; each source contributes
    ``cases_per_source`` cases whose label files hold only those organs. ``n_full`` fully
    labelled and ``n_unlabelled`` unlabelled (all-background) cases are added. With
    ``partial=False`` every case keeps its full labels and no ``annotated_labels`` is written
    (the oracle dataset on the very same images).
    """
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    final = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    if os.path.exists(final):
        raise FileExistsError(f"{final} exists already; remove it or choose another dataset id")
    os.makedirs(raw_root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp_Dataset{dataset_id:03d}_", dir=raw_root)
    try:
        os.makedirs(os.path.join(tmp, "imagesTr"))
        os.makedirs(os.path.join(tmp, "labelsTr"))
        plan = [(src, tuple(organs)) for src, organs in sources.items() for _ in range(cases_per_source)]
        plan += [("full", ORGANS)] * n_full + [("unlabelled", ())] * n_unlabelled
        annotated, counters = {}, {}
        for i, (src, organs) in enumerate(plan):
            counters[src] = counters.get(src, 0) + 1
            case = f"{src}_{counters[src]:03d}"
            image, label = make_phantom(seed * 100003 + i, shape)
            if partial:
                label = _keep_labels(label, [LABELS[o] for o in organs])
            write_nifti(image, os.path.join(tmp, "imagesTr", f"{case}_0000.nii.gz"))
            write_nifti(label, os.path.join(tmp, "labelsTr", f"{case}.nii.gz"))
            annotated[case] = list(organs)
        extra = {"annotated_labels": annotated} if partial else {}
        generate_dataset_json(tmp, {0: "CT"}, LABELS, num_training_cases=len(plan), file_ending=".nii.gz",
                              dataset_name=f"Dataset{dataset_id:03d}_{name}",
                              description="nnunet-partial synthetic abdomen phantoms", **extra)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_test_set(folder: str, n: int, shape: Sequence[int] = DEFAULT_SHAPE, seed: int = 10_000) -> tuple[str, str]:
    """Fully labelled test cases: ``folder/imagesTs`` (nnU-Net input naming) and ``folder/labelsTs``."""
    images, labels = os.path.join(folder, "imagesTs"), os.path.join(folder, "labelsTs")
    os.makedirs(images, exist_ok=True)
    os.makedirs(labels, exist_ok=True)
    for i in range(n):
        image, label = make_phantom(seed + i, shape)
        write_nifti(image, os.path.join(images, f"test_{i:03d}_0000.nii.gz"))
        write_nifti(label, os.path.join(labels, f"test_{i:03d}.nii.gz"))
    return images, labels
