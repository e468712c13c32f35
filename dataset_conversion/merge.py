"""``nnunet-partial merge SPEC``: several nnU-Net raw datasets (+ folders of unlabelled scans) -> one
partial-label nnU-Net raw dataset with ``annotated_labels`` and ``case_provenance``.

Spec (YAML or JSON; paths relative to the spec file)::

    dataset_id: 510
    dataset_name: AbdomenPartial
    labels: [liver, kidney, pancreas]      # target labels, values 1..K in this order
    orientation: LPS                       # optional; common voxel axis order (null = keep each file's)
    duplicates: error                      # optional; 'drop' keeps the first copy of a duplicated image
    allow_mixed_channels: false            # optional; allow e.g. CT with MR
    channel_names: {"0": "CT"}             # optional; default: the first dataset source's
    tolerance: 0.001                       # optional; geometry tolerance (see common.geometry_mismatch)
    sources:
      - name: lits
        dataset: 501                       # id or DatasetXXX_Name in the output root, or a folder path
        labels: {liver: [liver, tumor]}    # target <- source label names (or values)
      - name: kits
        dataset: Dataset502_KiTS19
        labels: {kidney: [kidney, tumor]}
      - name: unlabelled
        images: scans/                     # a folder of scans without labels: cases with []
        image_labels: unl_labels.csv       # optional weak labels per source (dataset_conversion/weak_labels.py):
        boxes: unl_boxes.json              #   case,labels CSV; boxes JSON; case,class CSV; the source's case ids
        class_labels: unl_classes.csv
    class_names: [no_lesion, lesion]       # optional; default: the sorted class names the class_labels files use

Every file of the merged dataset is read and written with SimpleITK as ``.nii.gz``
(``overwrite_image_reader_writer: SimpleITKIO``).
"""
from __future__ import annotations

import difflib
import json
import os
import re
from collections import OrderedDict
from typing import Any, Mapping, Optional

import numpy as np
import SimpleITK as sitk

from dataset_conversion.common import (AtomicDataset, ConversionError, DATASET_NAME_RE, DEFAULT_TOLERANCE, Geometry,
                                       check_geometry, check_label_values, content_hashes, describe_folder, is_junk,
                                       label_image_like, present_values, progress_note, read_image, read_json_file,
                                       remap_labels,
                                       reorient, run_cases, short_repr, shorten, write_dataset_json, write_image)
from dataset_conversion.weak_labels import (WEAK_KEYS, check_box_in_image, map_case_ids, read_boxes_json,
                                            read_class_labels_csv, read_image_labels_csv, reorient_box)
from nnunet_partial.annotations import (ANNOTATED_KEY, BOXES_KEY, CLASS_LABELS_KEY, CLASS_NAMES_KEY,
                                        IMAGE_LABELS_KEY, PROVENANCE_KEY, ClassLabels, PartialAnnotations)

TOP_KEYS = {"dataset_id", "dataset_name", "labels", "sources", "orientation", "duplicates", "allow_mixed_channels",
            "channel_names", "tolerance", "description", "class_names"}
SOURCE_KEYS = {"name", "dataset", "images", "labels", "channel_names", *WEAK_KEYS}
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
_SOURCE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_CHANNEL_FILE_RE = re.compile(r"^(.+)_(\d{4})$")


# ----------------------------------------------------------------------------------------- spec
def _line_at(text: str, line: int) -> str:
    lines = text.splitlines()
    return f" ({short_repr(lines[line])})" if 0 <= line < len(lines) else ""


