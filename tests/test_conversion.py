"""Dataset conversion (issue #3): LiTS / KiTS19/21/23 / MSD -> nnU-Net raw, and merge into one partial-label
dataset. Drives the real command line (``nnunet_partial.cli.main`` in-process, and once as a subprocess) on
fake release trees (tests/conversion_fakes.py) and on the real MR scan of ../shared/data/totalseg_mr."""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conversion_fakes as cf  # noqa: E402

from nnunet_partial.cli import main  # noqa: E402
from nnunet_partial.commands.env import ext_trainer_value  # noqa: E402

REPO = cf.REPO_ROOT


# ------------------------------------------------------------------------------------------------ helpers
def cli(capsys, *argv) -> tuple[int, str]:
    """Run ``nnunet-partial argv`` in-process; return (exit code, stderr)."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(lines) == 1, err
    return lines[0]


def read(path):
    return sitk.ReadImage(str(path))


def arr(path):
    return sitk.GetArrayFromImage(read(path))


def geometry(img):
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def assert_clean(root, before_entries, sources=()):
    """Nothing half-written: no new dataset, no temp/trash folder; the sources are untouched."""
    after = set(os.listdir(root)) if os.path.isdir(root) else set()
    assert after == before_entries, f"leftovers: {sorted(after ^ before_entries)}"
    for folder, snap in sources:
        assert cf.snapshot(folder) == snap, f"source {folder} was modified"


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "nnUNet_raw"
    r.mkdir()
    return r


# ------------------------------------------------------------------------------------------------ convert
def test_convert_lits_batches_voxel_exact(tmp_path, root, capsys):
    src = tmp_path / "LiTS"
    cases = cf.make_lits_tree(str(src), numbers=(0, 1, 28), test_numbers=(3,), float_label_for=(1,))
    snap = cf.snapshot(src)
    rc, err = cli(capsys, "convert", "lits", src, "-d", 501, "-o", root, "-np", 1)
    assert rc == 0, err
    out = root / "Dataset501_LiTS"
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "liver": 1, "tumor": 2}
    assert dj["channel_names"] == {"0": "CT"} and dj["numTraining"] == 3 and dj["file_ending"] == ".nii.gz"
    assert dj["overwrite_image_reader_writer"] == "SimpleITKIO"
    assert dj["case_provenance"]["lits_0028"]["original_case"] == "volume-28"
    assert dj["case_provenance"]["lits_0028"]["files"][0] == "Training Batch 2/volume-28.nii"
    assert sorted(os.listdir(out / "imagesTr")) == ["lits_0000_0000.nii.gz", "lits_0001_0000.nii.gz",
                                                    "lits_0028_0000.nii.gz"]
    assert os.listdir(out / "imagesTs") == ["lits_test_0003_0000.nii.gz"]
    for n, info in cases.items():
        img, seg = read(out / "imagesTr" / f"lits_{n:04d}_0000.nii.gz"), read(out / "labelsTr" / f"lits_{n:04d}.nii.gz")
        src_img = read(info["image"])
        assert geometry(img) == geometry(src_img) == geometry(seg)
        assert img.GetPixelID() == src_img.GetPixelID() and seg.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), info["array"])
        np.testing.assert_array_equal(sitk.GetArrayFromImage(seg), info["labels"])
    assert cf.snapshot(src) == snap
    assert sorted(os.listdir(root)) == ["Dataset501_LiTS"]


def test_convert_kits19_keeps_world_coordinates(tmp_path, root, capsys):
    """KiTS19 stores the slice axis first (nibabel shape (slices, rows, cols)) with a permuted affine."""
    import nibabel as nib

    src = tmp_path / "kits19"
    cases = cf.make_kits_tree(str(src), 19, numbers=(0, 1), test_numbers=(210,))
    src_nib = nib.load(cases[0]["image"])
    assert src_nib.shape[0] == cases[0]["array"].shape[0]  # slice axis first, like the real files
    assert np.allclose(src_nib.affine[:3, :3], [[0, 0, -0.78], [0, -0.78, 0], [-3, 0, 0]])
    rc, err = cli(capsys, "convert", "kits", src, "-d", 502, "--version", 19, "-o", root)
    assert rc == 0, err
    out = root / "Dataset502_KiTS19"
    assert os.listdir(out / "imagesTs") == ["case_00210_0000.nii.gz"]
    for n in (0, 1):
        o_img = read(out / "imagesTr" / f"case_{n:05d}_0000.nii.gz")
        o_seg = read(out / "labelsTr" / f"case_{n:05d}.nii.gz")
        s_img, s_seg = read(cases[n]["image"]), read(cases[n]["label"])
        assert geometry(o_img) == geometry(s_img) == geometry(o_seg)
        # physically identical: every voxel holds the source's value at the same world coordinate ...
        cf.assert_same_world_values(o_img, s_img)
        cf.assert_same_world_values(o_seg, s_seg)
        # ... and the same as the synthetic (z, y, x) volume it was made from (identity direction)
        ref = cf.sitk_image(cases[n]["array"], cases[n]["spacing"], cases[n]["origin"])
        cf.assert_same_world_values(o_img, ref)
        cf.assert_same_world_values(o_seg, cf.sitk_image(cases[n]["labels"], cases[n]["spacing"], cases[n]["origin"]))
        # nibabel agrees: same affine and data as the source file
        o_nib, s_nib = nib.load(str(out / "imagesTr" / f"case_{n:05d}_0000.nii.gz")), nib.load(cases[n]["image"])
        np.testing.assert_allclose(o_nib.affine, s_nib.affine, atol=1e-4)
        np.testing.assert_array_equal(np.asanyarray(o_nib.dataobj), np.asanyarray(s_nib.dataobj))


@pytest.mark.parametrize("version", [21, 23])
def test_convert_kits21_23(tmp_path, root, capsys, version):
    src = tmp_path / f"kits{version}"
    cases = cf.make_kits_tree(str(src), version, numbers=(0, 3))
    rc, err = cli(capsys, "convert", "kits", src, "-d", 500 + version, "--version", version, "-o", root, "-np", 2)
    assert rc == 0, err
    out = root / f"Dataset{500 + version}_KiTS{version}"
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}
    expected_label = "aggregated_MAJ_seg.nii.gz" if version == 21 else "segmentation.nii.gz"
    assert dj["case_provenance"]["case_00003"]["files"][1] == f"data/case_00003/{expected_label}"
    for n in (0, 3):
        np.testing.assert_array_equal(arr(out / "labelsTr" / f"case_{n:05d}.nii.gz"), cases[n]["labels"])
        assert 3 in np.unique(arr(out / "labelsTr" / f"case_{n:05d}.nii.gz"))


def test_convert_msd_4d_multimodal_and_junk(tmp_path, root, capsys):
    import nibabel as nib

    mods = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    labels = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
    cases = cf.make_msd_tree(str(tmp_path), "Task01_BrainTumour", mods, labels, prefix="BRATS", numbers=(1, 2),
                             test_numbers=(5,))
    src = tmp_path / "Task01_BrainTumour"
    snap = cf.snapshot(src)
    rc, err = cli(capsys, "convert", "msd", src, "-o", root, "-np", 2)  # id 1 from the folder name
    assert rc == 0, err
    out = root / "Dataset001_BrainTumour"
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["channel_names"] == mods
    assert dj["labels"] == {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}
    assert not any(f.startswith("._") for sub in ("imagesTr", "labelsTr", "imagesTs") for f in os.listdir(out / sub))
    assert len(os.listdir(out / "imagesTs")) == 4
    for n in (1, 2):
        src4d = nib.load(cases[n]["image"])
        seg = read(out / "labelsTr" / f"BRATS_{n:03d}.nii.gz")
        np.testing.assert_array_equal(sitk.GetArrayFromImage(seg), cases[n]["labels"])
        for c in range(4):
            ch = read(out / "imagesTr" / f"BRATS_{n:03d}_{c:04d}.nii.gz")
            assert geometry(ch) == geometry(seg)
            np.testing.assert_array_equal(sitk.GetArrayFromImage(ch), np.asanyarray(src4d.dataobj)[..., c].T)
            cf.assert_same_world_values(ch, read(cases[n]["label"]), ref_values=cases[n]["array"] + 10 * c)
    assert cf.snapshot(src) == snap


def test_tolerance_and_overwrite(tmp_path, root, capsys):
    src = tmp_path / "LiTS"
    cases = cf.make_lits_tree(str(src), numbers=(0, 1), test_numbers=())
    seg = read(cases[1]["label"])
    seg.SetOrigin(tuple(o + 1e-4 for o in seg.GetOrigin()))  # header noise well inside the tolerance
    sitk.WriteImage(seg, cases[1]["label"])
    assert cli(capsys, "convert", "lits", src, "-d", 7, "-o", root)[0] == 0
    out = root / "Dataset007_LiTS"
    img, lab = read(out / "imagesTr" / "lits_0001_0000.nii.gz"), read(out / "labelsTr" / "lits_0001.nii.gz")
    assert geometry(lab) == geometry(img)  # the label gets exactly the image's header
    # a second run needs --overwrite; with it the dataset is replaced (new name allowed) and nothing is left over
    rc, err = cli(capsys, "convert", "lits", src, "-d", 7, "-o", root)
    assert rc == 2 and "already exists" in error_line(err)
    rc, err = cli(capsys, "convert", "lits", src, "-d", 7, "-n", "LiTSv2", "-o", root, "--overwrite")
    assert rc == 0, err
    assert sorted(os.listdir(root)) == ["Dataset007_LiTSv2"]


# ------------------------------------------------------------------------------------------------ merge
def _convert_synthetic_sources(tmp_path, root, capsys):
    lits = cf.make_lits_tree(str(tmp_path / "LiTS"), numbers=(0, 1), test_numbers=())
    kits = cf.make_kits_tree(str(tmp_path / "kits19"), 19, numbers=(0, 1))
    spleen = cf.make_msd_tree(str(tmp_path), "Task09_Spleen", numbers=(1, 2), test_numbers=())
    unl = tmp_path / "scans"
    unl.mkdir()
    for i in range(2):
        a, _ = cf.synthetic_case((9, 20, 20), seed=700 + i)
        sitk.WriteImage(cf.sitk_image(a, (1, 1, 2), (0, 0, 0)), str(unl / f"scan{i}.nii.gz"))
    cf.junk(str(unl / "._scan0.nii.gz"))
    (unl / "notes.txt").write_text("not an image")
    assert cli(capsys, "convert", "lits", tmp_path / "LiTS", "-d", 501, "-o", root)[0] == 0
    assert cli(capsys, "convert", "kits", tmp_path / "kits19", "-d", 502, "--version", 19, "-o", root)[0] == 0
    assert cli(capsys, "convert", "msd", tmp_path / "Task09_Spleen", "-d", 509, "-o", root)[0] == 0
    return lits, kits, spleen


def test_merge_yaml_labels_provenance_world(tmp_path, root, capsys):
    lits, kits, spleen = _convert_synthetic_sources(tmp_path, root, capsys)
    spec = tmp_path / "merge.yaml"
    spec.write_text("""
