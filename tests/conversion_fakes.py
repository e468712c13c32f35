"""Builders of small fake source trees with the layout, file names, label values and quirks of the public
releases (used by tests/test_conversion.py and scripts/benchmark_conversion.py).

- LiTS: ``Training Batch 1/volume-N.nii`` + ``segmentation-N.nii`` (uncompressed NIfTI), batch 2 from N=28,
  test release ``test-volume-N.nii``; flipped x/y direction; labels 0/1 liver/2 tumor.
- KiTS19: ``data/case_XXXXX/imaging.nii.gz`` + ``segmentation.nii.gz`` written with nibabel with the slice
  axis FIRST (numpy shape (slices, rows, cols)) and an affine like the real one
  ``[[0, 0, -sx, .], [0, -sy, 0, .], [-sz, 0, 0, .]]``; test cases >= 210 without segmentation.
- KiTS21: ``aggregated_MAJ_seg.nii.gz`` instead of ``segmentation.nii.gz``; KiTS23: ``segmentation.nii.gz``
  and an ``instances/`` folder; labels 0..3 (3 cyst).
- MSD: ``TaskNN_Name/{imagesTr,labelsTr,imagesTs}`` + MSD-style ``dataset.json``; 4D images for multi-modal
  tasks; macOS ``._*`` AppleDouble junk files everywhere (as in the tarballs).
- The real MR scan of ``../shared/data/totalseg_mr`` cut into LiTS-, KiTS19- and MSD-shaped sources.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import numpy as np
import SimpleITK as sitk

APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 4070

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MR_DIR = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "totalseg_mr")


def mr_available() -> bool:
    return all(os.path.isfile(os.path.join(MR_DIR, f)) for f in ("mr_image.nii.gz", "mr_labels.nii.gz"))


def junk(path: str) -> None:
    with open(path, "wb") as f:
        f.write(APPLEDOUBLE)


def sitk_image(arr: np.ndarray, spacing, origin, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in origin))
    img.SetDirection(tuple(float(d) for d in direction))
    return img


def synthetic_case(shape=(12, 24, 24), seed=0, tumor=True, cyst=False):
    """A CT-like int16 volume (z, y, x) with an organ ellipsoid (1), a tumour (2) and optionally a cyst (3)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    c = rng.uniform(-0.15, 0.15, 3)
    organ = ((z - c[0]) / 0.7) ** 2 + ((y - c[1]) / 0.6) ** 2 + ((x - c[2]) / 0.5) ** 2 < 1
    lab = organ.astype(np.uint8)
    if tumor:
        lab[organ & (((z - c[0]) ** 2 + (y - c[1] - 0.2) ** 2 + (x - c[2]) ** 2) < 0.08)] = 2
    if cyst:
        lab[organ & (((z - c[0]) ** 2 + (y - c[1] + 0.25) ** 2 + (x - c[2]) ** 2) < 0.04)] = 3
    img = rng.normal(-100, 30, shape) + 150 * (lab > 0) + 60 * (lab == 2)
    return img.astype(np.int16), lab


# ------------------------------------------------------------------------------------------------ LiTS
LITS_DIRECTION = (-1, 0, 0, 0, -1, 0, 0, 0, 1)


def write_lits_case(folder: str, n: int, img: sitk.Image, seg: sitk.Image, gz: bool = False) -> dict:
    os.makedirs(folder, exist_ok=True)
    ext = ".nii.gz" if gz else ".nii"
    vol, lab = os.path.join(folder, f"volume-{n}{ext}"), os.path.join(folder, f"segmentation-{n}{ext}")
    sitk.WriteImage(img, vol)
    sitk.WriteImage(seg, lab)
    return {"image": vol, "label": lab}


def make_lits_tree(root: str, numbers=(0, 1, 28), shape=(12, 24, 24), test_numbers=(0,), float_label_for=(1,)) -> dict:
    """LiTS release: N < 28 in 'Training Batch 1', the rest in 'Training Batch 2'. Returns {N: info}."""
    cases = {}
    for n in numbers:
        arr, lab = synthetic_case(shape, seed=100 + n)
        spacing, origin = (0.75 + 0.01 * n, 0.75 + 0.01 * n, 2.5), (150.0 - n, 170.0, -300.0 + n)
        img = sitk_image(arr, spacing, origin, LITS_DIRECTION)
        seg = sitk_image(lab.astype(np.float32) if n in float_label_for else lab, spacing, origin, LITS_DIRECTION)
        batch = "Training Batch 1" if n < 28 else "Training Batch 2"
        cases[n] = dict(write_lits_case(os.path.join(root, batch), n, img, seg), array=arr, labels=lab)
    if test_numbers:
        tdir = os.path.join(root, "Test Batch")
        os.makedirs(tdir, exist_ok=True)
        for n in test_numbers:
            arr, _ = synthetic_case(shape, seed=900 + n)
            sitk.WriteImage(sitk_image(arr, (0.8, 0.8, 2.0), (0, 0, 0), LITS_DIRECTION),
                            os.path.join(tdir, f"test-volume-{n}.nii"))
    with open(os.path.join(root, ".DS_Store"), "wb") as f:
        f.write(b"\x00\x00\x00\x01Bud1")
    return cases


