"""Read one CT with SimpleITK and cut fixed-size chunks around candidate centres.

A CT is checked from its headers before any voxel is read (`find_ct`): its size against
the flag `--max-ct-voxels` and against its files (`luna_dist.ct_files`), its grid's axes at
right angles, a DICOM folder's slices all there. Once read, voxels that are no number are
refused, and the CT is turned to LUNA16's axes (`geometry.LPS`), so the models and every
measurement see any CT as they saw LUNA16's, while positions stay those of its header.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from luna_dist.ct_files import (  # CtError and metaimage_data_file are known by this module's name too
    SHEAR_TOLERANCE,
    CtError,
    check_metaimage,
    check_nifti,
    check_orthogonal,
    is_nifti,
    metaimage_data_file,
    nifti_no_numbers,
)
from luna_dist.geometry import LPS, Geometry, lps_turn, orientation

HU_MIN, HU_MAX = -1000, 1000
"""Hounsfield range kept: air at -1000; bone and metal above +1000 carry nothing for nodules."""

CHUNK_SHAPE = (32, 48, 48)
"""Chunk size in voxels, (I, R, C) = (slices, rows, columns)."""

MAX_CT_VOXELS = 2**30
"""`--max-ct-voxels`' default: a header declaring more voxels is refused before they are allocated. LUNA16's
largest CT is 764x512x512 (2.0e8 voxels), a thin-slice chest CT 1,000 slices of 512x512 (2.6e8); 2**30
(1.07e9) is four times that, where the analysis's arrays (about 12 bytes a voxel) reach 13 GB."""


@dataclass
class Ct:
    series_uid: str
    hu: np.ndarray  # (I, R, C) int16 Hounsfield units, turned to LPS; a view of the image; chunks are clipped when cut
    geometry: Geometry  # of `hu`: identity direction for an axis-aligned CT
    stored_axes: str = LPS  # how the file's axes ran before the turn (`geometry.orientation`: RAS, LPI, ...)


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

SLICE_GAP_TOLERANCE = 0.01
"""Slices of a series may lie this share of their spacing off even spacing (DICOM keeps positions as
decimal strings) before the series counts as unevenly spaced or missing slices."""


def find_ct(path: Path, max_voxels: int = MAX_CT_VOXELS) -> CtSource:
    """A CT's source from its headers: a `.mhd/.raw` pair, another 3-D image file SimpleITK reads (NIfTI,
    `.mha`, `.nrrd`, a multi-frame DICOM file), or a folder holding one DICOM series.

    Raises CtError naming the path and the problem: not found, not a regular file, unreadable, not 3-D (a
    4-D or vector image), more than `max_voxels` voxels, shorter than its header declares, a DICOM modality
    other than CT, a single DICOM slice, a folder of no or several series, a series of one slice, slices
    missing or unevenly spaced, a sheared grid (a gantry-tilted series, a sheared sform).
    """
    path = Path(path)
    with _itk_quiet():
        return _dicom_series(path, max_voxels) if path.is_dir() else _image_file(path, max_voxels)


def read_ct(path: Path, max_voxels: int = MAX_CT_VOXELS) -> Ct:
    """Read a CT (`find_ct`: a `.mhd/.raw` pair, another image file, a DICOM series folder) as int16 HU
    turned to LPS, with its geometry (origin, spacing, direction cosines), without a copy when stored as
    int16 in LPS order (as LUNA16's are).

    DICOM's rescale slope and intercept are applied by SimpleITK. Raises CtError naming the file for what
    `find_ct` refuses, an image ITK cannot read, voxel types that cannot hold HU (unsigned or 8-bit), and
    voxels that are no number (NaN, infinite).
    """
    source = find_ct(path, max_voxels)
    try:  # as stored: a cast here would wrap values beyond int16
        with _itk_quiet():
            image = sitk.ReadImage([str(f) for f in source.files] if source.path.is_dir() else str(source.path))
    except RuntimeError as err:
        raise CtError(f"{source.path}: cannot read the image: {_itk_reason(err)}") from err
    if is_nifti(source.path):
        _refuse_no_numbers(source.path, nifti_no_numbers(source.path, _header(source.path)), image)
    image = turned_to_lps(image)
    return Ct(source.series_uid, _as_int16_hu(source.path, image), Geometry.of_image(image), source.stored_axes)


