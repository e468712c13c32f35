"""Weak labels (issue 12): bounding boxes in the metadata, through nnU-Net's preprocessing and augmentation,
restricting the MLDS self-/mean-taught pseudo labels; weak labels per source in ``nnunet-partial merge``.

Dataset ids 640-649 only."""
from __future__ import annotations

import copy
import json
import os
import re

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import conversion_fakes as cf
from nnunet_helpers import load_trainer, plan_and_preprocess

from nnunet_partial.annotations import PartialAnnotations, PartialLabelError, validate_raw_dataset
from nnunet_partial.losses.mlds import box_allowed, pseudo_label_targets
from nnunet_partial.trainers.mlds import (BoxChannel, BoxMaskDataset, nnUNetTrainerMLDSSelfTaught,
                                          preprocessed_box, split_box_channel)

LABELS = {"background": 0, "liver": 1, "spleen": 2}


def _dj(**extra) -> dict:
    return {"labels": LABELS, "annotated_labels": {"a": ["liver"], "b": [], "c": ["liver", "spleen"]}, **extra}


# ---------------------------------------------------------------------- metadata
def test_boxes_are_parsed_and_validated():
    pa = PartialAnnotations.from_dataset_json(_dj(boxes={"b": {"liver": [[0, 1, 2, 3, 4, 5]], "spleen": []},
                                                         "a": {"spleen": [[0, 0, 0, 1, 8, 8], [0, 1, 1, 1, 2, 2]]}}))
    assert pa.boxes == {"b": {1: ((0, 1, 2, 3, 4, 5),), 2: ()}, "a": {2: ((0, 0, 0, 1, 8, 8), (0, 1, 1, 1, 2, 2))}}
    assert pa.box_label_values() == (1, 2)
    restricted = pa.box_restricted()
    assert restricted.annotated == {"a": frozenset({2}), "b": frozenset({1, 2}), "c": frozenset()}
    pa.check_boxes_in_shape("b", (3, 4, 5))
    with pytest.raises(PartialLabelError, match=r"case 'b'.*\[0, 1, 2, 3, 4, 5\].*'liver'.*outside.*\[3, 4, 4\]"):
        pa.check_boxes_in_shape("b", (3, 4, 4))
    pa.check_boxes_in_shape("a", (8, 8))  # a 2D image is (1, y, x) for nnU-Net: z1 = 1 fits, z1 = 2 does not
    with pytest.raises(PartialLabelError, match="case 'a'"):
        PartialAnnotations.from_dataset_json(_dj(boxes={"a": {"spleen": [[0, 0, 0, 2, 8, 8]]}})).check_boxes_in_shape(
            "a", (8, 8))

    bad = [({"zz": {"liver": [[0, 0, 0, 1, 1, 1]]}}, r"names case 'zz'.*not a training case"),
           ({"a": {"kidney": [[0, 0, 0, 1, 1, 1]]}}, r"case 'a'.*unknown label 'kidney'.*\['liver', 'spleen'\]"),
           ({"a": {"background": [[0, 0, 0, 1, 1, 1]]}}, r"case 'a'.*'background'"),
           ({"a": {"liver": [[0, 0, 1, 1]]}}, r"case 'a', label 'liver'.*not 6 integers.*\[0, y0, x0, 1, y1, x1\]"),
           ({"a": {"liver": [[0, 0, 0, 1, 1, 1.5]]}}, r"not 6 integers"),
           ({"a": {"liver": [0, 0, 0, 1, 1, 1]}}, r"not 6 integers"),
           ({"a": {"liver": [[0, 5, 0, 1, 2, 1]]}}, r"case 'a', label 'liver'.*inverted.*0 <= lower < upper"),
           ({"a": {"liver": [[0, 0, 0, 1, 0, 1]]}}, r"inverted, empty"),
           ({"a": {"liver": [[-1, 0, 0, 1, 1, 1]]}}, r"negative"),
           ({"a": ["liver"]}, r"case 'a'.*map label names to lists of boxes"),
           (["a"], r"'boxes' must map case ids")]
    for boxes, message in bad:
        with pytest.raises(PartialLabelError, match=message):
            PartialAnnotations.from_dataset_json(_dj(boxes=boxes))
    # image-level labels and boxes must agree: a box of a label the image labels call absent
    with pytest.raises(PartialLabelError, match=r"case 'b' has boxes of 'spleen'.*image_labels"):
        PartialAnnotations.from_dataset_json(_dj(image_labels={"b": ["liver"]},
                                                 boxes={"b": {"spleen": [[0, 0, 0, 1, 1, 1]]}}))
    # ... an empty list (absent) agrees with them
    PartialAnnotations.from_dataset_json(_dj(image_labels={"b": ["liver"]}, boxes={"b": {"spleen": []}}))


