"""Read one CT with SimpleITK, as int16 HU in LUNA16's axes (chunks are cut from it by `luna_dist.imaging.chunks`).

A CT is checked from its headers before any voxel is read (`find_ct`): its size against
the flag `--max-ct-voxels` and against its files (`luna_dist.imaging.files`), its grid's axes at
right angles, a DICOM folder's slices all there (`luna_dist.imaging.dicom`). Once read, voxels
that are no number are refused, and the CT is turned to LUNA16's axes
(`luna_dist.imaging.geometry.LPS`), so the models and every measurement see any CT as they saw
LUNA16's, while positions stay those of its header.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from luna_dist.imaging.dicom import dicom_series
from luna_dist.imaging.files import (  # CtError is known by this module's name too
    CtError,
    CtSource,
    check_metaimage,
    check_modality,
    check_nifti,
    check_orthogonal,
    check_voxels,
    ct_source,
    is_nifti,
    itk_reason,
    nifti_no_numbers,
    read_header,
    tag,
)
from luna_dist.imaging.geometry import LPS, Geometry, lps_turn

HU_MIN, HU_MAX = -1000, 1000
"""Hounsfield range kept: air at -1000; bone and metal above +1000 carry nothing for nodules."""


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
        return dicom_series(path, max_voxels) if path.is_dir() else _image_file(path, max_voxels)


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
        raise CtError(f"{source.path}: cannot read the image: {itk_reason(err)}") from err
    if is_nifti(source.path):
        _refuse_no_numbers(source.path, nifti_no_numbers(source.path, read_header(source.path)), image)
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
    reader = read_header(path)
    check_modality(path, reader)
    uid = tag(reader, "series_uid")
    size = _check_volume(path, reader, uid is not None)
    check_voxels(path, size, max_voxels)
    if is_nifti(path):
        check_nifti(path, reader)
    geometry = Geometry.of_image(reader)
    check_orthogonal(path, geometry.direction * geometry.spacing_xyz, size, "sheared geometry: its direction cosines "
                     "put axes")
    return ct_source(path, uid or _stem(path), (path,) if data_file is None else (path, data_file), size, geometry,
                   dicom_uid=uid is not None)


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
    converted to whatever the cast makes of it (a NIfTI's are found in its file: `nifti_no_numbers`).

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
