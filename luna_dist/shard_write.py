"""Writing a shard set's files: one CT cut into samples and written as shards, and the positives packed per fold.

A shard exists under its final name only once complete: it is written as `NAME.partial`,
hashed as it goes (never read back) and renamed. A CT's positives wait in
`.build/pos/UID.tar` until every CT is done, then `pack_positives` gathers each fold's
into `fold{K}-pos-NNNNNN.tar`. What a build is and when it resumes is `luna_dist.shard`'s.
"""

from __future__ import annotations

import hashlib
import math
import os
import tarfile
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


# -- tar files ---------------------------------------------------------------------------------------
# A shard's bytes are exactly those webdataset's TarWriter writes (Python's tarfile, PAX format:
# ustar headers, mode 0o444, owner bigdata, mtime 0), but written here: tarfile builds each
# 512-byte header field by field and writes a member in several calls, a third of a CT's build.
_BLOCK, _RECORD = 512, 20 * 512  # tarfile ends an archive with two zero blocks, padded to a whole record
_ZEROS = bytes(_RECORD)
_MODE_IDS = b"0000444\0" b"0000000\0" b"0000000\0"  # mode 0o444, uid 0, gid 0
_MTIME = b"00000000000\0"
_AFTER_CHECKSUM = (b"0" + bytes(100) + b"ustar\x0000" + b"bigdata".ljust(32, b"\0") * 2
                   + bytes(8 + 8 + 155 + 12))  # regular file, no link, magic, owner names, devices, prefix
_HEADER_SUM = sum(_MODE_IDS) + sum(_MTIME) + 8 * ord(" ") + sum(_AFTER_CHECKSUM)


def _member_header(name: str, size: int) -> bytes:
    """The tar header of a regular file `name` of `size` bytes, as tarfile writes it for TarWriter."""
    if not (name.isascii() and len(name) <= 100 and size < 8 ** 11):  # ustar cannot hold it: tarfile adds pax
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "bigdata", "bigdata"
        return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    name_field, size_field = name.encode().ljust(100, b"\0"), b"%011o\0" % size
    checksum = _HEADER_SUM + sum(name_field) + sum(size_field)  # of the header with its checksum field blank
    return b"".join((name_field, _MODE_IDS, size_field, _MTIME, b"%06o\0 " % checksum, _AFTER_CHECKSUM))


class TarShard:
    """A tar file that exists under its name only once complete: written as `NAME.partial`, each sample's
    members in one system call, hashed as they pass (never read back), renamed when closed without error.

    No fsync: the rename is what protects against a killed build, and a resumed build
    checks every journaled shard's size before trusting it.
    """

    def __init__(self, path: Path):
        self.path, self.samples, self.size, self.sha256 = path, 0, 0, hashlib.sha256()
        self._partial = path.with_name(path.name + ".partial")
        self._fd = os.open(self._partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def write(self, sample: dict) -> None:
        """A sample's members `KEY.NAME` in name order, as TarWriter writes them; fields starting with `_`
        (`__key__`, and a reader's `__url__`) are not members."""
        key, pieces = sample["__key__"], []
        for name in sorted(sample):
            if not name.startswith("_"):
                data = sample[name]
                pieces += (_member_header(f"{key}.{name}", len(data)), data, _ZEROS[:-len(data) % _BLOCK])
        self._write(pieces)
        self.samples += 1

    def _write(self, pieces: list) -> None:
        for piece in pieces:
            self.sha256.update(piece)
        total = sum(map(len, pieces))
        written = os.writev(self._fd, pieces)
        if written < total:  # a regular file takes it all, unless e.g. the disk fills: then os.write raises
            rest = memoryview(b"".join(pieces))[written:]
            while rest:
                rest = rest[os.write(self._fd, rest):]
        self.size += total

    def __enter__(self) -> TarShard:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        try:
            if error_type is None:
                end = self.size + 2 * _BLOCK
                self._write([_ZEROS[:2 * _BLOCK + (-end % _RECORD)]])
        finally:
            os.close(self._fd)
        if error_type is None:
            os.replace(self._partial, self.path)
        else:
            self._partial.unlink(missing_ok=True)


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
    started = time.perf_counter()
    ct = read_ct(Path(task.mhd_path))
    cut = task.cutter.cut(task, ct)

    out_dir = Path(task.out_dir)
    shards = write_shards(cut.neg, out_dir, task.fold, "neg", task.neg_first_shard, task.samples_per_shard)
    shards += write_shards(cut.val, out_dir, task.fold, "val", task.val_shard, max(1, len(cut.val)))
    if cut.pos:
        with TarShard(positives_tar(out_dir, task.series_uid)) as tar:
            for sample in cut.pos:
                tar.write(sample)
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
        samples = list(wds.DataPipeline(wds.SimpleShardList(tars), wds.tarfile_to_samples()))
        records += write_shards(samples, out, fold, "pos", 0, per_shard)
    return records