# ------------------------------------------------------------------------------------------------ KiTS
def kits19_affine(shape_zyx, spacing_xyz, origin_lps) -> np.ndarray:
    """Affine (RAS) of a KiTS19-style file whose data is ``arr_zyx[::-1]`` (slice axis first, reversed) for a
    volume that SimpleITK would describe with identity direction, ``spacing_xyz`` and ``origin_lps``."""
    sx, sy, sz = spacing_xyz
    ox, oy, oz = origin_lps
    nz = shape_zyx[0]
    return np.array([[0, 0, -sx, -ox],
                     [0, -sy, 0, -oy],
                     [-sz, 0, 0, oz + sz * (nz - 1)],
                     [0, 0, 0, 1]], dtype=float)


def write_kits19_nifti(arr_zyx: np.ndarray, spacing_xyz, origin_lps, path: str) -> None:
    """Write like the KiTS19 release: nibabel data shape (slices, rows, cols), permuted affine."""
    import nibabel as nib

    aff = kits19_affine(arr_zyx.shape, spacing_xyz, origin_lps)
    img = nib.Nifti1Image(np.ascontiguousarray(arr_zyx[::-1]), aff)
    img.header.set_qform(aff, code=1)
    img.header.set_sform(aff, code=1)
    nib.save(img, path)


def make_kits_tree(root: str, version: int = 19, numbers=(0, 1, 2), shape=(10, 20, 24), test_numbers=()) -> dict:
    """``root/data/case_XXXXX``. KiTS19 files use the slice-first axis order; 21/23 are written with SimpleITK
    (axial, identity direction) and carry cyst labels."""
    cases = {}
    data = os.path.join(root, "data")
    for n in list(numbers) + list(test_numbers):
        arr, lab = synthetic_case(shape, seed=200 + n, cyst=version != 19)
        spacing, origin = (0.78 + 0.02 * n, 0.78 + 0.02 * n, 3.0), (-180.0 + n, -190.0, 50.0 + 3 * n)
        folder = os.path.join(data, f"case_{n:05d}")
        os.makedirs(folder, exist_ok=True)
        image = os.path.join(folder, "imaging.nii.gz")
        label_name = {19: "segmentation.nii.gz", 21: "aggregated_MAJ_seg.nii.gz", 23: "segmentation.nii.gz"}[version]
        label = os.path.join(folder, label_name)
        is_test = n in test_numbers
        if version == 19:
            write_kits19_nifti(arr, spacing, origin, image)
            if not is_test:
                write_kits19_nifti(lab, spacing, origin, label)
        else:
            sitk.WriteImage(sitk_image(arr, spacing, origin), image)
            sitk.WriteImage(sitk_image(lab, spacing, origin), label)
            if version == 21:  # the repository also holds the other aggregations and raw annotations
                sitk.WriteImage(sitk_image(lab, spacing, origin), os.path.join(folder, "aggregated_OR_seg.nii.gz"))
            if version == 23:
                os.makedirs(os.path.join(folder, "instances"), exist_ok=True)
        cases[n] = {"image": image, "label": None if is_test else label, "array": arr, "labels": lab,
                    "spacing": spacing, "origin": origin}
    if version != 19:
        with open(os.path.join(root, "kits.json"), "w") as f:
            json.dump([{"case_id": f"case_{n:05d}"} for n in numbers], f)
    return cases


