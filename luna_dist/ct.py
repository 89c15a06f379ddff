"""Read one CT with SimpleITK and cut fixed-size chunks around candidate centres."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from luna_dist.geometry import Geometry

HU_MIN, HU_MAX = -1000, 1000
"""Hounsfield range kept: air at -1000; bone and metal above +1000 carry nothing for nodules."""

CHUNK_SHAPE = (32, 48, 48)
"""Chunk size in voxels, (I, R, C) = (slices, rows, columns)."""


class CtError(Exception):
    """A CT that cannot be read; the message names the file and the problem."""


@dataclass
class Ct:
    series_uid: str
    hu: np.ndarray  # (I, R, C) int16 Hounsfield units as stored, a view of the image; chunks are clipped when cut
    geometry: Geometry


@dataclass(frozen=True)
class CtSource:
    """A CT on disk, its headers read and checked before any voxel is."""

    path: Path  # as given: an image file, or a folder holding one DICOM series
    series_uid: str  # DICOM's SeriesInstanceUID where there is one, else the file's name without its suffixes
    files: tuple[Path, ...]  # what the voxels are read from: the file, or the series' slices in order
    size_irc: tuple[int, int, int]  # slices, rows, columns


DICOM_TAGS = {"modality": "0008|0060", "series_uid": "0020|000e", "position": "0020|0032",
              "orientation": "0020|0037"}
"""The DICOM tags a CT's headers are checked by (SimpleITK's group|element keys)."""

SLICE_GAP_TOLERANCE = 0.01
"""Slices of a series may lie this share of their spacing off even spacing (DICOM keeps positions as
decimal strings) before the series counts as unevenly spaced or missing slices."""


def find_ct(path: Path) -> CtSource:
    """A CT's source from its headers: a `.mhd/.raw` pair, another 3-D image file SimpleITK reads (NIfTI,
    `.mha`, `.nrrd`, a multi-frame DICOM file), or a folder holding one DICOM series.

    Raises CtError naming the path and the problem: not found, unreadable, not 3-D, a DICOM modality other
    than CT, a folder of no or several series, a series of one slice, slices missing or unevenly spaced.
    """
    path = Path(path)
    if path.is_dir():
        return _dicom_series(path)
    if not path.is_file():
        raise CtError(f"{path}: file not found")
    if path.suffix.lower() == ".mhd":
        _check_metaimage(path)
    reader = _header(path)
    _check_modality(path, reader)
    if reader.GetDimension() != 3:
        raise CtError(f"{path}: expected a 3-D image, found {reader.GetDimension()}-D")
    return CtSource(path, _tag(reader, "series_uid") or _stem(path), (path,), tuple(reader.GetSize()[::-1]))


def _stem(path: Path) -> str:
    """The file's name without its suffix, and without `.gz` before it: `1.2.3.nii.gz` is series 1.2.3."""
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    return Path(name).stem


def read_ct(path: Path) -> Ct:
    """Read a CT (`find_ct`: a `.mhd/.raw` pair, another image file, a DICOM series folder) as int16 HU, with
    its geometry (origin, spacing, direction cosines), without a copy when stored as int16.

    DICOM's rescale slope and intercept are applied by SimpleITK. Raises CtError naming the file for what
    `find_ct` refuses, a truncated image, and voxel types that cannot hold HU (unsigned or 8-bit).
    """
    source = find_ct(path)
    try:  # as stored: a cast here would wrap values beyond int16
        image = sitk.ReadImage([str(f) for f in source.files] if source.path.is_dir() else str(source.path))
    except RuntimeError as err:
        raise CtError(f"{source.path}: cannot read the image: {_itk_reason(err)}") from err
    return Ct(series_uid=source.series_uid, hu=_as_int16_hu(source.path, image), geometry=Geometry.of_image(image))


READ_AHEAD_STEP = 1 << 20
"""Bytes a read-ahead asks for at a time: Linux reads at most the device's readahead or largest request
(128 kB to 8 MB) of one `POSIX_FADV_WILLNEED`, so a CT is asked for in steps."""


def metaimage_data_file(mhd: Path, header: bytes) -> Path | None:
    """The file the `.mhd` header `header` names for its voxels (which may not exist), or None."""
    named = _metaimage_fields(header.decode(errors="replace")).get("ElementDataFile")
    return mhd.parent / named if named else None