def _yaml_error(path: str, text: str, e: Exception) -> ConversionError:
    """One line from a PyYAML error: where (line, column, the line itself), what, and the likely fix."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e).splitlines()[0]
    context, cmark = getattr(e, "context", None) or "", getattr(e, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}{_line_at(text, mark.line)}: " if mark else ""
    opened = f"line {cmark.line + 1}, column {cmark.column + 1}" if cmark else "earlier"
    if "'\\t'" in problem:
        fix = "YAML indents with spaces only: replace the tab with spaces"
    elif "flow sequence" in context or "flow mapping" in context:
        bracket = "[" if "sequence" in context else "{"
        fix = f"is the '{bracket}' opened at {opened} closed, and its items separated by commas?"
    elif "quoted scalar" in context:
        fix = f"is the quote opened at {opened} closed?"
    elif "block" in problem or "block" in context or "mapping values are not allowed" in problem:
        fix = "check the indentation: the keys of one mapping start in the same column, list items ('- ') too"
    else:
        fix = "see the spec format in docs/conversion.md"
    return ConversionError(f"merge spec {path} is not valid YAML: {where}{problem}; {fix}")


def load_spec(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConversionError(f"merge spec {path} does not exist")
    try:
        with open(path) as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"merge spec {path} cannot be read: {e}") from None
    if path.lower().endswith(".json"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConversionError(f"merge spec {path} is not valid JSON: line {e.lineno}, column {e.colno}"
                                  f"{_line_at(text, e.lineno - 1)}: {e.msg}") from None
    else:
        import yaml
        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise _yaml_error(path, text, e) from None
    if not isinstance(spec, dict):
        raise ConversionError(f"merge spec {path}: expected a mapping with dataset_id, dataset_name, labels, sources; "
                              f"got {type(spec).__name__} {short_repr(spec)}")
    return spec


def _err(spec_path: str, msg: str, key: Optional[str] = None) -> ConversionError:
    """``key``: where in the spec, as a path (``sources[1].labels``)."""
    return ConversionError(f"merge spec {spec_path}: {key + ': ' if key else ''}{msg}")


def _unknown_keys(spec_path: str, found, known, key: Optional[str] = None, prefix: str = "") -> None:
    unknown = sorted(set(found) - set(known), key=str)
    if unknown:
        close = [f"{c[0]!r} for {u!r}" for u in unknown if (c := difflib.get_close_matches(str(u), sorted(known), 1))]
        raise _err(spec_path, f"{prefix}unknown key(s) {short_repr(unknown)}; known: {sorted(known)}"
                   + (f" (did you mean {', '.join(close[:3])}?)" if close else ""), key)


def _name_map(value, spec_path: str, key: str) -> dict[str, str]:
    """A channel_names mapping ({"0": "CT"}) with string values."""
    if not isinstance(value, dict) or not value or not all(isinstance(v, str) for v in value.values()):
        raise _err(spec_path, f"must map channel numbers to names, e.g. {{\"0\": \"CT\"}}; got {short_repr(value)}",
                   key)
    try:
        out = {str(int(k)): v for k, v in value.items()}
    except (TypeError, ValueError):
        raise _err(spec_path, f"channel numbers must be 0, 1, ...; got {short_repr(sorted(map(str, value)))}",
                   key) from None
    if sorted(map(int, out)) != list(range(len(out))):
        raise _err(spec_path, f"channel numbers must be 0, 1, ... without gaps; got {sorted(map(int, out))}", key)
    return out


def _check_orientation(code, spec_path) -> Optional[str]:
    if code in (None, "", "none", "None"):
        return None
    code = str(code).upper()
    axes = ("LR", "PA", "SI")
    used = sorted(next((i for i, a in enumerate(axes) if c in a), -1) for c in code)
    if used != [0, 1, 2]:
        raise _err(spec_path, f"{short_repr(code)} is not a 3-letter code using each of L/R, P/A, S/I once "
                              "(e.g. LPS, RAS), or null", "orientation")
    return code


def _resolve_dataset(ref, root: str, spec_dir: str, source: str, spec_path: str, key: str) -> str:
    if isinstance(ref, bool) or not isinstance(ref, (int, str)) or ref == "":
        raise _err(spec_path, f"source '{source}': 'dataset' must be an id, a DatasetXXX_Name or a folder, got "
                              f"{short_repr(ref)}", key)
    text = str(ref)
    if isinstance(ref, int) or text.isdigit():
        prefix = f"Dataset{int(text):03d}_"
        hits = sorted(d for d in (os.listdir(root) if os.path.isdir(root) else []) if d.startswith(prefix)
                      and os.path.isdir(os.path.join(root, d)))
        if len(hits) != 1:
            raise _err(spec_path, f"source '{source}': dataset {ref} " + (
                f"not found in {root} (no {prefix}* folder)" if not hits
                else f"is ambiguous in {root}: {shorten(hits)}; name the folder"), key)
        return os.path.join(root, hits[0])
    for cand in (os.path.join(spec_dir, text), os.path.join(root, text)):
        if os.path.isdir(cand):
            return os.path.abspath(cand)
    raise _err(spec_path, f"source '{source}': dataset {short_repr(text)} not found (looked in {spec_dir} and {root})",
               key)


def _load_source_json(folder: str, source: str) -> dict:
    dj_path = os.path.join(folder, "dataset.json")
    if not os.path.isfile(dj_path):
        raise ConversionError(f"source '{source}': {folder} has no dataset.json; is it an nnU-Net raw dataset? "
                              "Convert public releases first with 'nnunet-partial convert'. "
                              f"{describe_folder(folder)}")
    dj = read_json_file(dj_path, f"source '{source}': {dj_path}")
    if not isinstance(dj, dict):
        raise ConversionError(f"source '{source}': {dj_path} is not a JSON object")
    return dj


def _source_labels(dj: Mapping, folder: str, source: str) -> dict[str, int]:
    labels = dj.get("labels")
    if not isinstance(labels, Mapping) or "background" not in labels:
        raise ConversionError(f"source '{source}': {folder}/dataset.json has no nnU-Net v2 'labels' with background; "
                              f"{describe_folder(folder)}")
    out = {}
    for k, v in labels.items():
        if isinstance(v, (list, tuple)):
            raise ConversionError(f"source '{source}': label {short_repr(k)} of {folder} is a region "
                                  f"{short_repr(v)}; merge needs plain integer labels")
        try:
            out[str(k)] = int(v)
        except (TypeError, ValueError):
            raise ConversionError(f"source '{source}': label {short_repr(k)} of {folder}/dataset.json has the value "
                                  f"{short_repr(v)}; expected an integer") from None
    return out


def _list_unlabelled(folder: str, source: str) -> dict[str, list[str]]:
    """Case id -> channel files of a folder of scans. nnU-Net naming (CASE_0000.ext) groups channels; any other
    name is one single-channel case."""
    if not os.path.isdir(folder):
        raise ConversionError(f"source '{source}': images folder {folder} does not exist")
    files = []
    for f in sorted(os.listdir(folder)):
        if is_junk(f) or not os.path.isfile(os.path.join(folder, f)):
            continue
        ext = next((e for e in IMAGE_EXTENSIONS if f.lower().endswith(e)), None)
        if ext:
            files.append((f[:-len(ext)], os.path.join(folder, f)))
    if not files:
        raise ConversionError(f"source '{source}': images folder {folder} holds no image file "
                              f"({', '.join(IMAGE_EXTENSIONS)})")
    if all(_CHANNEL_FILE_RE.match(stem) for stem, _ in files):
        cases: dict[str, dict[int, str]] = {}
        for stem, path in files:
            m = _CHANNEL_FILE_RE.match(stem)
            cases.setdefault(m.group(1), {})[int(m.group(2))] = path
        out = {}
        for case, chans in cases.items():
            if sorted(chans) != list(range(len(chans))):
                raise ConversionError(f"source '{source}' case '{case}': channel files {shorten(sorted(chans), 8)} are "
                                      f"not numbered 0000..{len(chans) - 1:04d}")
            out[case] = [chans[i] for i in range(len(chans))]
        return out
    return {stem: [path] for stem, path in files}


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = lines[0] if lines else type(e).__name__
    return msg if len(msg) <= 200 else msg[:197] + "..."


def _merged_case_id(source: str, original: str) -> str:
    cid = original if original.startswith(source + "_") else f"{source}_{original}"
    return re.sub(r"[^A-Za-z0-9_-]", "_", cid)


def plan_merge(spec: dict, spec_path: str, root: str) -> dict:
    """Validate the spec against the sources and build the per-case jobs (no image is read here). Errors name the
    key at fault as a path (``sources[1].labels``, sources counted from 0)."""
    spec_dir = os.path.dirname(os.path.abspath(spec_path))
    _unknown_keys(spec_path, spec, TOP_KEYS)
    for key in ("dataset_id", "dataset_name", "labels", "sources"):
        if key not in spec:
            raise _err(spec_path, f"missing required key '{key}'")
    dataset_id = spec["dataset_id"]
    if isinstance(dataset_id, bool) or not re.fullmatch(r"\d+", str(dataset_id)) or not 1 <= int(dataset_id) <= 999:
        raise _err(spec_path, f"must be an integer 1..999, got {short_repr(dataset_id)}", "dataset_id")
    if not isinstance(spec["dataset_name"], str) or not DATASET_NAME_RE.match(spec["dataset_name"]):
        raise _err(spec_path, f"{short_repr(spec['dataset_name'])} is not usable in a folder name: use letters, "
                              "digits, '_' and '-' only", "dataset_name")
    targets = spec["labels"]
    if not isinstance(targets, list) or not targets:
        raise _err(spec_path, f"must be a non-empty list of target label names, got {short_repr(targets)}", "labels")
    for i, t in enumerate(targets):
        if not isinstance(t, str) or not t:
            raise _err(spec_path, f"target label names must be non-empty strings, got {short_repr(t)}",
                       f"labels[{i}]")
        if t in targets[:i]:
            raise _err(spec_path, f"{t!r} is listed twice", f"labels[{i}]")
        if t == "background":
            raise _err(spec_path, "'background' is implied (value 0): remove it", f"labels[{i}]")
    target_value = {t: i + 1 for i, t in enumerate(targets)}
    duplicates = spec.get("duplicates", "error")
    if duplicates not in ("error", "drop"):
        raise _err(spec_path, f"must be 'error' or 'drop', got {short_repr(duplicates)}", "duplicates")
    orientation = _check_orientation(spec.get("orientation", "LPS"), spec_path)
    tolerance = spec.get("tolerance", DEFAULT_TOLERANCE)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise _err(spec_path, f"must be a number >= 0 (e.g. 0.001), got {short_repr(tolerance)}", "tolerance")
    allow_mixed = spec.get("allow_mixed_channels", False)
    if not isinstance(allow_mixed, bool):
        raise _err(spec_path, f"must be true or false, got {short_repr(allow_mixed)}", "allow_mixed_channels")
    if not isinstance(spec.get("description", ""), str):
        raise _err(spec_path, f"must be text, got {short_repr(spec['description'])}", "description")
    sources = spec["sources"]
    if not isinstance(sources, list) or not sources:
        raise _err(spec_path, f"must be a non-empty list of sources, got {short_repr(sources)}", "sources")

    plans, names, channel_ref = [], set(), None
    if spec.get("channel_names") is not None:
        channel_ref = ("the spec's channel_names", _name_map(spec["channel_names"], spec_path, "channel_names"))
    used_targets = set()
    for i, s in enumerate(sources):
        at = f"sources[{i}]"
        if not isinstance(s, dict):
            raise _err(spec_path, f"each source must be a mapping with 'name' and 'dataset' or 'images', got "
                                  f"{short_repr(s)}", at)
        name = s.get("name")
        if not isinstance(name, str) or not _SOURCE_NAME_RE.match(name):
            raise _err(spec_path, f"must be letters, digits, '_' or '-', got {short_repr(name)}", f"{at}.name")
        if name in names:
            raise _err(spec_path, f"source name '{name}' is used twice", f"{at}.name")
        names.add(name)
        _unknown_keys(spec_path, s, SOURCE_KEYS, at, f"source '{name}': ")
        if ("dataset" in s) == ("images" in s):
            raise _err(spec_path, f"source '{name}': give exactly one of 'dataset' (a labelled nnU-Net raw "
                                  "dataset) or 'images' (a folder of unlabelled scans)", at)
        plan: dict[str, Any] = {"name": name}
        if "images" in s:
            if s.get("labels"):
                raise _err(spec_path, f"source '{name}': an 'images' source is unlabelled and takes no 'labels'",
                           f"{at}.labels")
            if not isinstance(s["images"], str) or not s["images"]:
                raise _err(spec_path, f"source '{name}': must be a folder, got {short_repr(s['images'])}",
                           f"{at}.images")
            folder = os.path.abspath(os.path.join(spec_dir, s["images"]))
            plan.update(kind="images", folder=folder, display=folder, lut=None, annotated_default=[],
                        cases=_list_unlabelled(folder, name), source_labels={}, partial=None, provenance={})
            plan["channel_names"] = (None if s.get("channel_names") is None
                                     else _name_map(s["channel_names"], spec_path, f"{at}.channel_names"))
        else:
            folder = _resolve_dataset(s["dataset"], root, spec_dir, name, spec_path, f"{at}.dataset")
            dj_path = os.path.join(folder, "dataset.json")
            dj = _load_source_json(folder, name)
            src_labels = _source_labels(dj, folder, name)
            mapping = s.get("labels") or {}
            if not isinstance(mapping, dict):
                raise _err(spec_path, f"source '{name}': must map target names to lists of source labels (e.g. "
                                      f"{{liver: [liver, tumor]}}), got {short_repr(mapping)}", f"{at}.labels")
            lut = np.zeros(max(src_labels.values()) + 1, dtype=np.uint8)
            by_value = {v: k for k, v in src_labels.items()}
            mapped_to: dict[int, str] = {}
            ann_targets, per_target_src = [], {}
            for tgt, src_list in mapping.items():
                key = f"{at}.labels.{tgt}"
                if tgt not in target_value:
                    raise _err(spec_path, f"source '{name}': target label {short_repr(tgt)} is not in 'labels' "
                                          f"{short_repr(targets)}", key)
                if isinstance(src_list, (str, int)):
                    src_list = [src_list]
                if not isinstance(src_list, list):
                    raise _err(spec_path, f"source '{name}': must be a source label name or value, or a list of "
                                          f"them, got {short_repr(src_list)}", key)
                if not src_list:
                    raise _err(spec_path, f"source '{name}': target {tgt!r} maps no source label", key)
                vals = []
                for sl in src_list:
                    if isinstance(sl, int) and not isinstance(sl, bool):
                        v = sl if sl in by_value else None
                    elif isinstance(sl, str):
                        v = src_labels.get(sl)
                    else:
                        raise _err(spec_path, f"source '{name}': source labels are names or values, got "
                                              f"{short_repr(sl)}", key)
                    if v is None or v == 0:
                        raise _err(spec_path, f"source '{name}': {sl!r} is not a foreground label of {folder} "
                                              f"(its labels: {short_repr(src_labels)})", key)
                    if v in mapped_to:
                        raise _err(spec_path, f"source '{name}': source label {by_value[v]!r} is mapped to both "
                                              f"{mapped_to[v]!r} and {tgt!r}", key)
                    mapped_to[v] = tgt
                    lut[v] = target_value[tgt]
                    vals.append(v)
                ann_targets.append(tgt)
                per_target_src[tgt] = vals
                used_targets.add(tgt)
            unmapped = [k for k, v in src_labels.items() if v and v not in mapped_to]
            if unmapped:
                progress_note(f"merge: source '{name}': labels {shorten(unmapped, 8)} are not mapped to any target; "
                              "their voxels become background")
            from nnunet_partial.annotations import raw_training_cases
            try:
                files = raw_training_cases(folder, dj)
            except Exception as e:  # noqa: BLE001 - nnU-Net raises assorted errors on broken folders
                raise ConversionError(f"source '{name}': cannot list the cases of {folder}: {_first_line(e)}") from None
            if not files:
                raise ConversionError(f"source '{name}': {folder} has no training case")
            partial = PartialAnnotations.from_dataset_json(dj, files.keys(), source=dj_path)
            chans = dj.get("channel_names", dj.get("modality", {}))
            if not isinstance(chans, dict):
                raise ConversionError(f"source '{name}': {dj_path} has channel_names {short_repr(chans)}; expected a "
                                      "mapping like {\"0\": \"CT\"}")
            chans = {str(k): str(v) for k, v in chans.items()}
            plan.update(kind="dataset", folder=folder, display=os.path.basename(folder), lut=lut,
                        annotated_default=[t for t in targets if t in ann_targets], per_target_src=per_target_src,
                        cases={c: (f["images"], f["label"]) for c, f in files.items()}, source_labels=src_labels,
                        partial=partial, provenance=dj.get(PROVENANCE_KEY, {}), channel_names=chans)
        plan["weak"] = _read_weak_labels(s, plan, spec_dir, targets, spec_path, at)
        # channels
        chans = plan["channel_names"]
        if chans is not None:
            if channel_ref is None:
                channel_ref = (f"source '{name}'", chans)
            else:
                ref_name, ref = channel_ref
                if len(chans) != len(ref):
                    raise ConversionError(f"source '{name}' has {len(chans)} channel(s) {short_repr(chans)} but "
                                          f"{ref_name} has {len(ref)} {short_repr(ref)}; all cases of a dataset need "
                                          "the same channels")
                kinds = [chans[k].strip().lower() for k in sorted(chans, key=int)]
                ref_kinds = [ref[k].strip().lower() for k in sorted(ref, key=int)]
                if kinds != ref_kinds and not allow_mixed:
                    raise ConversionError(f"source '{name}' has channels {short_repr(chans)} but {ref_name} has "
                                          f"{short_repr(ref)}: merging different kinds of images (e.g. CT with MR) "
                                          "changes nnU-Net's normalisation; set 'allow_mixed_channels: true' (or "
                                          "--allow-mixed-channels) if you mean it")
        plans.append(plan)
    if channel_ref is None:
        raise _err(spec_path, "no source defines channel names; add 'channel_names' to the spec")
    for t in targets:
        if t not in used_targets:
            progress_note(f"merge: target label {t!r} is annotated by no source; nnU-Net will never see it")
    n_channels = len(channel_ref[1])

    jobs, seen, wrong_channels = [], {}, []
    for plan in plans:
        for original in sorted(plan["cases"]):
            if plan["kind"] == "images":
                images, label = plan["cases"][original], None
                annotated = []
            else:
                images, label = plan["cases"][original]
                annotated = plan["annotated_default"]
                if plan["partial"] is not None:  # a partially annotated source: keep only fully annotated targets
                    have = plan["partial"].annotated[original]
                    annotated = [t for t in annotated if set(plan["per_target_src"][t]) <= have]
            cid = _merged_case_id(plan["name"], original)
            if cid in seen:
                raise ConversionError(f"merged case id '{cid}' arises from source '{plan['name']}' case '{original}' "
                                      f"and from {seen[cid]}; rename a source")
            seen[cid] = f"source '{plan['name']}' case '{original}'"
            prov = {"source": plan["display"], "source_name": plan["name"], "original_case": original}
            if original in plan["provenance"]:
                prov["upstream"] = plan["provenance"][original]
            if len(images) != n_channels:
                wrong_channels.append((f"{plan['name']}/{original}", len(images)))
            jobs.append({"case": cid, "name": f"{plan['name']}/{original}", "images": list(images), "label": label,
                         "lut": plan["lut"], "defined": {v: k for k, v in plan["source_labels"].items()},
                         "dataset": f"source '{plan['name']}' ({plan['display']})", "annotated": annotated,
                         "provenance": prov, "orientation": orientation, "tolerance": tolerance,
                         **{k: plan["weak"][k][original] for k in WEAK_KEYS if original in plan["weak"].get(k, {})}})
    if wrong_channels:
        (case, n), more = wrong_channels[0], len(wrong_channels)
        raise ConversionError(f"case '{case}': {n} channel file(s) but the merged dataset has {n_channels} channel(s) "
                              f"{short_repr(channel_ref[1])}" + (f"; {more} cases have the wrong number of channel "
                              f"files: {shorten(c for c, _ in wrong_channels)}" if more > 1 else ""))
    class_names = spec.get("class_names")
    if class_names is not None and (not isinstance(class_names, list) or not all(isinstance(n, str) and n for n in
                                                                                 class_names)):
        raise _err(spec_path, f"must be a list of class names, got {short_repr(class_names)}", "class_names")
    for plan in plans:
        unknown = sorted(set(plan["weak"].get("class_labels", {}).values()) - set(class_names or ()))
        if class_names is not None and unknown:
            raise _err(spec_path, f"source '{plan['name']}': its class_labels use {unknown}, which 'class_names' "
                                  f"{class_names} does not list; add them or fix the class_labels file", "class_names")
    return {"targets": targets, "jobs": jobs, "duplicates": duplicates, "channel_names": channel_ref[1],
            "orientation": orientation, "plans": plans, "class_names": class_names}


def _read_weak_labels(s: dict, plan: dict, spec_dir: str, targets: list, spec_path: str, at: str) -> dict:
    """The weak-label files a source names (``image_labels`` / ``boxes`` / ``class_labels``, paths relative to
    the spec), read and checked against the source's case ids: key -> source case id -> value."""
    out = {}
    for key in WEAK_KEYS:
        if s.get(key) is None:
            continue
        if not isinstance(s[key], str) or not s[key]:
            raise _err(spec_path, f"source '{plan['name']}': must be a file path, got {short_repr(s[key])}",
                       f"{at}.{key}")
        path = os.path.abspath(os.path.join(spec_dir, s[key]))
        if key == "image_labels":
            values = read_image_labels_csv(path, plan["name"], targets)
        elif key == "boxes":
            values = read_boxes_json(path, plan["name"], targets)
        else:
            values = read_class_labels_csv(path, plan["name"])
        map_case_ids(values, plan["cases"], plan["name"], path)
        out[key] = values
        plan.setdefault("weak_files", {})[key] = path
    return out


