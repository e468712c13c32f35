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

This module is the one place that reads and validates the key and turns it into per-batch
tensors. Errors are :class:`PartialLabelError` with the case and the fix in the message.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

ANNOTATED_KEY = "annotated_labels"
PROVENANCE_KEY = "case_provenance"


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
        raw = dataset_json[ANNOTATED_KEY]
        if not isinstance(raw, Mapping):
            raise PartialLabelError(f"{source}: '{ANNOTATED_KEY}' must map case ids to lists of label "
                                    f"names, got {type(raw).__name__}")
        annotated = {}
        for case, names in raw.items():
            if isinstance(names, str) or not isinstance(names, Sequence):
                raise PartialLabelError(
                    f"{source}: case '{case}': annotated labels must be a list of label names "
                    f"(e.g. [\"liver\"] or [] for unlabelled), got {names!r}")
            values = set()
            for n in names:
                if n == "background":
                    raise PartialLabelError(
                        f"{source}: case '{case}' lists 'background'; list only the organs that were "
                        "annotated (background is implied).")
                if n not in name_to_value:
                    raise PartialLabelError(
                        f"{source}: case '{case}' lists unknown label '{n}'. Known labels: "
                        f"{sorted(name_to_value)}. Fix the name or add the label to 'labels'.")
                values.add(name_to_value[n])
            annotated[str(case)] = frozenset(values)
        names_by_value = tuple(sorted(name_to_value, key=name_to_value.get))
        result = cls(label_names=names_by_value, annotated=annotated)
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

    def check_present_labels(self, case: str, present: Iterable[int], where: str = "") -> None:
        """Refuse a label map holding voxels of a label the case does not list as annotated."""
        extra = sorted(set(int(v) for v in present) - {0} - set(self.annotated[case]))
        if extra:
            names = [self.label_names[v - 1] if 0 < v < self.num_classes else f"value {v}" for v in extra]
            raise PartialLabelError(
                f"case '{case}'{where}: the label map contains {names} but '{ANNOTATED_KEY}' lists "
                f"only {self.names_of(case)}. Either add them to the case's annotated labels or "
                "remove them from its label file — otherwise they would be taught as annotated.")

    # ------------------------------------------------------------------ queries
    def names_of(self, case: str) -> list[str]:
        return [self.label_names[v - 1] for v in sorted(self.annotated[case])]

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
    if annotations is None or not check_label_files:
        return annotations
    for case, files in sorted(cases.items()):
        label_file = files["label"]
        try:
            arr = sitk.GetArrayFromImage(sitk.ReadImage(label_file))
        except RuntimeError as e:
            raise PartialLabelError(f"case '{case}': cannot read label file {label_file}: {e}") from None
        annotations.check_present_labels(case, np.unique(arr), where=f" ({label_file})")
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