def _metaimage_fields(header: str) -> dict[str, str]:
    """A MetaImage header's `KEY = VALUE` lines."""
    return dict((key.strip(), value.strip())
                for key, sep, value in (line.partition("=") for line in header.splitlines()) if sep)


class ReadAhead:
    """Has the kernel read the CTs a pool of readers takes next (`read_ahead`), in the order they take them:
    two a reader at first, then one more each time a reader takes up another (`more`)."""

    def __init__(self, paths: Iterable[Path | str], readers: int):
        self._upcoming = iter(paths)
        self.more(2 * max(1, readers))

    def more(self, count: int = 1) -> None:
        for path in itertools.islice(self._upcoming, count):
            read_ahead(Path(path))


def read_ahead(path: Path) -> None:
    """Have the kernel read a CT's files (a `.mhd` and its data file, another image file, a DICOM folder)
    into the page cache in the background, where it can (Linux); anything unreadable is left for
    `read_ct` to report.

    A shard build asks this for the CTs its workers take next, so the disk reads them while the
    workers cut and compress the ones before and a worker finds its CT in memory instead of waiting.
    """
    if not hasattr(os, "posix_fadvise"):  # macOS, Windows
        return
    path = Path(path)
    try:
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        if path.suffix.lower() == ".mhd" and (data := metaimage_data_file(path, path.read_bytes())) is not None:
            files.append(data)
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            try:
                for offset in range(0, os.fstat(fd).st_size, READ_AHEAD_STEP):
                    os.posix_fadvise(fd, offset, READ_AHEAD_STEP, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
    except OSError:
        pass


def _header(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise CtError(f"{path}: cannot read the image: {_itk_reason(err)}") from err
    return reader


def _tag(reader: sitk.ImageFileReader, name: str) -> str | None:
    """A DICOM tag's value, without DICOM's padding; None where the file has none (or is no DICOM file)."""
    key = DICOM_TAGS[name]
    if not reader.HasMetaDataKey(key):
        return None
    return reader.GetMetaData(key).strip(" \0") or None


def _check_modality(path: Path, reader: sitk.ImageFileReader) -> None:
    modality = _tag(reader, "modality")
    if modality is not None and modality.upper() != "CT":
        raise CtError(f"{path}: DICOM modality {modality} ({DICOM_TAGS['modality']}), not CT: only CTs are analysed")


def _dicom_series(folder: Path) -> CtSource:
    """The one DICOM series of `folder`, its slices in order along their normal, checked evenly spaced."""
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as err:
        raise CtError(f"{folder}: cannot list its DICOM series: {_itk_reason(err)}") from err
    if not series:
        raise CtError(f"{folder}: a folder holding no DICOM series (give a folder of one DICOM series, or an image "
                      "file such as .mhd, .nii.gz, .mha or .nrrd)")
    if len(series) > 1:
        raise CtError(f"{folder}: {len(series)} DICOM series ({', '.join(series[:3])}"
                      f"{', ...' if len(series) > 3 else ''}): give a folder holding one series")
    files = [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])]
    headers = [_header(f) for f in files]
    for file, reader in zip(files, headers):
        _check_modality(file, reader)
    if len(files) < 2:
        raise CtError(f"{folder}: a DICOM series of one slice: a 2-D image, not a CT")
    order = _slice_order(folder, files, headers)
    columns, rows = headers[0].GetSize()[:2]
    return CtSource(folder, _tag(headers[0], "series_uid") or folder.name, tuple(files[k] for k in order),
                    (len(files), rows, columns))