# ---------------------------------------------------------------------- restriction of pseudo labels
def test_boxes_restrict_pseudo_labels_only_inside_and_combine_with_image_labels():
    """Case 0 (unlabelled): liver boxed on the left half, spleen without an entry. Case 1 (unlabelled): spleen
    boxed ([] for liver: absent). Case 2 (liver annotated): a spleen box; its manual liver stays."""
    shape = (4, 6)
    box_values = (1, 2)                           # bit 0 <-> liver, bit 1 <-> spleen
    channel = torch.zeros((3, *shape), dtype=torch.int16)
    channel[0, :, :3] = 1                         # liver box of case 0
    channel[1, 1:3, 1:5] = 2                      # spleen box of case 1
    channel[2, :2, :] = 2                         # spleen box of case 2
    restricted = torch.tensor([[False, True, False], [False, True, True], [False, False, True]])
    allowed = box_allowed(channel, restricted, box_values)
    assert allowed.shape == (3, 3, *shape) and allowed[:, 0].all()        # background never restricted
    assert torch.equal(allowed[0, 1], channel[0] == 1) and allowed[0, 2].all()
    assert not allowed[1, 1].any() and torch.equal(allowed[1, 2], channel[1] == 2)
    assert allowed[2, 1].all() and torch.equal(allowed[2, 2], channel[2] == 2)

    probabilities = torch.zeros((3, 3, *shape))
    probabilities[:, 1, :, :] = 1.0               # the network calls every voxel liver ...
    probabilities[:, 1, 3, :] = 0.0
    probabilities[:, 2, 3, :] = 1.0               # ... except the last row: spleen
    label_map = torch.zeros((3, 1, *shape), dtype=torch.int16)
    label_map[2, 0, 0, 0] = 1                     # a manual liver voxel of case 2, outside every liver box
    annotated = torch.tensor([[False, False, False], [False, False, False], [True, True, False]])
    target = pseudo_label_targets(probabilities, label_map, annotated, 0.5, allowed=allowed)
    free = pseudo_label_targets(probabilities, label_map, annotated, 0.5)
    # case 0: liver pseudo-foreground kept inside its box only, spleen (no entry) untouched
    assert torch.equal(target[0, 1], free[0, 1] * (channel[0] == 1)) and free[0, 1, :, 3:].any()
    assert torch.equal(target[0, 2], free[0, 2]) and target[0, 2].any()
    # case 1: liver absent ([]), spleen outside its box removed
    assert not target[1, 1].any() and free[1, 1].any()
    assert torch.equal(target[1, 2], free[1, 2] * (channel[1] == 2)) and not target[1, 2, 3, 0]
    # case 2: the manual liver voxel and the annotated liver channel are untouched, spleen outside its box removed
    assert target[2, 1, 0, 0] == 1 and torch.equal(target[2, 1], free[2, 1])
    assert not target[2, 2].any() and free[2, 2].any()  # the spleen row (3) lies outside the box (rows 0-1)
    # image-level labels combine: case 0 names spleen only -> its liver goes even inside the box
    possible = torch.tensor([[True, False, True], [True, True, True], [True, True, True]])
    both = pseudo_label_targets(probabilities, label_map, annotated, 0.5, possible, allowed)
    assert not both[0, 1].any() and torch.equal(both[1:], target[1:])