# ----------------------------------------------------------------------------------------- per case
def merge_case(job: dict) -> dict:
    name = job["name"]
    images = [read_image(p, name, f"channel {i} image") for i, p in enumerate(job["images"])]
    for i, (img, p) in enumerate(zip(images, job["images"])):
        if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
            raise ConversionError(f"case '{name}': channel {i} image {p} is {img.GetDimension()}D with "
                                  f"{img.GetNumberOfComponentsPerPixel()} component(s); expected a 3D scalar volume")
    ref = Geometry.of(images[0])
    for i in range(1, len(images)):
        check_geometry(ref, Geometry.of(images[i]), name, job["images"][0], job["images"][i], job["tolerance"],
                       what="channel images")
        images[i].CopyInformation(images[0])
    if job["label"] is not None:
        seg = read_image(job["label"], name, "label")
        check_geometry(ref, Geometry.of(seg), name, job["images"][0], job["label"], job["tolerance"])
        arr = sitk.GetArrayViewFromImage(seg)
        values = present_values(arr, name, job["label"], job["images"][0])
        check_label_values(values, job["defined"], name, job["label"], job["dataset"], image=job["images"][0])
        label = label_image_like(remap_labels(arr, job["lut"]), images[0])
        del seg, arr
        present = sorted({int(job["lut"][v]) for v in values} - {0})
    else:
        label = sitk.Image(images[0].GetSize(), sitk.sitkUInt8)
        label.CopyInformation(images[0])
        present = []
    digest = content_hashes(images)
    source_image = images[0]
    images = [reorient(img, job["orientation"]) for img in images]
    boxes = None
    if "boxes" in job:  # source voxel coordinates -> the written (reoriented) image's
        check_box_in_image(job["boxes"], source_image, name, job["images"][0])
        boxes = {t: [reorient_box(b, source_image, images[0]) for b in bxs] for t, bxs in job["boxes"].items()}
    label = reorient(label, job["orientation"])
    for img, out in zip(images, job["out_images"]):
        write_image(img, out)
    write_image(label, job["out_label"])
    return {"case": job["case"], "hash": digest, "present": present, "boxes": boxes}


