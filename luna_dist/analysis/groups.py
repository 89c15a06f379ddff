"""The second stage: the segmentation's 3-D groups, placed at their centres and measured."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from luna_dist.imaging.ct import HU_MAX, HU_MIN

EROSION_ITERATIONS = 1
"""Binary erosions of the segmentation before grouping: they cut the thin bridges between structures."""

MIN_EXTENT = 2 * EROSION_ITERATIONS + 1
"""Voxels a CT needs along each axis for anything to survive the erosion (the volume's border erodes too)."""

GROUP_SLAB_SHARE = 16
"""A group's bounding box is summed a slab of slices at a time, each at most 1/16 of the CT (one slice at
least): the slab's temporaries (5 bytes a voxel) stay below a third of a byte per voxel of the CT."""


@dataclass
class Groups:
    """The groups of a segmentation: each a core left by the erosion, grown back within the segmentation
    (`group`); group k is label k + 1 of `labels`."""

    centres: np.ndarray  # (N, 3) IRC float: centres of mass of the cores, weighted by HU + 1001
    voxels: np.ndarray  # (N,) int64 voxel counts of the grown groups
    axial_diameter_mm: np.ndarray  # (N,) longest diameter within one slice, mm (see `group`)
    labels: np.ndarray  # (I, R, C) int32, 0 outside every group: what the report outlines


FERET_DIRECTIONS = 64
"""Directions a group's width is measured in, within each slice: the longest width found is at least
cos(90° / 64) = 0.9997 of the true longest diameter, and never more."""

NEIGHBOURS = np.array([offset for offset in itertools.product((-1, 0, 1), repeat=3) if any(offset)])
"""The 26 voxels around a voxel (I, R, C offsets): a group grows back a layer of them at a time."""


def group(mask: np.ndarray, hu: np.ndarray, spacing_irc: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Groups:
    """Connected groups of a segmentation: centres, voxel counts, longest axial diameters.

    `mask` is the segmentation (I, R, C) bool, `hu` the CT's int16 HU, `spacing_irc` its spacing in mm
    (sizes are in voxels without it). The erosion (EROSION_ITERATIONS) cuts thin bridges, and each connected
    component left is a group's core; its centre is the core's centre of mass weighted by HU + 1001 (HU
    clipped to [-1000, 1000]), so denser voxels pull harder, air still weighs a little, and what touches
    the nodule does not pull it. Each core is then grown back within the segmentation (`_grow`), so its
    voxel count (the volume) and its longest axial diameter are of the segmented group, not of its core: the
    erosion takes a voxel off each side, about half the volume of a 6-8 mm nodule. The longest axial
    diameter is the largest Feret diameter of the group's voxels (as squares) in any of its slices, the size
    a reader measures on an axial slice.

    The mask, the eroded mask (1 byte a voxel each) and the labels (4 bytes) are the only arrays the size of
    the CT; each group is measured within its bounding box, in integers: the same centres as scipy's
    `center_of_mass` of the cores (whose float64 sums of these integer weights are exact too) without its
    whole-volume float64 temporaries.
    """
    eroded = ndimage.binary_erosion(mask, iterations=EROSION_ITERATIONS)
    labels, count = ndimage.label(eroded)
    del eroded  # labelled: the grouping needs only the labels from here on
    slab_voxels = labels.size // GROUP_SLAB_SHARE
    cores = ndimage.find_objects(labels)
    centres = np.array([_centre(labels, hu, index + 1, box, slab_voxels)
                        for index, box in enumerate(cores)]).reshape(-1, 3)
    _grow(labels, mask, cores, growth_reach(spacing_irc))
    voxels, diameters = np.zeros(count, dtype=np.int64), np.zeros(count)
    for index, box in enumerate(ndimage.find_objects(labels)):
        voxels[index], diameters[index] = _size(labels, index + 1, box, slab_voxels, spacing_irc[1:])
    return Groups(centres, voxels, diameters, labels)


def growth_reach(spacing_irc: tuple[float, float, float]) -> tuple[int, int, int]:
    """Voxels along each axis a core may grow beyond its bounding box: the erosion's reach in mm along the
    CT's coarsest axis, EROSION_ITERATIONS times its largest spacing (at 0.6 x 0.6 x 2.5 mm, a slice and 5
    pixels). The erosion takes a slice off the top of a nodule, and with it the rim of the slice below as far
    in as the nodule's surface slopes, up to about that far."""
    reach_mm = EROSION_ITERATIONS * max(spacing_irc)
    return tuple(int(np.ceil(reach_mm / spacing - 1e-9)) for spacing in spacing_irc)


def _grow(labels: np.ndarray, mask: np.ndarray, cores: list[tuple[slice, ...]], reach: tuple[int, int, int]) -> None:
    """Grow each core of `labels` back within `mask`, in place: a layer of NEIGHBOURS at a time, through the
    voxels of the mask that no group holds, each group within its core's bounding box (`cores`) widened by
    `reach`; a voxel that two groups reach in the same layer goes to the lower label, so each goes to the
    nearest core through the mask. A thin structure (a vessel) that the erosion cut off is not regained
    beyond the reach, nor is anything the mask does not connect to the core.

    The first layer is sought among every free voxel of the mask, each later one among those still free or,
    where fewer, the free neighbours of the layer before: the work grows with the voxels regained and the
    free ones, never with the CT's.
    """
    if not cores:
        return
    low = np.array([(0, 0, 0)] + [[b.start - r for b, r in zip(box, reach)] for box in cores]).T  # (3, groups + 1)
    high = np.array([(0, 0, 0)] + [[b.stop + r for b, r in zip(box, reach)] for box in cores]).T  # column 0: none
    plane, chunk = labels[0].size, max(4096, labels.size // 256)  # a chunk's temporaries: ~0.4 bytes a voxel
    slab = max(1, labels.size // GROUP_SLAB_SHARE // plane)
    free = np.concatenate([first * plane + np.flatnonzero(mask[first:first + slab] & (labels[first:first + slab] == 0))
                           for first in range(0, len(labels), slab)])
    flat_labels, flat_mask = labels.reshape(-1), np.ascontiguousarray(mask).reshape(-1)  # views, as both are
    candidates = free
    while len(candidates):
        layer = [_nearest_label(candidates[start:start + chunk], labels, low, high)
                 for start in range(0, len(candidates), chunk)]
        claimed = np.concatenate([voxels for voxels, _ in layer])
        flat_labels[claimed] = np.concatenate([label for _, label in layer])
        free = free[flat_labels[free] == 0]
        candidates = free
        if len(free) > len(NEIGHBOURS) * len(claimed):
            step = chunk // len(NEIGHBOURS)
            candidates = np.unique(np.concatenate([np.zeros(0, dtype=np.int64)] + [
                _free_neighbours(claimed[start:start + step], labels.shape, flat_labels, flat_mask)
                for start in range(0, len(claimed), step)]))


def _nearest_label(voxels: np.ndarray, labels: np.ndarray, low: np.ndarray, high: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Of the free voxels `voxels` (flat indices), those a group holds a neighbour of, within its reach
    (`low` <= voxel < `high`, columns by label), and the lowest such label of each."""
    flat, none = labels.reshape(-1), np.iinfo(labels.dtype).max
    irc = np.unravel_index(voxels, labels.shape)
    edges = [(axis > 0, axis < size - 1) for axis, size in zip(irc, labels.shape)]  # a neighbour on each side
    strides = np.array(labels.strides) // labels.itemsize
    nearest = np.full(len(voxels), none, dtype=labels.dtype)
    for offset in NEIGHBOURS:
        inside = np.ones(len(voxels), dtype=bool)
        for step, (before, after) in zip(offset, edges):
            if step:
                inside &= before if step < 0 else after
        label = flat[np.where(inside, voxels + int(offset @ strides), voxels)]  # outside: the voxel itself, free
        within = label > 0
        for axis, low_axis, high_axis in zip(irc, low, high):
            within &= (axis >= low_axis[label]) & (axis < high_axis[label])
        np.minimum(nearest, label, out=nearest, where=within)
    held = nearest < none
    return voxels[held], nearest[held]


def _free_neighbours(voxels: np.ndarray, shape: tuple[int, int, int], flat_labels: np.ndarray,
                     flat_mask: np.ndarray) -> np.ndarray:
    """The voxels of the mask next to `voxels` (flat indices) that no group holds, flat, possibly repeated."""
    near = (np.stack(np.unravel_index(voxels, shape), axis=1)[:, None] + NEIGHBOURS).reshape(-1, 3)
    near = near[((near >= 0) & (near < shape)).all(axis=1)]
    flat = np.ravel_multi_index(tuple(near.T), shape)
    return flat[flat_mask[flat] & (flat_labels[flat] == 0)]


def _slabs(box: tuple[slice, slice, slice], slab_voxels: int):
    """The box a slab of slices at a time, each of at most `slab_voxels` voxels (one slice at least)."""
    step = max(1, slab_voxels // ((box[1].stop - box[1].start) * (box[2].stop - box[2].start)))
    for first in range(box[0].start, box[0].stop, step):
        yield (slice(first, min(first + step, box[0].stop)), box[1], box[2])


def _centre(labels: np.ndarray, hu: np.ndarray, label: int, box: tuple[slice, slice, slice],
            slab_voxels: int) -> np.ndarray:
    """Weighted centre (3,) IRC of group `label`, from the per-axis sums of its weights over its bounding
    box `box`, a slab of slices at a time."""
    per_slice, per_row, per_column = [], 0, 0
    for slab in _slabs(box, slab_voxels):
        weight = hu[slab].astype(np.int32)
        np.clip(weight, HU_MIN, HU_MAX, out=weight)
        weight += 1001
        weight *= labels[slab] == label
        per_slice.append(weight.sum(axis=(1, 2), dtype=np.int64))
        per_row = per_row + weight.sum(axis=(0, 2), dtype=np.int64)
        per_column = per_column + weight.sum(axis=(0, 1), dtype=np.int64)
    sums = [np.concatenate(per_slice), per_row, per_column]
    moments = [int(s @ np.arange(b.start, b.stop, dtype=np.int64)) for s, b in zip(sums, box)]
    return np.array(moments, dtype=np.float64) / float(sums[0].sum())


def _size(labels: np.ndarray, label: int, box: tuple[slice, slice, slice], slab_voxels: int,
          spacing_rc: tuple[float, float]) -> tuple[int, float]:
    """Voxel count and longest axial diameter (mm) of group `label` within its bounding box `box`."""
    count, diameter = 0, 0.0
    for slab in _slabs(box, slab_voxels):
        inside = labels[slab] == label
        count += int(np.count_nonzero(inside))
        diameter = max(diameter, _longest_axial_diameter(inside, box[1].start, spacing_rc))
    return count, diameter


def _longest_axial_diameter(inside: np.ndarray, first_row: int, spacing_rc: tuple[float, float]) -> float:
    """Largest Feret diameter (mm) over the slices of `inside` (S, R, C) bool, its voxels taken as squares.

    A slice's convex hull is that of the outer corners of each row's first and last voxel, so only those
    (4 a row) are projected, on FERET_DIRECTIONS directions: memory and time grow with the box's rows,
    not its voxels.
    """
    rows = inside.any(axis=2)  # (S, R)
    if not rows.any():
        return 0.0
    columns = inside.shape[2]
    first = inside.argmax(axis=2)
    last = columns - 1 - inside[..., ::-1].argmax(axis=2)
    row_mm, column_mm = spacing_rc
    angle = np.arange(FERET_DIRECTIONS) * (np.pi / FERET_DIRECTIONS) - np.pi / 2  # every direction, cos >= 0
    cos, sin = np.cos(angle), np.sin(angle)  # (K,)
    y = (first_row + np.arange(inside.shape[1]))[:, None] * row_mm * sin  # (R, K): row centres, projected
    half_row = row_mm / 2 * np.abs(sin)  # (K,): the nearer or farther edge of the row, whichever is outer
    high = ((last + 0.5) * column_mm)[..., None] * cos  # (S, R, K): each row's outer corners, projected
    high += y + half_row
    low = ((first - 0.5) * column_mm)[..., None] * cos
    low += y - half_row
    high[~rows] = -np.inf
    low[~rows] = np.inf
    return float((high.max(axis=1) - low.min(axis=1)).max())