# ---------------------------------------------------------------------- the geometry
def test_preprocessed_box_follows_transpose_crop_and_resampling():
    # raw (z, y, x) = (10, 20, 30); transpose_forward [2, 0, 1]: transposed (x, z, y) = (30, 10, 20); crop
    # [[5, 25], [0, 10], [2, 18]] -> (20, 10, 16); resampled to (10, 10, 32)
    props = {"shape_before_cropping": (30, 10, 20), "bbox_used_for_cropping": [[5, 25], [0, 10], [2, 18]],
             "shape_after_cropping_and_before_resampling": (20, 10, 16)}
    from nnunet_partial.trainers.mlds import raw_shape_of
    assert raw_shape_of(props, (2, 0, 1)) == (10, 20, 30)
    box = (2, 4, 7, 5, 9, 12)                                    # z 2-5, y 4-9, x 7-12
    # x: 7-12 -> crop 2-7 -> x0.5 -> 1-3.5 -> floor/ceil 1-4; z: 2-5 unchanged; y: 4-9 -> 2-7 -> x2 -> 4-14
    assert preprocessed_box(box, props, (2, 0, 1), (10, 10, 32), margin=0) == ((1, 2, 4), (4, 5, 14))
    assert preprocessed_box(box, props, (2, 0, 1), (10, 10, 32)) == ((0, 1, 3), (5, 6, 15))
    assert preprocessed_box((0, 0, 0, 10, 20, 5), props, (2, 0, 1), (10, 10, 32)) is None  # in the cropped border
    # the lazy channel rasterises only the slice asked for, bits OR-ed where boxes overlap
    ch = BoxChannel((4, 5, 6), [(0, (0, 0, 0), (2, 5, 3)), (3, (1, 1, 1), (4, 3, 6))])
    full = np.asarray(ch)
    assert full.dtype == np.int16 and full[1, 1, 1] == 9 and full[0, 0, 0] == 1 and full[3, 2, 5] == 8
    assert full[3, 4, 0] == 0 and np.array_equal(ch[1:3, 2:5, 0:4], full[1:3, 2:5, 0:4])


# ---------------------------------------------------------------------- through real nnU-Net
SPACINGS_X = (2.0, 2.0, 2.5, 2.5, 2.5, 2.0, 2.0)  # sitk (x) spacing per case: median 2.5 / 2.0 -> resampling
RAW_SHAPE = (14, 24, 16)                           # numpy (z, y, x); x coarsest -> nnU-Net transposes


def _organ_boxes(seg: np.ndarray) -> dict:
    out = {}
    for name, v in (("liver", 1), ("spleen", 2)):
        idx = np.argwhere(seg == v)
        if len(idx):
            out[name] = [[*map(int, idx.min(0)), *map(int, idx.max(0) + 1)]]   # tight, upper exclusive
    return out