def turned_to_lps(image: sitk.Image) -> sitk.Image:
    """The image with its axes turned to LPS by `sitk.DICOMOrient` (permuted and flipped, never interpolated:
    every voxel keeps its value and its point), or the image itself where they already run so."""
    order, flips = lps_turn(np.reshape(image.GetDirection(), (3, 3)))
    return image if order == (0, 1, 2) and not any(flips) else sitk.DICOMOrient(image, LPS)


@contextlib.contextmanager
def _itk_quiet():
    """ITK prints its warnings raw on stderr (`WARNING: In .../itkGDCMSeriesFileNames.cxx ...`, NIfTI's
    "unexpected scales in sform"): off while a CT is listed and read, its problems said here instead."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


# -- one image file ----------------------------------------------------------------------------------------
_NOT_REGULAR = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def _image_file(path: Path, max_voxels: int) -> CtSource:
    _check_regular_file(path)
    data_file = check_metaimage(path) if path.suffix.lower() in (".mhd", ".mha") else None
    reader = _header(path)
    _check_modality(path, reader)
    uid = _tag(reader, "series_uid")
    size = _check_volume(path, reader, uid is not None)
    _check_voxels(path, size, max_voxels)
    if is_nifti(path):
        check_nifti(path, reader)
    geometry = Geometry.of_image(reader)
    check_orthogonal(path, geometry.direction * geometry.spacing_xyz, size, "sheared geometry: its direction cosines "
                     "put axes")
    return _source(path, uid or _stem(path), (path,) if data_file is None else (path, data_file), size, geometry,
                   dicom_uid=uid is not None)


def _source(path: Path, uid: str, files: tuple[Path, ...], size_xyz, geometry: Geometry, **more) -> CtSource:
    """The source of a CT of `size_xyz` voxels at `geometry` as stored, described as it will be read: in LPS."""
    turned, size = geometry.turned_to_lps(tuple(size_xyz))
    return CtSource(path, uid, files, size[::-1], turned, orientation(geometry.direction), **more)


def _check_regular_file(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise CtError(f"{path}: a symbolic link to {os.readlink(path)}, which does not exist") from None
        raise CtError(f"{path}: file not found") from None
    except OSError as err:
        raise CtError(f"{path}: cannot read it: {err.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = next((what for test, what in _NOT_REGULAR if test(mode)), "no file")
        raise CtError(f"{path}: not a regular file ({kind}): give an image file, or a folder holding a DICOM series")


def _stem(path: Path) -> str:
    """The file's name without its suffix, and without `.gz` before it: `1.2.3.nii.gz` is series 1.2.3."""
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    return Path(name).stem


def _check_volume(path: Path, reader: sitk.ImageFileReader, dicom: bool) -> tuple[int, int, int]:
    """The size (x, y, z) of a 3-D image of one value a voxel; CtError for anything else, saying what it is."""
    size, components = reader.GetSize(), reader.GetNumberOfComponents()
    if components > 1 and not is_nifti(path):
        raise CtError(f"{path}: {components} values a voxel (a colour or vector image), where a CT has one HU value")
    if reader.GetDimension() == 4 or components > 1:  # NIfTI's dim[4] (volumes), or dim[5] (numpy's 4-D arrays)
        volumes, advice = ((size[3], f"sitk.ReadImage({str(path)!r})[:, :, :, K]") if components == 1 else
                           (components, f"sitk.VectorIndexSelectionCast(sitk.ReadImage({str(path)!r}), K)"))
        raise CtError(f"{path}: a 4-D image, {volumes} volumes of {'x'.join(map(str, size[:3]))} voxels (NIfTI's "
                      f"dim[{4 if components == 1 else 5}]), where a CT is one: give the volume K you mean (0 to "
                      f"{volumes - 1}), e.g. written by sitk.WriteImage({advice}, 'volume.nii.gz')")
    if reader.GetDimension() != 3:
        raise CtError(f"{path}: expected a 3-D image, found {reader.GetDimension()}-D")
    if dicom and size[2] == 1:
        raise CtError(f"{path}: one DICOM slice, a 2-D image, not a CT: give the folder holding its series "
                      f"({path.parent})")
    return size


def _check_voxels(path: Path, size_xyz, max_voxels: int) -> None:
    voxels = int(np.prod(size_xyz, dtype=np.int64))
    if voxels > max_voxels:
        raise CtError(f"{path}: its header declares {'x'.join(map(str, size_xyz))} = {voxels:,} voxels, more than "
                      f"--max-ct-voxels {max_voxels:,} (LUNA16's largest CT has 200,278,016): not read; raise "
                      "--max-ct-voxels if the CT is that large")


def _header(path: Path, io: str = "") -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO(io)
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