def _slice_order(folder: Path, files: list[Path], headers: list[sitk.ImageFileReader]) -> np.ndarray:
    """The slices' order along their normal, from each file's ImagePositionPatient
    projected on the normal of its ImageOrientationPatient; CtError where slices are missing or uneven."""
    try:
        position = np.array([[float(v) for v in _tag(r, "position").split("\\")] for r in headers])
        orientation = np.array([float(v) for v in _tag(headers[0], "orientation").split("\\")])
    except (AttributeError, ValueError):
        raise CtError(f"{folder}: a DICOM slice without a readable ImagePositionPatient "
                      f"({DICOM_TAGS['position']}) or ImageOrientationPatient ({DICOM_TAGS['orientation']}): "
                      "the slices cannot be placed") from None
    along = position @ np.cross(orientation[:3], orientation[3:])
    order = np.argsort(along, kind="stable")
    along = along[order]
    gaps = np.diff(along)
    spacing = float(np.median(gaps))
    if spacing <= 0:
        raise CtError(f"{folder}: its slices lie at the same position: not one 3-D series")
    off = np.flatnonzero(np.abs(gaps - spacing) > SLICE_GAP_TOLERANCE * spacing)
    if len(off):
        k = off[0]
        missing = round(gaps[k] / spacing) - 1
        what = (f"{missing} slice(s) missing" if missing >= 1 and abs(gaps[k] - (missing + 1) * spacing)
                <= SLICE_GAP_TOLERANCE * spacing else "uneven slice spacing")
        raise CtError(f"{folder}: {what}: {gaps[k]:.4g} mm between {files[order[k]].name} and "
                      f"{files[order[k + 1]].name} (at {along[k]:.4g} and {along[k + 1]:.4g} mm along the slice "
                      f"normal) where the others are {spacing:.4g} mm apart"
                      + (f", and {len(off) - 1} more such gap(s)" if len(off) > 1 else ""))
    return order


_CANNOT_HOLD_HU = (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkUInt32, sitk.sitkUInt64)
"""Voxel types without room for air's -1000 HU: such a CT holds raw scanner values or a picture, not HU."""


def _as_int16_hu(path: Path, image: sitk.Image) -> np.ndarray:
    """The voxels as int16 HU: a view of an int16 image; other types clipped to int16's range in their own
    type, then converted (floats rounded), so 40000.0 stays bone instead of wrapping round to air."""
    if image.GetPixelID() == sitk.sitkInt16:
        return np.asarray(_ImageBuffer(image))
    if image.GetPixelID() in _CANNOT_HOLD_HU or image.GetNumberOfComponentsPerPixel() != 1:
        raise CtError(f"{path}: voxels are {image.GetPixelIDTypeAsString()}, which cannot hold Hounsfield units "
                      "(air is -1000 HU); convert the CT to HU first (signed 16-bit, MET_SHORT, with its rescale "
                      "slope and intercept applied)")
    voxels = sitk.GetArrayViewFromImage(image)
    info = np.iinfo(np.int16)
    clipped = np.clip(voxels, info.min, info.max)
    if np.issubdtype(clipped.dtype, np.floating):
        np.rint(clipped, out=clipped)
    return clipped.astype(np.int16)


class _ImageBuffer:
    """Exposes an image's voxels to numpy without a copy while keeping the image alive.

    `sitk.GetArrayViewFromImage` alone returns a view that does not own the image: once
    the image is collected, the view reads freed memory. An array made from this object
    holds it (and so the image) as its base.
    """

    def __init__(self, image: sitk.Image):
        self.image = image
        self.__array_interface__ = sitk.GetArrayViewFromImage(image).__array_interface__