def write_box_dataset(raw_root: str, dataset_id: int = 640) -> tuple:
    """Dataset 640: 2 fully labelled, 1 liver-only, 4 unlabelled cases of (14, 24, 16) voxels (z, y, x) with a zero
    border (nnU-Net crops it), x spacing 2.0 / 2.5 (resampled, x transposed first); organs are boxes of random
    position. Boxes: tight around both organs on the labelled cases (to follow them), loose on 3 unlabelled
    ones, none on the last. Returns (folder, raw label maps by case)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_WeakBoxes")
    os.makedirs(os.path.join(folder, "imagesTr"))
    os.makedirs(os.path.join(folder, "labelsTr"))
    rng = np.random.default_rng(0)
    cases = ["full_001", "full_002", "liver_001", "unlabelled_001", "unlabelled_002", "unlabelled_003",
             "unlabelled_004"]
    annotated, boxes, segs = {}, {}, {}
    for i, case in enumerate(cases):
        seg = np.zeros(RAW_SHAPE, np.uint8)
        z, y, x = rng.integers(2, 5), rng.integers(3, 8), rng.integers(2, 5)
        seg[z:z + 5, y:y + 6, x:x + 4] = 1                                        # liver
        seg[z + 4:z + 8, y + 9:y + 13, x + 5:x + 8] = 2                           # spleen
        img = rng.normal(0, 0.2, RAW_SHAPE) + 1.0 + seg
        img[:1], img[-1:], img[:, :2], img[:, :, -1:] = 0, 0, 0, 0                # border nnU-Net crops away
        organs = {"full": ["liver", "spleen"], "liver": ["liver"], "unlabelled": []}[case.split("_")[0]]
        annotated[case] = organs
        stored = np.where(np.isin(seg, [LABELS[o] for o in organs]), seg, 0).astype(np.uint8)
        segs[case] = seg
        if case.startswith(("full", "liver")):
            boxes[case] = _organ_boxes(seg)
        elif case != "unlabelled_004":
            boxes[case] = {k: [[max(0, b[0] - 1), max(0, b[1] - 2), b[2], b[3] + 1, b[4] + 2, b[5]]]
                           for k, (b,) in _organ_boxes(seg).items()}
        for arr, path in ((img.astype(np.float32), f"imagesTr/{case}_0000.nii.gz"),
                          (stored, f"labelsTr/{case}.nii.gz")):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing((SPACINGS_X[i], 1.0, 1.0))
            sitk.WriteImage(im, os.path.join(folder, path))
    generate_dataset_json(folder, {0: "CT"}, LABELS, len(cases), ".nii.gz", dataset_name="WeakBoxes",
                          annotated_labels=annotated, boxes=boxes)
    return folder, segs


@pytest.fixture(scope="module")
def box_dataset(nnunet_env):
    folder, segs = write_box_dataset(nnunet_env["nnUNet_raw"])
    validate_raw_dataset(folder)     # nnunet-partial check's validation accepts the boxes
    plan_and_preprocess(640, ("3d_fullres",), env=nnunet_env)
    name = os.path.basename(folder)
    pre = os.path.join(nnunet_env["nnUNet_preprocessed"], name)
    with open(os.path.join(pre, "splits_final.json"), "w") as f:
        json.dump([{"train": ["full_001", "full_002", "liver_001", "unlabelled_001", "unlabelled_002",
                              "unlabelled_003", "unlabelled_004"], "val": ["full_001"]}] * 5, f)
    return name, folder, pre


def test_box_outside_the_image_is_refused_by_check(box_dataset, tmp_path):
    name, folder, _ = box_dataset
    with open(os.path.join(folder, "dataset.json")) as f:
        dj = json.load(f)
    import shutil
    copy_folder = str(tmp_path / name)
    shutil.copytree(folder, copy_folder)
    dj = copy.deepcopy(dj)
    dj["boxes"]["unlabelled_004"] = {"spleen": [[0, 0, 0, 14, 24, 17]]}   # x1 = 17 > 16
    with open(os.path.join(copy_folder, "dataset.json"), "w") as f:
        json.dump(dj, f)
    with pytest.raises(PartialLabelError, match=r"case 'unlabelled_004'.*outside the image of shape \[14, 24, 16\]"):
        validate_raw_dataset(copy_folder)
    # the trainer's check (before training), against the raw shape in nnU-Net's preprocessed properties
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    pre = box_dataset[2]
    data_folder = os.path.join(pre, "nnUNetPlans_3d_fullres")
    dataset = infer_dataset_class(data_folder)(data_folder)
    with open(os.path.join(pre, "nnUNetPlans.json")) as f:
        transpose = json.load(f)["transpose_forward"]
    with open(os.path.join(folder, "dataset.json")) as f:
        good = PartialAnnotations.from_dataset_json(json.load(f))
    assert BoxMaskDataset(dataset, good, transpose).box_values == (1, 2)
    with pytest.raises(PartialLabelError, match=r"case 'unlabelled_004' \(.*preprocessed.*\).*outside the image of "
                                                r"shape \[14, 24, 16\]"):
        BoxMaskDataset(dataset, PartialAnnotations.from_dataset_json(dj), transpose)


def test_box_around_an_organ_contains_it_after_preprocessing_and_augmentation(box_dataset):
    name, _, pre = box_dataset
    t = load_trainer(nnUNetTrainerMLDSSelfTaught, name, "3d_fullres", 0)
    transpose = tuple(t.plans_manager.transpose_forward)
    assert transpose != (0, 1, 2)                                   # the transpose is exercised
    # the wrapped training dataset: boxes mapped into the preprocessed arrays contain the organs there
    dl_train, _ = t.get_dataloaders()
    loader = dl_train.data_loader                    # nnUNet_n_proc_DA=0: nnU-Net's SingleThreadedAugmenter
    data = loader._data
    assert isinstance(data, BoxMaskDataset)
    resampled = 0
    for case in ("full_001", "full_002", "liver_001"):
        _, seg, channel, props = data.load_case(case)
        resampled += tuple(seg.shape[1:]) != tuple(props["shape_after_cropping_and_before_resampling"])
        assert tuple(props["bbox_used_for_cropping"][0]) != (0, RAW_SHAPE[transpose[0]])   # cropped
        bits = np.asarray(channel)
        for bit, value in ((0, 1), (1, 2)):
            organ = np.asarray(seg[0]) == value
            if organ.any():
                inside = (bits >> bit) & 1
                assert inside[organ].all(), (case, value)
                assert inside.mean() < 0.6                          # a box, not the whole image
    assert resampled >= 1                                           # the resampling is exercised

    # nnU-Net's training pipeline with rotation and scaling forced on: the box channel moves with the label map
    spatial = [tr for tr in loader.transforms.transforms if type(tr).__name__ == "SpatialTransform"]
    assert len(spatial) == 1
    spatial[0].p_rotation, spatial[0].p_scaling = 1.0, 1.0
    torch.manual_seed(0)
    np.random.seed(0)
    checked = 0
    for _ in range(6):
        batch = loader.generate_train_batch()
        target, box_channel = split_box_channel(batch["target"])
        assert box_channel is not None and target[0].shape[1] == 1
        for i, key in enumerate(batch["keys"]):
            label = target[0][i, 0]
            for bit, value in ((0, 1), (1, 2)):
                organ = label == value
                if organ.any() and value in t.annotations.boxes.get(key, {}):
                    assert ((box_channel[i] >> bit) & 1)[organ].all(), (key, value)
                    checked += 1
    assert checked >= 3

    # the pseudo labels of a real batch: no pseudo-foreground of a boxed class outside its boxes
    batch = loader.generate_train_batch()
    target, box_channel = split_box_channel(batch["target"])
    annotated = t.batch_annotated_mask(batch["keys"])
    allowed = t.batch_box_allowed(batch["keys"], box_channel)
    probabilities = torch.full((len(batch["keys"]), 3, *target[0].shape[2:]), 0.0)
    probabilities[:, 1] = 1.0                                          # "liver everywhere"
    pseudo = pseudo_label_targets(probabilities, target[0], annotated, t.pseudo_threshold,
                                  t.batch_possible_classes(batch["keys"]), allowed)
    for i, key in enumerate(batch["keys"]):
        if 1 in t.annotations.boxes.get(key, {}) and 1 not in t.annotations.annotated[key]:
            liver_box = ((box_channel[i] >> 0) & 1).bool()
            assert pseudo[i, 1][~liver_box].sum() == 0 and pseudo[i, 1][liver_box].all()
    # and a training step runs on it (the box channel is split off before every loss)
    out = t.train_step(batch)
    assert np.isfinite(out["loss"]) and np.isfinite(out["mlds_pseudo_loss"])


# ---------------------------------------------------------------------- merge: weak labels per source
def _write_source(root, dataset_id: int = 641) -> dict:
    """A labelled nnU-Net raw source (liver 1, tumour 2) stored with flipped x/y axes (merge reorients it to LPS),
    two cases; returns case -> label array (source voxel order)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    folder = os.path.join(root, f"Dataset{dataset_id:03d}_WeakSrc")
    os.makedirs(os.path.join(folder, "imagesTr"))
    os.makedirs(os.path.join(folder, "labelsTr"))
    labels = {}
    for n in range(2):
        arr, lab = cf.synthetic_case((8, 14, 12), seed=300 + n)
        for a, path in ((arr, f"imagesTr/src_{n:03d}_0000.nii.gz"), (lab, f"labelsTr/src_{n:03d}.nii.gz")):
            sitk.WriteImage(cf.sitk_image(a, (0.8, 0.8, 2.5), (10.0 * n, 5.0, -3.0), cf.LITS_DIRECTION),
                            os.path.join(folder, path))
        labels[f"src_{n:03d}"] = lab
    generate_dataset_json(folder, {0: "CT"}, {"background": 0, "liver": 1, "tumor": 2}, 2, ".nii.gz",
                          dataset_name="WeakSrc")
    return labels


