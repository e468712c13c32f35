"""Shared machinery of the converters: errors, atomic dataset folders, safe reading, geometry and
label checks, content hashing, and the per-case process pool with a progress bar."""
from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing
import os
import re
import reprlib
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


def shorten(items: Iterable, limit: int = 5) -> str:
    """'a, b, c', or the first ``limit`` items and a count ('a, b, c, d, e, ... (37 in all)'): lists of values,
    cases or files keep an error message to one readable line."""
    items = [str(i) for i in items]
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", ... ({len(items)} in all)"


_REPR = reprlib.Repr()
_REPR.maxlist = _REPR.maxdict = _REPR.maxset = _REPR.maxtuple = 8
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 3


def short_repr(obj) -> str:
    """``repr`` with long lists, mappings and strings cut (``[1, 2, ...]``): user input quoted in a message."""
    return _REPR.repr(obj)


def read_json_file(path: str, prefix: str):
    """The parsed JSON of ``path``; a :class:`ConversionError` starting with ``prefix`` (who asks, which file)
    when it is not valid JSON or cannot be read."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{prefix} is not valid JSON: line {e.lineno}, column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"{prefix} cannot be read: {e}") from None


def check_dataset_id_and_name(dataset_id, name: str) -> int:
    try:
        dataset_id = int(dataset_id)
    except (TypeError, ValueError):
        raise ConversionError(f"dataset id must be an integer 1..999, got {short_repr(dataset_id)}") from None
    if not 1 <= dataset_id <= 999:
        raise ConversionError(f"dataset id must be in 1..999, got {dataset_id}")
    if not isinstance(name, str) or not DATASET_NAME_RE.match(name):
        raise ConversionError(f"dataset name {short_repr(name)} is not usable in a folder name: use letters, digits, "
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
    return (("; ".join(hints) + "; ") if hints else "") + f"it contains: {shorten(entries, 6)}"


# ----------------------------------------------------------------------------------------- reading
# ITK reads a NIfTI (or MetaImage) file whose voxel data are shorter than its header declares without an error,
# filling the missing part with zeros, and reads a damaged gzip stream as far as it goes. So every file is
# checked to hold as many bytes as its header declares: a .nii by its size, a .nii.gz by counting the
# decompressed bytes while the converter reads it (one decode, see read_image), a MetaImage by its header.

_READ_BLOCK = 1 << 18      # compressed bytes read at a time
_INFLATE_BLOCK = 1 << 20   # decompressed bytes produced at a time (bounds memory for highly compressible labels)
GZIP_MAGIC = b"\x1f\x8b"
_MAX_DEFLATE_RATIO = 1032  # deflate cannot expand one byte to more than this
# NIfTI datatype -> (numpy type, SimpleITK pixel type): the scalar types ITK reads into a buffer as they are stored
_NIFTI_NUMPY = {2: ("u1", sitk.sitkUInt8), 4: ("i2", sitk.sitkInt16), 8: ("i4", sitk.sitkInt32),
                16: ("f4", sitk.sitkFloat32), 64: ("f8", sitk.sitkFloat64), 256: ("i1", sitk.sitkInt8),
                512: ("u2", sitk.sitkUInt16), 768: ("u4", sitk.sitkUInt32), 1024: ("i8", sitk.sitkInt64),
                1280: ("u8", sitk.sitkUInt64)}
# bytes per voxel of the other datatypes (complex, RGB, RGBA, long double): length-checked, read by ITK
_NIFTI_OTHER_SIZES = {32: 8, 128: 3, 1536: 16, 1792: 16, 2048: 32, 2304: 4}


@dataclass(frozen=True)
class NiftiHeader:
    """What a single-file NIfTI-1 / NIfTI-2 header says about the voxel data that follow it."""
    header_size: int  # 348 or 540
    endian: str       # struct / numpy byte order: '<' or '>'
    shape: tuple      # dim[1..dim[0]], x fastest
    datatype: int
    itemsize: int
    data_offset: int  # first voxel byte (vox_offset, at least the header size)
    vox_offset: float
    slope: float
    inter: float

    @property
    def data_bytes(self) -> int:
        n = self.itemsize
        for d in self.shape:
            n *= d
        return n

    @property
    def total_bytes(self) -> int:
        return self.data_offset + self.data_bytes

    @property
    def dtype(self) -> Optional[np.dtype]:
        code = _NIFTI_NUMPY.get(self.datatype)
        return np.dtype(self.endian + code[0]) if code else None

    def describe(self) -> str:
        """e.g. '24x24x12 int16 voxels from byte 352'"""
        kind = self.dtype.name if self.dtype is not None else f"{self.itemsize}-byte"
        return f"{'x'.join(map(str, self.shape))} {kind} voxels from byte {self.data_offset}"

    def plain(self) -> bool:
        """ITK reads the voxels exactly as stored: native byte order, a scalar type, the standard data offset and no
        scl_slope / scl_inter rescaling (which makes ITK return floats)."""
        slope_off = not np.isfinite(self.slope) or self.slope == 0 or (self.slope == 1 and self.inter == 0)
        native = self.endian == ("<" if sys.byteorder == "little" else ">")
        return (self.dtype is not None and native and slope_off and self.vox_offset == self.data_offset
                and self.data_offset >= self.header_size + 4)


def parse_nifti_header(head: bytes) -> Optional[NiftiHeader]:
    """The header at the start of a single-file NIfTI-1 (348 bytes) or NIfTI-2 (540 bytes) image, in either byte
    order; None when ``head`` is neither (Analyze, a .hdr/.img pair, another format)."""
    for endian in "<>":
        if len(head) >= 540 and struct.unpack_from(endian + "i", head)[0] == 540 and head[4:8] == b"n+2\0":
            datatype, bitpix = struct.unpack_from(endian + "2h", head, 12)
            dim = struct.unpack_from(endian + "8q", head, 16)
            vox_offset = float(struct.unpack_from(endian + "q", head, 168)[0])
            slope, inter = struct.unpack_from(endian + "2d", head, 176)
            size = 540
            break
        if len(head) >= 348 and struct.unpack_from(endian + "i", head)[0] == 348 and head[344:348] == b"n+1\0":
            dim = struct.unpack_from(endian + "8h", head, 40)
            datatype, bitpix = struct.unpack_from(endian + "2h", head, 70)
            vox_offset, slope, inter = struct.unpack_from(endian + "3f", head, 108)
            size = 348
            break
    else:
        return None
    ndim = dim[0]
    if not 1 <= ndim <= 7 or any(d < 0 for d in dim[1:ndim + 1]) or not np.isfinite(vox_offset):
        return None  # ITK refuses such a header with its own message
    itemsize = np.dtype(_NIFTI_NUMPY[datatype][0]).itemsize if datatype in _NIFTI_NUMPY else _NIFTI_OTHER_SIZES.get(
        datatype, bitpix // 8 if bitpix > 0 and bitpix % 8 == 0 else 0)
    if not itemsize:
        return None
    return NiftiHeader(size, endian, tuple(max(int(d), 1) for d in dim[1:ndim + 1]), int(datatype), itemsize,
                       max(int(vox_offset), size), vox_offset, float(slope), float(inter))


def _inflate(path: str, out: Optional[bytearray] = None, skip: int = 0) -> tuple[int, Optional[str]]:
    """Decompress every gzip member of ``path`` in blocks, counting the bytes; decompressed bytes ``skip`` ..
    ``skip + len(out)`` are copied into ``out``. Returns (decompressed length, problem or None); zlib checks each
    member's CRC and length; problem is "cut" for a stream that ends early. Bytes after the last member that are
    not a gzip member are ignored, as by gzip."""
    view = memoryview(out) if out is not None else None
    end = skip + (len(out) if out is not None else 0)
    total = 0
    with open(path, "rb") as f:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        data = f.read(_READ_BLOCK)
        while True:
            try:
                chunk = d.decompress(data, _INFLATE_BLOCK) if data else d.flush()
            except zlib.error as e:
                return total, f"is damaged ({_zlib_reason(e)})"
            if view is not None and total < end and total + len(chunk) > skip:
                a, b = max(total, skip), min(total + len(chunk), end)
                view[a - skip:b - skip] = memoryview(chunk)[a - total:b - total]
            total += len(chunk)
            if d.eof:
                data = d.unused_data or f.read(_READ_BLOCK)
                if 0 < len(data) < 2:
                    data += f.read(_READ_BLOCK)
                if not data.startswith(GZIP_MAGIC):
                    return total, None
                d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            elif d.unconsumed_tail:
                data = d.unconsumed_tail
            elif data:
                data = f.read(_READ_BLOCK)  # b"" at the end of the file: the next round flushes
            else:
                return total, "cut"


def _zlib_reason(e: Exception) -> str:
    return re.sub(r"^Error -?\d+ while decompressing data:\s*", "", str(e))


def _length_problem(hdr: NiftiHeader, held: int, compressed: bool,
                    stream_problem: Optional[str] = None) -> Optional[str]:
    declared = f"its header declares {hdr.total_bytes} ({hdr.describe()})"
    if stream_problem == "cut":
        return f"it is truncated: its gzip stream is cut off after {held} decompressed bytes; {declared}"
    if stream_problem:
        return f"it is corrupt: its gzip stream {stream_problem}; {declared}"
    if held < hdr.total_bytes:
        return f"it is truncated: it {'decompresses to' if compressed else 'holds'} {held} bytes but {declared}"
    return None


def _nifti_problem(path: str) -> Optional[str]:
    with open(path, "rb") as f:
        head = f.read(540)
    if head.startswith(GZIP_MAGIC):  # by content: ITK reads a gzipped .nii and a plain .nii.gz alike
        try:
            with gzip.open(path, "rb") as g:
                head = g.read(540)
        except (OSError, EOFError, zlib.error) as e:
            return f"it is truncated or corrupt: its gzip stream ends or breaks inside the header ({_zlib_reason(e)})"
        hdr = parse_nifti_header(head)
        if hdr is None:
            return None  # not NIfTI: the reader says what it is
        held, stream_problem = _inflate(path)
        return _length_problem(hdr, held, True, stream_problem)
    hdr = parse_nifti_header(head)
    return _length_problem(hdr, os.path.getsize(path), False) if hdr else None


_MET_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _metaimage_problem(path: str) -> Optional[str]:
    """MetaImage (.mha / .mhd): the data length its text header declares against the bytes present. Layouts this
    does not cover (lists of slice files, unknown types) are left to the reader."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    fields, offset = {}, None
    for m in re.finditer(rb"([^\r\n]*)(\r?\n|$)", head):
        key, _, value = m.group(1).decode("latin-1").partition("=")
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            offset = m.end()
            break
    if offset is None:
        return None
    try:
        dims = [int(v) for v in fields.get("DimSize", "").split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        header_size = int(fields.get("HeaderSize", "0"))
    except ValueError:
        return None
    source = fields["ElementDataFile"]
    if source == "LOCAL":
        held = os.path.getsize(path) - offset
    else:
        if source == "LIST" or "%" in source or header_size < 0:
            return None
        data = os.path.join(os.path.dirname(path), source)
        if not os.path.isfile(data):
            return f"its data file {data} (ElementDataFile) is missing"
        held = os.path.getsize(data) - header_size
    if fields.get("CompressedData", "False").lower() == "true":
        if not fields.get("CompressedDataSize", "").isdigit():
            return None
        expected, kind = int(fields["CompressedDataSize"]), "compressed voxel data"
    else:
        size = _MET_SIZES.get(fields.get("ElementType", ""))
        if not dims or size is None:
            return None
        expected, kind = int(np.prod(dims)) * channels * size, "voxel data"
    if held < expected:
        return (f"it is truncated: it holds {max(held, 0)} bytes of {kind} but its header declares {expected} "
                f"({'x'.join(map(str, dims))} {fields.get('ElementType', '?')})")
    return None


def check_file_complete(path: str) -> Optional[str]:
    """Why ``path`` holds fewer bytes than its header declares, or None. NIfTI (.nii, .nii.gz, either NIfTI-1 or -2)
    and MetaImage are checked here; for other formats (NRRD) the reader itself reports short data."""
    lower = path.lower()
    if lower.endswith((".nii", ".nii.gz")):
        return _nifti_problem(path)
    if lower.endswith((".mha", ".mhd")):
        return _metaimage_problem(path)
    return None


def _sitk_reason(e: Exception, path: str = "") -> str:
    """ITK's exception text, which spans several lines (a trace for NRRD), as one short phrase: its last line."""
    keep = []
    for ln in str(e).splitlines():
        ln = ln.strip()
        if not ln or ln.startswith("Exception thrown in") or re.match(r"^\S+\.(cxx|h|hxx):\d+:?$", ln):
            continue
        ln = re.sub(r"^(sitk::ERROR|ITK ERROR):\s*", "", ln)
        ln = re.sub(r"^\w+\(0x[0-9a-f]+\):\s*", "", ln)
        if ln.startswith("Reason: ") and os.path.isfile(path):
            continue  # errno left over from an earlier call: "No such file or directory" for a file that exists
        keep.append(ln)
    msg = re.sub(r"^\[nrrd\]\s*\w+:\s*", "", keep[-1]) if keep else str(e).strip()
    return msg if len(msg) <= 300 else msg[:297] + "..."


def _check_readable(path: str, what: str, case: str) -> None:
    if not os.path.exists(path):
        raise ConversionError(f"case '{case}': {what} file {path} is missing")
    if os.path.isdir(path):
        raise ConversionError(f"case '{case}': {what} {path} is a folder, expected an image file")
    if os.path.getsize(path) == 0:
        raise ConversionError(f"case '{case}': {what} file {path} is empty (0 bytes)")


def _unusable(case: str, what: str, path: str, problem: str) -> ConversionError:
    return ConversionError(f"case '{case}': {what} file {path} cannot be used: {problem}; download, extract or "
                           "convert it again")


def check_complete(path: str, case: str, what: str = "image") -> None:
    """Raise ConversionError when ``path`` holds fewer bytes than its header declares (see check_file_complete)."""
    _check_readable(path, what, case)
    try:
        problem = check_file_complete(path)
    except OSError as e:
        raise ConversionError(f"case '{case}': {what} file {path} cannot be read: {e.strerror or e}") from None
    if problem:
        raise _unusable(case, what, path, problem)


def _read_plain_nifti_gz(path: str, case: str, what: str) -> Optional[sitk.Image]:
    """Read a gzipped NIfTI ourselves, counting the decompressed bytes as they come, so that a short or damaged
    file is caught without a second decode. The header (geometry, metadata) still comes from ITK; only files
    ITK reads as stored (``NiftiHeader.plain``, 3D scalar) take this path; None for the others."""
    try:
        with gzip.open(path, "rb") as g:
            hdr = parse_nifti_header(g.read(540))
    except (OSError, EOFError, zlib.error):
        return None  # not gzip, or damaged in the header: check_file_complete / ITK say which
    if hdr is None or not hdr.plain() or len(hdr.shape) != 3:
        return None
    if hdr.data_bytes > _MAX_DEFLATE_RATIO * os.path.getsize(path):
        return None  # declares more than the file can hold: counted by check_complete, not allocated here
    buf = bytearray(hdr.data_bytes)
    held, stream_problem = _inflate(path, buf, hdr.data_offset)  # first: ITK cannot even open a damaged stream
    problem = _length_problem(hdr, held, True, stream_problem)
    if problem:
        raise _unusable(case, what, path, problem)
    reader = read_header(path, case, what)
    if (reader.GetNumberOfComponents() != 1 or tuple(reader.GetSize()) != hdr.shape
            or reader.GetPixelID() != _NIFTI_NUMPY[hdr.datatype][1]):
        return None  # ITK makes something else of it (not seen in practice): let it read the file itself
    img = sitk.GetImageFromArray(np.frombuffer(buf, hdr.dtype).reshape(hdr.shape[::-1]))
    del buf
    img.SetSpacing(reader.GetSpacing())
    img.SetOrigin(reader.GetOrigin())
    img.SetDirection(reader.GetDirection())
    for key in reader.GetMetaDataKeys():  # as sitk.ReadImage: the NIfTI header fields ride along to the writer
        img.SetMetaData(key, reader.GetMetaData(key))
    return img


def read_image(path: str, case: str, what: str = "image") -> sitk.Image:
    """Read a whole image; missing / empty / unreadable / truncated files raise ConversionError."""
    _check_readable(path, what, case)
    if path.lower().endswith(".nii.gz"):
        img = _read_plain_nifti_gz(path, case, what)
        if img is not None:
            return img
    check_complete(path, case, what)
    try:
        return sitk.ReadImage(path)
    except RuntimeError as e:
        raise ConversionError(f"case '{case}': {what} file {path} cannot be read: {_sitk_reason(e, path)}") from None


def read_header(path: str, case: str, what: str = "image") -> sitk.ImageFileReader:
    """Read only the header (size, spacing, origin, direction) of an image file."""
    _check_readable(path, what, case)
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ConversionError(f"case '{case}': {what} file {path} cannot be read: {_sitk_reason(e, path)}") from None
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
MAX_LISTED_VALUES = 8  # more undefined label values than this: summarise instead of listing


def _chunks(n: int, step: int = CHUNK_SLICES):
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


def _swap_hint(image: Optional[str], label: str) -> str:
    """' does this file hold an image? are volume-1 and segmentation-1 swapped?'"""
    if not image:
        return " does this file hold an image?"
    a, b = (re.sub(r"(\.nii(\.gz)?|\.mha|\.mhd|\.nrrd|\.nhdr)$", "", os.path.basename(p), flags=re.I)
            for p in (image, label))
    if a == b:  # MSD: imagesTr/x.nii.gz and labelsTr/x.nii.gz
        a, b = (os.path.join(os.path.basename(os.path.dirname(p)), os.path.basename(p)) for p in (image, label))
    return f" does this file hold an image? are {a} and {b} swapped?"


def present_values(arr: np.ndarray, case: str, path: str, image: Optional[str] = None) -> list[int]:
    """Sorted label values present in a label array, scanning it in slabs (bounded extra memory).

    Non-integer values raise ConversionError (``image``: the case's image file, named when the label file looks
    like an image).
    """
    found: set[int] = set()
    is_int = np.issubdtype(arr.dtype, np.integer)
    for s in _chunks(arr.shape[0] if arr.ndim else 1):
        chunk = arr[s] if arr.ndim else arr
        if not is_int:
            bad_mask = ~np.isfinite(chunk) | (chunk != np.rint(chunk))
            if bad_mask.any():
                bad = chunk[bad_mask].ravel()[0]
                # mostly non-integer: a scan, not a label map that merely went through interpolation
                hint = (";" + _swap_hint(image, path)) if bad_mask.mean() > 0.5 else ""
                raise ConversionError(f"case '{case}': label file {path} holds the non-integer value {bad:g}; "
                                      f"a label map must hold integer label values{hint}")
        lo, hi = int(chunk.min()), int(chunk.max())
        if lo >= 0 and hi < 65536:
            counts = np.bincount(chunk.astype(np.intp, copy=False).ravel(), minlength=1)
            found.update(int(v) for v in np.flatnonzero(counts))
        elif hi - lo < 1 << 17:  # e.g. an int16 scan mistaken for a label map
            counts = np.bincount((chunk.astype(np.intp) - lo).ravel(), minlength=1)
            found.update(int(v) + lo for v in np.flatnonzero(counts))
        else:
            found.update(int(v) for v in np.unique(chunk))
    return sorted(found)


def label_table(defined: Mapping[int, str], limit: int = 12) -> str:
    """'0 background, 1 liver, 2 tumor' (the first ``limit`` and a count for long label lists)."""
    return shorten([f"{v} {n}" for v, n in sorted(defined.items())], limit)


def check_label_values(values: Iterable[int], defined: Mapping[int, str], case: str, path: str,
                       dataset: str, hint: str = "", image: Optional[str] = None) -> None:
    values = sorted(values)
    undefined = [v for v in values if v not in defined]
    if not undefined:
        return
    table = label_table(defined)
    if len(undefined) <= MAX_LISTED_VALUES:
        raise ConversionError(f"case '{case}': label file {path} holds value(s) {undefined} that {dataset} does "
                              f"not define (defined: {table}){hint}")
    # an image mistaken for a label map holds thousands of values: summarise them
    raise ConversionError(f"case '{case}': label file {path} holds {len(values)} distinct values from {values[0]} "
                          f"to {values[-1]}, {len(undefined)} of which {dataset} does not define (defined: {table});"
                          + _swap_hint(image, path))


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
    # a copy: a view would outlive the temporary reoriented image (SimpleITK frees the buffer with it)
    lps = _hash_arrays(sitk.GetArrayFromImage(reorient(img, "LPS")) for img in images)
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
        apply_umask_modes(self.tmp)
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


def current_umask() -> int:
    try:
        with open("/proc/self/status") as f:  # read without changing it (os.umask can only set)
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask_modes(folder: str) -> None:
    """Give ``folder`` and everything in it the modes the umask gives any new folder / file (0755 / 0644 under
    umask 022): mkdtemp makes the temporary dataset folder 0700 and shutil.copy copies a source file's mode, and
    a dataset on a shared cluster must be readable by whoever the umask allows."""
    mask = current_umask()
    dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    os.chmod(folder, dir_mode)
    for dirpath, dirnames, filenames in os.walk(folder):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), dir_mode)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), file_mode)


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
        values = present_values(sitk.GetArrayViewFromImage(seg), name, job["label"], job["image"])
        check_label_values(values, job["defined"], name, job["label"], job["dataset"], job.get("hint", ""),
                           image=job["image"])
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