# -- a DICOM series ----------------------------------------------------------------------------------------
def _dicom_series(folder: Path, max_voxels: int) -> CtSource:
    """The one DICOM series of `folder`, its slices in order along their normal, checked evenly spaced and
    stacked along that normal (no gantry tilt)."""
    series, skipped, subfolders = _dicom_files(folder)
    if not series:
        holding = _folders_holding_dicom(subfolders)
        raise CtError(f"{folder}: a folder holding no DICOM series" + (
            f"; its subfolder(s) {', '.join(str(f.relative_to(folder)) for f in holding[:3])}"
            f"{', ...' if len(holding) > 3 else ''} hold DICOM files: give one of them" if holding else
            " (give a folder of one DICOM series, or an image file such as .mhd, .nii.gz, .mha or .nrrd)"))
    if len(series) > 1:
        uids = sorted(series)
        raise CtError(f"{folder}: {len(uids)} DICOM series ({', '.join(uids[:3])}"
                      f"{', ...' if len(uids) > 3 else ''}): give a folder holding one series")
    uid, slices = next(iter(series.items()))
    files, headers = [file for file, _ in slices], [reader for _, reader in slices]
    for file, reader in zip(files, headers):
        _check_modality(file, reader)
    if len(files) < 2:
        raise CtError(f"{folder}: a DICOM series of one slice: a 2-D image, not a CT")
    columns, rows = headers[0].GetSize()[:2]
    _check_voxels(folder, (columns, rows, len(files)), max_voxels)
    order, spacing = _slice_order(folder, uid, files, headers)
    first = headers[order[0]]
    geometry = Geometry(np.array(first.GetOrigin()), np.array([*first.GetSpacing()[:2], spacing]),
                        np.reshape(first.GetDirection(), (3, 3)))
    return _source(folder, uid or folder.name, tuple(files[k] for k in order), (columns, rows, len(files)), geometry,
                   dicom_uid=bool(uid), skipped=tuple(skipped))


def _dicom_files(folder: Path) -> tuple[dict[str, list[tuple[Path, sitk.ImageFileReader]]], list[str], list[Path]]:
    """The DICOM files in `folder` (not its subfolders) with their headers, by SeriesInstanceUID; a line per
    entry that is skipped; and the subfolders.

    Listed here, as GDCM's reader reads each file's header anyway: GDCM's own listing
    (`GetGDCMSeriesIDs`) stops at a dangling link, leaving the slices after it out. A file that is
    no DICOM image (a DICOMDIR, notes) is passed over, as GDCM passes it over; what cannot be read
    at all (a dangling link, a FIFO, no permission) is skipped and named.
    """
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as err:
        raise CtError(f"{folder}: cannot list it: {err.strerror}") from None
    series: dict[str, list] = {}
    skipped, subfolders = [], []
    for entry in entries:
        path = Path(entry.path)
        if entry.is_dir():
            subfolders.append(path)
        elif not entry.is_file():
            skipped.append(f"{path}: a symbolic link to {os.readlink(path)}, which does not exist"
                           if entry.is_symlink() and not path.exists() else f"{path}: not a regular file")
        elif not os.access(path, os.R_OK):
            skipped.append(f"{path}: cannot be read (no permission)")
        elif (reader := _dicom_header(path)) is not None:
            series.setdefault(_tag(reader, "series_uid") or "", []).append((path, reader))
    return series, skipped, subfolders


def _dicom_header(path: Path) -> sitk.ImageFileReader | None:
    """The header of a DICOM image file, read by GDCM; None where the file is none."""
    try:
        return _header(path, "GDCMImageIO")
    except CtError:
        return None


