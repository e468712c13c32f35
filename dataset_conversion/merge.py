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

Every file of the merged dataset is read and written with SimpleITK as ``.nii.gz``
(``overwrite_image_reader_writer: SimpleITKIO``).
"""
from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from typing import Any, Mapping, Optional

import numpy as np
import SimpleITK as sitk

from dataset_conversion.common import (AtomicDataset, ConversionError, DEFAULT_TOLERANCE, Geometry, check_geometry,
                                       check_label_values, content_hashes, describe_folder, is_junk,
                                       label_image_like, present_values, progress_note, read_image, remap_labels,
                                       reorient, run_cases, write_dataset_json, write_image)
from nnunet_partial.annotations import ANNOTATED_KEY, PROVENANCE_KEY, PartialAnnotations

TOP_KEYS = {"dataset_id", "dataset_name", "labels", "sources", "orientation", "duplicates", "allow_mixed_channels",
            "channel_names", "tolerance", "description"}
SOURCE_KEYS = {"name", "dataset", "images", "labels", "channel_names"}
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
_SOURCE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_CHANNEL_FILE_RE = re.compile(r"^(.+)_(\d{4})$")


# ----------------------------------------------------------------------------------------- spec
def load_spec(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConversionError(f"merge spec {path} does not exist")
    try:
        with open(path) as f:
            text = f.read()
        if path.lower().endswith(".json"):
            spec = json.loads(text)
        else:
            import yaml
            spec = yaml.safe_load(text)
    except (OSError, ValueError) as e:  # yaml.YAMLError is not a ValueError: handled below
        raise ConversionError(f"merge spec {path} cannot be parsed: {e}") from None
    except Exception as e:  # noqa: BLE001 - yaml.YAMLError
        raise ConversionError(f"merge spec {path} cannot be parsed: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict):
        raise ConversionError(f"merge spec {path}: expected a mapping with dataset_id, dataset_name, labels, sources")
    return spec


def _err(spec_path: str, msg: str) -> ConversionError:
    return ConversionError(f"merge spec {spec_path}: {msg}")


def _check_orientation(code, spec_path) -> Optional[str]:
    if code in (None, "", "none", "None"):
        return None
    code = str(code).upper()
    axes = ("LR", "PA", "SI")
    used = sorted(next((i for i, a in enumerate(axes) if c in a), -1) for c in code)
    if used != [0, 1, 2]:
        raise _err(spec_path, f"orientation {code!r} is not a 3-letter code using each of L/R, P/A, S/I once "
                              "(e.g. LPS, RAS), or null")
    return code


def _resolve_dataset(ref, root: str, spec_dir: str, source: str, spec_path: str) -> str:
    if isinstance(ref, bool) or ref is None:
        raise _err(spec_path, f"source '{source}': 'dataset' must be an id, a DatasetXXX_Name or a folder")
    text = str(ref)
    if isinstance(ref, int) or text.isdigit():
        prefix = f"Dataset{int(text):03d}_"
        hits = sorted(d for d in (os.listdir(root) if os.path.isdir(root) else []) if d.startswith(prefix)
                      and os.path.isdir(os.path.join(root, d)))
        if len(hits) != 1:
            raise ConversionError(f"source '{source}': dataset {ref} " + (
                f"not found in {root} (no {prefix}* folder)" if not hits else f"is ambiguous in {root}: {hits}"))
        return os.path.join(root, hits[0])
    for cand in (os.path.join(spec_dir, text), os.path.join(root, text)):
        if os.path.isdir(cand):
            return os.path.abspath(cand)
    raise ConversionError(f"source '{source}': dataset {text!r} not found (looked in {spec_dir} and {root})")


def _source_labels(dj: Mapping, folder: str, source: str) -> dict[str, int]:
    labels = dj.get("labels")
    if not isinstance(labels, Mapping) or "background" not in labels:
        raise ConversionError(f"source '{source}': {folder}/dataset.json has no nnU-Net v2 'labels' with background; "
                              f"{describe_folder(folder)}")
    out = {}
    for k, v in labels.items():
        if isinstance(v, (list, tuple)):
            raise ConversionError(f"source '{source}': label {k!r} of {folder} is a region {v}; merge needs plain "
                                  "integer labels")
        out[str(k)] = int(v)
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
                raise ConversionError(f"source '{source}' case '{case}': channel files {sorted(chans)} are not "
                                      f"numbered 0000..{len(chans) - 1:04d}")
            out[case] = [chans[i] for i in range(len(chans))]
        return out
    return {stem: [path] for stem, path in files}


def _merged_case_id(source: str, original: str) -> str:
    cid = original if original.startswith(source + "_") else f"{source}_{original}"
    return re.sub(r"[^A-Za-z0-9_-]", "_", cid)


def plan_merge(spec: dict, spec_path: str, root: str) -> dict:
    """Validate the spec against the sources and build the per-case jobs (no image is read here)."""
    spec_dir = os.path.dirname(os.path.abspath(spec_path))
    unknown = sorted(set(spec) - TOP_KEYS)
    if unknown:
        raise _err(spec_path, f"unknown key(s) {unknown}; known: {sorted(TOP_KEYS)}")
    for key in ("dataset_id", "dataset_name", "labels", "sources"):
        if key not in spec:
            raise _err(spec_path, f"missing required key '{key}'")
    targets = spec["labels"]
    if (not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets)
            or len(set(targets)) != len(targets)):
        raise _err(spec_path, f"'labels' must be a non-empty list of distinct target label names, got {targets!r}")
    if "background" in targets:
        raise _err(spec_path, "'labels' lists 'background'; it is implied (value 0)")
    target_value = {t: i + 1 for i, t in enumerate(targets)}
    duplicates = spec.get("duplicates", "error")
    if duplicates not in ("error", "drop"):
        raise _err(spec_path, f"duplicates must be 'error' or 'drop', got {duplicates!r}")
    orientation = _check_orientation(spec.get("orientation", "LPS"), spec_path)
    tolerance = float(spec.get("tolerance", DEFAULT_TOLERANCE))
    allow_mixed = bool(spec.get("allow_mixed_channels", False))
    sources = spec["sources"]
    if not isinstance(sources, list) or not sources:
        raise _err(spec_path, "'sources' must be a non-empty list")

    plans, names, channel_ref = [], set(), None
    if spec.get("channel_names") is not None:
        channel_ref = ("the spec's channel_names", {str(k): str(v) for k, v in dict(spec["channel_names"]).items()})
    used_targets = set()
    for i, s in enumerate(sources):
        if not isinstance(s, dict):
            raise _err(spec_path, f"source #{i + 1} must be a mapping, got {s!r}")
        name = s.get("name")
        if not isinstance(name, str) or not _SOURCE_NAME_RE.match(name):
            raise _err(spec_path, f"source #{i + 1}: 'name' must be letters, digits, '_' or '-', got {name!r}")
        if name in names:
            raise _err(spec_path, f"source name '{name}' is used twice")
        names.add(name)
        bad = sorted(set(s) - SOURCE_KEYS)
        if bad:
            raise _err(spec_path, f"source '{name}': unknown key(s) {bad}; known: {sorted(SOURCE_KEYS)}")
        if ("dataset" in s) == ("images" in s):
            raise _err(spec_path, f"source '{name}': give exactly one of 'dataset' (a labelled nnU-Net raw "
                                  "dataset) or 'images' (a folder of unlabelled scans)")
        plan: dict[str, Any] = {"name": name}
        if "images" in s:
            if s.get("labels"):
                raise _err(spec_path, f"source '{name}': an 'images' source is unlabelled and takes no 'labels'")
            folder = os.path.abspath(os.path.join(spec_dir, str(s["images"])))
            plan.update(kind="images", folder=folder, display=folder, lut=None, annotated_default=[],
                        cases=_list_unlabelled(folder, name), source_labels={}, partial=None, provenance={})
            chans = ({str(k): str(v) for k, v in dict(s["channel_names"]).items()} if s.get("channel_names")
                     else None)
            plan["channel_names"] = chans
        else:
            folder = _resolve_dataset(s["dataset"], root, spec_dir, name, spec_path)
            dj_path = os.path.join(folder, "dataset.json")
            if not os.path.isfile(dj_path):
                raise ConversionError(f"source '{name}': {folder} has no dataset.json; is it an nnU-Net raw dataset? "
                                      "Convert public releases first with 'nnunet-partial convert'. "
                                      f"{describe_folder(folder)}")
            with open(dj_path) as f:
                dj = json.load(f)
            src_labels = _source_labels(dj, folder, name)
            mapping = s.get("labels") or {}
            if not isinstance(mapping, dict):
                raise _err(spec_path, f"source '{name}': 'labels' must map target names to lists of source labels")
            lut = np.zeros(max(src_labels.values()) + 1, dtype=np.uint8)
            by_value = {v: k for k, v in src_labels.items()}
            mapped_to: dict[int, str] = {}
            ann_targets, per_target_src = [], {}
            for tgt, src_list in mapping.items():
                if tgt not in target_value:
                    raise _err(spec_path, f"source '{name}': target label {tgt!r} is not in 'labels' {targets}")
                if isinstance(src_list, (str, int)):
                    src_list = [src_list]
                if not src_list:
                    raise _err(spec_path, f"source '{name}': target {tgt!r} maps no source label")
                vals = []
                for sl in src_list:
                    if isinstance(sl, int) and not isinstance(sl, bool):
                        v = sl if sl in by_value else None
                    else:
                        v = src_labels.get(str(sl))
                    if v is None or v == 0:
                        raise _err(spec_path, f"source '{name}': {sl!r} is not a foreground label of {folder} "
                                              f"(its labels: {src_labels})")
                    if v in mapped_to:
                        raise _err(spec_path, f"source '{name}': source label {by_value[v]!r} is mapped to both "
                                              f"{mapped_to[v]!r} and {tgt!r}")
                    mapped_to[v] = tgt
                    lut[v] = target_value[tgt]
                    vals.append(v)
                ann_targets.append(tgt)
                per_target_src[tgt] = vals
                used_targets.add(tgt)
            unmapped = [k for k, v in src_labels.items() if v and v not in mapped_to]
            if unmapped:
                progress_note(f"merge: source '{name}': labels {unmapped} are not mapped to any target; their voxels "
                              "become background")
            from nnunet_partial.annotations import raw_training_cases
            try:
                files = raw_training_cases(folder, dj)
            except Exception as e:  # noqa: BLE001 - nnU-Net raises assorted errors on broken folders
                raise ConversionError(f"source '{name}': cannot list the cases of {folder}: {e}") from None
            if not files:
                raise ConversionError(f"source '{name}': {folder} has no training case")
            partial = PartialAnnotations.from_dataset_json(dj, files.keys(), source=dj_path)
            chans = {str(k): str(v) for k, v in dict(dj.get("channel_names", dj.get("modality", {}))).items()}
            plan.update(kind="dataset", folder=folder, display=os.path.basename(folder), lut=lut,
                        annotated_default=[t for t in targets if t in ann_targets], per_target_src=per_target_src,
                        cases={c: (f["images"], f["label"]) for c, f in files.items()}, source_labels=src_labels,
                        partial=partial, provenance=dj.get(PROVENANCE_KEY, {}), channel_names=chans)
        # channels
        chans = plan["channel_names"]
        if chans is not None:
            if channel_ref is None:
                channel_ref = (f"source '{name}'", chans)
            else:
                ref_name, ref = channel_ref
                if len(chans) != len(ref):
                    raise ConversionError(f"source '{name}' has {len(chans)} channel(s) {chans} but {ref_name} has "
                                          f"{len(ref)} {ref}; all cases of a dataset need the same channels")
                kinds = [chans[k].strip().lower() for k in sorted(chans, key=int)]
                ref_kinds = [ref[k].strip().lower() for k in sorted(ref, key=int)]
                if kinds != ref_kinds and not allow_mixed:
                    raise ConversionError(f"source '{name}' has channels {chans} but {ref_name} has {ref}: merging "
                                          "different kinds of images (e.g. CT with MR) changes nnU-Net's "
                                          "normalisation; set 'allow_mixed_channels: true' (or "
                                          "--allow-mixed-channels) if you mean it")
        plans.append(plan)
    if channel_ref is None:
        raise _err(spec_path, "no source defines channel names; add 'channel_names' to the spec")
    for t in targets:
        if t not in used_targets:
            progress_note(f"merge: target label {t!r} is annotated by no source; nnU-Net will never see it")
    n_channels = len(channel_ref[1])

    jobs, seen = [], {}
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
                raise ConversionError(f"source '{plan['name']}' case '{original}': {len(images)} channel file(s) but the "
                                      f"merged dataset has {n_channels} channel(s) {channel_ref[1]}")
            jobs.append({"case": cid, "name": f"{plan['name']}/{original}", "images": list(images), "label": label,
                         "lut": plan["lut"], "defined": {v: k for k, v in plan["source_labels"].items()},
                         "dataset": f"source '{plan['name']}' ({plan['display']})", "annotated": annotated,
                         "provenance": prov, "orientation": orientation, "tolerance": tolerance})
    return {"targets": targets, "jobs": jobs, "duplicates": duplicates, "channel_names": channel_ref[1],
            "orientation": orientation, "plans": plans}


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
        values = present_values(arr, name, job["label"])
        check_label_values(values, job["defined"], name, job["label"], job["dataset"])
        label = label_image_like(remap_labels(arr, job["lut"]), images[0])
        del seg, arr
        present = sorted({int(job["lut"][v]) for v in values} - {0})
    else:
        label = sitk.Image(images[0].GetSize(), sitk.sitkUInt8)
        label.CopyInformation(images[0])
        present = []
    digest = content_hashes(images)
    images = [reorient(img, job["orientation"]) for img in images]
    label = reorient(label, job["orientation"])
    for img, out in zip(images, job["out_images"]):
        write_image(img, out)
    write_image(label, job["out_label"])
    return {"case": job["case"], "hash": digest, "present": present}


# ----------------------------------------------------------------------------------------- driver
def merge(spec_path: str, root: Optional[str] = None, overwrite: bool = False, num_processes: int = 1,
          duplicates: Optional[str] = None, allow_mixed_channels: Optional[bool] = None,
          tolerance: Optional[float] = None) -> str:
    from dataset_conversion.common import resolve_output_root

    spec = load_spec(spec_path)
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
        dj = {"labels": labels, ANNOTATED_KEY: annotated}
        pa = PartialAnnotations.from_dataset_json(dj, annotated.keys(), source="merged dataset")
        for j, r in kept:
            pa.check_present_labels(j["case"], r["present"], where=f" (from {j['name']})")
        write_dataset_json(
            tmp, plan["channel_names"], labels, len(kept), spec["dataset_name"],
            spec.get("description", "partial-label dataset merged by nnunet-partial from: " +
                     ", ".join(p["name"] for p in plan["plans"])),
            **{ANNOTATED_KEY: annotated, PROVENANCE_KEY: provenance,
               "merge_spec": json.loads(json.dumps(spec, default=str)), "orientation": plan["orientation"]})
    n_unl = sum(1 for a in annotated.values() if not a)
    print(f"merged {len(kept)} case(s) ({n_unl} unlabelled, {len(dropped)} duplicate(s) dropped) into {target.final}")
    for t in targets:
        print(f"  {t:>20s}: annotated on {sum(t in a for a in annotated.values())} case(s)")
    return target.final