# ----------------------------------------------------------------------------------------- driver
def merge(spec_path: str, root: Optional[str] = None, overwrite: bool = False, num_processes: int = 1,
          duplicates: Optional[str] = None, allow_mixed_channels: Optional[bool] = None,
          tolerance: Optional[float] = None, weak_labels: Optional[Mapping[str, Mapping[str, str]]] = None) -> str:
    """``weak_labels``: source name -> {``image_labels`` | ``boxes`` | ``class_labels``: file}, set on (or
    replacing) the spec's sources (the CLI's ``--image-labels SOURCE=FILE`` etc.; relative paths resolve against
    the current directory, unlike the spec's own paths)."""
    from dataset_conversion.common import resolve_output_root

    spec = load_spec(spec_path)
    for source, files in (weak_labels or {}).items():
        match = [s for s in spec.get("sources", []) if isinstance(s, dict) and s.get("name") == source]
        if not match:
            names = [s.get("name") for s in spec.get("sources", []) if isinstance(s, dict)]
            raise ConversionError(f"weak labels given for source '{source}', which merge spec {spec_path} does not "
                                  f"have (its sources: {names})")
        for key, path in files.items():
            if key not in WEAK_KEYS:
                raise ConversionError(f"unknown weak-label kind '{key}'; known: {list(WEAK_KEYS)}")
            match[0][key] = os.path.abspath(path)
    if duplicates is not None:
        spec["duplicates"] = duplicates
    if allow_mixed_channels:
        spec["allow_mixed_channels"] = True
    if tolerance is not None:
        spec["tolerance"] = tolerance
    root = resolve_output_root(root)
    plan = plan_merge(spec, spec_path, root)
    target = AtomicDataset(root, spec["dataset_id"], spec["dataset_name"], overwrite)
    for p in plan["plans"]:
        for folder in [target.final] + target.existing():
            if os.path.realpath(p["folder"]) == os.path.realpath(folder):
                raise ConversionError(f"source '{p['name']}' is the target dataset {folder} itself; merge into a new id")
    targets, jobs = plan["targets"], plan["jobs"]
    with target as tmp:
        os.makedirs(os.path.join(tmp, "imagesTr"))
        os.makedirs(os.path.join(tmp, "labelsTr"))
        for j in jobs:
            j["out_images"] = [os.path.join(tmp, "imagesTr", f"{j['case']}_{c:04d}.nii.gz") for c in range(len(j["images"]))]
            j["out_label"] = os.path.join(tmp, "labelsTr", f"{j['case']}.nii.gz")
        results = run_cases(merge_case, jobs, num_processes, f"merge {target.name}")

        # duplicate images (by voxel content, in storage order or in LPS order)
        first_of: dict[str, dict] = {}
        dropped, kept = [], []
        for job, res in zip(jobs, results):
            first = next((first_of[h] for h in res["hash"] if h in first_of), None)
            if first is None:
                for h in res["hash"]:
                    first_of[h] = job
                kept.append((job, res))
            else:
                dropped.append((job, first))
        if dropped and plan["duplicates"] == "error":
            job, first = dropped[0]
            raise ConversionError(
                f"duplicate image: case '{job['name']}' has the same voxel content as case '{first['name']}' "
                f"(merged ids '{job['case']}' and '{first['case']}'). The same scan in two sources leaks test "
                "cases (e.g. MSD Task03 Liver is LiTS). Remove one source, or set 'duplicates: drop' "
                f"(--duplicates drop) to keep only the first copy ({len(dropped)} duplicate image(s) in all)")
        for job, first in dropped:
            for p in job["out_images"] + [job["out_label"]]:
                os.remove(p)
        if dropped:
            shown = "; ".join(f"'{j['name']}' (= '{f['name']}')" for j, f in dropped[:5])
            progress_note(f"merge: warning: dropped {len(dropped)} duplicate image(s), keeping the first copy: {shown}"
                          + (" ..." if len(dropped) > 5 else ""))
        annotated = OrderedDict((j["case"], list(j["annotated"])) for j, _ in kept)
        provenance = OrderedDict((j["case"], j["provenance"]) for j, _ in kept)
        labels = {"background": 0, **{t: i + 1 for i, t in enumerate(targets)}}
        weak = _merged_weak_labels(kept, plan["class_names"], targets)
        dj = {"labels": labels, ANNOTATED_KEY: annotated, **weak}
        pa = PartialAnnotations.from_dataset_json(dj, annotated.keys(), source="merged dataset")
        ClassLabels.from_dataset_json(dj, annotated.keys(), source="merged dataset")
        for j, r in kept:
            pa.check_present_labels(j["case"], r["present"], where=f" (from {j['name']})")
        write_dataset_json(
            tmp, plan["channel_names"], labels, len(kept), spec["dataset_name"],
            spec.get("description", "partial-label dataset merged by nnunet-partial from: " +
                     ", ".join(p["name"] for p in plan["plans"])),
            **{ANNOTATED_KEY: annotated, PROVENANCE_KEY: provenance, **weak,
               "merge_spec": json.loads(json.dumps(spec, default=str)), "orientation": plan["orientation"]})
    n_unl = sum(1 for a in annotated.values() if not a)
    print(f"merged {len(kept)} case(s) ({n_unl} unlabelled, {len(dropped)} duplicate(s) dropped) into {target.final}")
    for t in targets:
        print(f"  {t:>20s}: annotated on {sum(t in a for a in annotated.values())} case(s)")
    return target.final