_ELEMENT_BYTES = {"MET_UCHAR": 1, "MET_CHAR": 1, "MET_USHORT": 2, "MET_SHORT": 2, "MET_UINT": 4,
                  "MET_INT": 4, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _check_metaimage(mhd_path: Path) -> None:
    """Catch the common faults of a MetaImage pair before ITK reports them obscurely.

    ITK says "No such file or directory" even for a truncated `.raw`; here the user
    learns which file is missing or how many bytes it lacks.
    """
    try:
        header = _metaimage_fields(mhd_path.read_text(errors="replace"))
    except OSError as err:
        raise CtError(f"{mhd_path}: cannot read the header: {err.strerror}") from err
    missing = [key for key in ("NDims", "DimSize", "ElementType", "ElementDataFile") if key not in header]
    if missing:
        raise CtError(f"{mhd_path}: not a MetaImage header (missing {', '.join(missing)})")
    _check_dimensions(mhd_path, header)
    data_file = header["ElementDataFile"]
    if data_file in ("LOCAL", "LIST") or "%" in data_file or header.get("CompressedData", "False") == "True":
        return  # layouts whose size cannot be checked from the header alone: ITK checks them
    raw_path = mhd_path.parent / data_file
    if not raw_path.is_file():
        raise CtError(f"{mhd_path}: its data file {raw_path} is missing")
    try:
        voxels = int(np.prod([int(n) for n in header["DimSize"].split()]))
        channels = int(header.get("ElementNumberOfChannels", "1"))
        expected = voxels * channels * _ELEMENT_BYTES[header["ElementType"]]
    except (ValueError, KeyError) as err:
        raise CtError(f"{mhd_path}: bad DimSize or ElementType in the header ({err})") from err
    actual = raw_path.stat().st_size
    if actual < expected:
        raise CtError(f"{raw_path}: truncated, {actual} bytes where the header needs {expected}")


_PER_AXIS = {"DimSize": 1, "ElementSpacing": 1, "ElementSize": 1, "Offset": 1, "Origin": 1, "Position": 1,
             "TransformMatrix": 2, "Rotation": 2, "Orientation": 2}
"""Header fields with one value per axis (power 1) or one per pair of axes (power 2: a matrix)."""


def _check_dimensions(mhd_path: Path, header: dict[str, str]) -> None:
    """The header agrees with itself: NDims says how many values each per-axis field holds."""
    try:
        ndims = int(header["NDims"])
    except ValueError:
        raise CtError(f"{mhd_path}: inconsistent header: NDims = {header['NDims']!r} is not a number") from None
    for key, power in _PER_AXIS.items():
        values = header.get(key, "").split()
        if key in header and len(values) != ndims**power:
            raise CtError(f"{mhd_path}: inconsistent header: NDims = {ndims} but {key} has {len(values)} "
                          f"value(s) ({header[key]}), expected {ndims**power}")


def _itk_reason(err: RuntimeError) -> str:
    """ITK's exception text on one line, without the source locations it is wrapped in."""
    lines = [line.strip() for line in str(err).splitlines()]
    kept = [line for line in lines if line and not line.startswith(("Exception thrown", "Location"))]
    return "; ".join(kept) or str(err).strip()


def chunk_bounds(center_irc: np.ndarray, shape: tuple[int, int, int] = CHUNK_SHAPE) -> np.ndarray:
    """Start indices (..., 3) of chunks of `shape` centred on `center_irc` (..., 3).

    A chunk of width w around centre c spans [c - w//2, c - w//2 + w) on each axis.
    """
    return np.asarray(center_irc, dtype=np.int64) - np.asarray(shape, dtype=np.int64) // 2


def cut_chunks(
    hu: np.ndarray, centers_irc: np.ndarray, shape: tuple[int, int, int] = CHUNK_SHAPE
) -> tuple[np.ndarray, np.ndarray]:
    """Cut one chunk per centre, clipped to [HU_MIN, HU_MAX].

    Parts of a chunk outside the volume read as HU_MIN (air): the chunk is padded,
    never shifted, so the candidate stays at its centre. Returns the chunks
    (N, *shape) int16 and a boolean (N,) flag telling which chunks needed padding.
    """
    chunks, outside = cut_boxes(hu, centers_irc, shape, HU_MIN, np.int16)
    np.clip(chunks, HU_MIN, HU_MAX, out=chunks)
    return chunks, outside


def cut_boxes(
    volume: np.ndarray, centers_irc: np.ndarray, shape: tuple[int, ...], fill, dtype
) -> tuple[np.ndarray, np.ndarray]:
    """One box of `shape` per centre (N, 3) from `volume`, `fill` outside it; and which boxes needed it.

    The box around centre c spans [c - w//2, c - w//2 + w) per axis (see `chunk_bounds`).
    """
    centers_irc = np.asarray(centers_irc, dtype=np.int64).reshape(-1, 3)
    starts = chunk_bounds(centers_irc, shape)
    ends = starts + np.asarray(shape)
    size = np.asarray(volume.shape)
    outside = np.any((starts < 0) | (ends > size), axis=1)
    boxes = np.empty((len(centers_irc), *shape), dtype=dtype)
    boxes[outside] = fill  # the others are copied whole: filling them first would be a wasted pass
    # One slice copy per box (a few hundred per CT): the voxels themselves are never looped over.
    for n, (start, end) in enumerate(zip(starts, ends)):
        src_lo = np.maximum(start, 0)
        src_hi = np.minimum(end, size)
        if np.any(src_hi <= src_lo):
            continue  # entirely outside: all fill
        dst_lo = src_lo - start
        dst_hi = dst_lo + (src_hi - src_lo)
        boxes[n, dst_lo[0] : dst_hi[0], dst_lo[1] : dst_hi[1], dst_lo[2] : dst_hi[2]] = volume[
            src_lo[0] : src_hi[0], src_lo[1] : src_hi[1], src_lo[2] : src_hi[2]
        ]
    return boxes, outside
