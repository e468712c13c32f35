"""Medical Segmentation Decathlon task folder -> nnU-Net v2 raw dataset.

Layout: ``TaskNN_Name/{imagesTr,labelsTr,imagesTs}/*.nii.gz`` and ``dataset.json`` (``modality``, ``labels``
as ``{"0": "background", "1": ...}``, ``training`` list of image/label pairs). Multi-modal tasks store
4D images (last axis = modality). The tarballs contain macOS ``._*`` AppleDouble files, skipped here.

Reuses nnU-Net's own ``split_4d_nifti`` (from ``nnunetv2.dataset_conversion.convert_MSD_dataset``) to write
the channel files of 4D images, but case by case into the temporary folder, after checking every case; a 3D
image is copied as ``split_4d_nifti`` copies it (without reading it a second time).
"""
from __future__ import annotations

import json
import os
import re
import shutil

import SimpleITK as sitk

from dataset_conversion.common import (AtomicDataset, ConversionError, DEFAULT_TOLERANCE, Geometry, as_uint8_label,
                                       check_complete, check_geometry, check_label_values, check_source_safe,
                                       describe_folder, is_junk, present_values, read_header, read_image, run_cases,
                                       short_repr, shorten, summarize, write_dataset_json, write_image)

_TASK_RE = re.compile(r"^Task(\d+)_(.+)$")


def load_msd_json(src: str) -> dict:
    path = os.path.join(src, "dataset.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{src} is not a Decathlon task folder: no dataset.json; {describe_folder(src)}")
    try:
        with open(path) as f:
            dj = json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path} cannot be read as JSON: {e}") from None
    if "channel_names" in dj and "modality" not in dj:
        raise ConversionError(f"{src} is already an nnU-Net v2 raw dataset (its dataset.json has 'channel_names'); "
                              "use it directly in 'merge'")
    missing = [k for k in ("modality", "labels", "training") if k not in dj]
    if missing:
        raise ConversionError(f"{src} is not a Decathlon task folder: its dataset.json lacks {missing}; "
                              f"{describe_folder(src)}")
    return dj


def _case_id(path: str, src: str, what: str) -> str:
    base = os.path.basename(path)
    if not base.endswith(".nii.gz"):
        raise ConversionError(f"{what} {path} in {src}/dataset.json is not a .nii.gz file (Decathlon files are .nii.gz)")
    return base[:-7]


def convert_msd_case(job: dict) -> dict:
    from nnunetv2.dataset_conversion.convert_MSD_dataset import split_4d_nifti

    name, image, nch = job["name"], job["image"], job["channels"]
    geo = Geometry.of(read_header(image, name, "image"))
    if geo.dim == 4 and geo.size[3] != nch:
        raise ConversionError(f"case '{name}': image {image} has {geo.size[3]} channels (4th axis) but dataset.json "
                              f"lists {nch} modalities")
    if geo.dim == 3 and nch != 1:
        raise ConversionError(f"case '{name}': image {image} is 3D but dataset.json lists {nch} modalities "
                              "(expected a 4D image)")
    if geo.dim not in (3, 4):
        raise ConversionError(f"case '{name}': image {image} is {geo.dim}D; expected 3D or 4D")
    check_complete(image, name, "image")  # a short or damaged file must fail here, not in nnU-Net
    result = {"case": job["case"], "values": None, "bytes": os.path.getsize(image)}
    if job.get("label"):
        seg = read_image(job["label"], name, "label")
        seg_geo = Geometry.of(seg)
        check_geometry(geo.spatial(), seg_geo, name, image, job["label"], job["tolerance"])
        values = present_values(sitk.GetArrayViewFromImage(seg), name, job["label"], image)
        check_label_values(values, job["defined"], name, job["label"], job["dataset"], image=image)
        if seg.GetPixelID() == sitk.sitkUInt8 and seg_geo == geo.spatial():
            shutil.copyfile(job["label"], job["out_label"])  # what nnU-Net's converter does
        else:
            write_image(as_uint8_label(seg, geo.spatial()), job["out_label"])
        result["values"] = values
        result["bytes"] += os.path.getsize(job["label"])
    if geo.dim == 3:
        shutil.copyfile(image, os.path.join(job["out_dir"], job["case"] + "_0000.nii.gz"))
        return result
    try:
        split_4d_nifti(image, job["out_dir"])
    except RuntimeError as e:
        raise ConversionError(f"case '{name}': image file {image} cannot be split into channels: "
                              f"{str(e).strip().splitlines()[-1]}") from None
    return result


