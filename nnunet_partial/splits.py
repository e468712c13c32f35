"""Cross-validation splits that can score every label on partially labelled data.

nnU-Net's default split is a seeded random 5-fold ``KFold`` over the case ids. With few cases per
source that leaves a fold's validation without any case annotating some label (seen: the demo's
fold 0 held no spleen case, so a lost spleen went unnoticed) or without any labelled case at all
(seen: a semi-supervised set with 4 labelled of 24 cases, every pseudo Dice NaN).

:func:`stratified_crossval_split` deals the cases of every *stratum* — annotation pattern plus
source (``case_provenance``) — round robin over the folds, continuing where the previous stratum
stopped, so every fold's validation gets its share of every source and of the labelled cases as
far as the counts allow, and fold sizes differ by at most one. It is seeded (the same split every
time) and is written only when no ``splits_final.json`` exists: a split the user wrote is never
touched. :func:`split_coverage` says what a given split cannot score.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import numpy as np

from nnunet_partial.annotations import PartialAnnotations


def case_stratum(annotations: PartialAnnotations, case: str, provenance: Optional[Mapping] = None) -> tuple:
    """(annotated label values, source) of a case; the source is '' when no provenance is recorded."""
    source = ""
    if provenance and isinstance(provenance.get(case), Mapping):
        source = str(provenance[case].get("source", ""))
    return tuple(sorted(annotations.annotated[case])), source


def stratified_crossval_split(case_ids: Sequence[str], annotations: PartialAnnotations,
                              provenance: Optional[Mapping] = None, n_splits: int = 5,
                              seed: int = 12345) -> list[dict]:
    """nnU-Net's ``splits_final.json`` layout (``[{"train": [...], "val": [...]}, ...]``), stratified
    by annotation pattern and source. Deterministic for a given case list and seed."""
    case_ids = sorted(case_ids)
    if len(case_ids) < n_splits:
        raise ValueError(f"{len(case_ids)} cases cannot fill {n_splits} cross-validation folds")
    rng = np.random.RandomState(seed)
    strata: dict = {}
    for case in case_ids:
        strata.setdefault(case_stratum(annotations, case, provenance), []).append(case)
    folds = [[] for _ in range(n_splits)]
    position = 0
    # rare strata first, so that their few cases land in different folds before the big ones fill up
    for key in sorted(strata, key=lambda k: (len(strata[k]), k)):
        members = [strata[key][i] for i in rng.permutation(len(strata[key]))]
        for case in members:
            folds[position % n_splits].append(case)
            position += 1
    return [{"train": sorted(c for c in case_ids if c not in set(val)), "val": sorted(val)} for val in folds]


def write_stratified_split(preprocessed_dataset_folder_base: str, case_ids: Sequence[str],
                           annotations: PartialAnnotations, provenance: Optional[Mapping] = None) -> Optional[str]:
    """Write :func:`stratified_crossval_split` as ``splits_final.json`` unless that file exists (a user's split is
    never replaced). Atomic: every DDP rank may call it, none reads half a file. Returns the path when written."""
    from batchgenerators.utilities.file_and_folder_operations import save_json
    splits_file = os.path.join(preprocessed_dataset_folder_base, "splits_final.json")
    if os.path.isfile(splits_file):
        return None
    tmp = f"{splits_file}.{os.getpid()}.tmp"
    save_json(stratified_crossval_split(case_ids, annotations, provenance), tmp)
    os.replace(tmp, splits_file)
    return splits_file


def split_coverage(annotations: PartialAnnotations, train_keys: Sequence[str], val_keys: Sequence[str]) -> dict:
    """What a split cannot do, as label names: ``unscorable`` = annotated on some case of the dataset but
    on no validation case (validation cannot see the label lost); ``untrained`` = annotated on no
    training case; ``labelled_val`` = number of validation cases with any annotation."""
    def names(cases):
        values = set().union(*(annotations.annotated[c] for c in cases)) if cases else set()
        return {annotations.label_names[v - 1] for v in values}

    everywhere = names(list(annotations.annotated))
    in_val, in_train = names(list(val_keys)), names(list(train_keys))
    order = list(annotations.label_names)
    return {"unscorable": [n for n in order if n in everywhere - in_val],
            "untrained": [n for n in order if n in everywhere - in_train],
            "labelled_val": sum(1 for c in val_keys if annotations.annotated[c])}
