"""Patient coordinates (XYZ, mm) <-> array indices (IRC: index, row, column).

LUNA16 CSVs give candidate centres in millimetres in X/Y/Z order, while the array
SimpleITK hands back is indexed (I, R, C) = (z, y, x). The mapping uses the image's
origin, spacing and direction cosines, so it is exact for anisotropic voxels, any
origin and non-identity directions, and it works on many points at once.

Every CT is turned to LUNA16's axes (`LPS`, `Geometry.turned_to_lps`) before a model or a
measurement sees it, and a grid whose axes are not at right angles (`shear`) is not read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

LPS = "LPS"
"""The patient space of every position (DICOM's, ITK's, LUNA16's CSVs'): +X towards the patient's left, +Y
posterior, +Z towards the head; NIfTI's tools show RAS, the same space with X and Y negated. It is also the
axes every CT is turned to (LUNA16's: identity direction): array (I, R, C) runs along +Z, +Y, +X."""


@dataclass(frozen=True)
class Geometry:
    """Where a CT's voxels sit in patient space (all in X/Y/Z order, millimetres)."""

    origin_xyz: np.ndarray  # (3,) centre of voxel (0, 0, 0), mm
    spacing_xyz: np.ndarray  # (3,) voxel size, mm
    direction: np.ndarray  # (3, 3) column k is the direction of array axis k (x, y, z)

    @classmethod
    def of_image(cls, image: sitk.Image) -> Geometry:
        return cls(
            origin_xyz=np.array(image.GetOrigin(), dtype=np.float64),
            spacing_xyz=np.array(image.GetSpacing(), dtype=np.float64),
            direction=np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3),
        )

    def turned_to_lps(self, size_xyz: tuple[int, int, int]) -> tuple[Geometry, tuple[int, int, int]]:
        """The geometry and size (x, y, z) of this grid of `size_xyz` voxels once `sitk.DICOMOrient` has turned
        it to LPS (`lps_turn`): the same voxels at the same points, their axes permuted and flipped, no
        interpolation. From the header alone, so a plan knows what the build will cut."""
        order, flips = lps_turn(self.direction)
        size = np.asarray(size_xyz)[list(order)]
        steps = self.direction[:, list(order)] * self.spacing_xyz[list(order)]  # columns: mm per index step
        flipped = np.array(flips)
        origin = self.origin_xyz + steps[:, flipped] @ (size[flipped] - 1)  # the far corner of each flip
        direction = self.direction[:, list(order)] * np.where(flips, -1.0, 1.0)
        return Geometry(origin, self.spacing_xyz[list(order)], direction), tuple(int(n) for n in size)

    def to_dict(self) -> dict:
        return {
            "origin_xyz": self.origin_xyz.tolist(),
            "spacing_xyz": self.spacing_xyz.tolist(),
            "direction": self.direction.ravel().tolist(),
        }


def xyz_to_irc_float(xyz: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Map points in mm, shape (..., 3) X/Y/Z, to continuous voxel indices (..., 3) I/R/C, float64.

    Integer values are voxel centres. Kept un-rounded where a position is reported or
    scored: rounding moves a point by up to half a voxel per axis (1.25 mm across a
    2.5 mm slice), enough to carry a mark off a small nodule.
    """
    xyz = np.asarray(xyz, dtype=np.float64)
    to_index = np.linalg.inv(geometry.direction * geometry.spacing_xyz)  # scales columns
    cri = (xyz - geometry.origin_xyz) @ to_index.T
    return cri[..., ::-1]


def nearest_voxel(irc: np.ndarray) -> np.ndarray:
    """The voxel (..., 3) int64 holding continuous indices `irc`: halves round up, as SimpleITK's
    TransformPhysicalPointToIndex does. Every cut of a chunk around a point uses this (np.rint rounds
    an exact half to even, so 2.5 would give voxel 2 where the shard build cut around voxel 3)."""
    return np.floor(np.asarray(irc, dtype=np.float64) + 0.5).astype(np.int64)


def xyz_to_irc(xyz: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Map points in mm, shape (..., 3) X/Y/Z, to the nearest voxel index (..., 3) I/R/C.

    Rounds halves up, as SimpleITK's TransformPhysicalPointToIndex does; indices may lie
    outside the volume (the caller decides what that means).
    """
    return nearest_voxel(xyz_to_irc_float(xyz, geometry))


def irc_to_xyz(irc: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Map voxel indices (..., 3) I/R/C, whole or continuous, to points in mm (..., 3) X/Y/Z."""
    cri = np.asarray(irc, dtype=np.float64)[..., ::-1]
    return cri @ (geometry.direction * geometry.spacing_xyz).T + geometry.origin_xyz


def lps_turn(direction: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """How `sitk.DICOMOrient(image, LPS)` turns an image of these direction cosines: the stored axis (x, y, z)
    each of its axes comes from, and which of its axes it then flips. Asked of a one-voxel image, so the
    library's choice (the nearest axes, also for an oblique grid) is known before any voxel is read."""
    probe = sitk.Image(1, 1, 1, sitk.sitkUInt8)
    probe.SetDirection(np.asarray(direction, dtype=np.float64).ravel().tolist())
    turn = sitk.DICOMOrientImageFilter()
    turn.SetDesiredCoordinateOrientation(LPS)
    turn.Execute(probe)
    return tuple(turn.GetPermuteOrder()), tuple(bool(f) for f in turn.GetFlipAxes())


def orientation(direction: np.ndarray) -> str:
    """The stored axes as DICOM letters (LUNA16's `LPS`; `RAS` for x to the right, y anterior, z to the head),
    of the nearest axes where the grid is oblique."""
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines
    return code(np.asarray(direction, dtype=np.float64).ravel().tolist())


def shear(steps: np.ndarray, size_xyz) -> tuple[float, float]:
    """How far a grid is from having its axes at right angles: the largest angle (degrees) by which two axes
    miss one, and how far (mm) that moves the grid's far side along the other axis.

    `steps` (3, 3): column k is the step in mm from one voxel to the next along axis k (direction x spacing);
    a gantry-tilted series, for one, steps from slice to slice off the slices' normal.
    """
    steps = np.asarray(steps, dtype=np.float64)
    lengths = np.linalg.norm(steps, axis=0)
    cosines = np.abs((steps / lengths).T @ (steps / lengths))
    np.fill_diagonal(cosines, 0.0)
    offsets = cosines * (lengths * (np.asarray(size_xyz) - 1))[None, :]  # [j, k]: along j across axis k
    j, k = np.unravel_index(np.argmax(offsets), offsets.shape)
    return float(np.degrees(np.arcsin(min(1.0, cosines[j, k])))), float(offsets[j, k])