def _bbox(mask: np.ndarray) -> list:
    idx = np.argwhere(mask)
    return [*map(int, idx.min(0)), *map(int, idx.max(0) + 1)]


def test_merge_writes_weak_labels_per_source_in_merged_ids_and_maps_boxes(tmp_path, capsys):
    from nnunet_partial.cli import main
    root = tmp_path / "raw"
    root.mkdir()
    src_labels = _write_source(str(root))
    scans = tmp_path / "scans"
    scans.mkdir()
    permuted = (0, 1, 0, -1, 0, 0, 0, 0, 1)            # x and y swapped and flipped: merge permutes the array
    scan, scan_lab = cf.synthetic_case((7, 10, 12), seed=5)
    sitk.WriteImage(cf.sitk_image(scan, (1.0, 1.5, 2.0), (0, 0, 0), permuted), str(scans / "scan_a.nii.gz"))
    sitk.WriteImage(cf.sitk_image(scan, (1.0, 1.5, 2.0), (0, 0, 0), permuted)[:, :, 1:], str(scans / "scan_b.nii.gz"))
    liver_box_src = _bbox(src_labels["src_001"] > 0)
    liver_box_scan = _bbox(scan_lab > 0)
    (tmp_path / "src_boxes.json").write_text(json.dumps({"src_001": {"liver": [liver_box_src], "spleen": []}}))
    (tmp_path / "scan_boxes.json").write_text(json.dumps({"scan_a": {"liver": [liver_box_scan]}}))
    (tmp_path / "scan_labels.csv").write_text("case,labels\nscan_a,liver\nscan_b,\n")
    (tmp_path / "src_classes.csv").write_text("case,class\nsrc_000,lesion\n")
    (tmp_path / "scan_classes.csv").write_text("case,class\nscan_b,no_lesion\n")
    spec = tmp_path / "merge.yaml"
    spec.write_text("""
dataset_id: 642
dataset_name: WeakMerged
labels: [liver, spleen]
sources:
  - {name: src, dataset: 641, labels: {liver: [liver, tumor]}, boxes: src_boxes.json, class_labels: src_classes.csv}
  - {name: unl, images: scans, image_labels: scan_labels.csv, boxes: scan_boxes.json}
""")
    rc = main(["merge", str(spec), "-o", str(root), "--class-labels", f"unl={tmp_path / 'scan_classes.csv'}"])
    assert rc == 0, capsys.readouterr().err
    out = root / "Dataset642_WeakMerged"
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["image_labels"] == {"unl_scan_a": ["liver"], "unl_scan_b": []}
    assert dj["class_names"] == ["lesion", "no_lesion"]
    assert dj["class_labels"] == {"src_000": "lesion", "unl_scan_b": "no_lesion"}
    assert set(dj["boxes"]) == {"src_001", "unl_scan_a"} and dj["boxes"]["src_001"]["spleen"] == []
    # the boxes were mapped through merge's reorientation: tight around the same voxels in the written files
    merged_lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / "src_001.nii.gz")))
    assert dj["boxes"]["src_001"]["liver"] == [_bbox(merged_lab == 1)] != [liver_box_src]
    merged_scan = sitk.ReadImage(str(out / "imagesTr" / "unl_scan_a_0000.nii.gz"))
    assert merged_scan.GetSize() != sitk.ReadImage(str(scans / "scan_a.nii.gz")).GetSize()   # axes permuted
    organ = sitk.GetArrayFromImage(merged_scan) > 0                    # the organ is bright (synthetic_case)
    z0, y0, x0, z1, y1, x1 = dj["boxes"]["unl_scan_a"]["liver"][0]
    inside = np.zeros_like(organ)
    inside[z0:z1, y0:y1, x0:x1] = True
    assert organ[inside].mean() > 0.5 and organ[~inside].mean() < 0.05
    # the merged dataset's metadata validates (annotations, boxes within the images, classes)
    pa = validate_raw_dataset(str(out))
    assert pa.boxes["src_001"][1] and pa.image_labels["unl_scan_b"] == frozenset()


