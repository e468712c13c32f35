"""Partial-label metadata: which labels were really annotated on which case.

Schema (a key of nnU-Net's ``dataset.json``; nnU-Net copies the file into
``nnUNet_preprocessed`` so trainers see it as ``self.dataset_json``)::

    "annotated_labels": {
        "lits_0001": ["liver"],          # only the liver was annotated on this case
        "kits_0003": ["kidney"],
        "full_0007": ["liver", "kidney", "spleen", "pancreas"],
        "unlab_0002": []                 # unlabelled case (all-background label file)
    }

Every training case must be listed; names are keys of ``"labels"`` (never ``background``).
No ``annotated_labels`` key means a stock, fully annotated nnU-Net dataset.

Stage 1 of CoWAM (``nnunet-partial teachers`` / ``pseudolabel``, nnunet_partial/teachers.py) adds:

- ``"pseudo_labels"`` (a pseudo-labelled dataset D̂): case id -> the label names whose voxels in the
  case's label file were filled by a teacher network, never labels of ``annotated_labels`` (which
  keeps the parent's true, manual annotation); ``"pseudo_labels_from"`` records how they were made.
- ``"teacher_of"`` (a single-organ teacher dataset): ``{"dataset": parent name, "label": name,
  "label_value": value in the parent}``.
- the teacher registry ``teachers.json`` in the parent's ``nnUNet_preprocessed`` folder:
  label name -> teacher dataset, trainer, plans, configurations, folds (:class:`TeacherRegistry`).

Weak labels (the self-/mean-taught trainers of nnunet_partial/trainers/mlds.py use them):

- ``"image_labels"``: case id -> the label names present in the image (image-level labels). A case
  listed here contains no other organ: absence is information too. Cases not listed carry no
  image-level labels.
- ``"boxes"``: case id -> label name -> list of boxes ``[z0, y0, x0, z1, y1, x1]`` (integers) in voxel
  coordinates of the raw image, axes in the order of the array nnU-Net's reader returns for the case
  (SimpleITKIO: numpy order of ``sitk.GetArrayFromImage``, i.e. z, y, x; a 2D image is read as
  ``(1, y, x)``, so its boxes are ``[0, y0, x0, 1, y1, x1]``). Lower bound inclusive, upper bound
  exclusive (a Python slice, nnU-Net's bounding-box convention). A label's pseudo-foreground is kept
  inside its boxes only; an empty list ``[]`` says the label is absent from the case; a label
  without an entry is not restricted by boxes (docs/mlds.md).

Image-level class labels (``nnUNetTrainerMultiMix``, nnunet_partial/trainers/multimix.py;
:class:`ClassLabels`):

- ``"class_names"``: the list of class names (at least two), e.g. ``["no_lesion", "lesion"]``;
  class index ``j`` of the classification head is ``class_names[j]``.
- ``"class_labels"``: case id -> class name. Cases without an image-level class label are absent.

This module is the one place that reads and validates the key and turns it into per-batch
tensors. Errors are :class:`PartialLabelError` with the case and the fix in the message.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

ANNOTATED_KEY = "annotated_labels"
PROVENANCE_KEY = "case_provenance"
PSEUDO_KEY = "pseudo_labels"
PSEUDO_SOURCE_KEY = "pseudo_labels_from"
TEACHER_OF_KEY = "teacher_of"
IMAGE_LABELS_KEY = "image_labels"
BOXES_KEY = "boxes"
CLASS_NAMES_KEY = "class_names"
CLASS_LABELS_KEY = "class_labels"
TEACHER_REGISTRY_FILE = "teachers.json"


class PartialLabelError(ValueError):
    """Invalid partial-label metadata; the message names the case and how to fix it."""


def _label_values(dataset_json: Mapping) -> dict[str, int]:
    """Foreground label name -> integer value. Refuses region / ignore labels (unsupported)."""
    labels = dataset_json.get("labels")
    if not isinstance(labels, Mapping) or "background" not in labels:
        raise PartialLabelError("dataset.json has no 'labels' dict with a 'background' entry; "
                                "it is not an nnU-Net v2 dataset.json.")
    out = {}
    for name, value in labels.items():
        if name == "background":
            continue
        if name == "ignore":
            raise PartialLabelError(
                "dataset.json defines an 'ignore' label together with 'annotated_labels'. The two "
                "cannot be combined yet: drop the ignore label or the annotated_labels key.")
        if isinstance(value, (list, tuple)):
            raise PartialLabelError(
                f"label '{name}' is a region {list(value)}; region-based training cannot be combined "
                "with 'annotated_labels'. Use plain integer labels (one per organ).")
        out[name] = int(value)
    values = sorted(out.values())
    if values != list(range(1, len(values) + 1)):
        raise PartialLabelError(f"label values must be consecutive 1..K, got {values}")
    return out


@dataclass(frozen=True)
class PartialAnnotations:
    """Annotated label values per case, plus the label table of the dataset.

    ``annotated[case]`` is a frozenset of label *values* (1..K). Channel ``k`` of an nnU-Net
    softmax output is label value ``k``, so the sets index output channels directly.
    """

    label_names: tuple[str, ...]        # foreground names, ordered by label value 1..K
    annotated: Mapping[str, frozenset]  # case id -> frozenset of label values
    # case id -> label values filled by a teacher (``pseudo_labels``; cases without pseudo labels absent)
    pseudo: Mapping[str, frozenset] = field(default_factory=dict)
    # case id -> label values present in the image (``image_labels``; cases without image labels absent)
    image_labels: Mapping[str, frozenset] = field(default_factory=dict)
    # case id -> label value -> tuple of boxes (z0, y0, x0, z1, y1, x1), raw voxel coordinates, upper bound
    # exclusive (``boxes``; cases without boxes absent, an empty tuple: the label is absent from the case)
    boxes: Mapping[str, Mapping[int, tuple]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Output channels including background."""
        return len(self.label_names) + 1

    @property
    def all_labels(self) -> frozenset:
        return frozenset(range(1, self.num_classes))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dataset_json(cls, dataset_json: Mapping, case_ids: Optional[Iterable[str]] = None,
                          source: str = "dataset.json") -> Optional["PartialAnnotations"]:
        """Parse and validate ``annotated_labels``; ``None`` for a fully annotated dataset.

        ``case_ids``: the training cases that exist (raw or preprocessed); when given, every one
        must be in the map and the map must name no other case.
        """
        if ANNOTATED_KEY not in dataset_json:
            return None
        name_to_value = _label_values(dataset_json)
        annotated = _label_sets(dataset_json[ANNOTATED_KEY], ANNOTATED_KEY, "annotated", name_to_value, source)
        names_by_value = tuple(sorted(name_to_value, key=name_to_value.get))
        pseudo = _parse_pseudo_labels(dataset_json, name_to_value, annotated, source)
        image_labels = _parse_image_labels(dataset_json, name_to_value, annotated, source)
        boxes = _parse_boxes(dataset_json, name_to_value, annotated, image_labels, source)
        result = cls(label_names=names_by_value, annotated=annotated, pseudo=pseudo, image_labels=image_labels,
                     boxes=boxes)
        if case_ids is not None:
            result.check_cases(case_ids, source)
        return result

    def check_cases(self, case_ids: Iterable[str], source: str = "dataset.json") -> None:
        case_ids = set(case_ids)
        missing = sorted(case_ids - set(self.annotated))
        if missing:
            raise PartialLabelError(
                f"{source}: {len(missing)} training case(s) missing from '{ANNOTATED_KEY}', e.g. "
                f"'{missing[0]}'. Every case needs an entry: the labels annotated on it, or [] if "
                "it is unlabelled.")
        unknown = sorted(set(self.annotated) - case_ids)
        if unknown:
            raise PartialLabelError(
                f"{source}: '{ANNOTATED_KEY}' names case '{unknown[0]}' (and {len(unknown) - 1} more) "
                "that is not a training case of this dataset. Remove it or add the case's files.")

    def check_present_labels(self, case: str, present: Iterable[int], where: str = "",
                             allow_pseudo: bool = False) -> None:
        """Refuse a label map holding voxels of a label the case does not list as annotated
        (``allow_pseudo``: nor as pseudo-labelled)."""
        allowed = set(self.annotated[case]) | (set(self.pseudo.get(case, ())) if allow_pseudo else set())
        extra = sorted(set(int(v) for v in present) - {0} - allowed)
        if extra:
            names = [self.label_names[v - 1] if 0 < v < self.num_classes else f"value {v}" for v in extra]
            if set(extra) <= set(self.pseudo.get(case, ())):
                # a trainer that reads annotated_labels only would take these pseudo voxels for manual ones
                raise PartialLabelError(
                    f"case '{case}'{where}: {names} are pseudo labels ('{PSEUDO_KEY}', made by nnunet-partial "
                    "pseudolabel). Train this dataset with nnUNetTrainerCoWAMPseudo (it treats them as known and "
                    "validates on the manual labels only) or stock nnUNetTrainer; train the other nnunet-partial "
                    "trainers on the parent dataset.")
            raise PartialLabelError(
                f"case '{case}'{where}: the label map contains {names} but '{ANNOTATED_KEY}' lists "
                f"only {self.names_of(case)}. Either add them to the case's annotated labels or "
                "remove them from its label file — otherwise they would be taught as annotated.")

    # ------------------------------------------------------------------ queries
    def names_of(self, case: str) -> list[str]:
        return [self.label_names[v - 1] for v in sorted(self.annotated[case])]

    def pseudo_names_of(self, case: str) -> list[str]:
        return [self.label_names[v - 1] for v in sorted(self.pseudo.get(case, ()))]

    def with_pseudo_as_annotated(self) -> "PartialAnnotations":
        """The training view of a pseudo-labelled dataset: every pseudo label counts as annotated."""
        merged = {c: v | self.pseudo.get(c, frozenset()) for c, v in self.annotated.items()}
        return PartialAnnotations(label_names=self.label_names, annotated=merged)

    def possible_labels(self) -> "PartialAnnotations":
        """The labels each case may contain, as an annotations object (``annotated[case]``: its image-level
        labels, every label for a case without them), e.g. for :meth:`annotated_mask` tables."""
        possible = {c: self.image_labels.get(c, self.all_labels) for c in self.annotated}
        return PartialAnnotations(label_names=self.label_names, annotated=possible)

    def box_restricted(self) -> "PartialAnnotations":
        """The labels whose pseudo-foreground boxes restrict on each case, as an annotations object
        (``annotated[case]``: the label values with a ``boxes`` entry for the case, an empty list included),
        e.g. for :meth:`annotated_mask` tables (column 0 is meaningless there: background is never restricted)."""
        restricted = {c: frozenset(self.boxes.get(c, {})) for c in self.annotated}
        return PartialAnnotations(label_names=self.label_names, annotated=restricted)

    def box_label_values(self) -> tuple:
        """Sorted label values that have at least one box on some case (an empty list needs no rasterising)."""
        return tuple(sorted({v for per_case in self.boxes.values() for v, bxs in per_case.items() if bxs}))

    def check_boxes_in_shape(self, case: str, shape: Sequence[int], where: str = "") -> None:
        """Refuse a box of ``case`` that reaches outside an image of raw array shape ``shape`` (z, y, x)."""
        shape = tuple(int(s) for s in shape)
        if len(shape) == 2:
            shape = (1, *shape)  # nnU-Net reads a 2D image as (1, y, x)
        for value, bxs in self.boxes.get(case, {}).items():
            for box in bxs:
                if any(hi > s for hi, s in zip(box[3:], shape)):
                    raise PartialLabelError(
                        f"case '{case}'{where}: box {list(box)} of '{self.label_names[value - 1]}' in '{BOXES_KEY}' "
                        f"reaches outside the image of shape {list(shape)} (z, y, x; the upper bound is exclusive, "
                        f"at most the shape). Fix the box: voxel coordinates of the raw image, [z0, y0, x0, z1, y1, x1].")

    def is_unlabelled(self, case: str) -> bool:
        return len(self.annotated[case]) == 0

    def is_fully_annotated(self, case: str) -> bool:
        return self.annotated[case] == self.all_labels

    def annotated_mask(self, keys: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """Bool tensor (B, C): ``[i, k]`` is True when label ``k`` is annotated on ``keys[i]``.

        Column 0 (background) is True for every labelled case and False for an unlabelled one
        (its stored background says nothing).
        """
        mask = np.zeros((len(keys), self.num_classes), dtype=bool)
        for i, k in enumerate(keys):
            try:
                values = self.annotated[k]
            except KeyError:
                raise PartialLabelError(f"case '{k}' has no entry in '{ANNOTATED_KEY}'") from None
            mask[i, list(values)] = True
            mask[i, 0] = len(values) > 0
        return torch.from_numpy(mask).to(device)


def full_annotation_mask(batch_size: int, num_classes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The (B, C) mask of a fully annotated batch (stock nnU-Net datasets)."""
    return torch.ones((batch_size, num_classes), dtype=torch.bool, device=device)


def raw_training_cases(raw_dataset_folder: str, dataset_json: Mapping) -> dict[str, dict]:
    """Case id -> {'images': [...], 'label': path} of a raw nnU-Net dataset (nnU-Net's own lookup)."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    return get_filenames_of_train_images_and_targets(raw_dataset_folder, dict(dataset_json))


def validate_raw_dataset(raw_dataset_folder: str, check_label_files: bool = True) -> Optional[PartialAnnotations]:
    """Validate ``annotated_labels`` of a raw dataset against its files (used by ``nnunet-partial check``)."""
    import SimpleITK as sitk
    from batchgenerators.utilities.file_and_folder_operations import load_json

    json_path = os.path.join(raw_dataset_folder, "dataset.json")
    if not os.path.isfile(json_path):
        raise PartialLabelError(f"{raw_dataset_folder}: no dataset.json; is this an nnU-Net raw dataset folder?")
    dataset_json = load_json(json_path)
    cases = raw_training_cases(raw_dataset_folder, dataset_json)
    annotations = PartialAnnotations.from_dataset_json(dataset_json, cases.keys(), source=json_path)
    ClassLabels.from_dataset_json(dataset_json, cases.keys(), source=json_path)  # image-level classes (MultiMix)
    if annotations is None or not check_label_files:
        return annotations
    for case, files in sorted(cases.items()):
        label_file = files["label"]
        try:
            arr = sitk.GetArrayFromImage(sitk.ReadImage(label_file))
        except RuntimeError as e:
            raise PartialLabelError(f"case '{case}': cannot read label file {label_file}: {e}") from None
        annotations.check_present_labels(case, np.unique(arr), where=f" ({label_file})", allow_pseudo=True)
        # the label file has the image's grid; nnU-Net's SimpleITK reader gives the same array order
        annotations.check_boxes_in_shape(case, arr.shape, where=f" ({label_file})")
    return annotations


def validate_preprocessed(annotations: PartialAnnotations, preprocessed_folder: str, dataset_class) -> None:
    """Check the preprocessed cases against the metadata before training starts.

    Uses the ``class_locations`` nnU-Net stores per case (cheap: no label volume is read).
    """
    from batchgenerators.utilities.file_and_folder_operations import load_pickle, isfile, join

    identifiers = dataset_class.get_identifiers(preprocessed_folder)
    annotations.check_cases(identifiers, source=f"dataset.json of {preprocessed_folder}")
    for case in identifiers:
        pkl = join(preprocessed_folder, case + ".pkl")
        if not isfile(pkl):
            continue
        locations = load_pickle(pkl).get("class_locations", {})
        present = [k for k, v in locations.items() if not isinstance(k, tuple) and len(v) > 0]
        annotations.check_present_labels(case, present, where=" (preprocessed)")


def _label_sets(raw, key: str, what: str, name_to_value: Mapping[str, int], source: str) -> dict[str, frozenset]:
    """``{case: [label names]}`` of the key ``key`` -> ``{case: frozenset of label values}``, validated."""
    if not isinstance(raw, Mapping):
        raise PartialLabelError(f"{source}: '{key}' must map case ids to lists of label "
                                f"names, got {type(raw).__name__}")
    out = {}
    for case, names in raw.items():
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise PartialLabelError(
                f"{source}: case '{case}': {what} labels must be a list of label names "
                f"(e.g. [\"liver\"] or [] for unlabelled), got {names!r}")
        values = set()
        for n in names:
            if n == "background":
                raise PartialLabelError(
                    f"{source}: case '{case}' lists 'background'; list only the organs that were "
                    f"{what} (background is implied).")
            if n not in name_to_value:
                raise PartialLabelError(
                    f"{source}: case '{case}' lists unknown label '{n}'. Known labels: "
                    f"{sorted(name_to_value)}. Fix the name or add the label to 'labels'.")
            values.add(name_to_value[n])
        out[str(case)] = frozenset(values)
    return out


# ---------------------------------------------------------------------------- stage 1: pseudo labels, teachers
def _parse_pseudo_labels(dataset_json: Mapping, name_to_value: Mapping[str, int], annotated: Mapping[str, frozenset],
                         source: str) -> dict[str, frozenset]:
    """``pseudo_labels`` -> case id -> label values; ``{}`` without the key. A pseudo label must be a label the
    case does not annotate (a manual label always wins) of a case listed in ``annotated_labels``."""
    if PSEUDO_KEY not in dataset_json:
        return {}
    pseudo = _label_sets(dataset_json[PSEUDO_KEY], PSEUDO_KEY, "pseudo", name_to_value, source)
    for case, values in pseudo.items():
        if case not in annotated:
            raise PartialLabelError(f"{source}: '{PSEUDO_KEY}' names case '{case}', which is not in "
                                    f"'{ANNOTATED_KEY}'. Every pseudo-labelled case keeps its manual annotation "
                                    "there ([] if it has none).")
        both = sorted(values & annotated[case])
        if both:
            names = [n for n, v in name_to_value.items() if v in both]
            raise PartialLabelError(f"{source}: case '{case}' lists {names} both as annotated and as pseudo labels; "
                                    "a manual label always wins, so remove them from its pseudo labels.")
    if PSEUDO_SOURCE_KEY in dataset_json:
        check_pseudo_source(dataset_json[PSEUDO_SOURCE_KEY], source)
    return {c: v for c, v in pseudo.items() if v}


def _parse_image_labels(dataset_json: Mapping, name_to_value: Mapping[str, int], annotated: Mapping[str, frozenset],
                        source: str) -> dict[str, frozenset]:
    """``image_labels`` -> case id -> label values present; ``{}`` without the key. Every case named must be a
    training case (listed in ``annotated_labels``)."""
    if IMAGE_LABELS_KEY not in dataset_json:
        return {}
    present = _label_sets(dataset_json[IMAGE_LABELS_KEY], IMAGE_LABELS_KEY, "present", name_to_value, source)
    unknown = sorted(set(present) - set(annotated))
    if unknown:
        raise PartialLabelError(f"{source}: '{IMAGE_LABELS_KEY}' names case '{unknown[0]}', which is not a training "
                                f"case (not in '{ANNOTATED_KEY}'). Fix the case id or remove the entry.")
    return present


# ---------------------------------------------------------------------------- image-level classes (MultiMix)
@dataclass(frozen=True)
class ClassLabels:
    """``class_names`` + ``class_labels``: one image-level class per labelled case.

    ``names[j]`` is class index ``j`` (output ``j`` of the classification head); ``labels[case]`` the
    class index of a labelled case; cases without a class label are absent.
    """
    names: tuple[str, ...]
    labels: Mapping[str, int]

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def counts(self) -> dict[str, int]:
        """Class name -> number of cases labelled with it (every class listed, zero included)."""
        out = {n: 0 for n in self.names}
        for j in self.labels.values():
            out[self.names[j]] += 1
        return out

    def index_of(self, case: str) -> int:
        """Class index of ``case``, ``-1`` when it has no class label (the ignore index of the CE)."""
        return self.labels.get(case, -1)

    def batch_targets(self, keys: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """(B,) int64: class index per case of a batch, ``-1`` for a case without a class label."""
        return torch.tensor([self.index_of(k) for k in keys], dtype=torch.long, device=device)

    @classmethod
    def from_dataset_json(cls, dataset_json: Mapping, case_ids: Optional[Iterable[str]] = None,
                          source: str = "dataset.json") -> Optional["ClassLabels"]:
        """Parse and validate ``class_names`` / ``class_labels``; ``None`` when the dataset has neither.

        Every case named must be a training case: one of ``case_ids`` when given, else one of
        ``annotated_labels`` when the dataset has that key.
        """
        names, labels = dataset_json.get(CLASS_NAMES_KEY), dataset_json.get(CLASS_LABELS_KEY)
        if names is None and labels is None:
            return None
        if names is None:
            raise PartialLabelError(
                f"{source}: '{CLASS_LABELS_KEY}' is given but '{CLASS_NAMES_KEY}' is not. Add the list of class "
                f"names, e.g. \"{CLASS_NAMES_KEY}\": [\"no_lesion\", \"lesion\"] (index j = output j of the "
                "classification head).")
        if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
            raise PartialLabelError(f"{source}: '{CLASS_NAMES_KEY}' must be a list of class names (strings), "
                                    f"got {names!r}")
        if len(set(names)) != len(names):
            dup = sorted(n for n in set(names) if list(names).count(n) > 1)
            raise PartialLabelError(f"{source}: '{CLASS_NAMES_KEY}' lists {dup} more than once; class names must "
                                    "be unique.")
        if len(names) < 2:
            raise PartialLabelError(
                f"{source}: '{CLASS_NAMES_KEY}' has {len(names)} class(es) {list(names)}; classification needs at "
                "least two (e.g. [\"no_lesion\", \"lesion\"]). Add the missing class or drop both class keys.")
        labels = {} if labels is None else labels
        if not isinstance(labels, Mapping):
            raise PartialLabelError(f"{source}: '{CLASS_LABELS_KEY}' must map case ids to class names, got "
                                    f"{type(labels).__name__}")
        index = {n: j for j, n in enumerate(names)}
        if case_ids is not None:
            known, what = set(case_ids), "a training case of this dataset"
        elif isinstance(dataset_json.get(ANNOTATED_KEY), Mapping):
            known, what = set(dataset_json[ANNOTATED_KEY]), f"listed in '{ANNOTATED_KEY}'"
        else:
            known, what = None, ""
        out = {}
        for case, name in labels.items():
            if known is not None and case not in known:
                raise PartialLabelError(
                    f"{source}: '{CLASS_LABELS_KEY}' names case '{case}', which is not {what}. Fix the case id or "
                    "remove the entry.")
            if name not in index:
                raise PartialLabelError(
                    f"{source}: case '{case}' has class '{name}' in '{CLASS_LABELS_KEY}', which is not in "
                    f"'{CLASS_NAMES_KEY}' {list(names)}. Fix the name or add the class to '{CLASS_NAMES_KEY}'.")
            out[str(case)] = index[name]
        return cls(names=tuple(names), labels=out)


def _parse_boxes(dataset_json: Mapping, name_to_value: Mapping[str, int], annotated: Mapping[str, frozenset],
                 image_labels: Mapping[str, frozenset], source: str) -> dict[str, dict[int, tuple]]:
    """``boxes`` -> case id -> label value -> tuple of 6-tuples ``(z0, y0, x0, z1, y1, x1)``; ``{}`` without the
    key. Checks the shape of every entry, a known case and label, ``0 <= lower < upper``, and agreement with the
    case's ``image_labels`` (a box of a label the image-level labels call absent is a contradiction). Whether a box
    fits its image is checked where the image shape is known (:meth:`PartialAnnotations.check_boxes_in_shape`)."""
    if BOXES_KEY not in dataset_json:
        return {}
    raw = dataset_json[BOXES_KEY]
    form = "{\"case\": {\"liver\": [[z0, y0, x0, z1, y1, x1], ...]}}"
    if not isinstance(raw, Mapping):
        raise PartialLabelError(f"{source}: '{BOXES_KEY}' must map case ids to {{label: [boxes]}}, e.g. {form}; "
                                f"got {type(raw).__name__}")
    out = {}
    for case, per_label in raw.items():
        case = str(case)
        if case not in annotated:
            raise PartialLabelError(f"{source}: '{BOXES_KEY}' names case '{case}', which is not a training case (not "
                                    f"in '{ANNOTATED_KEY}'). Fix the case id or remove the entry.")
        if not isinstance(per_label, Mapping):
            raise PartialLabelError(f"{source}: case '{case}': '{BOXES_KEY}' entries map label names to lists of "
                                    f"boxes, e.g. {form}; got {per_label!r}")
        out[case] = {}
        for name, bxs in per_label.items():
            if name == "background" or name not in name_to_value:
                raise PartialLabelError(
                    f"{source}: case '{case}': '{BOXES_KEY}' names "
                    + ("'background'; boxes are drawn around organs only." if name == "background" else
                       f"unknown label '{name}'. Known labels: {sorted(name_to_value)}. Fix the name."))
            value = name_to_value[name]
            if case in image_labels and value not in image_labels[case] and bxs:
                raise PartialLabelError(
                    f"{source}: case '{case}' has boxes of '{name}', but its '{IMAGE_LABELS_KEY}' do not name it (so "
                    f"it is absent). Add '{name}' to the case's image labels or remove the boxes.")
            if isinstance(bxs, str) or not isinstance(bxs, Sequence):
                raise PartialLabelError(f"{source}: case '{case}', label '{name}': '{BOXES_KEY}' needs a list of "
                                        f"boxes [[z0, y0, x0, z1, y1, x1], ...] ([] = absent), got {bxs!r}")
            boxes = []
            for box in bxs:
                ok = (not isinstance(box, (str, Mapping)) and isinstance(box, Sequence) and len(box) == 6
                      and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in box))
                if not ok:
                    hint = (" A 2D box is written [0, y0, x0, 1, y1, x1] (nnU-Net reads 2D images as (1, y, x))."
                            if isinstance(box, Sequence) and len(box) == 4 else "")
                    raise PartialLabelError(f"{source}: case '{case}', label '{name}': box {box!r} is not 6 integers "
                                            f"[z0, y0, x0, z1, y1, x1] (voxels, upper bound exclusive).{hint}")
                box = tuple(int(v) for v in box)
                if any(v < 0 for v in box) or any(lo >= hi for lo, hi in zip(box[:3], box[3:])):
                    raise PartialLabelError(
                        f"{source}: case '{case}', label '{name}': box {list(box)} is inverted, empty or negative; "
                        "write [z0, y0, x0, z1, y1, x1] with 0 <= lower < upper on every axis (upper bound "
                        "exclusive: a one-voxel box is [z, y, x, z+1, y+1, x+1]).")
                boxes.append(box)
            out[case][value] = tuple(boxes)
    return out


PSEUDO_SOURCE_FIELDS = {"parent": str, "configuration": str, "fold": str, "trainer": str, "plans": str,
                        "threshold": float, "teachers": Mapping}


def check_pseudo_source(value, source: str = "dataset.json") -> dict:
    """Validate ``pseudo_labels_from`` (how ``pseudolabel`` made the pseudo labels)."""
    if not isinstance(value, Mapping):
        raise PartialLabelError(f"{source}: '{PSEUDO_SOURCE_KEY}' must be a dict, got {type(value).__name__}")
    for name, kind in PSEUDO_SOURCE_FIELDS.items():
        v = value.get(name)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) if kind is float else isinstance(v, kind)
        if not ok:
            raise PartialLabelError(f"{source}: '{PSEUDO_SOURCE_KEY}.{name}' must be a {kind.__name__}, got {v!r}; "
                                    "the key is written by nnunet-partial pseudolabel, re-run it instead of editing")
    if not 0.0 <= float(value["threshold"]) < 1.0:
        raise PartialLabelError(f"{source}: '{PSEUDO_SOURCE_KEY}.threshold' must be in [0, 1), "
                                f"got {value['threshold']!r}")
    return dict(value)


def check_teacher_of(dataset_json: Mapping, source: str = "dataset.json") -> Optional[dict]:
    """Validate ``teacher_of`` of a teacher dataset (binary labels, parent and label named); None without it."""
    value = dataset_json.get(TEACHER_OF_KEY)
    if value is None:
        return None
    if not (isinstance(value, Mapping) and isinstance(value.get("dataset"), str) and isinstance(value.get("label"), str)
            and isinstance(value.get("label_value"), int)):
        raise PartialLabelError(f"{source}: '{TEACHER_OF_KEY}' must be {{\"dataset\": parent name, \"label\": name, "
                                f"\"label_value\": int}}, got {value!r}")
    labels = {k: v for k, v in dataset_json.get("labels", {}).items()}
    if labels != {"background": 0, value["label"]: 1}:
        raise PartialLabelError(f"{source}: a teacher dataset must have the labels {{'background': 0, "
                                f"'{value['label']}': 1}}, got {labels}")
    return dict(value)


@dataclass(frozen=True)
class TeacherEntry:
    """One single-organ teacher: its nnU-Net dataset and how it is (to be) trained."""
    label: str
    label_value: int
    dataset: str                 # DatasetXXX_Name of the teacher
    dataset_id: int
    trainer: str
    plans: str
    configurations: tuple
    folds: tuple                 # fold names as nnU-Net writes them: "0".."4" or "all"
    n_cases: int

    def results_folder(self, results_root: str, configuration: str, trainer: Optional[str] = None) -> str:
        """nnU-Net's ``<results>/<dataset>/<trainer>__<plans>__<configuration>``."""
        return os.path.join(results_root, self.dataset, f"{trainer or self.trainer}__{self.plans}__{configuration}")


@dataclass(frozen=True)
class TeacherRegistry:
    """``teachers.json``: label name -> :class:`TeacherEntry`, for one parent dataset."""
    parent: str
    teachers: Mapping[str, TeacherEntry]

    FORMAT = 1

    @classmethod
    def from_json(cls, data, dataset_json: Optional[Mapping] = None,
                  source: str = TEACHER_REGISTRY_FILE) -> "TeacherRegistry":
        """Parse and validate; with ``dataset_json`` (the parent's) every label must be one of its labels."""
        fix = "re-run nnunet-partial teachers to rewrite it"
        if not isinstance(data, Mapping) or data.get("format") != cls.FORMAT or not isinstance(data.get("parent"), str) \
                or not isinstance(data.get("teachers"), Mapping):
            raise PartialLabelError(f"{source}: not a teacher registry of format {cls.FORMAT} (keys 'format', "
                                    f"'parent', 'teachers'); {fix}")
        values = _label_values(dataset_json) if dataset_json is not None else None
        teachers = {}
        for label, e in data["teachers"].items():
            where = f"{source}: teacher of '{label}'"
            try:
                entry = TeacherEntry(label=str(label), label_value=int(e["label_value"]), dataset=str(e["dataset"]),
                                     dataset_id=int(e["dataset_id"]), trainer=str(e["trainer"]), plans=str(e["plans"]),
                                     configurations=tuple(str(c) for c in e["configurations"]),
                                     folds=tuple(str(f) for f in e["folds"]), n_cases=int(e["n_cases"]))
            except (KeyError, TypeError, ValueError) as err:
                raise PartialLabelError(f"{where}: missing or malformed field ({err!r}); {fix}") from None
            if values is not None and values.get(entry.label) != entry.label_value:
                raise PartialLabelError(f"{where}: the parent {data['parent']} has no label '{label}' of value "
                                        f"{entry.label_value} (its labels: {values}); {fix}")
            if not entry.dataset.startswith(f"Dataset{entry.dataset_id:03d}_"):
                raise PartialLabelError(f"{where}: dataset '{entry.dataset}' does not match id {entry.dataset_id}; {fix}")
            bad = [f for f in entry.folds if f != "all" and not f.isdigit()]
            if bad:
                raise PartialLabelError(f"{where}: folds must be integers or 'all', got {bad}; {fix}")
            teachers[entry.label] = entry
        return cls(parent=data["parent"], teachers=teachers)

    def to_json(self) -> dict:
        return {"format": self.FORMAT, "parent": self.parent, "teachers": {
            label: {"label_value": e.label_value, "dataset": e.dataset, "dataset_id": e.dataset_id,
                    "trainer": e.trainer, "plans": e.plans, "configurations": list(e.configurations),
                    "folds": list(e.folds), "n_cases": e.n_cases}
            for label, e in sorted(self.teachers.items(), key=lambda kv: kv[1].label_value)}}


def load_teacher_registry(preprocessed_folder: str, dataset_json: Optional[Mapping] = None) -> Optional[TeacherRegistry]:
    """The registry of the parent whose ``nnUNet_preprocessed`` folder is given; None when there is none."""
    path = os.path.join(preprocessed_folder, TEACHER_REGISTRY_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise PartialLabelError(f"{path}: cannot read the teacher registry ({e}); re-run nnunet-partial teachers") from None
    registry = TeacherRegistry.from_json(data, dataset_json, source=path)
    expected = os.path.basename(os.path.normpath(preprocessed_folder))
    if registry.parent != expected:
        raise PartialLabelError(f"{path}: the registry is for '{registry.parent}', not '{expected}' (copied from "
                                "another dataset?); delete it and re-run nnunet-partial teachers")
    return registry


def save_teacher_registry(registry: TeacherRegistry, preprocessed_folder: str) -> str:
    path = os.path.join(preprocessed_folder, TEACHER_REGISTRY_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(registry.to_json(), f, indent=2)
    os.replace(tmp, path)  # never half a registry for a concurrent reader
    return path
