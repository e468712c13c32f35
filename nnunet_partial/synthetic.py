"""Deterministic abdomen-like 3D phantoms and partial-label nnU-Net datasets built from them.

A phantom is a CT-like volume (HU-ish int16, z-y-x order, 3 x 1.5 x 1.5 mm) with a body, a
spine and four organs. Liver and spleen have nearly the same intensity (60 vs 64 HU under
25 HU noise): position and shape, not a threshold, separate them. Every case varies in body
size, organ position, size and intensity.

Label values: 1 liver, 2 kidney (both kidneys), 3 spleen, 4 pancreas.

Benchmark scenarios (``SCENARIOS``, used by ``scripts/benchmark_suite.py``) are built from the same
generator: an *anatomy* (``ANATOMIES``: organ shapes and intensities) and the datasets a scenario
trains on, each with a fully labelled oracle on the very same images.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from nnunet_partial.annotations import PSEUDO_KEY

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


def _variant(template: tuple, changes: Mapping[int, dict]) -> tuple:
    """The template with some ellipsoids (by position) changed; the order, and so every case's random
    draws, stay as in the template."""
    return tuple(replace(e, **changes.get(i, {})) for i, e in enumerate(template))


# Named anatomies. Every variant keeps the five ellipsoids in the same order, so a seed gives the same
# body, positions and noise in every anatomy; only the changed organs differ.
ANATOMIES = {
    "default": _ORGAN_TEMPLATE,
    # Both kidneys take the spleen's intensity (64 HU), so kidney, spleen and liver (60 HU) differ by
    # shape and position only; the pancreas becomes thin and small (a quarter of its volume).
    "hard": _variant(_ORGAN_TEMPLATE, {2: {"hu": 64.0}, 3: {"hu": 64.0},
                                       4: {"radii": (0.07, 0.035, 0.13)}}),
    # Small structures (nnU-Net's deep-supervision downsampling drops them): small kidneys and a
    # pancreas a few voxels thick.
    "small": _variant(_ORGAN_TEMPLATE, {2: {"radii": (0.09, 0.045, 0.04)}, 3: {"radii": (0.09, 0.045, 0.04)},
                                        4: {"radii": (0.06, 0.03, 0.10)}}),
    # Tiny but visible structures: kidneys about 3 voxels across, and a pancreas 2-4 voxels thick with a bright
    # (vessel-like, contrast-enhanced) intensity, all below the stride of nnU-Net's coarsest deep-supervision head
    # (8 voxels in-plane), so nearest-interpolated targets drop them while a network can still see them. In "small"
    # the thin pancreas had the contrast of fat/muscle and was found late or never, even by the oracle.
    "tiny": _variant(_ORGAN_TEMPLATE, {2: {"radii": (0.06, 0.025, 0.025)}, 3: {"radii": (0.06, 0.025, 0.025)},
                                       4: {"radii": (0.05, 0.022, 0.10), "hu": 130.0}}),
    # The default organs, but kidneys, spleen and pancreas may be missing from a body (ORGAN_ABSENCE): the only
    # anatomy in which image-level labels say something (in the others every image holds every organ).
    "absent": _ORGAN_TEMPLATE,
}

# anatomy -> {organ: probability that a case lacks it} (after surgery, or outside the field of view); the liver
# always stays. Both kidneys go together (one label).
ORGAN_ABSENCE = {"absent": {"kidney": 1 / 3, "spleen": 1 / 3, "pancreas": 1 / 3}}


def absent_organs(seed: int, anatomy: str = "default") -> tuple:
    """Organs that phantom ``seed`` of ``anatomy`` lacks (none outside ``ORGAN_ABSENCE``). Drawn from their own
    generator, so every other draw of the phantom (body, positions, noise) is the same as in "default"."""
    chances = ORGAN_ABSENCE.get(anatomy, {})
    draws = np.random.default_rng([int(seed), 9]).random(len(ORGANS))
    return tuple(o for o, d in zip(ORGANS, draws) if d < chances.get(o, 0.0))


# Image-level classes of the MultiMix benchmark (``class_task="lesion"``): a small bright lesion inside the
# liver is present or absent. The lesion stays labelled liver (as LiTS' liver label includes its tumours);
# only the image-level class says whether it is there.
LESION_CLASSES = ("no_lesion", "lesion")
LESION_RADII = (0.10, 0.07, 0.07)   # fractions of the shape (z, y, x)
LESION_CONTRAST_HU = 70.0


def lesion_present(seed: int) -> bool:
    """Whether phantom ``seed`` has a liver lesion under ``class_task="lesion"`` (about half of them).
    Drawn from its own generator, so every other draw of the phantom is the same with or without lesions."""
    return bool(np.random.default_rng([int(seed), 7]).random() < 0.5)


def make_phantom(seed: int, shape: Sequence[int] = DEFAULT_SHAPE,
                 anatomy: str = "default", lesion: bool = False, complete: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One case: (image int16 (z, y, x), label uint8 (z, y, x)), fully labelled; ``anatomy`` names an
    entry of ``ANATOMIES``. ``lesion``: add a bright blob inside the liver (label unchanged: liver).
    ``complete``: every organ present, whatever ``ORGAN_ABSENCE`` draws for this case."""
    if anatomy not in ANATOMIES:
        raise ValueError(f"unknown anatomy {anatomy!r}; known: {sorted(ANATOMIES)}")
    rng = np.random.default_rng(seed)
    missing = set() if complete else {LABELS[o] for o in absent_organs(seed, anatomy)}
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

    for organ in ANATOMIES[anatomy]:
        c = np.array(organ.center) + rng.normal(0, 0.025, 3)
        r = np.array(organ.radii) * scale * rng.uniform(0.85, 1.15, 3)
        # a random tilt in the axial plane makes shapes less uniform
        theta = rng.uniform(-0.35, 0.35)
        dy, dx = yy - c[1], xx - c[2]
        ry = np.cos(theta) * dy - np.sin(theta) * dx
        rx = np.sin(theta) * dy + np.cos(theta) * dx
        inside = ((zz - c[0]) / r[0]) ** 2 + (ry / r[1]) ** 2 + (rx / r[2]) ** 2 <= 1
        inside &= body & ~spine
        hu = organ.hu + rng.normal(0, 4)      # drawn even for a missing organ: the later draws stay the same
        if organ.label in missing:
            continue
        label[inside] = organ.label
        image[inside] = hu
        if organ.label == 1:
            liver_center, liver_radii = c, r

    if lesion:
        # its own generator: the phantom's other draws (and so every dataset sharing the seed) are unchanged
        lrng = np.random.default_rng([int(seed), 8])
        lc = liver_center + lrng.uniform(-0.35, 0.35, 3) * liver_radii
        blob = sum(((g - lc[i]) / LESION_RADII[i]) ** 2 for i, g in enumerate((zz, yy, xx))) <= 1
        image[blob & (label == 1)] += LESION_CONTRAST_HU

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
                          partial: bool = True, anatomy: str = "default", class_task: Optional[str] = None,
                          class_labelled_fraction: float = 0.0, pseudo_labelled: bool = False,
                          n_complete: int = 0, edit_metadata: Optional[Callable[[dict], None]] = None) -> str:
    """Write a merged nnU-Net raw dataset ``Dataset{id:03d}_{name}`` and return its folder.

    ``sources`` maps a source name to the organs it annotates; each source contributes
    ``cases_per_source`` cases whose label files hold only those organs. ``n_full`` fully
    labelled and ``n_unlabelled`` unlabelled (all-background) cases are added. With
    ``partial=False`` every case keeps its full labels and no ``annotated_labels`` is written
    (the oracle dataset on the very same images). Case ``i`` of the plan (sources in order, then
    full, then unlabelled) is phantom ``seed * 100003 + i``: datasets with the same plan prefix share
    those images.

    Image-level classes (nnUNetTrainerMultiMix): with ``class_task="lesion"`` each image holds a liver
    lesion or not (:func:`lesion_present` of its phantom seed) and ``class_names`` is written; the first
    ``round(class_labelled_fraction * n)`` cases of the plan get ``class_labels``. The fraction with
    segmentations is set by the plan: e.g. ``sources={}, n_full=2, n_unlabelled=18,
    class_labelled_fraction=0.5`` = 10 % segmented (and class-labelled), 40 % class label only, 50 % nothing.

    ``pseudo_labelled=True`` writes a pseudo-labelled dataset D̂ as ``nnunet-partial pseudolabel`` would from
    perfect teachers: every label file holds every organ, ``annotated_labels`` stays the manual annotation and
    ``pseudo_labels`` names the other organs of each case (nnUNetTrainerCoWAMPseudo trains on it).

    ``n_complete``: the first cases of the plan keep every organ where ``anatomy`` lets organs be missing
    (``ORGAN_ABSENCE``); label-efficiency's few labelled cases, so that each organ has labels to learn from.

    ``edit_metadata`` may change, in place, the dict of our dataset.json keys (``annotated_labels``, ...) before
    nnU-Net's ``generate_dataset_json`` writes them (e.g. to add weak labels); the folder is moved into place only
    afterwards (the converters' ``AtomicDataset``), so a finished dataset always holds its whole metadata.
    """
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    from dataset_conversion.common import AtomicDataset
    if class_task not in (None, "lesion"):
        raise ValueError(f"unknown class_task {class_task!r}; known: 'lesion'")
    target = AtomicDataset(raw_root, dataset_id, name)  # refuses a second DatasetXXX_ folder of this id
    with target as tmp:
        os.makedirs(os.path.join(tmp, "imagesTr"))
        os.makedirs(os.path.join(tmp, "labelsTr"))
        plan = [(src, tuple(organs)) for src, organs in sources.items() for _ in range(cases_per_source)]
        plan += [("full", ORGANS)] * n_full + [("unlabelled", ())] * n_unlabelled
        annotated, pseudo, counters, class_labels = {}, {}, {}, {}
        n_class_labelled = int(round(class_labelled_fraction * len(plan))) if class_task else 0
        for i, (src, organs) in enumerate(plan):
            counters[src] = counters.get(src, 0) + 1
            case = f"{src}_{counters[src]:03d}"
            has_lesion = class_task == "lesion" and lesion_present(seed * 100003 + i)
            image, label = make_phantom(seed * 100003 + i, shape, anatomy, lesion=has_lesion, complete=i < n_complete)
            if i < n_class_labelled:
                class_labels[case] = LESION_CLASSES[int(has_lesion)]
            if partial and pseudo_labelled and len(organs) < len(ORGANS):
                pseudo[case] = [o for o in ORGANS if o not in organs]
            elif partial:
                label = _keep_labels(label, [LABELS[o] for o in organs])
            write_nifti(image, os.path.join(tmp, "imagesTr", f"{case}_0000.nii.gz"))
            write_nifti(label, os.path.join(tmp, "labelsTr", f"{case}.nii.gz"))
            annotated[case] = list(organs)
        extra = {"annotated_labels": annotated} if partial else {}
        if pseudo:
            extra[PSEUDO_KEY] = pseudo
        if class_task:
            extra.update({"class_names": list(LESION_CLASSES), "class_labels": class_labels})
        if edit_metadata is not None:
            edit_metadata(extra)
        generate_dataset_json(tmp, {0: "CT"}, LABELS, num_training_cases=len(plan), file_ending=".nii.gz",
                              dataset_name=f"Dataset{dataset_id:03d}_{name}",
                              description="nnunet-partial synthetic abdomen phantoms", **extra)
    return target.final