@pytest.mark.parametrize("files, message", [
    ({"scan_labels.csv": "case,labels\nscan_zz,liver\n"}, r"scan_labels.csv names case 'scan_zz'.*did you mean 'scan_a'"),
    ({"scan_labels.csv": "case,labels\nscan_a,livr\n"}, r"line 2 \(case 'scan_a'\): unknown label 'livr'.*did you mean 'liver'"),
    ({"scan_labels.csv": "id,labels\nscan_a,liver\n"}, r"needs a header line with the columns case,labels"),
    ({"scan_labels.csv": "case,labels\nscan_a,liver\nscan_a,\n"}, r"line 3: case 'scan_a' is listed again"),
    ({"scan_boxes.json": '{"scan_a": {"liver": [[0, 0, 0, 8, 4, 4]]}}'}, r"case 'unl/scan_a': box \[0, 0, 0, 8, 4, 4\].*outside.*shape \[7,"),
    ({"scan_boxes.json": '{"scan_a": {"liver": [[0, 0, 4, 4]]}}'}, r"scan_boxes.json: case 'scan_a', label 'liver': expected a list of boxes"),
    ({"scan_boxes.json": '{"scan_a": {"liver": [[3, 0, 0, 2, 4, 4]]}}'}, r"inverted"),
])
def test_merge_refuses_bad_weak_labels_and_leaves_nothing(tmp_path, capsys, files, message):
    from nnunet_partial.cli import main
    root = tmp_path / "raw"
    root.mkdir()
    scans = tmp_path / "scans"
    scans.mkdir()
    scan, _ = cf.synthetic_case((7, 10, 12), seed=5)
    sitk.WriteImage(cf.sitk_image(scan, (1.0, 1.0, 2.0), (0, 0, 0)), str(scans / "scan_a.nii.gz"))
    keys = []
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        keys.append(f"{'image_labels' if name.endswith('.csv') else 'boxes'}: {name}")
    (tmp_path / "merge.yaml").write_text(f"""
dataset_id: 643
dataset_name: WeakBad
labels: [liver]
channel_names: {{"0": CT}}
sources:
  - {{name: unl, images: scans, {', '.join(keys)}}}
""")
    before = set(os.listdir(root))
    rc = main(["merge", str(tmp_path / "merge.yaml"), "-o", str(root)])
    err = capsys.readouterr().err
    assert rc != 0 and re.search(message, err), err
    assert set(os.listdir(root)) == before      # atomic: no dataset, no temporary folder left