def _merged_weak_labels(kept: list, class_names: Optional[list], targets: list) -> dict:
    """The weak-label keys of the merged dataset.json from the kept (job, result) pairs, in merged case ids; keys
    no source gives are left out. An image-level label set must name every label the case's label map holds."""
    image_labels, boxes, class_labels = OrderedDict(), OrderedDict(), OrderedDict()
    for job, res in kept:
        if "image_labels" in job:
            stored = {targets[v - 1] for v in res["present"]}
            missing = sorted(stored - set(job["image_labels"]), key=targets.index)
            if missing:
                raise ConversionError(f"case '{job['name']}': its label file holds {missing} but its image_labels "
                                      f"{job['image_labels']} do not name them (so they would be absent); fix the "
                                      "image_labels file")
            image_labels[job["case"]] = list(job["image_labels"])
        if res.get("boxes") is not None:
            boxes[job["case"]] = res["boxes"]
        if "class_labels" in job:
            class_labels[job["case"]] = job["class_labels"]
    out = {}
    if image_labels:
        out[IMAGE_LABELS_KEY] = image_labels
    if boxes:
        out[BOXES_KEY] = boxes
    if class_labels or class_names is not None:
        out[CLASS_NAMES_KEY] = list(class_names) if class_names is not None else sorted(set(class_labels.values()))
        out[CLASS_LABELS_KEY] = class_labels
    return out
