"""Writing a shard set's files: one CT cut into samples and written as shards, and the positives packed per fold.

A shard exists under its final name only once complete: it is written as `NAME.partial`,
hashed as it goes (never read back) and renamed. A CT's positives wait in
`.build/pos/UID.tar` until every CT is done, then `pack_positives` gathers each fold's
into `fold{K}-pos-NNNNNN.tar`. What a build is and when it resumes is `luna_dist.shards.build`'s.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from luna_dist.imaging.ct import MAX_CT_VOXELS, read_ct
from luna_dist.shards.format import Cutter, SeriesInputs, shard_name, with_checksums
from luna_dist.shards.tar import TarShard, read_samples

WORK = ".build"
"""The build's journal under --out: the plan, a record per finished CT, the positives waiting to be packed."""


@dataclass
class ShardRecord:
    name: str
    fold: int
    label: str  # "pos", "neg" or (segmentation) "val"
    samples: int
    bytes: int
    sha256: str


@dataclass
class SeriesTask(SeriesInputs):
    """Everything a worker needs to shard one CT: what its cutter reads, and where its shards go; pickles."""

    mhd_path: str = ""
    out_dir: str = ""
    neg_first_shard: int = 0
    samples_per_shard: int = 1
    cutter: Cutter | None = None
    val_shard: int = 0  # number of this CT's validation shard, for cutters that write one
    max_ct_voxels: int = MAX_CT_VOXELS  # a CT whose header declares more is refused before it is read

    def shard_names(self) -> list[str]:
        """The shards this CT owns in the plan: negatives numbered from `neg_first_shard`, its validation shard."""
        negatives = self.cutter.planned_negatives(self.candidates)
        names = [shard_name(self.fold, "neg", self.neg_first_shard + i)
                 for i in range(math.ceil(negatives / self.samples_per_shard))]
        if self.cutter.per_ct_validation:
            names.append(shard_name(self.fold, "val", self.val_shard))
        return names


@dataclass
class SeriesResult:
    series_uid: str
    fold: int
    shards: list[ShardRecord]
    positives: int
    negatives: int
    outside_volume: int
    bytes_read: int
    seconds: float = field(default=0.0)
    val_slices: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # read, cut (and encode), write


def write_shards(samples: list[dict], out_dir: Path, fold: int, label: str, first: int,
                 per_shard: int) -> list[ShardRecord]:
    """Write encoded samples as fold{fold}-{label}-NNNNNN.tar shards numbered from `first`, with their CRCs."""
    records = []
    for number, start in enumerate(range(0, len(samples), per_shard), first):
        with TarShard(out_dir / shard_name(fold, label, number)) as tar:
            for sample in samples[start:start + per_shard]:
                tar.write(with_checksums(sample))
        records.append(ShardRecord(tar.path.name, fold, label, tar.samples, tar.size, tar.sha256.hexdigest()))
    return records


def shard_series(task: SeriesTask) -> SeriesResult:
    """Read one CT, cut it, write its negative (and validation) shards and its positives' tar."""
    stages, started = {}, time.perf_counter()
    ct = read_ct(Path(task.mhd_path), task.max_ct_voxels)
    stages["read"] = time.perf_counter() - started
    cut = task.cutter.cut(task, ct)
    stages["cut"] = time.perf_counter() - started - stages["read"]

    out_dir = Path(task.out_dir)
    shards = write_shards(cut.neg, out_dir, task.fold, "neg", task.neg_first_shard, task.samples_per_shard)
    shards += write_shards(cut.val, out_dir, task.fold, "val", task.val_shard, max(1, len(cut.val)))
    if cut.pos:
        with TarShard(positives_tar(out_dir, task.series_uid)) as tar:
            for sample in cut.pos:
                tar.write(sample)
    seconds = time.perf_counter() - started
    stages["write"] = seconds - stages["read"] - stages["cut"]
    return SeriesResult(
        series_uid=task.series_uid,
        fold=task.fold,
        shards=shards,
        positives=len(cut.pos),
        negatives=len(cut.neg),
        outside_volume=cut.outside_volume,
        bytes_read=ct.hu.nbytes,
        seconds=seconds,
        val_slices=cut.val_slices,
        stage_seconds=stages,
    )


def positives_tar(out: Path, series_uid: str) -> Path:
    """Where a CT's positives wait until every CT is done and they are packed per fold."""
    return out / WORK / "pos" / f"{series_uid}.tar"


def pack_positives(results: list[SeriesResult], out: Path, per_shard: int) -> list[ShardRecord]:
    """Gather each fold's positives, a few per CT, into fold{K}-pos-NNNNNN.tar shards."""
    records = []
    by_fold = defaultdict(list)
    for result in sorted(results, key=lambda r: r.series_uid):
        if result.positives:
            by_fold[result.fold].append(str(positives_tar(out, result.series_uid)))
    for path in out.glob("fold*-pos-*.tar"):
        path.unlink()  # an earlier packing, maybe with fewer CTs
    for fold, tars in sorted(by_fold.items()):
        samples = []
        for tar in tars:
            with open(tar, "rb") as stream:
                samples += read_samples(stream, tar)
        records += write_shards(samples, out, fold, "pos", 0, per_shard)
    return records
