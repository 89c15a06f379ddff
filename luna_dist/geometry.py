"""Patient coordinates (XYZ, mm) <-> array indices (IRC: index, row, column).

LUNA16 CSVs give candidate centres in millimetres in X/Y/Z order, while the array
SimpleITK hands back is indexed (I, R, C) = (z, y, x). The mapping uses the image's
origin, spacing and direction cosines, so it is exact for anisotropic voxels, any
origin and non-identity directions, and it works on many points at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


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