dataset_id: 510
dataset_name: Abdomen
labels: [liver, kidney, spleen]
sources:
  - name: lits
    dataset: 501
    labels: {liver: [liver, tumor]}        # liver <- LiTS liver + tumour
  - name: kits
    dataset: Dataset502_KiTS19
    labels: {kidney: [kidney, tumor]}
  - name: spleen
    dataset: nnUNet_raw/Dataset509_Spleen  # a path, relative to this file
    labels: {spleen: spleen}
  - name: unl
    images: scans
""")
    before = {s: cf.snapshot(root / s) for s in os.listdir(root)}
    rc, err = cli(capsys, "merge", spec, "-o", root, "-np", 2)
    assert rc == 0, err
    out = root / "Dataset510_Abdomen"
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}
    assert dj["overwrite_image_reader_writer"] == "SimpleITKIO" and dj["file_ending"] == ".nii.gz"
    assert dj["annotated_labels"] == {
        "lits_0000": ["liver"], "lits_0001": ["liver"], "kits_case_00000": ["kidney"], "kits_case_00001": ["kidney"],
        "spleen_001": ["spleen"], "spleen_002": ["spleen"], "unl_scan0": [], "unl_scan1": []}
    assert dj["numTraining"] == 8
    prov = dj["case_provenance"]
    assert prov["kits_case_00001"]["source"] == "Dataset502_KiTS19"
    assert prov["kits_case_00001"]["original_case"] == "case_00001"
    assert prov["kits_case_00001"]["upstream"]["original_case"] == "case_00001"
    assert prov["lits_0001"]["upstream"]["original_case"] == "volume-1"
    assert prov["unl_scan1"]["original_case"] == "scan1"
    # every image is the source's voxels at the same world coordinates (reoriented to LPS, no interpolation)
    checks = [("lits_0000", lits[0], {0: 0, 1: 1, 2: 1}), ("kits_case_00001", kits[1], {0: 0, 1: 2, 2: 2}),
              ("spleen_002", spleen[2], {0: 0, 1: 3})]
    for cid, info, lut in checks:
        img, lab = read(out / "imagesTr" / f"{cid}_0000.nii.gz"), read(out / "labelsTr" / f"{cid}.nii.gz")
        assert geometry(img) == geometry(lab)
        assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection()) == "LPS"
        src_img, src_lab = read(info["image"]), read(info["label"])
        cf.assert_same_world_values(img, src_img)
        remapped = np.vectorize(lut.get)(sitk.GetArrayFromImage(src_lab))
        cf.assert_same_world_values(lab, src_lab, ref_values=remapped)
    # unlabelled: all-zero label map with the image's geometry
    img, lab = read(out / "imagesTr" / "unl_scan0_0000.nii.gz"), read(out / "labelsTr" / "unl_scan0.nii.gz")
    assert geometry(img) == geometry(lab) and not sitk.GetArrayFromImage(lab).any()
    # nnunet-partial check (annotated_labels vs label files + nnU-Net's integrity check) accepts it
    rc, err = cli(capsys, "check", out, "-np", 1)
    assert rc == 0, err
    for s, snap in before.items():
        assert cf.snapshot(root / s) == snap


def test_merge_json_tumours_as_own_targets_keep_orientation(tmp_path, root, capsys):
    lits, kits, _ = _convert_synthetic_sources(tmp_path, root, capsys)
    spec = tmp_path / "merge.json"
    spec.write_text(json.dumps({
        "dataset_id": 511, "dataset_name": "LiverKidneyTumours", "orientation": None,
        "labels": ["liver", "liver_tumor", "kidney", "kidney_tumor"],
        "sources": [{"name": "lits", "dataset": 501, "labels": {"liver": ["liver"], "liver_tumor": [2]}},
                    {"name": "kits", "dataset": 502, "labels": {"kidney": "kidney", "kidney_tumor": "tumor"}}]}))
    rc, err = cli(capsys, "merge", spec, "-o", root)
    assert rc == 0, err
    out = root / "Dataset511_LiverKidneyTumours"
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["annotated_labels"]["lits_0001"] == ["liver", "liver_tumor"]
    assert dj["annotated_labels"]["kits_case_00000"] == ["kidney", "kidney_tumor"]
    np.testing.assert_array_equal(arr(out / "labelsTr" / "lits_0001.nii.gz"), lits[1]["labels"])  # 1->1, 2->2
    k = read(out / "labelsTr" / "kits_case_00000.nii.gz")
    assert geometry(k) == geometry(read(kits[0]["image"]))  # orientation: null keeps KiTS19's storage order
    cf.assert_same_world_values(k, cf.sitk_image(kits[0]["labels"] * 0 + np.where(kits[0]["labels"] > 0,
                                                                                  kits[0]["labels"] + 2, 0),
                                                 kits[0]["spacing"], kits[0]["origin"]))


def test_merge_duplicates_drop_and_mixed_channels_allowed(tmp_path, root, capsys):
    """MSD Task03 Liver *is* LiTS: same voxels (other file format, other dtype, other case names)."""
    lits = cf.make_lits_tree(str(tmp_path / "LiTS"), numbers=(0, 1), test_numbers=())
    # MSD Task03: volume-1 again (as float32, flipped storage), plus one new case; a different modality name
    a1 = lits[1]["array"].astype(np.float32)
    new, newlab = cf.synthetic_case((12, 24, 24), seed=55)
    cf.make_msd_tree(str(tmp_path), "Task03_Liver", {"0": "MRI"}, {"0": "background", "1": "liver", "2": "cancer"},
                     numbers=(1, 2), test_numbers=(), arrays={1: (a1, lits[1]["labels"]), 2: (new, newlab)})
    assert cli(capsys, "convert", "lits", tmp_path / "LiTS", "-d", 501, "-o", root)[0] == 0
    assert cli(capsys, "convert", "msd", tmp_path / "Task03_Liver", "-o", root)[0] == 0
    spec = tmp_path / "m.yaml"
    spec.write_text("dataset_id: 520\ndataset_name: Livers\nlabels: [liver]\nsources:\n"
                    "  - {name: lits, dataset: 501, labels: {liver: [liver, tumor]}}\n"
                    "  - {name: msd, dataset: 3, labels: {liver: [liver, cancer]}}\n")
    rc, err = cli(capsys, "merge", spec, "-o", root, "--duplicates", "drop", "--allow-mixed-channels")
    assert rc == 0, err
    assert "dropped 1 duplicate image(s)" in err and "'msd/liver_001' (= 'lits/lits_0001')" in err
    dj = json.loads((root / "Dataset520_Livers" / "dataset.json").read_text())
    assert sorted(dj["annotated_labels"]) == ["lits_0000", "lits_0001", "msd_liver_002"]
    assert sorted(os.listdir(root / "Dataset520_Livers" / "imagesTr")) == [
        "lits_0000_0000.nii.gz", "lits_0001_0000.nii.gz", "msd_liver_002_0000.nii.gz"]
    assert dj["channel_names"] == {"0": "CT"}


def test_content_hashes_find_reoriented_and_reheadered_copies():
    from dataset_conversion.common import content_hashes

    a, _ = cf.synthetic_case((6, 8, 10), seed=1)
    img = cf.sitk_image(a, (1, 1, 2), (0, 0, 0), cf.LITS_DIRECTION)
    permuted = sitk.DICOMOrient(img, "SAR")  # the same scan stored in another axis order (header consistent)
    reheadered = cf.sitk_image(a.astype(np.float32), (2, 2, 2), (5, 5, 5))  # same array, other header and dtype
    other = cf.sitk_image(a + 1, (1, 1, 2), (0, 0, 0), cf.LITS_DIRECTION)
    h = content_hashes([img])
    assert sitk.GetArrayFromImage(permuted).shape != a.shape
    assert content_hashes([permuted])[1] == h[1]
    assert content_hashes([reheadered])[0] == h[0]
    assert not set(h) & set(content_hashes([other]))


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_dataset_modes_follow_the_umask(tmp_path, root, capsys, umask):
    """Converted and merged datasets are as readable as any new folder (not 0700 like a mkdtemp folder), also when
    a source file is private (shutil.copy would carry its mode)."""
    lits = tmp_path / "LiTS"
    cf.make_lits_tree(str(lits), numbers=(0, 1), test_numbers=(2,))
    spleen = cf.make_msd_tree(str(tmp_path), "Task09_Spleen", numbers=(1,), test_numbers=(2,))
    for info in spleen.values():  # MSD 3D images and uint8 labels are copied
        for f in (info["image"], info.get("label")):
            if f:
                os.chmod(f, 0o600)
    old = os.umask(umask)
    try:
        assert cli(capsys, "convert", "lits", lits, "-d", 501, "-o", root, "-np", 2)[0] == 0
        assert cli(capsys, "convert", "msd", tmp_path / "Task09_Spleen", "-d", 509, "-o", root)[0] == 0
        spec = _spec(tmp_path, "dataset_id: 510\ndataset_name: M\nlabels: [liver, spleen]\nsources:\n"
                               "  - {name: lits, dataset: 501, labels: {liver: [liver, tumor]}}\n"
                               "  - {name: spleen, dataset: 509, labels: {spleen: spleen}}\n")
        assert cli(capsys, "merge", spec, "-o", root)[0] == 0
    finally:
        os.umask(old)
    dir_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    assert (dir_mode, file_mode) == {0o022: (0o755, 0o644), 0o002: (0o775, 0o664)}[umask]
    for name in ("Dataset501_LiTS", "Dataset509_Spleen", "Dataset510_M"):
        n_files = 0
        for dirpath, _, files in os.walk(root / name):
            assert os.stat(dirpath).st_mode & 0o777 == dir_mode, dirpath
            for f in files:
                assert os.stat(os.path.join(dirpath, f)).st_mode & 0o777 == file_mode, f
                n_files += 1
        assert n_files >= 4


def _nifti_variants(folder):
    """{name: path} of .nii.gz files as the releases and tools write them: SimpleITK (several pixel types),
    nibabel (slice axis first, NaN scl_slope, a header extension), a scaled one, a 4D one, a multi-member gzip
    stream."""
    import nibabel as nib

    a, lab = cf.synthetic_case((7, 9, 11), seed=3)
    files = {}
    for dt in (np.int16, np.uint8, np.float32, np.int32, np.uint16, np.float64, np.int8):
        files[f"sitk_{np.dtype(dt).name}"] = p = os.path.join(folder, f"sitk_{np.dtype(dt).name}.nii.gz")
        sitk.WriteImage(cf.sitk_image(a.astype(dt), (0.7, 0.8, 2.5), (1, 2, 3), cf.LITS_DIRECTION), p, True)
    files["kits19_image"] = os.path.join(folder, "kits19_image.nii.gz")
    cf.write_kits19_nifti(a, (0.8, 0.8, 3.0), (-10.0, 5.0, 40.0), files["kits19_image"])
    files["kits19_label"] = os.path.join(folder, "kits19_label.nii.gz")
    cf.write_kits19_nifti(lab, (0.8, 0.8, 3.0), (-10.0, 5.0, 40.0), files["kits19_label"])
    scaled = nib.Nifti1Image(a, np.diag([1.5, 1.5, 2.0, 1.0]))
    scaled.header.set_slope_inter(2.0, -5.0)
    files["scaled"] = os.path.join(folder, "scaled.nii.gz")
    nib.save(scaled, files["scaled"])
    ext = nib.Nifti1Image(a.T.copy(), np.diag([-0.7, -0.7, 2.5, 1.0]))
    ext.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"a header extension: voxels start later" * 9))
    files["with_extension"] = os.path.join(folder, "with_extension.nii.gz")
    nib.save(ext, files["with_extension"])
    files["4d_one_volume"] = os.path.join(folder, "4d_one_volume.nii.gz")
    nib.save(nib.Nifti1Image(a.T[..., None].copy(), np.eye(4)), files["4d_one_volume"])
    raw = gzip.decompress(open(files["sitk_int16"], "rb").read())
    files["multi_member"] = os.path.join(folder, "multi_member.nii.gz")
    open(files["multi_member"], "wb").write(gzip.compress(raw[:500]) + gzip.compress(raw[500:]))
    return files


def test_read_image_counts_bytes_in_one_decode_and_equals_itk(tmp_path):
    """read_image decodes a plain .nii.gz itself (counting the bytes: no second decode) and must give exactly what
    sitk.ReadImage gives: pixel type, geometry, voxels, and a written file byte for byte."""
    from dataset_conversion import common

    for name, path in _nifti_variants(str(tmp_path)).items():
        ref, img = sitk.ReadImage(path), common.read_image(path, name)
        plain = common._read_plain_nifti_gz(path, name, "image") is not None
        if name == "with_extension":
            assert common.parse_nifti_header(gzip.open(path).read(540)).data_offset > 352
        assert plain == (name not in ("scaled", "4d_one_volume")), name
        assert img.GetPixelID() == ref.GetPixelID() and geometry(img) == geometry(ref), name
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(img), sitk.GetArrayViewFromImage(ref))
        assert common.check_file_complete(path) is None, name
        out_a, out_b = str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz")
        sitk.WriteImage(img, out_a, True)
        sitk.WriteImage(ref, out_b, True)
        assert gzip.decompress(open(out_a, "rb").read()) == gzip.decompress(open(out_b, "rb").read()), name


def test_nifti_header_lengths(tmp_path):
    """NIfTI-1 and NIfTI-2, both byte orders, .nii and .nii.gz: the declared length, and a short file found."""
    import nibabel as nib
    from dataset_conversion.common import check_file_complete, parse_nifti_header

    a = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    for cls, offset in ((nib.Nifti1Image, 352), (nib.Nifti2Image, 544)):
        for order in "<>":
            img = cls(a, np.eye(4))
            img = cls(a, np.eye(4), img.header.as_byteswapped(order))
            for ext in (".nii", ".nii.gz"):
                p = str(tmp_path / f"{cls.__name__}{'le' if order == '<' else 'be'}{ext}")
                nib.save(img, p)
                data = open(p, "rb").read()
                raw = gzip.decompress(data) if ext == ".nii.gz" else data
                hdr = parse_nifti_header(raw[:540])
                assert (hdr.shape, hdr.dtype, hdr.data_offset, hdr.total_bytes) == (
                    (5, 6, 7), np.dtype(order + "i2"), offset, offset + a.nbytes), p
                assert hdr.plain() == (order == "<"), p
                assert check_file_complete(p) is None, p
                short = raw[:-2]
                open(p, "wb").write(gzip.compress(short) if ext == ".nii.gz" else short)
                assert check_file_complete(p) == (
                    f"it is truncated: it {'decompresses to' if ext == '.nii.gz' else 'holds'} {len(short)} bytes but "
                    f"its header declares {len(raw)} (5x6x7 int16 voxels from byte {offset})"), p
    assert parse_nifti_header(b"\0" * 540) is None


def test_ctrl_c_and_parallel_failure_leave_nothing(tmp_path, root, capsys, monkeypatch):
    src = tmp_path / "LiTS"
    cases = cf.make_lits_tree(str(src), numbers=(0, 1, 2, 3, 28, 29), test_numbers=())
    snap, before = cf.snapshot(src), set(os.listdir(root))
    import dataset_conversion.common as common

    real, calls = common.convert_pair_case, []

    def interrupted(job):
        calls.append(job["case"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(common, "convert_pair_case", interrupted)
    rc, err = cli(capsys, "convert", "lits", src, "-d", 501, "-o", root, "-np", 1)
    assert rc == 130 and "interrupted" in err
    assert_clean(root, before, [(src, snap)])
    monkeypatch.undo()
    # a bad case among good ones with 2 processes: the error names it, nothing is left behind
    sitk.WriteImage(cf.sitk_image(cases[28]["labels"][:, :, :20], (1, 1, 1), (0, 0, 0)), cases[28]["label"])
    snap = cf.snapshot(src)
    rc, err = cli(capsys, "convert", "lits", src, "-d", 501, "-o", root, "-np", 2)
    assert rc == 2 and "case 'volume-28': image and label differ in size" in error_line(err)
    assert_clean(root, before, [(src, snap)])


# ------------------------------------------------------------------------------------------------ bad input
def _lits(tmp_path, numbers=(0, 1)):
    src = tmp_path / "LiTS"
    return src, cf.make_lits_tree(str(src), numbers=numbers, test_numbers=())


def _edit_label(path, fn):
    img = read(path)
    new = fn(img)
    sitk.WriteImage(new, str(path))


def _with(img, **kw):
    img = sitk.Image(img)
    for k, v in kw.items():
        getattr(img, "Set" + k)(v)
    return img


def bad_lits_size(tmp_path, root):
    src, c = _lits(tmp_path)
    _edit_label(c[1]["label"], lambda im: im[:, :20, :])
    return ["convert", "lits", src, "-d", 501], "case 'volume-1': image and label differ in size: size (24, 24, 12) vs (24, 20, 12)"


def bad_lits_spacing(tmp_path, root):
    src, c = _lits(tmp_path)
    _edit_label(c[1]["label"], lambda im: _with(im, Spacing=(0.76, 0.76, 3.0)))
    return ["convert", "lits", src, "-d", 501], "case 'volume-1': image and label differ in spacing"


def bad_lits_origin(tmp_path, root):
    src, c = _lits(tmp_path)
    _edit_label(c[1]["label"], lambda im: _with(im, Origin=(149.0, 170.0, -294.0)))
    return ["convert", "lits", src, "-d", 501], "case 'volume-1': image and label differ in origin"


def bad_lits_direction(tmp_path, root):
    src, c = _lits(tmp_path)
    _edit_label(c[1]["label"], lambda im: _with(im, Direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)))
    return ["convert", "lits", src, "-d", 501], "case 'volume-1': image and label differ in direction"


def bad_lits_label_value(tmp_path, root):
    src, c = _lits(tmp_path)
    lab = c[0]["labels"].copy()
    lab[0, 0, 0] = 3
    _edit_label(c[0]["label"], lambda im: cf.sitk_image(lab, im.GetSpacing(), im.GetOrigin(), im.GetDirection()))
    return ["convert", "lits", src, "-d", 501], "holds value(s) [3] that LiTS does not define (defined: 0 background, 1 liver, 2 tumor)"


def bad_lits_float_label(tmp_path, root):
    src, c = _lits(tmp_path)
    lab = c[0]["labels"].astype(np.float32)
    lab[1, 2, 3] = 0.5
    _edit_label(c[0]["label"], lambda im: cf.sitk_image(lab, im.GetSpacing(), im.GetOrigin(), im.GetDirection()))
    return ["convert", "lits", src, "-d", 501], "holds the non-integer value 0.5"


def bad_lits_missing_label(tmp_path, root):
    src, c = _lits(tmp_path)
    os.remove(c[1]["label"])
    return ["convert", "lits", src, "-d", 501], "case 'volume-1': segmentation-1.nii is missing"


def bad_lits_empty_image(tmp_path, root):
    src, c = _lits(tmp_path)
    open(c[1]["image"], "wb").close()
    return ["convert", "lits", src, "-d", 501], "case 'volume-1': image file", "is empty (0 bytes)"


def bad_lits_truncated_image(tmp_path, root):
    src, c = _lits(tmp_path)
    data = open(c[1]["image"], "rb").read()
    open(c[1]["image"], "wb").write(data[: len(data) * 2 // 3])
    return ["convert", "lits", src, "-d", 501], "case 'volume-1': image file", "cannot be used: it is truncated"


def bad_lits_duplicate_number(tmp_path, root):
    src, c = _lits(tmp_path)
    (src / "Training Batch 2").mkdir()
    shutil.copy(c[1]["image"], src / "Training Batch 2" / "volume-1.nii")
    return ["convert", "lits", src, "-d", 501], "LiTS volume-1 appears twice"


def bad_kits_truncated_gz(tmp_path, root):
    src = tmp_path / "kits19"
    c = cf.make_kits_tree(str(src), 19, numbers=(0, 1))
    data = open(c[1]["label"], "rb").read()
    open(c[1]["label"], "wb").write(data[: len(data) // 2])
    return ["convert", "kits", src, "-d", 502, "--version", 19], \
        f"case 'case_00001': label file {c[1]['label']} cannot be used: it is truncated: its gzip stream is cut off"


def bad_kits_missing_image(tmp_path, root):
    src = tmp_path / "kits21"
    c = cf.make_kits_tree(str(src), 21, numbers=(0, 1))
    os.remove(c[0]["image"])
    return ["convert", "kits", src, "-d", 521, "--version", 21], "case 'case_00000': image file", "is missing (the KiTS21/23 git repository ships only the labels"


def bad_kits19_cyst(tmp_path, root):
    src = tmp_path / "kits23"
    cf.make_kits_tree(str(src), 23, numbers=(0,))
    return ["convert", "kits", src, "-d", 502, "--version", 19], "holds value(s) [3] that KiTS19 does not define", "pass --version 21 or 23"


def bad_kits21_as_19(tmp_path, root):
    src = tmp_path / "kits21"
    cf.make_kits_tree(str(src), 21, numbers=(0,))
    return ["convert", "kits", src, "-d", 502, "--version", 19], "has aggregated_MAJ_seg.nii.gz, a KiTS21 file, but --version 19"


def bad_kits19_missing_train_label(tmp_path, root):
    src = tmp_path / "kits19"
    c = cf.make_kits_tree(str(src), 19, numbers=(0, 1))
    os.remove(c[1]["label"])
    return ["convert", "kits", src, "-d", 502, "--version", 19], "case 'case_00001': label file", "segmentation.nii.gz is missing"


def bad_lits_is_kits(tmp_path, root):
    src = tmp_path / "kits19"
    cf.make_kits_tree(str(src), 19, numbers=(0,))
    return ["convert", "lits", src, "-d", 501], "is not the LiTS release", "it looks like a KiTS release (use 'convert kits')"


def bad_kits_is_lits(tmp_path, root):
    src, _ = _lits(tmp_path)
    return ["convert", "kits", src, "-d", 502, "--version", 19], "is not a KiTS release", "it looks like the LiTS release"


def bad_msd_is_lits(tmp_path, root):
    src, _ = _lits(tmp_path)
    return ["convert", "msd", src, "-d", 503], "is not a Decathlon task folder: no dataset.json"


def bad_msd_is_nnunet(tmp_path, root):
    src, _ = _lits(tmp_path)
    main(["convert", "lits", str(src), "-d", "501", "-o", str(tmp_path / "other_raw")])
    return ["convert", "msd", tmp_path / "other_raw" / "Dataset501_LiTS", "-d", 503], "is already an nnU-Net v2 raw dataset"


def bad_msd_channels(tmp_path, root):
    cf.make_msd_tree(str(tmp_path), "Task01_BrainTumour", {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
                     {"0": "background", "1": "edema"}, prefix="BRATS", numbers=(1,), test_numbers=())
    p = tmp_path / "Task01_BrainTumour" / "dataset.json"
    dj = json.loads(p.read_text())
    del dj["modality"]["3"]
    p.write_text(json.dumps(dj))
    return ["convert", "msd", tmp_path / "Task01_BrainTumour"], "case 'BRATS_001'", "has 4 channels (4th axis) but dataset.json lists 3 modalities"


def bad_msd_unreadable(tmp_path, root):
    c = cf.make_msd_tree(str(tmp_path), "Task09_Spleen", numbers=(1, 2), test_numbers=())
    open(c[2]["image"], "wb").write(b"this is not a NIfTI file" * 20)
    return ["convert", "msd", tmp_path / "Task09_Spleen"], "case 'spleen_002': image file", "cannot be read: Unable to determine ImageIO reader"


def bad_target_exists(tmp_path, root):
    src, _ = _lits(tmp_path)
    (root / "Dataset501_Other").mkdir()
    return ["convert", "lits", src, "-d", 501], "target dataset id 501 already exists", "pass --overwrite to replace it"


def _two_converted(tmp_path, root):
    src, c = _lits(tmp_path)
    main(["convert", "lits", str(src), "-d", "501", "-o", str(root)])
    k = cf.make_kits_tree(str(tmp_path / "kits19"), 19, numbers=(0,))
    main(["convert", "kits", str(tmp_path / "kits19"), "-d", "502", "--version", "19", "-o", str(root)])
    return c, k


def _spec(tmp_path, text):
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return p


GOOD_SPEC = ("dataset_id: 530\ndataset_name: M\nlabels: [liver, kidney]\nsources:\n"
             "  - {name: lits, dataset: 501, labels: {liver: [liver, tumor]}}\n"
             "  - {name: kits, dataset: 502, labels: {kidney: [kidney, tumor]}}\n")


def bad_merge_channels_number(tmp_path, root):
    _two_converted(tmp_path, root)
    cf.make_msd_tree(str(tmp_path), "Task01_BrainTumour", {"0": "FLAIR", "1": "T1w"}, {"0": "background", "1": "edema"},
                     prefix="BRATS", numbers=(1,), test_numbers=())
    main(["convert", "msd", str(tmp_path / "Task01_BrainTumour"), "-o", str(root)])
    spec = _spec(tmp_path, GOOD_SPEC + "  - {name: brats, dataset: 1, labels: {}}\n")
    return ["merge", spec], "source 'brats' has 2 channel(s)", "but source 'lits' has 1"


def bad_merge_ct_with_mr(tmp_path, root):
    _two_converted(tmp_path, root)
    cf.make_msd_tree(str(tmp_path), "Task05_Prostate", {"0": "T2"}, {"0": "background", "1": "prostate"},
                     numbers=(1,), test_numbers=())
    main(["convert", "msd", str(tmp_path / "Task05_Prostate"), "-o", str(root)])
    spec = _spec(tmp_path, GOOD_SPEC + "  - {name: prostate, dataset: 5, labels: {}}\n")
    return ["merge", spec], "source 'prostate' has channels {'0': 'T2'} but source 'lits' has {'0': 'CT'}", "allow_mixed_channels: true"


def bad_merge_duplicate(tmp_path, root):
    c, _ = _two_converted(tmp_path, root)
    cf.make_msd_tree(str(tmp_path), "Task03_Liver", {"0": "CT"}, {"0": "background", "1": "liver", "2": "cancer"},
                     numbers=(1,), test_numbers=(), arrays={1: (c[0]["array"], c[0]["labels"])})
    main(["convert", "msd", str(tmp_path / "Task03_Liver"), "-o", str(root)])
    spec = _spec(tmp_path, GOOD_SPEC + "  - {name: msd, dataset: 3, labels: {liver: [liver, cancer]}}\n")
    return ["merge", spec], "duplicate image: case 'msd/liver_001' has the same voxel content as case 'lits/lits_0000'"


def bad_merge_undefined_value(tmp_path, root):
    _two_converted(tmp_path, root)
    p = root / "Dataset502_KiTS19" / "labelsTr" / "case_00000.nii.gz"
    a = arr(p)
    a[0, 0, 0] = 7
    _edit_label(p, lambda im: (lambda n: (n.CopyInformation(im), n)[1])(sitk.GetImageFromArray(a)))
    return ["merge", _spec(tmp_path, GOOD_SPEC)], "case 'kits/case_00000': label file", "holds value(s) [7] that source 'kits' (Dataset502_KiTS19) does not define"


def bad_merge_geometry(tmp_path, root):
    _two_converted(tmp_path, root)
    p = root / "Dataset501_LiTS" / "labelsTr" / "lits_0001.nii.gz"
    _edit_label(p, lambda im: _with(im, Spacing=(1.0, 1.0, 1.0)))
    return ["merge", _spec(tmp_path, GOOD_SPEC)], "case 'lits/lits_0001': image and label differ in spacing"


def bad_merge_unknown_target(tmp_path, root):
    _two_converted(tmp_path, root)
    return ["merge", _spec(tmp_path, GOOD_SPEC.replace("{kidney: [kidney", "{kidneys: [kidney"))], \
        "source 'kits': target label 'kidneys' is not in 'labels' ['liver', 'kidney']"


def bad_merge_unknown_source_label(tmp_path, root):
    _two_converted(tmp_path, root)
    return ["merge", _spec(tmp_path, GOOD_SPEC.replace("[kidney, tumor]", "[kidney, cyst]"))], \
        "source 'kits': 'cyst' is not a foreground label of"


def bad_merge_label_twice(tmp_path, root):
    _two_converted(tmp_path, root)
    text = GOOD_SPEC.replace("labels: [liver, kidney]", "labels: [liver, kidney, tumor]").replace(
        "{liver: [liver, tumor]}", "{liver: [liver, tumor], tumor: [tumor]}")
    return ["merge", _spec(tmp_path, text)], "source 'lits': source label 'tumor' is mapped to both 'liver' and 'tumor'"


def bad_merge_unknown_key(tmp_path, root):
    _two_converted(tmp_path, root)
    return ["merge", _spec(tmp_path, GOOD_SPEC + "duplicate: drop\n")], "unknown key(s) ['duplicate']"


def bad_merge_missing_source(tmp_path, root):
    _two_converted(tmp_path, root)
    return ["merge", _spec(tmp_path, GOOD_SPEC.replace("dataset: 502", "dataset: 599"))], \
        "source 'kits': dataset 599 not found in", "(no Dataset599_* folder)"


def bad_merge_empty_images(tmp_path, root):
    _two_converted(tmp_path, root)
    (tmp_path / "scans").mkdir()
    cf.junk(str(tmp_path / "scans" / "._a.nii.gz"))
    return ["merge", _spec(tmp_path, GOOD_SPEC + "  - {name: unl, images: scans}\n")], \
        "source 'unl': images folder", "holds no image file"


def bad_merge_target_exists(tmp_path, root):
    _two_converted(tmp_path, root)
    return ["merge", _spec(tmp_path, GOOD_SPEC.replace("dataset_id: 530", "dataset_id: 502"))], \
        "target dataset id 502 already exists"


# ---- truncated and damaged files: ITK zero-fills the missing voxels without an error
def _recompress_short(path, missing=1000, members=1):
    """Rewrite ``path`` as an intact gzip stream (``members`` gzip members) of its NIfTI bytes less the last
    ``missing``: a download cut off and compressed again. Returns (bytes held, bytes declared)."""
    with open(path, "rb") as f:
        data = f.read()
    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    short = raw[:len(raw) - missing]
    cut = len(short) // 2
    with open(path, "wb") as f:
        f.write(gzip.compress(short) if members == 1 else gzip.compress(short[:cut]) + gzip.compress(short[cut:]))
    return len(short), len(raw)


def bad_lits_short_gz(tmp_path, root):
    src, c = _lits(tmp_path)
    gz = c[1]["image"] + ".gz"  # LiTS also ships as .nii.gz
    os.rename(c[1]["image"], gz)
    held, declared = _recompress_short(gz)
    return ["convert", "lits", src, "-d", 501], (
        f"case 'volume-1': image file {gz} cannot be used: it is truncated: it decompresses to {held} bytes but its "
        f"header declares {declared} (24x24x12 int16 voxels from byte 352); download, extract or convert it again")


def bad_kits_short_multimember_label(tmp_path, root):
    src = tmp_path / "kits19"
    c = cf.make_kits_tree(str(src), 19, numbers=(0, 1))
    held, declared = _recompress_short(c[0]["label"], missing=2000, members=2)  # a bgzip-like multi-member stream
    return ["convert", "kits", src, "-d", 502, "--version", 19], \
        f"case 'case_00000': label file {c[0]['label']} cannot be used: it is truncated: it decompresses to {held} " \
        f"bytes but its header declares {declared} (10x20x24 uint8 voxels from byte 352)"


def bad_kits_damaged_gz(tmp_path, root):
    src = tmp_path / "kits19"
    c = cf.make_kits_tree(str(src), 19, numbers=(0, 1))
    data = bytearray(open(c[1]["image"], "rb").read())
    data[len(data) // 2] ^= 0x55  # one bad byte in the middle: the trailer (ISIZE) still matches
    open(c[1]["image"], "wb").write(data)
    return ["convert", "kits", src, "-d", 502, "--version", 19], \
        f"case 'case_00001': image file {c[1]['image']} cannot be used: it is corrupt: its gzip stream is damaged"


def bad_msd_short_3d_image(tmp_path, root):
    c = cf.make_msd_tree(str(tmp_path), "Task09_Spleen", numbers=(1, 2), test_numbers=())
    held, declared = _recompress_short(c[2]["image"], missing=1)
    return ["convert", "msd", tmp_path / "Task09_Spleen"], \
        f"case 'spleen_002': image file {c[2]['image']} cannot be used: it is truncated: it decompresses to {held} " \
        f"bytes but its header declares {declared} (16x16x8 int16 voxels from byte 352)"


def bad_msd_short_4d_image(tmp_path, root):
    c = cf.make_msd_tree(str(tmp_path), "Task01_BrainTumour", {"0": "FLAIR", "1": "T1w"},
                         {"0": "background", "1": "edema", "2": "non-enhancing tumor"}, prefix="BRATS", numbers=(1, 2),
                         test_numbers=(3,))
    held, declared = _recompress_short(c[3]["image"], missing=4 * 16 * 16)  # the test image: last slice of channel 1
    return ["convert", "msd", tmp_path / "Task01_BrainTumour"], \
        f"case 'BRATS_003': image file {c[3]['image']} cannot be used: it is truncated: it decompresses to {held} " \
        f"bytes but its header declares {declared} (16x16x8x2 float32 voxels from byte 352)"


def bad_lits_short_nii_big_endian(tmp_path, root):
    import nibabel as nib

    src, c = _lits(tmp_path)
    img = nib.load(c[0]["label"], mmap=False)  # not a memory map of the file rewritten below
    big = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header.as_byteswapped(">"))
    nib.save(big, c[0]["label"])
    assert open(c[0]["label"], "rb").read(4) == b"\0\0\1\x5c"  # 348, big-endian
    size = os.path.getsize(c[0]["label"])
    open(c[0]["label"], "r+b").truncate(size - 100)
    return ["convert", "lits", src, "-d", 501], \
        f"case 'volume-0': label file {c[0]['label']} cannot be used: it is truncated: it holds {size - 100} bytes " \
        f"but its header declares {size} (24x24x12 uint8 voxels from byte 352)"


def bad_merge_short_source_label(tmp_path, root):
    _two_converted(tmp_path, root)
    p = root / "Dataset502_KiTS19" / "labelsTr" / "case_00000.nii.gz"
    _recompress_short(str(p), missing=10)
    return ["merge", _spec(tmp_path, GOOD_SPEC)], \
        f"case 'kits/case_00000': label file {p} cannot be used: it is truncated"


def _short_scan(tmp_path, root, name, compress=False, cut=10, others=()):
    """Merge argv with an 'images' source holding the scan ``name`` (its last ``cut`` bytes missing) and intact
    ``others``; returns (argv, path of the short scan)."""
    _two_converted(tmp_path, root)
    scans = tmp_path / "scans"
    scans.mkdir()
    a, _ = cf.synthetic_case((9, 20, 20), seed=7)
    for f in (name,) + tuple(others):
        sitk.WriteImage(cf.sitk_image(a, (1, 1, 2), (0, 0, 0)), str(scans / f), compress)
    open(scans / name, "r+b").truncate(os.path.getsize(scans / name) - cut)
    return ["merge", _spec(tmp_path, GOOD_SPEC + "  - {name: unl, images: scans}\n")], scans / name


def bad_merge_short_mha(tmp_path, root):
    argv, path = _short_scan(tmp_path, root, "scan_a.mha", others=("scan_b.mha",))
    return argv, f"case 'unl/scan_a': channel 0 image file {path} cannot be used: it is truncated: it holds " \
        f"{9 * 20 * 20 * 2 - 10} bytes of voxel data but its header declares {9 * 20 * 20 * 2} (20x20x9 MET_SHORT)"


def bad_merge_short_compressed_mha(tmp_path, root):
    argv, path = _short_scan(tmp_path, root, "scan.mha", compress=True)
    return argv, f"image file {path} cannot be used: it is truncated: it holds", "bytes of compressed voxel data"


def bad_merge_short_nrrd(tmp_path, root):
    argv, path = _short_scan(tmp_path, root, "scan.nrrd", cut=500)
    return argv, f"case 'unl/scan': channel 0 image file {path} cannot be read: fread got only 3350 2-sized things, " \
        "not 3600"


# ---- image and label swapped: thousands of values, summarised
def bad_lits_swapped(tmp_path, root):
    src, c = _lits(tmp_path)
    os.rename(c[1]["image"], str(tmp_path / "v"))
    os.rename(c[1]["label"], c[1]["image"])
    os.rename(str(tmp_path / "v"), c[1]["label"])
    return ["convert", "lits", src, "-d", 501], re.compile(
        rf"case 'volume-1': label file {re.escape(c[1]['label'])} holds \d{{3,}} distinct values from -\d+ to \d+, "
        r"\d+ of which LiTS does not define \(defined: 0 background, 1 liver, 2 tumor\); "
        r"does this file hold an image\? are volume-1 and segmentation-1 swapped\?$")


def bad_msd_swapped(tmp_path, root):
    c = cf.make_msd_tree(str(tmp_path), "Task09_Spleen", numbers=(1, 2), test_numbers=())
    shutil.copy(c[1]["image"], c[1]["label"])
    return ["convert", "msd", tmp_path / "Task09_Spleen"], f"case 'spleen_001': label file {c[1]['label']} holds", \
        "does this file hold an image? are imagesTr/spleen_001.nii.gz and labelsTr/spleen_001.nii.gz swapped?"


def bad_merge_swapped(tmp_path, root):
    _two_converted(tmp_path, root)
    img = root / "Dataset502_KiTS19" / "imagesTr" / "case_00000_0000.nii.gz"
    lab = root / "Dataset502_KiTS19" / "labelsTr" / "case_00000.nii.gz"
    sitk.WriteImage(read(img), str(lab), True)
    return ["merge", _spec(tmp_path, GOOD_SPEC)], f"case 'kits/case_00000': label file {lab} holds", \
        "of which source 'kits' (Dataset502_KiTS19) does not define", "are case_00000_0000 and case_00000 swapped?"


# ---- many cases at fault: the first few and a count
def bad_lits_many_missing_labels(tmp_path, root):
    src, c = _lits(tmp_path, numbers=tuple(range(8)))
    for n in range(1, 8):
        os.remove(c[n]["label"])
    return ["convert", "lits", src, "-d", 501], "case 'volume-1': segmentation-1.nii is missing", \
        "; 7 volumes lack their segmentation: volume-1, volume-2, volume-3, volume-4, volume-5, ... (7 in all)"


def bad_kits_many_missing_images(tmp_path, root):
    src = tmp_path / "kits23"
    c = cf.make_kits_tree(str(src), 23, numbers=tuple(range(7)))
    for n in c:
        os.remove(c[n]["image"])
    return ["convert", "kits", src, "-d", 523, "--version", 23], f"case 'case_00000': image file {c[0]['image']} is " \
        "missing (the KiTS21/23 git repository ships only the labels: run its download script first); 7 cases lack " \
        "imaging.nii.gz: case_00000, case_00001, case_00002, case_00003, case_00004, ... (7 in all)"


def bad_msd_missing_files(tmp_path, root):
    c = cf.make_msd_tree(str(tmp_path), "Task09_Spleen", numbers=(1, 2, 3), test_numbers=())
    for n in (2, 3):
        os.remove(c[n]["image"])
    return ["convert", "msd", tmp_path / "Task09_Spleen"], f"case 'spleen_002': image file {c[2]['image']} is " \
        "missing; 2 files listed in dataset.json are missing: imagesTr/spleen_002.nii.gz, imagesTr/spleen_003.nii.gz"


# ---- merge specs that are not valid YAML / JSON, or have a wrong key or type
def _bad_spec(text, *expected):
    def case(tmp_path, root):
        _two_converted(tmp_path, root)
        spec = _spec(tmp_path, text)
        return (["merge", spec], f"merge spec {spec}", *expected)
    case.__name__ = "bad_spec"
    return case


bad_merge_yaml_tab = _bad_spec(GOOD_SPEC.replace("  - {name: kits", "\t- {name: kits"),
                               "is not valid YAML: line 6, column 1 "
                               "('\\t- {name: kits, dataset: 502, labels: {kidney: [kidney, tumor]}}')",
                               "found character '\\t' that cannot start any token; YAML indents with spaces only")
bad_merge_yaml_indent = _bad_spec(
    "dataset_id: 530\ndataset_name: M\nlabels: [liver]\nsources:\n  - name: lits\n    dataset: 501\n"
    "   labels: {liver: [liver]}\n",
    "is not valid YAML: line 7, column 4 ('   labels: {liver: [liver]}'): expected <block end>",
    "check the indentation")
bad_merge_yaml_bracket = _bad_spec(GOOD_SPEC.replace("labels: [liver, kidney]", "labels: [liver, kidney"),
                                   "is not valid YAML: line 4, column 8 ('sources:'): expected ',' or ']', but got "
                                   "':'; is the '[' opened at line 3, column 9 closed")
bad_merge_wrong_type_labels = _bad_spec(GOOD_SPEC.replace("labels: {kidney: [kidney, tumor]}", "labels: [kidney]"),
                                        ": sources[1].labels: source 'kits': must map target names to lists of "
                                        "source labels (e.g. {liver: [liver, tumor]}), got ['kidney']")
bad_merge_wrong_type_tolerance = _bad_spec(GOOD_SPEC + "tolerance: small\n",
                                           ": tolerance: must be a number >= 0 (e.g. 0.001), got 'small'")
bad_merge_wrong_type_flag = _bad_spec(GOOD_SPEC + "allow_mixed_channels: 'no'\n",
                                      ": allow_mixed_channels: must be true or false, got 'no'")
bad_merge_wrong_type_source_label = _bad_spec(GOOD_SPEC.replace("[kidney, tumor]", "[kidney, {tumor: 2}]"),
                                              ": sources[1].labels.kidney: source 'kits': source labels are names or "
                                              "values, got {'tumor': 2}")
bad_merge_wrong_key_in_source = _bad_spec(GOOD_SPEC.replace("{name: kits, dataset", "{name: kits, datset"),
                                          ": sources[1]: source 'kits': unknown key(s) ['datset']",
                                          "(did you mean 'dataset' for 'datset'?)")
for _f, _n in ((bad_merge_yaml_tab, "tab"), (bad_merge_yaml_indent, "indent"), (bad_merge_yaml_bracket, "bracket"),
               (bad_merge_wrong_type_labels, "labels"), (bad_merge_wrong_type_tolerance, "tolerance"),
               (bad_merge_wrong_type_flag, "flag"), (bad_merge_wrong_type_source_label, "source_label"),
               (bad_merge_wrong_key_in_source, "source_key")):
    _f.__name__ = f"bad_merge_spec_{_n}"


def bad_merge_json(tmp_path, root):
    _two_converted(tmp_path, root)
    spec = tmp_path / "spec.json"
    spec.write_text('{"dataset_id": 530,\n "dataset_name": "M",\n "labels": ["liver",]}')
    return ["merge", spec], f"merge spec {spec} is not valid JSON: line 3, column 21", "Expecting value"


BAD_INPUTS = [bad_lits_size, bad_lits_spacing, bad_lits_origin, bad_lits_direction, bad_lits_label_value,
              bad_lits_float_label, bad_lits_missing_label, bad_lits_empty_image, bad_lits_truncated_image,
              bad_lits_duplicate_number, bad_kits_truncated_gz, bad_kits_missing_image, bad_kits19_cyst,
              bad_kits21_as_19, bad_kits19_missing_train_label, bad_lits_is_kits, bad_kits_is_lits, bad_msd_is_lits,
              bad_msd_is_nnunet, bad_msd_channels, bad_msd_unreadable, bad_target_exists, bad_merge_channels_number,
              bad_merge_ct_with_mr, bad_merge_duplicate, bad_merge_undefined_value, bad_merge_geometry,
              bad_merge_unknown_target, bad_merge_unknown_source_label, bad_merge_label_twice, bad_merge_unknown_key,
              bad_merge_missing_source, bad_merge_empty_images, bad_merge_target_exists,
              # truncated / damaged files
              bad_lits_short_gz, bad_kits_short_multimember_label, bad_kits_damaged_gz, bad_msd_short_3d_image,
              bad_msd_short_4d_image, bad_lits_short_nii_big_endian, bad_merge_short_source_label, bad_merge_short_mha,
              bad_merge_short_compressed_mha, bad_merge_short_nrrd,
              # long messages: summarised
              bad_lits_swapped, bad_msd_swapped, bad_merge_swapped, bad_lits_many_missing_labels,
              bad_kits_many_missing_images, bad_msd_missing_files,
              # merge specs
              bad_merge_yaml_tab, bad_merge_yaml_indent, bad_merge_yaml_bracket, bad_merge_json,
              bad_merge_wrong_type_labels, bad_merge_wrong_type_tolerance, bad_merge_wrong_type_flag,
              bad_merge_wrong_type_source_label, bad_merge_wrong_key_in_source]
MAX_ERROR_CHARS = 600  # beyond the temp paths in it, an error is one readable line


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[f.__name__[4:] for f in BAD_INPUTS])
def test_bad_input(tmp_path, root, capsys, case):
    argv, *expected = case(tmp_path, root)
    capsys.readouterr()
    before = set(os.listdir(root))
    sources = [(str(p), cf.snapshot(p)) for p in tmp_path.iterdir() if p.is_dir() and p != root]
    sources += [(str(root / d), cf.snapshot(root / d)) for d in before]
    rc, err = cli(capsys, *argv, "-o", root)
    line = error_line(err)
    assert rc == 2, err
    for e in expected:
        assert (e.search(line) if isinstance(e, re.Pattern) else e in line), line
    assert len(line.replace(str(tmp_path), "…")) <= MAX_ERROR_CHARS, line
    assert_clean(root, before, sources)


def test_real_cli_subprocess_error_is_one_line(tmp_path, root):
    src, c = _lits(tmp_path)
    os.remove(c[0]["label"])
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), nnUNet_raw=str(root))
    p = subprocess.run([sys.executable, "-m", "nnunet_partial.cli", "convert", "lits", str(src), "-d", "501"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == (
        f"nnunet-partial convert: error: case 'volume-0': segmentation-0.nii is missing (image {c[0]['image']} has no "
        "label file in the release folders)")
    assert "Traceback" not in p.stderr and os.listdir(root) == []


# ------------------------------------------------------------------------------------------------ real MR scan
@pytest.fixture(scope="module")
def mr_merged(tmp_path_factory):
    if not cf.mr_available():
        pytest.skip(f"real MR scan not found at {cf.MR_DIR}")
    base = tmp_path_factory.mktemp("mr")
    root = base / "nnUNet_raw"
    srcs = cf.make_mr_sources(str(base / "downloads"))
    snaps = {k: cf.snapshot(v) for k, v in srcs.items()}
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), nnUNet_raw=str(root))
    # as a user would: the console command (here `python -m nnunet_partial.cli`) with nnUNet_raw set
    for argv in (["convert", "lits", srcs["lits"], "-d", "601", "-np", "2"],
                 ["convert", "kits", srcs["kits"], "-d", "602", "--version", "19"],
                 ["convert", "msd", srcs["msd"], "-d", "603"]):
        p = subprocess.run([sys.executable, "-m", "nnunet_partial.cli", *argv], capture_output=True, text=True,
                           cwd=REPO, env=env, timeout=300)
        assert p.returncode == 0, p.stderr
    spec = base / "downloads" / "merge.yaml"
    spec.write_text(f"""