# ---------------------------------------------------------------------- benchmark scenario (smoke test only)
def test_label_efficiency_scenarios_write_weak_labels(tmp_path):
    from nnunet_partial.synthetic import SCENARIOS, make_phantom
    shape = (8, 24, 24)
    for key, weak in (("label-efficiency", None), ("label-efficiency-image-labels", "image_labels"),
                      ("label-efficiency-boxes", "boxes")):
        scenario = SCENARIOS[key](n_labelled=1, n_unlabelled=2)
        assert scenario.name == key and set(scenario.datasets) == {"partial", "labelled", "oracle"}
        assert scenario.dataset_for("nnUNetTrainerPartial") == "labelled"
        assert scenario.dataset_for("nnUNetTrainerMLDSMeanTaught") == "partial"
        spec = scenario.datasets["partial"]
        folder = spec.writer(str(tmp_path / key), 644, name="Weak", seed=3, shape=shape, **spec.kwargs)
        assert not [f for f in os.listdir(tmp_path / key) if f.startswith(".tmp")]
        with open(os.path.join(folder, "dataset.json")) as f:
            dj = json.load(f)
        cases = list(dj["annotated_labels"])
        assert cases == ["full_001", "unlabelled_001", "unlabelled_002"]
        pa = PartialAnnotations.from_dataset_json(dj, cases)
        assert ("image_labels" in dj) == (weak == "image_labels") and ("boxes" in dj) == (weak == "boxes")
        for i, case in enumerate(cases[1:], start=1):
            full = make_phantom(3 * 100003 + i, shape)[1]       # the phantom of the unlabelled case
            stored = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, "labelsTr", f"{case}.nii.gz")))
            assert not stored.any()
            if weak == "image_labels":
                assert pa.image_labels[case] == frozenset(int(v) for v in np.unique(full) if v)
            if weak == "boxes":
                pa.check_boxes_in_shape(case, shape)
                for value in range(1, 5):
                    inside = np.zeros(shape, bool)
                    for z0, y0, x0, z1, y1, x1 in pa.boxes[case].get(value, ()):
                        inside[z0:z1, y0:y1, x0:x1] = True
                    assert inside[full == value].all() and (not (full == value).any() or inside.mean() < 0.5)


