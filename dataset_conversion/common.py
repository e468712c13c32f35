"""Shared machinery of the converters: errors, atomic dataset folders, safe reading, geometry and
label checks, content hashing, and the per-case process pool with a progress bar."""
from __future__ import annotations

import gzip
import hashlib
import multiprocessing
import os
import re
import shutil
import signal
import struct
import sys
import tempfile
import uuid
import zlib
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from nnunet_partial.annotations import PartialLabelError

DEFAULT_TOLERANCE = 1e-3
CHUNK_SLICES = 16  # slices processed at a time when scanning / hashing / remapping a volume


class ConversionError(PartialLabelError):
    """Bad input to a converter or to ``merge``. The message names the case and what is wrong.

    Subclasses :class:`PartialLabelError` (a ``ValueError``) so that ``nnunet-partial`` prints it as one
    clean line and exits with status 2.
    """


# ----------------------------------------------------------------------------------------- names
DATASET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def is_junk(name: str) -> bool:
    """macOS / archive junk that ships in the public tarballs: ``._x.nii.gz``, ``.DS_Store``, ``__MACOSX``."""
    return name.startswith(".") or name == "__MACOSX" or name.startswith("__MACOSX")


def check_dataset_id_and_name(dataset_id, name: str) -> int:
    try:
        dataset_id = int(dataset_id)
    except (TypeError, ValueError):
        raise ConversionError(f"dataset id must be an integer 1..999, got {dataset_id!r}") from None
    if not 1 <= dataset_id <= 999:
        raise ConversionError(f"dataset id must be in 1..999, got {dataset_id}")
    if not isinstance(name, str) or not DATASET_NAME_RE.match(name):
        raise ConversionError(f"dataset name {name!r} is not usable in a folder name: use letters, digits, "
                              "'_' and '-' only (e.g. 'LiTS')")
    return dataset_id


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{int(dataset_id):03d}_{name}"


def resolve_output_root(output_root: Optional[str]) -> str:
    """``-o/--output-root`` if given, else ``$nnUNet_raw``."""
    root = output_root or os.environ.get("nnUNet_raw")
    if not root:
        raise ConversionError("no output folder: set the nnUNet_raw environment variable or pass "
                              "-o/--output-root")
    return os.path.abspath(root)


def describe_folder(src: str) -> str:
    """A short guess of what a folder holds, for 'this is not the dataset you said' messages."""
    try:
        entries = sorted(e for e in os.listdir(src) if not is_junk(e))
    except OSError:
        return "it cannot be listed"
    if not entries:
        return "it is empty"
    hints = []
    names = set(entries)
    if {"imagesTr", "labelsTr"} <= names:
        dj = os.path.join(src, "dataset.json")
        kind = "an nnU-Net v2 raw dataset"
        if os.path.isfile(dj):
            try:
                import json
                with open(dj) as f:
                    d = json.load(f)
                if "modality" in d and "training" in d:
                    kind = "a Medical Segmentation Decathlon task (use 'convert msd')"
                elif "channel_names" in d:
                    kind = "an nnU-Net v2 raw dataset (merge it directly)"
            except (OSError, ValueError):
                pass
        hints.append(f"it looks like {kind}")
    if any(re.match(r"^case_\d{5}$", e) for e in entries) or "data" in names and os.path.isdir(
            os.path.join(src, "data")) and any(re.match(r"^case_\d{5}$", e) for e in os.listdir(os.path.join(src, "data"))):
        hints.append("it looks like a KiTS release (use 'convert kits')")
    if any(re.match(r"^(volume|segmentation)-\d+\.nii", e) for e in entries) or any(
            e.lower().startswith("training batch") for e in entries):
        hints.append("it looks like the LiTS release (use 'convert lits')")
    shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
    return (("; ".join(hints) + "; ") if hints else "") + f"it contains: {shown}"


