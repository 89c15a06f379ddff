"""The segmentation samples: what `python -m luna_dist.shard --task seg` cuts from a CT.

The build machinery (plan, journal, worker pool, atomic shard writers, manifest) is
`luna_dist.shards.build`'s; this module is the segmentation task's part of it, and the
layout its readers rely on (their batches of training stacks and validation slabs
unrolled into slices: `luna_dist.data.batches`). Masks come from `annotations.csv` by
`luna_dist.imaging.masks`. Per CT it writes:

- positives (`fold{K}-pos-*.tar`, packed per fold like the classifier's): for every
  slice of every nodule's mask, a 7-slice context stack (the slice and 3 on each side,
  clamped at the volume ends) of 96 x 96 centred on the nodule's row and column, with
  that slice's mask;
- negatives (`fold{K}-neg-*.tar`): the same stacks around `NEGATIVES_PER_CT` negative
  candidates of `candidates.csv` (lung, vessels, body, volume edges), spread over the
  table and taken from slices without mask where there are enough; their mask is the
  true one (almost always empty). Training mixes the two streams at a ratio of its own;
- validation (`fold{K}-val-*.tar`, one shard per CT): full slices with their context,
  for every slice with mask and, of the others, every slice of one block of
  `VAL_BLOCK` slices in `val_every` (counted from the block in the middle of the CT, so
  every CT has one). Consecutive slices are stored together as slabs
  of up to `SLAB_SLICES` slices plus their context once, so a slice costs about one
  slice of int16 and not seven.

Masks are stored as bits (`np.packbits` along the columns); images are int16 HU
clipped to [-1000, 1000], -1000 outside the CT (in-plane; context slices are clamped).
Both are `.npy` members stored as the build's codec says (`luna_dist.shards.codecs.CODECS`:
`ct.npy.b2` and `mask.npy.b2` by default).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from luna_dist.imaging.chunks import cut_boxes, cut_chunks
from luna_dist.imaging.ct import HU_MAX, HU_MIN, Ct
from luna_dist.imaging.geometry import xyz_to_irc
from luna_dist.imaging.masks import nodule_boxes, nodule_mask
from luna_dist.shards.codecs import CODECS, stored_array
from luna_dist.shards.format import Cut, SeriesInputs
from luna_dist.tables.candidates import Candidate

CONTEXT = 3
"""Slices on each side of the segmented slice that the model sees."""
STACK = 2 * CONTEXT + 1
CROP = 96
"""Rows and columns of a training stack (the model trains on random 64 x 64 crops of it)."""
NEGATIVES_PER_CT = 64
VAL_EVERY = 4
VAL_BLOCK = 16
"""Slices without mask are validated in blocks of this many consecutive slices, so their context is shared."""
SLAB_SLICES = 32
"""Validation slices per stored slab at most: bounds a sample at 38 slices of the CT."""
TRAIN_SAMPLE_BYTES = STACK * CROP * CROP * 2 + CROP * CROP // 8 + 5 * 1024
"""Upper bound of one training sample in a tar: stack, packed mask, headers, json and crc32.json."""
TASK = "seg"
READS = {"sample": {"context_slices": STACK, "crop": [CROP, CROP], "dtype": "int16"}}
"""What a reader needs of a build's manifest (`luna_dist.shards.format.check_manifest`)."""


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """Bool (..., R, C) -> uint8 (..., R, ceil(C / 8)): one bit per pixel."""
    return np.packbits(mask, axis=-1)


def unpack_mask(packed: np.ndarray, columns: int) -> np.ndarray:
    """The inverse of `pack_mask`, as bool."""
    return np.unpackbits(packed, axis=-1, count=columns).view(bool)


def context_slices(slices: np.ndarray, depth: int) -> np.ndarray:
    """(N,) slice indices -> (N, STACK) indices of their context, clamped to [0, depth)."""
    return np.clip(np.asarray(slices)[:, None] + np.arange(-CONTEXT, CONTEXT + 1), 0, depth - 1)


