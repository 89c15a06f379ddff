"""What a CT's files declare, checked against the files before a voxel is read.

ITK trusts a header: a `.raw` shorter than its `.mhd` fails as "No such file or directory",
a truncated `.nii` or `.nii.gz` reads its missing voxels as 0 HU, and a NIfTI whose sform is
sheared is read by its qform instead, the positions of its voxels off by millimetres. Here
each is one line naming the file and what is wrong, from the headers and the files' sizes.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from luna_dist.imaging.geometry import Geometry, orientation, shear


class CtError(Exception):
    """A CT that cannot be read; the message names the file and the problem."""


SHEAR_TOLERANCE = 0.1
"""A grid's axes may miss right angles by as much as moves its far side a tenth of its smallest voxel: the
rounding of a header's decimals (DICOM's strings, NIfTI's float32) stays far below it, a gantry tilt of a
tenth of a degree over a 40 mm scan is above it."""


def check_orthogonal(path: Path, steps: np.ndarray, size_xyz, what: str) -> None:
    """CtError where the grid whose axis steps (mm, columns) are `steps` is sheared beyond SHEAR_TOLERANCE.

    A sheared grid's array is a distorted picture of the patient, which no model saw in training: it is
    refused with its angle rather than resampled, so every finding comes from voxels as scanned.
    """
    angle, offset = shear(steps, size_xyz)
    if offset > SHEAR_TOLERANCE * np.linalg.norm(steps, axis=0).min():
        raise CtError(f"{path}: {what} {angle:.1f}° off a right angle, {offset:.1f} mm across the volume: a sheared "
                      "grid, which the models never saw; resample it onto an orthogonal grid first")


# -- MetaImage (.mhd + data file, .mha) ------------------------------------------------------------------
HEADER_BYTES = 1 << 16
"""A MetaImage header is read from at most this many bytes: the voxels of a `.mha` follow it in the file."""

_ELEMENT_BYTES = {"MET_UCHAR": 1, "MET_CHAR": 1, "MET_USHORT": 2, "MET_SHORT": 2, "MET_UINT": 4,
                  "MET_INT": 4, "MET_FLOAT": 4, "MET_DOUBLE": 8}

_PER_AXIS = {"DimSize": 1, "ElementSpacing": 1, "ElementSize": 1, "Offset": 1, "Origin": 1, "Position": 1,
             "TransformMatrix": 2, "Rotation": 2, "Orientation": 2}
"""Header fields with one value per axis (power 1) or one per pair of axes (power 2: a matrix)."""


def metaimage_data_file(mhd: Path, header: bytes) -> Path | None:
    """The file the `.mhd` header `header` names for its voxels (which may not exist), or None."""
    named = _metaimage_fields(header.decode(errors="replace")).get("ElementDataFile")
    return mhd.parent / named if named else None


def _metaimage_fields(header: str) -> dict[str, str]:
    """A MetaImage header's `KEY = VALUE` lines."""
    return dict((key.strip(), value.strip())
                for key, sep, value in (line.partition("=") for line in header.splitlines()) if sep)


def check_metaimage(path: Path) -> Path | None:
    """Catch the common faults of a MetaImage (`.mhd` and its data file, or a `.mha` holding both) before
    ITK reports them obscurely; return the `.mhd`'s data file where it names one.

    ITK says "No such file or directory" even for a truncated `.raw` or `.mha`; here the user
    learns which file is missing or how many bytes it lacks.
    """
    try:
        with open(path, "rb") as file:
            head = file.read(HEADER_BYTES)
    except OSError as err:
        raise CtError(f"{path}: cannot read the header: {err.strerror}") from err
    start = head.find(b"ElementDataFile")
    line_end = head.find(b"\n", start) if start >= 0 else -1  # the voxels of a .mha follow that line
    end = line_end + 1 if line_end >= 0 else len(head)
    header = _metaimage_fields(head[:end].decode(errors="replace"))
    missing = [key for key in ("NDims", "DimSize", "ElementType", "ElementDataFile") if key not in header]
    if missing:
        raise CtError(f"{path}: not a MetaImage header (missing {', '.join(missing)})")
    _check_dimensions(path, header)
    data_file = header["ElementDataFile"]
    if data_file == "LIST" or "%" in data_file:
        return None  # slices in files of their own: ITK checks them
    local = data_file == "LOCAL"
    data_path = path if local else path.parent / data_file
    if not data_path.is_file():
        raise CtError(f"{path}: its data file {data_path} is missing")
    try:
        voxels = int(np.prod([int(n) for n in header["DimSize"].split()]))
        channels = int(header.get("ElementNumberOfChannels", "1"))
        expected = voxels * channels * _ELEMENT_BYTES[header["ElementType"]]
        if header.get("CompressedData", "False") == "True":
            expected = int(header["CompressedDataSize"]) if "CompressedDataSize" in header else 0
    except (ValueError, KeyError) as err:
        raise CtError(f"{path}: bad DimSize, ElementType or CompressedDataSize in the header ({err})") from err
    actual = data_path.stat().st_size - (end if local else 0)
    if actual < expected:
        raise CtError(f"{data_path}: truncated, {actual} bytes{' after the header' if local else ''} where the header "
                      f"needs {expected}")
    return None if local else data_path