dataset_id: 610
dataset_name: MRAbdomen
labels: [liver, kidney, pancreas]
sources:
  - name: lits
    dataset: 601
    labels: {{liver: [liver, tumor]}}
  - name: kits
    dataset: 602
    labels: {{kidney: [kidney, tumor]}}
  - name: msd
    dataset: Dataset603_Pancreas
    labels: {{pancreas: [pancreas, cancer]}}
  - name: unl
    images: {srcs['unlabelled']}
""")
    p = subprocess.run([sys.executable, "-m", "nnunet_partial.cli", "merge", str(spec)], capture_output=True,
                       text=True, cwd=REPO, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    for k, v in srcs.items():
        assert cf.snapshot(v) == snaps[k], f"source {k} modified"
    return {"root": root, "base": base, "srcs": srcs, "out": root / "Dataset610_MRAbdomen"}


def test_mr_scan_convert_and_merge_world_exact(mr_merged):
    img_mr, lab_mr = cf.load_mr()
    mr_labels = sitk.GetArrayFromImage(lab_mr)
    root, out = mr_merged["root"], mr_merged["out"]
    # after conversion: the KiTS19-shaped file (slice axis first) still holds the MR voxels at their world position
    k_img = read(root / "Dataset602_KiTS19" / "imagesTr" / "case_00000_0000.nii.gz")
    assert k_img.GetDirection() != (1, 0, 0, 0, 1, 0, 0, 0, 1)  # permuted, like the release
    cf.assert_same_world_values(k_img, img_mr)
    k_lab = read(root / "Dataset602_KiTS19" / "labelsTr" / "case_00000.nii.gz")
    assert set(np.unique(arr(root / "Dataset602_KiTS19" / "labelsTr" / "case_00000.nii.gz"))) == {0, 1, 2}
    cf.assert_same_world_values(k_lab, lab_mr, ref_values=np.isin(mr_labels, (2, 3)).astype(np.uint8),
                                out_values=(sitk.GetArrayFromImage(k_lab) > 0).astype(np.uint8))
    # after merge: every case is the MR scan's voxels, labels = the organ of its source, others background
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["annotated_labels"] == {"lits_0000": ["liver"], "lits_0028": ["liver"], "kits_case_00000": ["kidney"],
                                      "msd_pancreas_001": ["pancreas"], "unl_scan_a": []}
    assert dj["case_provenance"]["kits_case_00000"]["upstream"]["files"][0] == "data/case_00000/imaging.nii.gz"
    expected = {"lits_0000": np.where(mr_labels == 5, 1, 0), "lits_0028": np.where(mr_labels == 5, 1, 0),
                "kits_case_00000": np.where(np.isin(mr_labels, (2, 3)), 2, 0),
                "msd_pancreas_001": np.where(mr_labels == 7, 3, 0), "unl_scan_a": np.zeros_like(mr_labels)}
    for cid, ref_lab in expected.items():
        img, lab = read(out / "imagesTr" / f"{cid}_0000.nii.gz"), read(out / "labelsTr" / f"{cid}.nii.gz")
        assert geometry(img) == geometry(lab)
        assert img.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1) and img.GetSpacing() == (3.0, 3.0, 3.0)
        cf.assert_same_world_values(img, img_mr)
        cf.assert_same_world_values(lab, lab_mr, ref_values=ref_lab)
        # spot check with SimpleITK's own index -> physical mapping
        for index in [(0, 0, 0), tuple(s - 1 for s in img.GetSize()), (5, 7, 3)]:
            p = img.TransformIndexToPhysicalPoint(index)
            mr_index = img_mr.TransformPhysicalPointToIndex(p)
            assert img[index] == img_mr[mr_index]
    assert sitk.GetArrayFromImage(read(out / "labelsTr" / "lits_0000.nii.gz")).sum() > 1000  # real liver shape


@pytest.mark.integration
def test_mr_merged_dataset_plans_trains_cowam_and_predicts_with_the_stock_cli(mr_merged):
    base, out = mr_merged["base"], mr_merged["out"]
    env = dict(os.environ, nnUNet_raw=str(mr_merged["root"]), nnUNet_preprocessed=str(base / "pre"),
               nnUNet_results=str(base / "res"), nnUNet_n_proc_DA="1")
    exe = shutil.which("nnUNetv2_plan_and_preprocess")
    cmd = [exe] if exe else [sys.executable, "-c", "from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints "
                                                    "import plan_and_preprocess_entry; plan_and_preprocess_entry()"]
    p = subprocess.run(cmd + ["-d", "610", "-c", "3d_fullres", "-np", "1", "-npfp", "1"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    pre = base / "pre" / "Dataset610_MRAbdomen"
    dj = json.loads((pre / "dataset.json").read_text())
    assert dj["annotated_labels"]["unl_scan_a"] == [] and "case_provenance" in dj
    data = pre / "nnUNetPlans_3d_fullres"
    ids = sorted({f.split(".")[0].removesuffix("_seg") for f in os.listdir(data)})
    assert ids == sorted(dj["annotated_labels"])

    # the merged real dataset trains with the headline trainer and predicts through the stock CLI
    env["nnUNet_extTrainer"] = ext_trainer_value("")
    trainer = "nnUNetTrainerCoWAM_tiny"
    p = subprocess.run(["nnUNetv2_train", "610", "3d_fullres", "0", "-tr", trainer, "-device", "cpu"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    fold = base / "res" / "Dataset610_MRAbdomen" / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()
    images = base / "predict_in"
    images.mkdir()
    os.symlink(out / "imagesTr" / "unl_scan_a_0000.nii.gz", images / "unl_scan_a_0000.nii.gz")
    p = subprocess.run(["nnUNetv2_predict", "-i", str(images), "-o", str(base / "predict_out"), "-d", "610",
                        "-c", "3d_fullres", "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1",
                        "--disable_tta"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    pred = read(base / "predict_out" / "unl_scan_a.nii.gz")
    assert geometry(pred) == geometry(read(out / "imagesTr" / "unl_scan_a_0000.nii.gz"))
    assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2, 3}
