"""Writing a shard set's files: one CT cut into samples and written as shards, and the positives packed per fold.

A shard exists under its final name only once complete: it is written as `NAME.partial`,
hashed as it goes (never read back) and renamed. A CT's positives wait in
`.build/pos/UID.tar` until every CT is done, then `pack_positives` gathers each fold's
into `fold{K}-pos-NNNNNN.tar`. What a build is and when it resumes is `luna_dist.shard`'s.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds

from luna_dist.ct import read_ct
from luna_dist.shard_format import Cutter, SeriesInputs, shard_name, with_checksums

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


class _HashingFile(io.RawIOBase):
    """Write-only file that hashes what passes through, so shards are never read back.

    No fsync: the rename after close is what protects against a killed build, and a
    resumed build checks every journaled shard's size before trusting it.
    """

    def __init__(self, path: Path):
        self._file = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._file.write(data)

    def close(self) -> None:
        self._file.close()
        super().close()


class _AtomicShards:
    """`opener` and `post` for wds.ShardWriter: write `NAME.partial`, hash it, rename when complete."""

    def __init__(self, fold: int, label: str, counts: list[int]):
        self.fold, self.label, self.counts = fold, label, counts
        self.records: list[ShardRecord] = []
        self._file: _HashingFile | None = None

    def open(self, name: str) -> _HashingFile:
        self._file = _HashingFile(Path(name + ".partial"))
        return self._file

    def post(self, name: str) -> None:
        file, self._file = self._file, None
        file.close()
        os.replace(name + ".partial", name)
        samples = self.counts[len(self.records)]
        self.records.append(ShardRecord(Path(name).name, self.fold, self.label, samples, file.size,
                                        file.sha256.hexdigest()))


def write_shards(samples: list[dict], out_dir: Path, fold: int, label: str, first: int,
                 per_shard: int) -> list[ShardRecord]:
    """Write encoded samples as fold{fold}-{label}-NNNNNN.tar shards numbered from `first`."""
    if not samples:
        return []
    counts = [min(per_shard, len(samples) - start) for start in range(0, len(samples), per_shard)]
    sink = _AtomicShards(fold, label, counts)
    pattern = str(out_dir / f"fold{fold}-{label}-%06d.tar")
    # mtime=0 makes shards byte-identical across builds; the samples are bytes already.
    with wds.ShardWriter(pattern, maxcount=per_shard, maxsize=math.inf, start_shard=first, verbose=0,
                         opener=sink.open, post=sink.post, encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write(with_checksums(sample))
    return sink.records


def shard_series(task: SeriesTask) -> SeriesResult:
    """Read one CT, cut it, write its negative (and validation) shards and its positives' tar."""
    started = time.perf_counter()
    ct = read_ct(Path(task.mhd_path))
    cut = task.cutter.cut(task, ct)

    out_dir = Path(task.out_dir)
    shards = write_shards(cut.neg, out_dir, task.fold, "neg", task.neg_first_shard, task.samples_per_shard)
    shards += write_shards(cut.val, out_dir, task.fold, "val", task.val_shard, max(1, len(cut.val)))
    if cut.pos:
        pos_tar = positives_tar(out_dir, task.series_uid)
        partial = pos_tar.with_suffix(".tar.partial")
        with wds.TarWriter(str(partial), encoder=False, mtime=0) as writer:
            for sample in cut.pos:
                writer.write(sample)
        os.replace(partial, pos_tar)
    return SeriesResult(
        series_uid=task.series_uid,
        fold=task.fold,
        shards=shards,
        positives=len(cut.pos),
        negatives=len(cut.neg),
        outside_volume=cut.outside_volume,
        bytes_read=ct.hu.nbytes,
        seconds=time.perf_counter() - started,
        val_slices=cut.val_slices,
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
        samples = [
            {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
            for sample in wds.DataPipeline(wds.SimpleShardList(tars), wds.tarfile_to_samples())
        ]
        records += write_shards(samples, out, fold, "pos", 0, per_shard)
    return records