def validation_slices(has_mask: np.ndarray, val_every: int) -> np.ndarray:
    """Which slices (I,) bool are validated: every slice with mask, and the blocks of VAL_BLOCK slices
    that lie a multiple of `val_every` blocks from the middle one (the middle block always)."""
    block = np.arange(len(has_mask)) // VAL_BLOCK
    middle = (len(has_mask) - 1) // 2 // VAL_BLOCK
    return has_mask | ((block - middle) % val_every == 0)


def slabs(selected: np.ndarray) -> list[tuple[int, int]]:
    """Runs [start, stop) of consecutive selected slices, cut into pieces of at most SLAB_SLICES."""
    edges = np.flatnonzero(np.diff(np.concatenate([[False], selected, [False]]).astype(np.int8)))
    runs = []
    for start, stop in zip(edges[::2], edges[1::2]):
        runs += [(int(s), int(min(s + SLAB_SLICES, stop))) for s in range(start, stop, SLAB_SLICES)]
    return runs


def _spread(indices: np.ndarray, k: int) -> np.ndarray:
    """k of `indices` evenly spaced over them (all of them when there are no more than k)."""
    if len(indices) <= k:
        return indices
    return indices[np.arange(k) * len(indices) // k]


@dataclass(frozen=True)
class SegmentCutter:
    """The segmentation task's cut of one CT (see the module docstring); pickles for the worker pool."""

    negatives_per_ct: int = NEGATIVES_PER_CT
    val_every: int = VAL_EVERY
    codec: str = CODECS[0]

    task: ClassVar[str] = TASK
    sample_bytes: ClassVar[int] = TRAIN_SAMPLE_BYTES
    per_ct_validation: ClassVar[bool] = True

    def planned_negatives(self, candidates: list[Candidate]) -> int:
        return min(self.negatives_per_ct, sum(not c.is_nodule for c in candidates))

    def planned_samples(self, series: SeriesInputs, shape: tuple[int, int, int], geometry) -> tuple[int, int]:
        """An estimate: a nodule's mask is taken to span the slices within its radius of its centre
        (the mask itself follows the CT's densities, known only once the CT is read)."""
        slices = np.arange(shape[0])
        has_mask = np.zeros(shape[0], dtype=bool)
        positives = 0
        for annotation in series.annotations:
            center = xyz_to_irc(np.array([annotation.center_xyz], dtype=np.float64), geometry)[0]
            spans = np.abs(slices - center[0]) * abs(float(geometry.spacing_xyz[2])) <= annotation.diameter_mm / 2
            positives += int(spans.sum())
            has_mask |= spans
        validated = validation_slices(has_mask, self.val_every)
        return positives + self.planned_negatives(series.candidates), int(validated.sum())

    def identity(self) -> dict:
        return {"task": self.task, "sample": self.layout()["sample"]}

    def layout(self) -> dict:
        return {"sample": {
            "context_slices": STACK, "crop": [CROP, CROP], "dtype": "int16", "axes": "IRC",
            "hu_range": [HU_MIN, HU_MAX], "mask": "packbits along columns", "negatives_per_ct": self.negatives_per_ct,
            "val_block": VAL_BLOCK, "val_every": self.val_every, "slab_slices": SLAB_SLICES, "codec": self.codec,
        }}

    def cut(self, series: SeriesInputs, ct: Ct) -> Cut:
        nodules_irc = xyz_to_irc(np.array([a.center_xyz for a in series.annotations], dtype=np.float64).reshape(-1, 3),
                                 ct.geometry)
        mask = nodule_mask(ct.hu, nodules_irc)
        has_mask = mask.any(axis=(1, 2))
        uid = ct.series_uid.replace(".", "_")

        # Positives: every mask slice of every nodule's own box, centred on the nodule.
        pos_centers, pos_names = [], []
        for n, (box, center) in enumerate(zip(nodule_boxes(ct.hu, nodules_irc), nodules_irc)):
            if box is None:
                continue
            (i0, r0, c0), (i1, r1, c1) = box
            for s in i0 + np.flatnonzero(mask[i0:i1, r0:r1, c0:c1].any(axis=(1, 2))):
                pos_centers.append((s, center[1], center[2]))
                pos_names.append({"key": f"{uid}_nodule{n}_slice{s}", "kind": "nodule", "annotation": n})

        # Negatives: candidates' stacks, preferring slices without mask.
        negatives = [c for c in series.candidates if not c.is_nodule]
        neg_irc = xyz_to_irc(np.array([c.center_xyz for c in negatives], dtype=np.float64).reshape(-1, 3), ct.geometry)
        neg_irc[:, 0] = np.clip(neg_irc[:, 0], 0, ct.hu.shape[0] - 1)
        free = ~has_mask[neg_irc[:, 0]]
        k = self.planned_negatives(series.candidates)
        chosen = _spread(np.flatnonzero(free), k)
        chosen = np.sort(np.concatenate([chosen, _spread(np.flatnonzero(~free), k - len(chosen))]))
        neg_names = [{"key": f"{uid}_row{negatives[i].row}", "kind": "negative", "candidate_row": negatives[i].row}
                     for i in chosen]

        centers = np.array(pos_centers + [tuple(neg_irc[i]) for i in chosen], dtype=np.int64).reshape(-1, 3)
        stacks, outside = self._stacks(ct.hu, centers)
        masks, _ = cut_boxes(mask, centers, (1, CROP, CROP), False, bool)
        encoded = [self._encode_crop(series, names, center, stack, crop_mask[0], out, self.codec)
                   for names, center, stack, crop_mask, out
                   in zip(pos_names + neg_names, centers, stacks, masks, outside)]
        runs = slabs(validation_slices(has_mask, self.val_every))
        return Cut(pos=encoded[:len(pos_names)], neg=encoded[len(pos_names):],
                   val=[self._encode_slab(series, ct, mask, start, stop, self.codec) for start, stop in runs],
                   outside_volume=int(outside.sum()), val_slices=sum(stop - start for start, stop in runs))

    @staticmethod
    def _stacks(hu: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, STACK, CROP, CROP) int16 context stacks around centers (N, 3), and which needed padding."""
        n = len(centers)
        around = np.repeat(centers, STACK, axis=0)  # (N * STACK, 3)
        around[:, 0] = context_slices(centers[:, 0], hu.shape[0]).ravel()
        chunks, outside = cut_chunks(hu, around, (1, CROP, CROP))
        return chunks.reshape(n, STACK, CROP, CROP), outside.reshape(n, STACK).any(axis=1)

    @staticmethod
    def _encode_crop(series: SeriesInputs, names: dict, center: np.ndarray, stack: np.ndarray, mask: np.ndarray,
                     outside: bool, codec: str) -> dict:
        meta = {"series_uid": series.series_uid, "fold": series.fold, "slice": int(center[0]),
                "center_irc": [int(v) for v in center], "kind": names["kind"], "mask_pixels": int(mask.sum()),
                "outside_volume": bool(outside)}
        meta.update({k: v for k, v in names.items() if k not in ("key", "kind")})
        return {"__key__": names["key"], **_arrays({"ct.npy": stack, "mask.npy": pack_mask(mask)}, codec),
                "json": json.dumps(meta).encode()}

    @staticmethod
    def _encode_slab(series: SeriesInputs, ct: Ct, mask: np.ndarray, start: int, stop: int, codec: str) -> dict:
        depth = ct.hu.shape[0]
        first, last = max(0, start - CONTEXT), min(depth, stop + CONTEXT)
        images = np.clip(ct.hu[first:last], HU_MIN, HU_MAX).astype(np.int16)
        meta = {"series_uid": series.series_uid, "fold": series.fold, "first_slice": start, "slices": stop - start,
                "ct_first": first, "volume_slices": depth, "mask_slices": int(mask[start:stop].any(axis=(1, 2)).sum()),
                "mask_pixels": int(mask[start:stop].sum())}
        return {"__key__": f"{series.series_uid.replace('.', '_')}_val{start}",
                **_arrays({"ct.npy": images, "mask.npy": pack_mask(mask[start:stop])}, codec),
                "json": json.dumps(meta).encode()}


def _arrays(arrays: dict[str, np.ndarray], codec: str) -> dict[str, bytes]:
    """A sample's `.npy` members, stored by `codec`."""
    return dict(stored_array(name, array, codec) for name, array in arrays.items())
