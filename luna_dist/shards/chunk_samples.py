"""The classifier's samples: one 32x48x48 chunk per candidate, cut from a CT for the build.

Each sample of `fold{K}-pos-*.tar` (nodule candidates) and `fold{K}-neg-*.tar` holds

- `chunk.npy.b2` (`--codec zstd`: `chunk.npy.zst`; `--codec none`: `chunk.npy`): int16 (32, 48, 48) in
  (I, R, C) order, HU clipped to [-1000, 1000], -1000 where the chunk reaches outside the
  CT (padded, never shifted), stored as `luna_dist.shards.codecs.CODECS` describes;
- `cls`: `1` for a nodule candidate, `0` otherwise;
- `json`: series_uid, fold, center_xyz (mm), center_irc, is_nodule, diameter_mm,
  is_malignant (true/false/null), candidate_row, outside_volume;
- `crc32.json` (`luna_dist.shards.format`).

Decoding (`luna_dist.data.batches`) copies each chunk's payload (decompressed first, where it
is stored so) into one preallocated int16 batch (no np.load, no per-sample tensors); conversion
to float and augmentation happen on the training device.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from luna_dist.imaging.chunks import CHUNK_SHAPE, cut_chunks
from luna_dist.imaging.ct import HU_MAX, HU_MIN, Ct
from luna_dist.imaging.geometry import xyz_to_irc
from luna_dist.shards.codecs import CODECS, stored_arrays
from luna_dist.shards.format import Cut, SeriesInputs, sample_key
from luna_dist.tables.candidates import Candidate

TASK = "cls"
READS = {"chunk": {"shape": list(CHUNK_SHAPE), "dtype": "int16"}}
"""What a reader needs of a build's manifest (`luna_dist.shards.format.check_manifest`)."""
CHUNK_BYTES = int(np.prod(CHUNK_SHAPE)) * 2
SAMPLE_BYTES_MAX = CHUNK_BYTES + 5 * 1024
"""Upper bound of one sample in a tar: npy payload, four 512-byte headers and padding, json, crc32.json."""
CUT_BLOCK = 128
"""Chunks cut and encoded at a time (18.9 MB): the block's buffers stay small enough to be reused
(below glibc's largest mmap threshold), and a CT's candidates need no more memory than one block."""


# -- writing --------------------------------------------------------------------------------------
def encode_sample(candidate: Candidate, fold: int, center_irc: np.ndarray, outside: bool,
                  chunk_member: tuple[str, bytes]) -> dict:
    """One sample as WebDataset stores it, around its chunk as `stored_arrays` stores it (name, bytes)."""
    meta = {
        "series_uid": candidate.series_uid,
        "fold": fold,
        "center_xyz": list(candidate.center_xyz),
        "center_irc": [int(v) for v in center_irc],
        "is_nodule": candidate.is_nodule,
        "diameter_mm": candidate.diameter_mm,
        "is_malignant": candidate.is_malignant,
        "candidate_row": candidate.row,
        "outside_volume": bool(outside),
    }
    return {
        "__key__": sample_key(candidate.series_uid, candidate.row),
        chunk_member[0]: chunk_member[1],
        "cls": b"1" if candidate.is_nodule else b"0",
        "json": json.dumps(meta).encode(),
    }


@dataclass(frozen=True)
class ChunkCutter:
    """The classification task's part of the build: one 32x48x48 chunk per candidate of candidates.csv."""

    codec: str = CODECS[0]

    task: ClassVar[str] = TASK
    sample_bytes: ClassVar[int] = SAMPLE_BYTES_MAX  # uncompressed: the bound holds for every codec
    per_ct_validation: ClassVar[bool] = False

    def planned_negatives(self, candidates: list[Candidate]) -> int:
        return sum(not c.is_nodule for c in candidates)

    def planned_samples(self, series: SeriesInputs, shape: tuple[int, int, int], geometry) -> tuple[int, int]:
        return len(series.candidates), 0  # a chunk per candidate, inside the volume or not

    def identity(self) -> dict:
        return {"chunk_shape": list(CHUNK_SHAPE), "codec": self.codec}

    def layout(self) -> dict:
        return {"chunk": {"shape": list(CHUNK_SHAPE), "dtype": "int16", "axes": "IRC", "hu_range": [HU_MIN, HU_MAX],
                          "codec": self.codec}}

    def cut(self, series: SeriesInputs, ct: Ct) -> Cut:
        centers_xyz = np.array([c.center_xyz for c in series.candidates], dtype=np.float64)
        centers_irc = xyz_to_irc(centers_xyz, ct.geometry)
        encoded, outside_volume = {True: [], False: []}, 0
        for start in range(0, len(centers_irc), CUT_BLOCK):
            block = slice(start, start + CUT_BLOCK)
            chunks, outside = cut_chunks(ct.hu, centers_irc[block])
            name, stored = stored_arrays("chunk.npy", chunks, self.codec)
            for candidate, irc, out, data in zip(series.candidates[block], centers_irc[block], outside, stored):
                encoded[candidate.is_nodule].append(encode_sample(candidate, series.fold, irc, out, (name, data)))
            outside_volume += int(outside.sum())
        return Cut(pos=encoded[True], neg=encoded[False], outside_volume=outside_volume)


def malignancy_counts(shards, folds: Iterable[int]) -> dict[str, int]:
    """Nodule samples of `folds` of a `luna_dist.data.streams.ShardSet` by label: {"malignant", "benign",
    "unknown"}; reads only the JSON members."""
    counts = {"malignant": 0, "benign": 0, "unknown": 0}
    for url in shards.shards(folds, "pos"):
        with shards.source.open(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if member.name.split(".", 1)[-1] == "json":  # not crc32.json
                    malignant = json.load(tar.extractfile(member))["is_malignant"]
                    counts[{True: "malignant", False: "benign", None: "unknown"}[malignant]] += 1
    return counts