# ------------------------------------------------------------------------------------------------ MSD
def make_msd_tree(root: str, task: str = "Task09_Spleen", modalities=None, labels=None, numbers=(1, 2, 3),
                  test_numbers=(4,), shape=(8, 16, 16), prefix: Optional[str] = None, arrays=None) -> dict:
    """A Decathlon task folder. More than one modality -> 4D images (x, y, z, modality) as in the release.

    ``arrays``: optional {N: (image_zyx, labels_zyx)} to use instead of synthetic data (3D tasks only).
    """
    import nibabel as nib

    modalities = modalities or {"0": "CT"}
    labels = labels or {"0": "background", "1": task.split("_", 1)[1].lower()}
    prefix = prefix or task.split("_", 1)[1].lower()
    folder = os.path.join(root, task)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    nmod, nlab = len(modalities), len(labels) - 1
    aff = np.diag([-1.5, -1.5, 2.0, 1.0])
    aff[:3, 3] = (120.0, 110.0, -40.0)
    cases = {}
    for n in list(numbers) + list(test_numbers):
        if arrays and n in arrays:
            arr, lab = arrays[n]
        else:
            arr, lab = synthetic_case(shape, seed=300 + n, tumor=nlab >= 2, cyst=nlab >= 3)
        sub = "imagesTs" if n in test_numbers else "imagesTr"
        base = f"{prefix}_{n:03d}.nii.gz"
        # nibabel axis order is (x, y, z[, modality]); arrays here are (z, y, x)
        if nmod > 1:
            chans = np.stack([arr.T + 10 * m for m in range(nmod)], axis=-1).astype(np.float32)
            img = nib.Nifti1Image(chans, aff)
        else:
            img = nib.Nifti1Image(arr.T.copy(), aff)
        nib.save(img, os.path.join(folder, sub, base))
        junk(os.path.join(folder, sub, "._" + base))
        info = {"image": os.path.join(folder, sub, base), "array": arr, "labels": lab, "case": base[:-7]}
        if n not in test_numbers:
            nib.save(nib.Nifti1Image(lab.T.astype(np.uint8), aff), os.path.join(folder, "labelsTr", base))
            junk(os.path.join(folder, "labelsTr", "._" + base))
            info["label"] = os.path.join(folder, "labelsTr", base)
        cases[n] = info
    dj = {
        "name": task.split("_", 1)[1], "description": f"fake {task}", "reference": "fake", "licence": "CC-BY-SA 4.0",
        "release": "1.0 04/05/2018", "tensorImageSize": "4D" if nmod > 1 else "3D",
        "modality": modalities, "labels": labels, "numTraining": len(numbers), "numTest": len(test_numbers),
        "training": [{"image": f"./imagesTr/{prefix}_{n:03d}.nii.gz", "label": f"./labelsTr/{prefix}_{n:03d}.nii.gz"}
                     for n in numbers],
        "test": [f"./imagesTs/{prefix}_{n:03d}.nii.gz" for n in test_numbers],
    }
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dj, f, indent=4)
    junk(os.path.join(folder, "._dataset.json"))
    return cases


# ------------------------------------------------------------------------------------------------ real MR scan
# index boxes (x0, x1, y0, y1) in the MR scan (117 x 91 x 20 voxels), every slice kept
MR_CROPS = {
    "lits_a": (0, 72, 8, 80),     # liver
    "lits_b": (2, 70, 10, 82),    # liver, shifted: a second LiTS case
    "kits": (20, 96, 40, 72),     # both kidneys
    "msd": (40, 90, 24, 60),      # pancreas
    "unlabelled": (30, 110, 0, 60),
}


def load_mr():
    img = sitk.ReadImage(os.path.join(MR_DIR, "mr_image.nii.gz"))
    lab = sitk.ReadImage(os.path.join(MR_DIR, "mr_labels.nii.gz"))
    return img, lab


def crop(img: sitk.Image, box) -> sitk.Image:
    x0, x1, y0, y1 = box
    return img[x0:x1, y0:y1, :]  # SimpleITK slicing keeps world coordinates (origin moves)