def _check_dimensions(path: Path, header: dict[str, str]) -> None:
    """The header agrees with itself: NDims says how many values each per-axis field holds."""
    try:
        ndims = int(header["NDims"])
    except ValueError:
        raise CtError(f"{path}: inconsistent header: NDims = {header['NDims']!r} is not a number") from None
    for key, power in _PER_AXIS.items():
        values = header.get(key, "").split()
        if key in header and len(values) != ndims**power:
            raise CtError(f"{path}: inconsistent header: NDims = {ndims} but {key} has {len(values)} "
                          f"value(s) ({header[key]}), expected {ndims**power}")


# -- NIfTI (.nii, .nii.gz) -------------------------------------------------------------------------------
def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def check_nifti(path: Path, reader: sitk.ImageFileReader) -> None:
    """A NIfTI's file holds the bytes its header declares, and its sform, where it has one, is not sheared.

    The bytes are checked before any is read: a `.nii` by its size; a `.nii.gz` by the size its gzip
    trailer records (`ISIZE`, the uncompressed size modulo 2**32), and only where that disagrees (a stream
    of several members, or a cut one) by decompressing it, counting, at most the bytes the header declares.
    """
    meta = {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()}
    try:
        dims = [int(meta[f"dim[{k}]"]) for k in range(1, int(meta["dim[0]"]) + 1)]
        needed = int(float(meta["vox_offset"])) + int(np.prod(dims)) * int(meta["bitpix"]) // 8
    except (KeyError, ValueError):
        return  # ITK read the header without these: it found the sizes itself
    held = _gzip_bytes(path, needed) if path.name.lower().endswith(".gz") else path.stat().st_size
    if held < needed:
        raise CtError(f"{path}: truncated, {held} bytes{' once decompressed' if path.suffix.lower() == '.gz' else ''} "
                      f"where the header needs {needed}")
    if int(meta.get("sform_code", "0")) > 0:
        try:
            sform = np.array([[float(v) for v in meta[f"srow_{axis}"].split()[:3]] for axis in "xyz"])
        except (KeyError, ValueError):
            return
        check_orthogonal(path, sform, reader.GetSize()[:3], "sheared geometry: its sform (srow_x/y/z) has axes")


NIFTI_FLOATS = {16: "f4", 64: "f8"}
"""NIfTI's float datatypes: the voxel types that can be no number."""


def nifti_no_numbers(path: Path, reader: sitk.ImageFileReader) -> int:
    """How many voxels of a float NIfTI are not a number (NaN, infinite), counted in its file a block at a time.

    ITK's NIfTI reader sets them to 0 (nifti_clib's "bad floats"), so an all-NaN CT would read as water and
    a partly NaN one be patched silently: only the file tells. Read once more for that, from the page cache
    where ITK has just read it; NIfTIs of integers hold none and are not read again.
    """
    meta = {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()}
    kind = NIFTI_FLOATS.get(int(meta.get("datatype", "0")))
    if kind is None:
        return 0
    opened = gzip.open if path.name.lower().endswith(".gz") else open
    with opened(path, "rb") as file:
        order = "<" if int.from_bytes(file.read(4), "little") in (348, 540) else ">"
        file.seek(int(float(meta["vox_offset"])))
        dtype = np.dtype(order + kind)
        left, bad = int(np.prod([int(meta[f"dim[{k}]"]) for k in range(1, int(meta["dim[0]"]) + 1)])), 0
        while left and (block := file.read(min(left, 1 << 20) * dtype.itemsize)):
            values = np.frombuffer(block, dtype=dtype)
            bad += values.size - int(np.count_nonzero(np.isfinite(values)))
            left -= values.size
    return bad