def convert_msd(src: str, dataset_id: int = None, name: str = None, root: str = None, overwrite: bool = False,
                num_processes: int = 1, tolerance: float = DEFAULT_TOLERANCE) -> str:
    src = os.path.abspath(src.rstrip("/\\"))
    if not os.path.isdir(src):
        raise ConversionError(f"Decathlon source {src} is not a folder")
    dj = load_msd_json(src)
    m = _TASK_RE.match(os.path.basename(src))
    if dataset_id is None:
        if not m:
            raise ConversionError(f"cannot infer a dataset id from the folder name {os.path.basename(src)!r} "
                                  "(expected TaskNN_Name); pass -d ID")
        dataset_id = int(m.group(1))
    if name is None:
        name = m.group(2) if m else os.path.basename(src)
    if not os.path.isdir(os.path.join(src, "imagesTr")):
        raise ConversionError(f"{src} is not a Decathlon task folder: imagesTr is missing; {describe_folder(src)}")

    try:
        channel_names = {str(int(k)): str(v) for k, v in dj["modality"].items()}
        labels = {str(v): int(k) for k, v in dj["labels"].items()}
    except (AttributeError, TypeError, ValueError):
        raise ConversionError(f"{src}/dataset.json: 'modality' and 'labels' must map numbers to names") from None
    if len(labels) != len(dj["labels"]) or labels.get("background", 0) != 0 or 0 not in labels.values():
        raise ConversionError(f"{src}/dataset.json: labels {short_repr(dj['labels'])} must be unique names with "
                              "0 = background")
    if sorted(labels.values()) != list(range(len(labels))):
        raise ConversionError(f"{src}/dataset.json: label values {shorten(sorted(labels.values()), 12)} are not "
                              "consecutive 0..K")
    labels = dict(sorted(labels.items(), key=lambda kv: kv[1]))
    dataset = f"MSD {os.path.basename(src)}"

    train, seen = [], set()
    for entry in dj["training"]:
        try:
            img_rel, lab_rel = entry["image"], entry["label"]
        except (TypeError, KeyError):
            raise ConversionError(f"{src}/dataset.json: training entry {short_repr(entry)} lacks "
                                  "'image'/'label'") from None
        case = _case_id(img_rel, src, "training image")
        if case in seen:
            raise ConversionError(f"case '{case}': listed twice in {src}/dataset.json")
        seen.add(case)
        train.append({"case": case, "name": case, "image": os.path.normpath(os.path.join(src, img_rel)),
                      "label": os.path.normpath(os.path.join(src, lab_rel))})
    if not train:
        raise ConversionError(f"{src}/dataset.json lists no training case")
    missing = [(c["case"], what, c[what]) for c in train for what in ("image", "label") if not os.path.exists(c[what])]
    if missing:  # a partial download: name the first and count them, before any case is converted
        case, what, path = missing[0]
        more = (f"; {len(missing)} files listed in dataset.json are missing: "
                f"{shorten(os.path.relpath(p, src) for _, _, p in missing)}" if len(missing) > 1 else "")
        raise ConversionError(f"case '{case}': {what} file {path} is missing{more}")
    ts_dir = os.path.join(src, "imagesTs")
    test = []
    if os.path.isdir(ts_dir):
        for f in sorted(os.listdir(ts_dir)):
            if not is_junk(f) and f.endswith(".nii.gz"):
                test.append({"case": f[:-7], "name": f[:-7], "image": os.path.join(ts_dir, f), "label": None})

    target = AtomicDataset(root, dataset_id, name, overwrite)
    check_source_safe(src, target)
    defined = {v: k for k, v in labels.items()}
    with target as tmp:
        for sub in ("imagesTr", "labelsTr") + (("imagesTs",) if test else ()):
            os.makedirs(os.path.join(tmp, sub))
        jobs = [dict(c, channels=len(channel_names), defined=defined, dataset=dataset, tolerance=tolerance,
                     out_dir=os.path.join(tmp, "imagesTr"), out_label=os.path.join(tmp, "labelsTr", c["case"] + ".nii.gz"))
                for c in train]
        jobs += [dict(c, channels=len(channel_names), tolerance=tolerance, out_dir=os.path.join(tmp, "imagesTs"))
                 for c in test]
        results = run_cases(convert_msd_case, jobs, num_processes, f"convert {dataset}")
        provenance = {c["case"]: {"source": dataset, "original_case": c["case"],
                                  "files": [os.path.relpath(c["image"], src), os.path.relpath(c["label"], src)]}
                      for c in train}
        extra = {k: dj[k] for k in ("reference", "licence", "release", "tensorImageSize") if k in dj}
        write_dataset_json(tmp, channel_names, labels, len(train), name,
                           f"{dj.get('description', dj.get('name', ''))} (Medical Segmentation Decathlon "
                           f"{os.path.basename(src)}, converted by nnunet-partial)",
                           source_folder=src, case_provenance=provenance,
                           **{f"msd_{k}": v for k, v in extra.items()})
    summarize(target.final, dataset, src, results, labels, len(train), len(test))
    return target.final
