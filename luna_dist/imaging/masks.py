"""Nodule masks from `annotations.csv`: the labels of the segmentation task.

LUNA16 gives each nodule a centre and a diameter, not its voxels. The rule of
*Deep Learning with PyTorch* (chapter 13) turns a centre into a mask:

1. From the centre voxel, grow a radius r along each axis separately, starting at
   r = 2: while the voxels at centre - r and centre + r on that axis are both above
   -700 HU, r grows by one. The radius of the axis is the first r where either is not.
2. The box of those three radii around the centre (2r + 1 voxels per axis) is the
   nodule's box; the mask is every voxel of the union of the boxes above -700 HU.

The book indexes the array with centre - r directly, so near the first slice (or
row, or column) a negative index wraps round to the far side of the volume and the
box grows on what lies there. Here a voxel outside the volume reads as -1000 HU, as
it does for chunks (`luna_dist.imaging.chunks`): growth stops at the edge and the box is clipped
to the volume.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from luna_dist.imaging.ct import Ct
from luna_dist.imaging.geometry import xyz_to_irc
from luna_dist.tables.candidates import Annotation

THRESHOLD_HU = -700
"""Denser than this is tissue (a nodule, a vessel); lung parenchyma and air are below."""

START_RADIUS = 2
"""The book's first radius: every box spans at least 5 voxels per axis."""


def box_radii(hu: np.ndarray, center_irc: np.ndarray) -> np.ndarray:
    """The grown radius along I, R and C, (3,) int64, for a centre inside the volume."""
    center_irc = np.asarray(center_irc, dtype=np.int64)
    radii = np.empty(3, dtype=np.int64)
    for axis in range(3):
        index = [int(v) for v in center_irc]
        index[axis] = slice(None)
        line = hu[tuple(index)] > THRESHOLD_HU  # the voxels on this axis through the centre
        c, size = int(center_irc[axis]), line.shape[0]
        # Every radius up to the first that leaves the volume on some side: there growth stops.
        r = np.arange(START_RADIUS, max(c, size - 1 - c) + 2)
        below, above = c - r, c + r
        plus = (above < size) & line[np.minimum(above, size - 1)]
        minus = (below >= 0) & line[np.maximum(below, 0)]
        radii[axis] = r[np.argmin(plus & minus)] if len(r) else START_RADIUS
    return radii


def nodule_boxes(hu: np.ndarray, centers_irc: np.ndarray) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Each nodule's box as (start, stop) index arrays (3,), clipped to the volume; None for a centre outside."""
    size = np.asarray(hu.shape)
    boxes = []
    for center in np.asarray(centers_irc, dtype=np.int64).reshape(-1, 3):
        if np.any(center < 0) or np.any(center >= size):
            boxes.append(None)
            continue
        radii = box_radii(hu, center)
        boxes.append((np.maximum(center - radii, 0), np.minimum(center + radii + 1, size)))
    return boxes


def nodule_mask(hu: np.ndarray, centers_irc: np.ndarray) -> np.ndarray:
    """Mask (I, R, C) bool of the nodules centred at `centers_irc` (N, 3); centres outside are ignored."""
    hu = np.asarray(hu)
    inside = np.zeros(hu.shape, dtype=bool)
    for box in nodule_boxes(hu, centers_irc):
        if box is not None:
            (i0, r0, c0), (i1, r1, c1) = box
            inside[i0:i1, r0:r1, c0:c1] = True
    return inside & (hu > THRESHOLD_HU)


def annotation_mask(ct: Ct, annotations: Iterable[Annotation]) -> np.ndarray:
    """The mask of a CT's annotated nodules (annotations of other series are ignored)."""
    centers = [a.center_xyz for a in annotations if a.series_uid == ct.series_uid]
    if not centers:
        return np.zeros(ct.hu.shape, dtype=bool)
    return nodule_mask(ct.hu, xyz_to_irc(np.array(centers, dtype=np.float64), ct.geometry))