def test_absent_anatomy_removes_organs_only_and_image_labels_name_what_is_left(tmp_path):
    """Image-level labels can act only where organs may be missing; the "absent" anatomy is the default phantom
    with some organs removed (every other draw equal), and the labelled cases of the scenario keep all organs."""
    from nnunet_partial.synthetic import LABELS, ORGANS, SCENARIOS, absent_organs, make_phantom
    shape = (8, 24, 24)
    missing = {s: absent_organs(s, "absent") for s in range(40)}
    assert all(absent_organs(s) == () for s in range(40))                 # other anatomies: nothing missing
    assert all("liver" not in m for m in missing.values()) and len({m for m in missing.values()}) > 3
    for organ in ORGANS[1:]:
        assert 5 <= sum(organ in m for m in missing.values()) <= 22       # about a third of 40
    seed = next(s for s, m in missing.items() if len(m) >= 2)
    image, label = make_phantom(seed, shape, "absent")
    image0, label0 = make_phantom(seed, shape)
    gone = np.isin(label0, [LABELS[o] for o in missing[seed]])
    assert gone.any() and not np.isin(label, [LABELS[o] for o in missing[seed]]).any()
    assert np.array_equal(label[~gone], label0[~gone]) and np.array_equal(image[~gone], image0[~gone])
    assert np.array_equal(make_phantom(seed, shape, "absent", complete=True)[1], label0)

    scenario = SCENARIOS["label-efficiency-image-labels"](n_labelled=2, n_unlabelled=6, anatomy="absent")
    assert scenario.anatomy == "absent" and "missing" in scenario.description
    spec = scenario.datasets["partial"]
    folder = spec.writer(str(tmp_path), 645, name="Absent", seed=0, shape=shape, **spec.kwargs)
    with open(os.path.join(folder, "dataset.json")) as f:
        dj = json.load(f)
    cases = list(dj["annotated_labels"])
    for i, case in enumerate(cases):
        full = make_phantom(i, shape, "absent", complete=i < 2)[1]    # seed 0: phantom i
        if i < 2:
            assert set(np.unique(full)) == {0, 1, 2, 3, 4}
            stored = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, "labelsTr", f"{case}.nii.gz")))
            assert np.array_equal(stored, full)
        else:
            assert sorted(dj["image_labels"][case]) == sorted(o for o in ORGANS if LABELS[o] in full)
    assert any(len(v) < 4 for v in dj["image_labels"].values())          # some image labels rule organs out
    # the oracle has the same images: labelled cases complete, the others with their organs missing
    oracle = scenario.datasets["oracle"]
    assert dict(oracle.kwargs)["n_complete"] == 2 and dict(oracle.kwargs)["anatomy"] == "absent"
    # and the default scenario's arguments are unchanged (the suite identifies finished runs by them)
    assert "anatomy" not in SCENARIOS["label-efficiency-image-labels"]().datasets["partial"].kwargs