def _gzip_bytes(path: Path, needed: int) -> int:
    """`needed` where the gzip file `path` decompresses to at least that many bytes, else the bytes it holds.

    Decompressed a block at a time, counted and dropped, member after member; stopped at `needed`."""
    try:
        with open(path, "rb") as file:
            file.seek(-4, 2)
            if int.from_bytes(file.read(4), "little") == needed % 2**32:
                return needed
            file.seek(0)
            held, stream = 0, zlib.decompressobj(wbits=31)
            while held < needed and (data := file.read(1 << 16)):
                while data:
                    held += len(stream.decompress(data))
                    data, stream = (stream.unused_data, zlib.decompressobj(wbits=31)) if stream.eof else (b"", stream)
            return held
    except (OSError, zlib.error) as err:
        raise CtError(f"{path}: not a readable gzip file ({err})") from None


@dataclass(frozen=True)
class CtSource:
    """A CT on disk, its headers read and checked before any voxel is."""

    path: Path  # as given: an image file, or a folder holding one DICOM series
    series_uid: str  # DICOM's SeriesInstanceUID where there is one, else the file's name without its suffixes
    files: tuple[Path, ...]  # what the voxels come from: the file (a .mhd and its data file), or the slices in order
    size_irc: tuple[int, int, int]  # slices, rows, columns, once turned to LPS
    geometry: Geometry  # once turned to LPS
    stored_axes: str  # how the file's axes run (`geometry.orientation`)
    dicom_uid: bool = False  # series_uid is the files' SeriesInstanceUID (not a name)
    skipped: tuple[str, ...] = ()  # what a DICOM folder holds besides its series and could not be read: one line each


DICOM_TAGS = {"modality": "0008|0060", "series_uid": "0020|000e", "position": "0020|0032",
              "orientation": "0020|0037"}
"""The DICOM tags a CT's headers are checked by (SimpleITK's group|element keys)."""


def ct_source(path: Path, uid: str, files: tuple[Path, ...], size_xyz, geometry: Geometry, **more) -> CtSource:
    """The source of a CT of `size_xyz` voxels at `geometry` as stored, described as it will be read: in LPS."""
    turned, size = geometry.turned_to_lps(tuple(size_xyz))
    return CtSource(path, uid, files, size[::-1], turned, orientation(geometry.direction), **more)


def check_voxels(path: Path, size_xyz, max_voxels: int) -> None:
    voxels = int(np.prod(size_xyz, dtype=np.int64))
    if voxels > max_voxels:
        raise CtError(f"{path}: its header declares {'x'.join(map(str, size_xyz))} = {voxels:,} voxels, more than "
                      f"--max-ct-voxels {max_voxels:,} (LUNA16's largest CT has 200,278,016): not read; raise "
                      "--max-ct-voxels if the CT is that large")


def read_header(path: Path, io: str = "") -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO(io)
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise CtError(f"{path}: cannot read the image: {itk_reason(err)}") from err
    return reader


def tag(reader: sitk.ImageFileReader, name: str) -> str | None:
    """A DICOM tag's value, without DICOM's padding; None where the file has none (or is no DICOM file)."""
    key = DICOM_TAGS[name]
    if not reader.HasMetaDataKey(key):
        return None
    return reader.GetMetaData(key).strip(" \0") or None


def check_modality(path: Path, reader: sitk.ImageFileReader) -> None:
    modality = tag(reader, "modality")
    if modality is not None and modality.upper() != "CT":
        raise CtError(f"{path}: DICOM modality {modality} ({DICOM_TAGS['modality']}), not CT: only CTs are analysed")


def itk_reason(err: RuntimeError) -> str:
    """ITK's exception text on one line, without the source locations it is wrapped in."""
    lines = [line.strip() for line in str(err).splitlines()]
    kept = [line for line in lines if line and not line.startswith(("Exception thrown", "Location"))]
    return "; ".join(kept) or str(err).strip()
