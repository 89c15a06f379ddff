"""A shard build's options, each checked as it is given, and the error every part of the build raises."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from luna_dist.common import cli
from luna_dist.imaging.ct import MAX_CT_VOXELS
from luna_dist.shards import chunk_samples, seg_samples
from luna_dist.shards.codecs import CODECS
from luna_dist.shards.format import Cutter


class BuildError(Exception):
    """The build cannot start or finish; the message says what to change."""


class OutputError(BuildError):
    """--out cannot be written (full disk, read-only, no permission); what was finished is kept."""


@dataclass
class BuildOptions:
    data: Path
    out: Path
    # The tables; None: found under `data` where the LUNA16 download puts them (luna_dist.tables.layout).
    candidates: Path | None = None  # candidates_V2.csv, else candidates.csv
    annotations: Path | None = None
    malignancy: Path | None = None  # annotations_with_malignancy.csv, if present
    excluded: Path | None = None  # annotations_excluded.csv, if present
    seriesuids: Path | None = None  # the evaluation kit's list of the series scored, if present
    workers: int = max(1, os.cpu_count() or 1)
    max_samples: int = 1000
    max_mb: float = 1000.0
    strict: bool = False
    max_bad_rows: float = 1.0  # percent of a table's rows that may be left out as malformed
    overwrite: bool = False
    progress: bool = True
    task: str = "cls"  # what to cut: "cls" chunks per candidate, "seg" slice stacks and masks
    seg_negatives: int = 64  # seg: negative stacks per CT
    seg_val_every: int = 4  # seg: validate one block of slices without mask in this many
    codec: str = CODECS[0]  # how the samples' arrays are stored (luna_dist.shards.codecs)
    max_ct_voxels: int = MAX_CT_VOXELS  # a CT whose header declares more is refused before it is read

    def __post_init__(self):
        self.data, self.out = Path(self.data), Path(self.out)
        if self.task not in CUTTERS:
            raise BuildError(f"--task must be {' or '.join(CUTTERS)}, got {self.task!r}")
        if self.codec not in CODECS:
            raise BuildError(f"--codec must be {' or '.join(CODECS)}, got {self.codec!r}")
        problems = [cli.below("--workers", self.workers, 1), cli.below("--max-samples", self.max_samples, 1),
                    cli.below("--seg-negatives", self.seg_negatives, 0),
                    cli.below("--seg-val-every", self.seg_val_every, 1),
                    cli.below("--max-ct-voxels", self.max_ct_voxels, 1),
                    cli.outside("--max-bad-rows", self.max_bad_rows, 0, 100)]
        if problem := next((p for p in problems if p is not None), None):
            raise BuildError(problem)
        self.cutter: Cutter = CUTTERS[self.task](self)  # built once: what every CT of the build is cut by
        if self.samples_per_shard < 1:
            raise BuildError(f"--max-mb {self.max_mb} is below one sample ({self.cutter.sample_bytes / 1e6:.2f} MB)")

    @property
    def samples_per_shard(self) -> int:
        return min(self.max_samples, int(self.max_mb * 1e6 // self.cutter.sample_bytes))


CUTTERS: dict[str, Callable[[BuildOptions], Cutter]] = {
    chunk_samples.TASK: lambda options: chunk_samples.ChunkCutter(options.codec),
    seg_samples.TASK: lambda options: seg_samples.SegmentCutter(options.seg_negatives, options.seg_val_every,
                                                                options.codec),
}
"""What each --task cuts from a CT: its sample module's cutter, built from the build's options."""