def make_mr_sources(root: str) -> dict:
    """Cut the real MR scan into a LiTS release (liver 5 -> 1, a fake tumour 2 inside the liver), a KiTS19
    release (kidneys 2,3 -> 1, a fake tumour 2 inside the left kidney; slice-first axis order), an MSD
    Task07_Pancreas (7 -> 1) and a folder of unlabelled scans. Returns the source folders."""
    img, lab = load_mr()
    out = {}
    # LiTS
    lits = os.path.join(root, "LiTS")
    for n, key in ((0, "lits_a"), (28, "lits_b")):
        im, lb = crop(img, MR_CROPS[key]), crop(lab, MR_CROPS[key])
        a = sitk.GetArrayFromImage(lb)
        seg = (a == 5).astype(np.uint8)
        zz = np.zeros_like(seg, dtype=bool)
        zz[8:11, 30:40, 20:32] = True
        seg[(seg == 1) & zz] = 2
        s = sitk.GetImageFromArray(seg)
        s.CopyInformation(im)
        write_lits_case(os.path.join(lits, "Training Batch 1" if n < 28 else "Training Batch 2"), n, im, s)
    out["lits"] = lits
    # KiTS19 (slice-first axis order, written with nibabel)
    kits = os.path.join(root, "kits19")
    im, lb = crop(img, MR_CROPS["kits"]), crop(lab, MR_CROPS["kits"])
    a = sitk.GetArrayFromImage(lb)
    seg = np.isin(a, (2, 3)).astype(np.uint8)
    tumor = np.zeros_like(seg, dtype=bool)
    tumor[4:8, :, 55:70] = True
    seg[(a == 3) & tumor] = 2
    folder = os.path.join(kits, "data", "case_00000")
    os.makedirs(folder)
    assert im.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    write_kits19_nifti(sitk.GetArrayFromImage(im), im.GetSpacing(), im.GetOrigin(), os.path.join(folder, "imaging.nii.gz"))
    write_kits19_nifti(seg, im.GetSpacing(), im.GetOrigin(), os.path.join(folder, "segmentation.nii.gz"))
    out["kits"] = kits
    # MSD Task07_Pancreas
    msd_root = os.path.join(root, "msd")
    im, lb = crop(img, MR_CROPS["msd"]), crop(lab, MR_CROPS["msd"])
    task = os.path.join(msd_root, "Task07_Pancreas")
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(task, sub))
    sitk.WriteImage(im, os.path.join(task, "imagesTr", "pancreas_001.nii.gz"))
    p = sitk.GetImageFromArray((sitk.GetArrayFromImage(lb) == 7).astype(np.uint8))
    p.CopyInformation(im)
    sitk.WriteImage(p, os.path.join(task, "labelsTr", "pancreas_001.nii.gz"))
    junk(os.path.join(task, "imagesTr", "._pancreas_001.nii.gz"))
    with open(os.path.join(task, "dataset.json"), "w") as f:
        json.dump({"name": "Pancreas", "description": "fake (cut from a real MR scan)", "tensorImageSize": "3D",
                   "modality": {"0": "CT"}, "labels": {"0": "background", "1": "pancreas", "2": "cancer"},
                   "numTraining": 1, "numTest": 0,
                   "training": [{"image": "./imagesTr/pancreas_001.nii.gz", "label": "./labelsTr/pancreas_001.nii.gz"}],
                   "test": []}, f, indent=4)
    out["msd"] = task
    # unlabelled scans
    unl = os.path.join(root, "unlabelled")
    os.makedirs(unl)
    sitk.WriteImage(crop(img, MR_CROPS["unlabelled"]), os.path.join(unl, "scan_a.nii.gz"))
    junk(os.path.join(unl, "._scan_a.nii.gz"))
    out["unlabelled"] = unl
    return out


# ------------------------------------------------------------------------------------------------ helpers
def snapshot(folder: str) -> dict:
    """{relative path: (size, mtime_ns, sha1)} of every file under folder (to prove sources stay untouched)."""
    snap = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            st = os.stat(p)
            with open(p, "rb") as fh:
                snap[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns, hashlib.sha1(fh.read()).hexdigest())
    return snap


def world_to_index_map(out: sitk.Image, ref: sitk.Image) -> np.ndarray:
    """For every voxel of ``out`` (numpy order z, y, x), the integer index (numpy order) of the voxel of ``ref``
    at the same world coordinate; raises AssertionError when a voxel centre of ``out`` is not a voxel centre of
    ``ref`` (no interpolation allowed)."""
    size = out.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in size], indexing="ij"), -1).reshape(-1, 3).astype(float)
    d_out = np.array(out.GetDirection()).reshape(3, 3)
    world = np.array(out.GetOrigin()) + (idx * np.array(out.GetSpacing())) @ d_out.T
    d_ref = np.array(ref.GetDirection()).reshape(3, 3)
    cont = ((world - np.array(ref.GetOrigin())) @ d_ref) / np.array(ref.GetSpacing())
    ref_idx = np.rint(cont)
    assert np.abs(cont - ref_idx).max() < 1e-3, "voxel centres moved (interpolation or wrong header)"
    ref_idx = ref_idx.astype(int)
    assert (ref_idx >= 0).all() and (ref_idx < np.array(ref.GetSize())).all(), "voxels outside the reference"
    # back to numpy order: out voxel (x,y,z) -> array position [z,y,x]
    res = np.empty(tuple(size[::-1]) + (3,), dtype=int)
    res[idx[:, 2].astype(int), idx[:, 1].astype(int), idx[:, 0].astype(int)] = ref_idx[:, ::-1]
    return res


def assert_same_world_values(out: sitk.Image, ref: sitk.Image, ref_values: Optional[np.ndarray] = None,
                             out_values: Optional[np.ndarray] = None) -> None:
    """Every voxel of ``out`` holds the value of ``ref`` at the same world coordinate (``ref_values`` /
    ``out_values`` override the arrays compared, e.g. a remapped label map)."""
    m = world_to_index_map(out, ref)
    rv = sitk.GetArrayFromImage(ref) if ref_values is None else ref_values
    ov = sitk.GetArrayFromImage(out) if out_values is None else out_values
    np.testing.assert_array_equal(ov, rv[m[..., 0], m[..., 1], m[..., 2]])
