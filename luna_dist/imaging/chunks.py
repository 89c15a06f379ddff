"""Chunks: fixed-size boxes of a CT around given centres, padded with air where they reach outside it."""

from __future__ import annotations

import numpy as np

from luna_dist.imaging.ct import HU_MAX, HU_MIN

CHUNK_SHAPE = (32, 48, 48)
"""Chunk size in voxels, (I, R, C) = (slices, rows, columns)."""


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