def write_test_set(folder: str, n: int, shape: Sequence[int] = DEFAULT_SHAPE, seed: int = 10_000,
                   anatomy: str = "default") -> tuple[str, str]:
    """Fully labelled test cases: ``folder/imagesTs`` (nnU-Net input naming) and ``folder/labelsTs``."""
    images, labels = os.path.join(folder, "imagesTs"), os.path.join(folder, "labelsTs")
    os.makedirs(images, exist_ok=True)
    os.makedirs(labels, exist_ok=True)
    for i in range(n):
        image, label = make_phantom(seed + i, shape, anatomy)
        write_nifti(image, os.path.join(images, f"test_{i:03d}_0000.nii.gz"))
        write_nifti(label, os.path.join(labels, f"test_{i:03d}.nii.gz"))
    return images, labels


# ---------------------------------------------------------------------- benchmark scenarios
@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of a scenario: keyword arguments of ``writer`` besides ``raw_root``, ``dataset_id``,
    ``name``, ``seed`` and ``shape``, which the benchmark passes. A scenario that needs other metadata
    (weak or class labels) gives a writer of its own with that signature."""
    kwargs: Mapping = field(default_factory=dict)
    writer: Callable[..., str] = write_partial_dataset


@dataclass(frozen=True)
class Scenario:
    """One benchmark scenario: the datasets it trains on and how it is scored.

    ``datasets`` holds ``"partial"`` (what the methods train on) and ``"oracle"`` (the same images,
    fully labelled; the oracle row is stock ``nnUNetTrainer`` on it), and any others; ``PSEUDO_DATASET``
    is derived from ``"partial"`` by the benchmark (teachers + pseudo labels), not written here. A trainer
    (base name, no schedule suffix) trains on ``"partial"`` (full CoWAM: on D̂) unless ``trainer_datasets``
    names another key for it; ``not_applicable`` maps trainers that cannot run here to the reason. The
    fully labelled test set is drawn from ``anatomy``. Headroom = oracle minus naive, and oracle minus ``supervised``.
    """
    name: str
    description: str
    datasets: Mapping[str, DatasetSpec]
    anatomy: str = "default"
    trainer_datasets: Mapping[str, str] = field(default_factory=dict)
    not_applicable: Mapping[str, str] = field(default_factory=dict)
    supervised: str = "nnUNetTrainerPartial"

    def dataset_for(self, trainer: str) -> Optional[str]:
        """Dataset key a trainer trains on here, None when it does not apply."""
        from nnunet_partial.trainers import needs_pseudo_labels
        if trainer in self.not_applicable:
            return None
        return self.trainer_datasets.get(trainer, PSEUDO_DATASET if needs_pseudo_labels(trainer) else "partial")


# A dataset every scenario derives from its "partial" one by CoWAM's stage 1 (nnunet-partial teachers, then
# pseudolabel): D̂, the partial dataset with every unannotated organ filled by single-organ teachers.
PSEUDO_DATASET = "pseudo"

# in the scenarios with a "labelled" dataset (few fully labelled + many other cases): the supervised-only
# baseline and its ablations (weight averaging, nnU-Net's batch replaced) train on the labelled cases alone
SUPERVISED_ONLY_TRAINERS = ("nnUNetTrainerPartial", "nnUNetTrainerPartialEMA", "nnUNetTrainerPartialBatch16",
                            "nnUNetTrainerPartialEMABatch16", "nnUNetTrainerPartialBatch16Foreground")

# trainers that need unlabelled cases in the training split
SEMI_SUPERVISED_TRAINERS = ("nnUNetTrainerMeanTeacher", "nnUNetTrainerMLDSSelfTaught", "nnUNetTrainerMLDSMeanTaught")


def _partial_and_oracle(anatomy: str = "default", **plan) -> dict:
    """A partial dataset and its oracle: the same plan, hence the same images, all organs labelled."""
    return {"partial": DatasetSpec({**plan, "anatomy": anatomy}),
            "oracle": DatasetSpec({**plan, "anatomy": anatomy, "partial": False})}


def _without_unlabelled() -> dict:
    return {t: "no unlabelled cases in this scenario" for t in SEMI_SUPERVISED_TRAINERS}


def few_labels(cases_per_source: int = 3, n_unlabelled: int = 12) -> Scenario:
    return Scenario("few-labels", f"{cases_per_source} cases per single-organ source + {n_unlabelled} unlabelled",
                    _partial_and_oracle(cases_per_source=cases_per_source, n_unlabelled=n_unlabelled))


def hard_anatomy(cases_per_source: int = 4) -> Scenario:
    return Scenario("hard-anatomy", f"kidneys with the spleen's intensity, thin small pancreas; "
                                    f"{cases_per_source} cases per single-organ source",
                    _partial_and_oracle("hard", cases_per_source=cases_per_source), anatomy="hard",
                    not_applicable=_without_unlabelled())


def semi(n_labelled: int = 2, n_unlabelled: int = 18) -> Scenario:
    """Mean Teacher's setting. Supervised-only = nnUNetTrainerPartial on the labelled cases alone; the
    labelled cases come first in every plan, so all three datasets share their images."""
    return Scenario(
        "semi", f"{n_labelled} fully labelled + {n_unlabelled} unlabelled cases",
        {"partial": DatasetSpec({"sources": {}, "n_full": n_labelled, "n_unlabelled": n_unlabelled}),
         "labelled": DatasetSpec({"sources": {}, "n_full": n_labelled}),
         "oracle": DatasetSpec({"sources": {}, "n_full": n_labelled + n_unlabelled, "partial": False})},
        trainer_datasets=dict.fromkeys(SUPERVISED_ONLY_TRAINERS, "labelled"))


def small_structures(cases_per_source: int = 3, n_unlabelled: int = 6) -> Scenario:
    return Scenario("small-structures", f"small kidneys and pancreas; {cases_per_source} cases per source + "
                                        f"{n_unlabelled} unlabelled",
                    _partial_and_oracle("small", cases_per_source=cases_per_source, n_unlabelled=n_unlabelled),
                    anatomy="small")


def tiny_structures(cases_per_source: int = 3, n_unlabelled: int = 6) -> Scenario:
    return Scenario("tiny-structures", f"tiny bright kidneys and pancreas; {cases_per_source} cases per source + "
                                       f"{n_unlabelled} unlabelled",
                    _partial_and_oracle("tiny", cases_per_source=cases_per_source, n_unlabelled=n_unlabelled),
                    anatomy="tiny")


# name -> function returning a Scenario (keyword arguments change its sizes). Weak-label or
# class-label scenarios plug in here as one function each, with a DatasetSpec writer that adds
# their metadata.
SCENARIOS: dict = {"few-labels": few_labels, "hard-anatomy": hard_anatomy, "semi": semi,
                   "small-structures": small_structures, "tiny-structures": tiny_structures}


# ---------------------------------------------------------------------- weak labels: label efficiency (issue 12)
WEAK_KINDS = ("none", "image_labels", "boxes")


def weak_labels_of(label: np.ndarray) -> tuple[list, dict]:
    """A fully labelled (z, y, x) phantom label map -> (organ names present, ``{organ: [boxes]}``): one tight box
    ``[z0, y0, x0, z1, y1, x1]`` (upper bound exclusive) per connected component (two kidneys, two boxes)."""
    from scipy.ndimage import find_objects, label as components
    present, boxes = [], {}
    for name in ORGANS:
        mask = label == LABELS[name]
        if not mask.any():
            continue
        present.append(name)
        comp, _ = components(mask)
        boxes[name] = [[s.start for s in sl] + [s.stop for s in sl] for sl in find_objects(comp) if sl is not None]
    return present, boxes


def write_weak_label_dataset(raw_root: str, dataset_id: int, name: str = "SyntheticWeak", weak: str = "boxes",
                             seed: int = 0, shape: Sequence[int] = DEFAULT_SHAPE, anatomy: str = "default",
                             **plan) -> str:
    """:func:`write_partial_dataset` (``plan``: its other arguments) whose unlabelled cases (``[]``) get weak labels
    from their phantom's full label map: ``weak="image_labels"`` the organs present, ``"boxes"`` a tight box per
    organ component (docs/mlds.md), ``"none"`` nothing."""
    if weak not in WEAK_KINDS:
        raise ValueError(f"unknown weak-label kind {weak!r}; known: {WEAK_KINDS}")

    def add_weak_labels(metadata: dict) -> None:
        key = "image_labels" if weak == "image_labels" else "boxes"
        metadata[key] = {}
        # annotated_labels is in plan order: case i is phantom seed * 100003 + i (write_partial_dataset)
        for i, (case, organs) in enumerate(metadata["annotated_labels"].items()):
            if not organs:
                full = make_phantom(seed * 100003 + i, shape, anatomy, complete=i < plan.get("n_complete", 0))[1]
                present, boxes = weak_labels_of(full)
                metadata[key][case] = present if weak == "image_labels" else boxes

    return write_partial_dataset(raw_root, dataset_id, name=name, seed=seed, shape=shape, anatomy=anatomy,
                                 edit_metadata=None if weak == "none" else add_weak_labels, **plan)


def label_efficiency(weak: str = "none", n_labelled: int = 2, n_unlabelled: int = 18,
                     anatomy: str = "default") -> Scenario:
    """Issue 12, item 2: ``n_labelled`` fully labelled cases (10 % by default), the rest unlabelled, with
    image-level labels or with boxes (``weak``). Supervised-only = nnUNetTrainerPartial on the labelled cases
    alone; the oracle labels every case. All datasets share their images (labelled cases first in every plan).
    ``anatomy="absent"``: organs missing from some bodies, unlabelled and test cases alike (image-level labels then
    say which; a test case without an organ scores only a prediction of it, as Dice 0); the labelled cases keep
    every organ (``n_complete``)."""
    # the anatomy only where it is not the default: the suite identifies finished runs by these arguments
    looks = {"anatomy": anatomy, "n_complete": n_labelled} if anatomy != "default" else {}
    plan = {"sources": {}, "n_full": n_labelled, "n_unlabelled": n_unlabelled, **looks}
    suffix = {"none": "", "image_labels": "-image-labels", "boxes": "-boxes"}[weak] if weak in WEAK_KINDS else None
    if suffix is None:
        raise ValueError(f"unknown weak-label kind {weak!r}; known: {WEAK_KINDS}")
    absence = (f"; {', '.join(ORGAN_ABSENCE[anatomy])} each missing from "
               f"{max(ORGAN_ABSENCE[anatomy].values()):.0%} of the bodies") if anatomy in ORGAN_ABSENCE else ""
    return Scenario(
        f"label-efficiency{suffix}", f"{n_labelled} fully labelled + {n_unlabelled} "
                                     + ("unlabelled" if weak == "none" else f"with {weak.replace('_', '-')} only")
                                     + absence,
        {"partial": DatasetSpec({**plan, "weak": weak}, writer=write_weak_label_dataset),
         "labelled": DatasetSpec({"sources": {}, "n_full": n_labelled, **looks}),
         "oracle": DatasetSpec({"sources": {}, "n_full": n_labelled + n_unlabelled, "partial": False, **looks})},
        anatomy=anatomy, trainer_datasets=dict.fromkeys(SUPERVISED_ONLY_TRAINERS, "labelled"))


def _label_efficiency_boxes(n_labelled: int = 2, n_unlabelled: int = 18, anatomy: str = "default") -> Scenario:
    return label_efficiency("boxes", n_labelled, n_unlabelled, anatomy)


def _label_efficiency_image_labels(n_labelled: int = 2, n_unlabelled: int = 18, anatomy: str = "default") -> Scenario:
    return label_efficiency("image_labels", n_labelled, n_unlabelled, anatomy)


SCENARIOS.update({"label-efficiency": label_efficiency, "label-efficiency-image-labels": _label_efficiency_image_labels,
                  "label-efficiency-boxes": _label_efficiency_boxes})


def multimix(n_segmented: int = 2, n_other: int = 18, class_labelled_fraction: float = 0.5) -> Scenario:
    """Issue 13: ``n_segmented`` fully labelled cases (10 % by default), the rest unsegmented; a liver lesion
    present or absent in each image (``class_task="lesion"``) and class labels on the first
    ``class_labelled_fraction`` of the cases (the segmented ones included). The suite scores segmentation only;
    accuracy / AUC of the classification: scripts/benchmark_multimix.py. Every dataset has the same images
    (segmented cases first in every plan, lesions in all)."""
    n = n_segmented + n_other
    lesion = {"class_task": "lesion", "class_labelled_fraction": class_labelled_fraction}
    return Scenario(
        "multimix", f"{n_segmented} segmented + {n_other} unsegmented cases, {round(class_labelled_fraction * n)} "
                    "with a lesion class label",
        {"partial": DatasetSpec({"sources": {}, "n_full": n_segmented, "n_unlabelled": n_other, **lesion}),
         "labelled": DatasetSpec({"sources": {}, "n_full": n_segmented, "class_task": "lesion"}),
         "oracle": DatasetSpec({"sources": {}, "n_full": n, "partial": False, "class_task": "lesion"})},
        trainer_datasets=dict.fromkeys(SUPERVISED_ONLY_TRAINERS, "labelled"))


SCENARIOS["multimix"] = multimix