# ----------------------------------------------------------------------------------------- reading
def _nifti_expected_bytes(header: bytes) -> Optional[int]:
    """vox_offset + data bytes of a NIfTI-1 header, or None if it is not NIfTI-1."""
    if len(header) < 348:
        return None
    for endian in "<>":
        if struct.unpack(endian + "i", header[:4])[0] == 348:
            break
    else:
        return None
    dim = struct.unpack(endian + "8h", header[40:56])
    bitpix = struct.unpack(endian + "h", header[72:74])[0]
    vox_offset = struct.unpack(endian + "f", header[108:112])[0]
    ndim = dim[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    n = 1
    for d in dim[1:ndim + 1]:
        n *= max(int(d), 1)
    return int(max(vox_offset, 352)) + n * bitpix // 8


def _gzip_stream_complete(path: str) -> bool:
    """Decompress the whole file to check it is a complete, CRC-correct gzip stream (slow path)."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    with open(path, "rb") as f:
        while True:
            block = f.read(1 << 22)
            if not block:
                return d.eof
            try:
                d.decompress(block, 0)
            except zlib.error:
                return False
            if d.eof:
                return True


def check_file_complete(path: str) -> Optional[str]:
    """ITK zero-fills truncated NIfTI files without an error; detect them. Returns a problem or None."""
    lower = path.lower()
    try:
        if lower.endswith(".nii"):
            with open(path, "rb") as f:
                expected = _nifti_expected_bytes(f.read(352))
            size = os.path.getsize(path)
            if expected is not None and size < expected:
                return f"it is truncated ({size} of {expected} bytes)"
        elif lower.endswith(".nii.gz"):
            with gzip.open(path, "rb") as f:
                expected = _nifti_expected_bytes(f.read(352))
            if expected is None:
                return None
            with open(path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                isize = struct.unpack("<I", f.read(4))[0]
            if isize != expected % (1 << 32) and not _gzip_stream_complete(path):
                return "it is truncated or corrupt (incomplete gzip stream)"
    except (OSError, EOFError, zlib.error) as e:
        return f"it is truncated or corrupt ({e})"
    return None


def _sitk_reason(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = lines[-1] if lines else str(e)
    return re.sub(r"^sitk::ERROR:\s*", "", msg)


def _check_readable(path: str, what: str, case: str) -> None:
    if not os.path.exists(path):
        raise ConversionError(f"case '{case}': {what} file {path} is missing")
    if os.path.isdir(path):
        raise ConversionError(f"case '{case}': {what} {path} is a folder, expected an image file")
    if os.path.getsize(path) == 0:
        raise ConversionError(f"case '{case}': {what} file {path} is empty (0 bytes)")


def read_image(path: str, case: str, what: str = "image") -> sitk.Image:
    """Read a whole image; missing / empty / unreadable / truncated files raise ConversionError."""
    _check_readable(path, what, case)
    problem = check_file_complete(path)
    if problem:
        raise ConversionError(f"case '{case}': {what} file {path} cannot be used: {problem}")
    try:
        return sitk.ReadImage(path)
    except RuntimeError as e:
        raise ConversionError(f"case '{case}': {what} file {path} cannot be read: {_sitk_reason(e)}") from None


def read_header(path: str, case: str, what: str = "image") -> sitk.ImageFileReader:
    """Read only the header (size, spacing, origin, direction) of an image file."""
    _check_readable(path, what, case)
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ConversionError(f"case '{case}': {what} file {path} cannot be read: {_sitk_reason(e)}") from None
    return reader


# ----------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    size: tuple
    spacing: tuple
    origin: tuple
    direction: tuple  # row-major, dim x dim

    @classmethod
    def of(cls, obj) -> "Geometry":
        """Geometry of an ``sitk.Image`` or an ``ImageFileReader`` after ReadImageInformation."""
        return cls(tuple(int(s) for s in obj.GetSize()), tuple(obj.GetSpacing()), tuple(obj.GetOrigin()),
                   tuple(obj.GetDirection()))

    @property
    def dim(self) -> int:
        return len(self.size)

    def spatial(self) -> "Geometry":
        """The first three axes of a 4D (multi-channel) geometry."""
        if self.dim == 3:
            return self
        d = np.array(self.direction).reshape(self.dim, self.dim)[:3, :3]
        return Geometry(self.size[:3], self.spacing[:3], self.origin[:3], tuple(d.ravel()))


def _fmt(t) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in t) + ")"


def geometry_mismatch(a: Geometry, b: Geometry, tol: float = DEFAULT_TOLERANCE) -> Optional[str]:
    """None when a and b agree; else which property differs.

    Tolerances: spacing relative (``tol``), origin in voxels (``tol`` x spacing), direction absolute.
    """
    if a.size != b.size:
        return f"size {a.size} vs {b.size}"
    sa, sb = np.array(a.spacing), np.array(b.spacing)
    if np.any(np.abs(sa - sb) > tol * np.abs(sa)):
        return f"spacing {_fmt(a.spacing)} vs {_fmt(b.spacing)}"
    if np.any(np.abs(np.array(a.origin) - np.array(b.origin)) > tol * sa):
        return f"origin {_fmt(a.origin)} vs {_fmt(b.origin)}"
    if np.any(np.abs(np.array(a.direction) - np.array(b.direction)) > tol):
        return f"direction {_fmt(a.direction)} vs {_fmt(b.direction)}"
    return None


def check_geometry(image: Geometry, label: Geometry, case: str, image_path: str, label_path: str,
                   tol: float = DEFAULT_TOLERANCE, what: str = "image and label") -> None:
    problem = geometry_mismatch(image, label, tol)
    if problem:
        prop = problem.split(" ", 1)[0]
        raise ConversionError(f"case '{case}': {what} differ in {prop}: {problem} ({image_path} vs "
                              f"{label_path}; tolerance {tol:g})")


# ----------------------------------------------------------------------------------------- labels
def _chunks(n: int, step: int = CHUNK_SLICES):
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


def present_values(arr: np.ndarray, case: str, path: str) -> list[int]:
    """Sorted label values present in a label array, scanning it in slabs (bounded extra memory).

    Non-integer values raise ConversionError.
    """
    found: set[int] = set()
    is_int = np.issubdtype(arr.dtype, np.integer)
    for s in _chunks(arr.shape[0] if arr.ndim else 1):
        chunk = arr[s] if arr.ndim else arr
        if not is_int:
            if not np.all(np.isfinite(chunk)) or not np.array_equal(chunk, np.rint(chunk)):
                bad = chunk[~np.isfinite(chunk) | (chunk != np.rint(chunk))].ravel()[0]
                raise ConversionError(f"case '{case}': label file {path} holds the non-integer value {bad:g}; "
                                      "a label map must hold integer label values")
        lo, hi = chunk.min(), chunk.max()
        if lo >= 0 and hi < 65536:
            counts = np.bincount(chunk.astype(np.intp, copy=False).ravel(), minlength=1)
            found.update(int(v) for v in np.flatnonzero(counts))
        else:
            found.update(int(v) for v in np.unique(chunk))
    return sorted(found)


def check_label_values(values: Iterable[int], defined: Mapping[int, str], case: str, path: str,
                       dataset: str, hint: str = "") -> None:
    undefined = sorted(set(values) - set(defined))
    if undefined:
        table = ", ".join(f"{v} {n}" for v, n in sorted(defined.items()))
        raise ConversionError(f"case '{case}': label file {path} holds value(s) {undefined} that {dataset} does "
                              f"not define (defined: {table}){hint}")


def remap_labels(arr: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """``lut[arr]`` slab by slab into a uint8 array (``arr`` holds checked, non-negative integers)."""
    out = np.empty(arr.shape, dtype=np.uint8)
    for s in _chunks(arr.shape[0]):
        out[s] = lut[arr[s].astype(np.intp, copy=False)]
    return out


def label_image_like(arr: np.ndarray, reference: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(reference)
    return img


def as_uint8_label(seg: sitk.Image, reference_geometry: Geometry) -> sitk.Image:
    """The label map as uint8 carrying exactly ``reference_geometry`` (values already checked 0..255)."""
    out = seg if seg.GetPixelID() == sitk.sitkUInt8 else sitk.Cast(seg, sitk.sitkUInt8)
    if Geometry.of(out) != reference_geometry:
        out = sitk.Image(out)  # do not modify the caller's image
        out.SetSpacing(reference_geometry.spacing)
        out.SetOrigin(reference_geometry.origin)
        out.SetDirection(reference_geometry.direction)
    return out


# ----------------------------------------------------------------------------------------- hashing
def reorient(img: sitk.Image, orientation: Optional[str]) -> sitk.Image:
    """Permute / flip the voxel axes to an orientation code (e.g. 'LPS'). No interpolation: every voxel
    keeps its value and its world coordinate; only the storage order and the header change."""
    if not orientation:
        return img
    if sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection()) == orientation:
        return img
    return sitk.DICOMOrient(img, orientation)


def _hash_arrays(arrays) -> str:
    h = hashlib.blake2b(digest_size=16)
    for arr in arrays:
        h.update(repr(arr.shape).encode())
        for s in _chunks(arr.shape[0]):
            h.update(np.ascontiguousarray(arr[s], dtype="<f4").tobytes())
    return h.hexdigest()


def content_hashes(images: Sequence[sitk.Image]) -> tuple[str, str]:
    """Two hashes of the voxel content of a case's channels, both independent of file format, pixel type
    (values hashed as float32), origin and spacing: one in storage order (the same voxel array saved with
    another header) and one in LPS order (the same scan re-stored with permuted / flipped axes, header
    consistent). Two sources shipping the same scan (MSD Task03 Liver = LiTS) share at least one of them."""
    raw = _hash_arrays(sitk.GetArrayViewFromImage(img) for img in images)
    lps = _hash_arrays(sitk.GetArrayViewFromImage(reorient(img, "LPS")) for img in images)
    return raw, lps


def write_image(img: sitk.Image, path: str) -> None:
    sitk.WriteImage(img, path, True)


# ----------------------------------------------------------------------------------------- atomic output
class AtomicDataset:
    """Write a dataset into a hidden temporary folder beside the target; rename it into place only when
    the ``with`` block ends without an exception. Any failure, Ctrl-C or SIGTERM removes the temporary
    folder; an existing target is replaced only with ``overwrite`` and only after success."""

    def __init__(self, root: str, dataset_id, name: str, overwrite: bool = False):
        self.dataset_id = check_dataset_id_and_name(dataset_id, name)
        self.root = os.path.abspath(root)
        self.name = dataset_folder_name(self.dataset_id, name)
        self.final = os.path.join(self.root, self.name)
        self.overwrite = overwrite
        self.tmp: Optional[str] = None
        self._old_sigterm = None
        self._check_existing()

    def existing(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        prefix = f"Dataset{self.dataset_id:03d}_"
        return sorted(os.path.join(self.root, d) for d in os.listdir(self.root)
                      if d.startswith(prefix) and os.path.isdir(os.path.join(self.root, d)))

    def _check_existing(self) -> None:
        existing = self.existing()
        if existing and not self.overwrite:
            raise ConversionError(f"target dataset id {self.dataset_id} already exists: {', '.join(existing)}; "
                                  "refusing to overwrite it (pass --overwrite to replace it)")

    def __enter__(self) -> str:
        try:
            os.makedirs(self.root, exist_ok=True)
            self.tmp = tempfile.mkdtemp(prefix=f".tmp_{self.name}_", dir=self.root)
        except OSError as e:
            raise ConversionError(f"cannot write into the output folder {self.root}: {e}") from None
        if multiprocessing.current_process().name == "MainProcess":
            try:
                self._old_sigterm = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
            except ValueError:  # not the main thread
                self._old_sigterm = None
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._commit()
        finally:
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)
            if self.tmp and os.path.isdir(self.tmp):
                shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    def _commit(self) -> None:
        self._check_existing()
        trash = []
        try:
            for old in self.existing():
                t = os.path.join(self.root, f".trash_{os.path.basename(old)}_{uuid.uuid4().hex[:8]}")
                os.rename(old, t)
                trash.append((old, t))
            os.rename(self.tmp, self.final)
        except BaseException:
            for old, t in trash:  # put the old dataset back
                if os.path.isdir(t) and not os.path.exists(old):
                    os.rename(t, old)
            raise
        for _, t in trash:
            shutil.rmtree(t, ignore_errors=True)
        self.tmp = None


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt


def _inside(path: str, folder: str) -> bool:
    a, b = os.path.realpath(path), os.path.realpath(folder)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def check_source_safe(src: str, target: "AtomicDataset") -> None:
    """Refuse layouts where writing the target could touch the source: the output root inside the source
    tree, or the source inside the dataset folder that would be written / replaced."""
    if _inside(target.root, src):
        raise ConversionError(f"the output folder {target.root} is inside the source {src}; the source is never "
                              "written to: choose another -o/--output-root")
    for folder in [target.final] + target.existing():
        if _inside(src, folder):
            raise ConversionError(f"the source {src} is inside the target dataset {folder}, which this command "
                                  "would replace; convert into another dataset id")


# ----------------------------------------------------------------------------------------- parallel
def _worker_init():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and cleans up


def _mp_context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def run_cases(fn: Callable, jobs: Sequence, num_processes: int, desc: str) -> list:
    """``[fn(job) for job in jobs]`` with a progress bar, one case per task, ``num_processes`` workers.

    Only ``num_processes`` cases are in memory at a time. The first failure cancels the cases not yet
    started, waits for the running ones (so nothing writes into a folder being removed) and re-raises.
    """
    results = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc=desc, unit="case", file=sys.stderr, dynamic_ncols=True)
    try:
        if num_processes <= 1 or len(jobs) <= 1:
            for i, job in enumerate(jobs):
                results[i] = fn(job)
                bar.update()
            return results
        ex = ProcessPoolExecutor(max_workers=min(num_processes, len(jobs)), mp_context=_mp_context(),
                                 initializer=_worker_init)
        try:
            futures = {ex.submit(fn, job): i for i, job in enumerate(jobs)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    results[futures[f]] = f.result()  # re-raises the worker's exception
                    bar.update()
        except BrokenProcessPool:
            raise ConversionError(f"{desc}: a worker process died (out of memory?); retry with fewer processes "
                                  "(-np)") from None
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
        return results
    finally:
        bar.close()


def default_num_processes() -> int:
    return max(1, min(4, os.cpu_count() or 1))


# ----------------------------------------------------------------------------------------- dataset.json
def write_dataset_json(folder: str, channel_names: Mapping, labels: Mapping[str, int], num_training: int,
                       name: str, description: str, **extra) -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    generate_dataset_json(folder, dict(channel_names), dict(labels), num_training, ".nii.gz",
                          dataset_name=name, description=description,
                          overwrite_image_reader_writer="SimpleITKIO",
                          license="see the licence of the source dataset(s)",
                          converted_by="nnunet-partial", **extra)


def progress_note(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


# ----------------------------------------------------------------------------------------- image + label pairs
def convert_pair_case(job: dict) -> dict:
    """Convert one case given as an image file and (optionally) a label file (LiTS, KiTS).

    The image is written unchanged (same voxels, pixel type, spacing, origin, direction) with SimpleITK; the
    label as uint8 on exactly the image's geometry after checking geometry and label values.
    """
    name = job["name"]
    img = read_image(job["image"], name, "image")
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(f"case '{name}': image {job['image']} is {img.GetDimension()}D with "
                              f"{img.GetNumberOfComponentsPerPixel()} component(s); expected a 3D scalar volume")
    geo = Geometry.of(img)
    result = {"case": job["case"], "values": None, "bytes": os.path.getsize(job["image"])}
    if job.get("label"):
        seg = read_image(job["label"], name, "label")
        check_geometry(geo, Geometry.of(seg), name, job["image"], job["label"], job["tolerance"])
        values = present_values(sitk.GetArrayViewFromImage(seg), name, job["label"])
        check_label_values(values, job["defined"], name, job["label"], job["dataset"], job.get("hint", ""))
        write_image(as_uint8_label(seg, geo), job["out_label"])
        result["values"] = values
        result["bytes"] += os.path.getsize(job["label"])
    write_image(img, job["out_image"])
    return result


def run_pair_conversion(*, src: str, train: Sequence[dict], test: Sequence[dict], root: str, dataset_id, name: str,
                        overwrite: bool, num_processes: int, labels: Mapping[str, int], dataset: str,
                        tolerance: float, description: str, hint: str = "", channel_names=None) -> str:
    """Shared driver of LiTS / KiTS: ``train``/``test`` are dicts with ``case``, ``name``, ``image``, ``label``."""
    defined = {v: k for k, v in labels.items()}
    target = AtomicDataset(root, dataset_id, name, overwrite)
    check_source_safe(src, target)
    with target as tmp:
        jobs = []
        for part, cases in (("Tr", train), ("Ts", test)):
            if cases:
                os.makedirs(os.path.join(tmp, "images" + part))
            for c in cases:
                job = dict(c, defined=defined, dataset=dataset, hint=hint, tolerance=tolerance,
                           out_image=os.path.join(tmp, "images" + part, c["case"] + "_0000.nii.gz"))
                if part == "Tr":
                    job["out_label"] = os.path.join(tmp, "labelsTr", c["case"] + ".nii.gz")
                else:
                    job["label"] = None
                jobs.append(job)
        os.makedirs(os.path.join(tmp, "labelsTr"))
        results = run_cases(convert_pair_case, jobs, num_processes, f"convert {dataset}")
        provenance = {c["case"]: {"source": dataset, "original_case": c["name"],
                                  "files": [os.path.relpath(c["image"], src), os.path.relpath(c["label"], src)]}
                      for c in train}
        write_dataset_json(tmp, channel_names or {"0": "CT"}, labels, len(train), name, description,
                           source_folder=os.path.abspath(src), case_provenance=provenance)
    summarize(target.final, dataset, src, results, labels, len(train), len(test))
    return target.final


def summarize(final: str, dataset: str, src: str, results: Sequence[dict], labels: Mapping[str, int],
              n_train: int, n_test: int) -> None:
    print(f"{dataset}: converted {n_train} training case(s)" + (f" and {n_test} test case(s)" if n_test else "")
          + f" from {src} into {final}")
    labelled = [r for r in results if r and r.get("values") is not None]
    for lname, v in labels.items():
        if v == 0:
            continue
        k = sum(v in r["values"] for r in labelled)
        print(f"  label {v} {lname!r}: present in {k} of {len(labelled)} label map(s)")