def _folders_holding_dicom(folders: list[Path], depth: int = 2) -> list[Path]:
    """Those of `folders`, and of their subfolders `depth` levels down, that hold a DICOM file (`DICM` at
    byte 128, DICOM's file preamble): where a patient's folder keeps its series."""
    holding = []
    for folder in folders:
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError:
            continue
        if any(entry.is_file() and _is_dicom_file(Path(entry.path)) for entry in entries):
            holding.append(folder)
        elif depth > 1:
            holding += _folders_holding_dicom([Path(entry.path) for entry in entries if entry.is_dir()], depth - 1)
    return holding


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as file:
            return file.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _slice_order(folder: Path, uid: str, files: list[Path], headers: list[sitk.ImageFileReader]
                 ) -> tuple[np.ndarray, float]:
    """The slices' order along their normal, from each file's ImagePositionPatient projected on the normal
    of its ImageOrientationPatient, and their spacing; CtError where slices are missing or uneven, or
    stacked off their normal (a gantry tilt, which ITK's series reader would drop: the grid is sheared)."""
    try:
        position = np.array([[float(v) for v in _tag(r, "position").split("\\")] for r in headers])
        orientation = np.array([float(v) for v in _tag(headers[0], "orientation").split("\\")])
    except (AttributeError, ValueError):
        raise CtError(f"{folder}: a DICOM slice without a readable ImagePositionPatient "
                      f"({DICOM_TAGS['position']}) or ImageOrientationPatient ({DICOM_TAGS['orientation']}): "
                      "the slices cannot be placed") from None
    normal = np.cross(orientation[:3], orientation[3:])
    along = position @ normal
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
    _check_tilt(folder, uid, [files[k] for k in order], position[order], normal, headers[0].GetSpacing()[:2])
    return order, spacing


def _check_tilt(folder: Path, uid: str, files: list[Path], position: np.ndarray, normal: np.ndarray,
                pixel_mm: tuple[float, float]) -> None:
    """CtError where a slice lies off the line through the first one along the slices' normal by more than
    `ct_files.SHEAR_TOLERANCE` of a pixel: a gantry tilt, named by its angle."""
    step = position - position[0]
    along = step @ normal
    off = np.linalg.norm(step - along[:, None] * normal, axis=1)
    worst = int(np.argmax(off))
    if off[worst] > SHEAR_TOLERANCE * min(pixel_mm):
        angle = np.degrees(np.arctan2(off[worst], abs(along[worst])))
        raise CtError(f"{folder}: series {uid or folder.name} has a gantry tilt of {angle:.1f}°: {files[worst].name} "
                      f"lies {off[worst]:.1f} mm off the normal through {files[0].name} (ImagePositionPatient "
                      "against ImageOrientationPatient): a sheared grid, which the models never saw; resample it "
                      "onto an orthogonal grid first")


# -- the voxels --------------------------------------------------------------------------------------------
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
    if np.issubdtype(voxels.dtype, np.floating):
        _check_numbers(path, voxels)
    info = np.iinfo(np.int16)
    clipped = np.clip(voxels, info.min, info.max)
    if np.issubdtype(clipped.dtype, np.floating):
        np.rint(clipped, out=clipped)
    return clipped.astype(np.int16)


def _check_numbers(path: Path, voxels: np.ndarray) -> None:
    """CtError where float voxels are not all numbers: NaN or infinite HU has no int16 value, and would be
    converted to whatever the cast makes of it (a NIfTI's are found in its file: `ct_files.nifti_no_numbers`).

    Found by one sum in float64 (NaN and infinity carry through it; no array is allocated); only where
    it is not finite are the voxels counted, which also clears a float64 CT whose sum merely overflowed.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(voxels, axis=None, dtype=np.float64)):
            return
    _refuse_no_numbers(path, voxels.size - int(np.count_nonzero(np.isfinite(voxels))), voxels)


def _refuse_no_numbers(path: Path, bad: int, voxels: np.ndarray | sitk.Image) -> None:
    total = voxels.size if isinstance(voxels, np.ndarray) else int(np.prod(voxels.GetSize()))
    if bad:
        raise CtError(f"{path}: {'all' if bad == total else f'{bad:,} of the'} {total:,} voxels are not a number (NaN "
                      "or infinite), which no HU stands for: " + ("an empty or failed image, not a CT" if bad == total
                                                                   else "fill them in the CT first (e.g. with -1000)"))


class _ImageBuffer:
    """Exposes an image's voxels to numpy without a copy while keeping the image alive.

    `sitk.GetArrayViewFromImage` alone returns a view that does not own the image: once
    the image is collected, the view reads freed memory. An array made from this object
    holds it (and so the image) as its base.
    """

    def __init__(self, image: sitk.Image):
        self.image = image
        self.__array_interface__ = sitk.GetArrayViewFromImage(image).__array_interface__


READ_AHEAD_STEP = 1 << 20
"""Bytes a read-ahead asks for at a time: Linux reads at most the device's readahead or largest request
(128 kB to 8 MB) of one `POSIX_FADV_WILLNEED`, so a CT is asked for in steps."""


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
            fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO among a folder's files would block
            try:
                for offset in range(0, os.fstat(fd).st_size, READ_AHEAD_STEP):
                    os.posix_fadvise(fd, offset, READ_AHEAD_STEP, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
    except OSError:
        pass


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
