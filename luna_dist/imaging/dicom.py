"""A folder holding one DICOM series: its slices listed, ordered along their normal and checked."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from luna_dist.imaging.files import (
    DICOM_TAGS,
    SHEAR_TOLERANCE,
    CtError,
    CtSource,
    check_modality,
    check_voxels,
    ct_source,
    read_header,
    tag,
)
from luna_dist.imaging.geometry import Geometry


# -- a DICOM series ----------------------------------------------------------------------------------------
def dicom_series(folder: Path, max_voxels: int) -> CtSource:
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
        check_modality(file, reader)
    if len(files) < 2:
        raise CtError(f"{folder}: a DICOM series of one slice: a 2-D image, not a CT")
    columns, rows = headers[0].GetSize()[:2]
    check_voxels(folder, (columns, rows, len(files)), max_voxels)
    order, spacing = _slice_order(folder, uid, files, headers)
    first = headers[order[0]]
    geometry = Geometry(np.array(first.GetOrigin()), np.array([*first.GetSpacing()[:2], spacing]),
                        np.reshape(first.GetDirection(), (3, 3)))
    return ct_source(folder, uid or folder.name, tuple(files[k] for k in order), (columns, rows, len(files)), geometry,
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
            series.setdefault(tag(reader, "series_uid") or "", []).append((path, reader))
    return series, skipped, subfolders


def _dicom_header(path: Path) -> sitk.ImageFileReader | None:
    """The header of a DICOM image file, read by GDCM; None where the file is none."""
    try:
        return read_header(path, "GDCMImageIO")
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
        position = np.array([[float(v) for v in tag(r, "position").split("\\")] for r in headers])
        orientation = np.array([float(v) for v in tag(headers[0], "orientation").split("\\")])
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
    `SHEAR_TOLERANCE` of a pixel: a gantry tilt, named by its angle."""
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


SLICE_GAP_TOLERANCE = 0.01
"""Slices of a series may lie this share of their spacing off even spacing (DICOM keeps positions as
decimal strings) before the series counts as unevenly spaced or missing slices."""
