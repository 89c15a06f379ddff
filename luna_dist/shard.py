"""`python -m luna_dist.shard`: turn a LUNA16-format folder into WebDataset shards.

Each CT is read once and every candidate of `candidates.csv` in it is cut into a
32x48x48 (I, R, C) int16 chunk. Output, under `--out` (see DESIGN.md for the contract):

    fold{K}-neg-NNNNNN.tar   negatives of the series of fold K, written per CT
    fold{K}-pos-NNNNNN.tar   positives of fold K, packed together once every CT is done
    manifest.json            counts, shards with sizes and sha256, series per fold,
                             series skipped or failed and why, CSV rows rejected

Each sample holds `chunk.npy`, `cls`, `json` and, as every sample of every shard kind,
`crc32.json` (the CRC-32 of each other member, so a reader names a sample whose bytes
changed after the build). CTs are processed in parallel; a shard appears under its final name only once complete (written as `.partial`, then
renamed). Progress is journaled per CT under `.build/` (kept after the build), so a
killed build rerun with the same command redoes only the unfinished CTs and yields
exactly the samples of an uninterrupted build, and a series that failed or had no
`.mhd` is added later by a rerun that reads only that CT. Negative shard numbers are
planned from the CSV before any CT is read, so a redone CT overwrites its own shards
and nothing else.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
import zlib
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import webdataset as wds
from tqdm import tqdm

from luna_dist import __version__
from luna_dist.atomic import write_json
from luna_dist.candidates import (
    Annotation,
    Candidate,
    assign_folds,
    find_series,
    join_annotations,
    read_annotations,
    read_candidates,
)
from luna_dist.ct import CHUNK_SHAPE, HU_MAX, HU_MIN, Ct, CtError, cut_chunks, read_ct
from luna_dist.geometry import xyz_to_irc

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, a second writer is not detected
    fcntl = None

FORMAT = "luna_dist-shards"
FORMAT_VERSION = 2  # 2: every sample carries crc32.json
MANIFEST = "manifest.json"
WORK = ".build"
LOCK = "lock"
LOCK_WAIT_S = 10.0
"""How long a build waits for another writer of its --out (workers of a killed build end within ms)."""
PR_SET_PDEATHSIG = 1
CHUNK_BYTES = int(np.prod(CHUNK_SHAPE)) * 2
SAMPLE_BYTES_MAX = CHUNK_BYTES + 5 * 1024
"""Upper bound of one sample in a tar: npy payload, four 512-byte headers and padding, json, crc32.json."""
CHECKSUMS = "crc32.json"


class BuildError(Exception):
    """The build cannot start or finish; the message says what to change."""


class OutputError(BuildError):
    """--out cannot be written (full disk, read-only, no permission); what was finished is kept."""


@dataclass
class BuildOptions:
    data: Path
    out: Path
    candidates: Path | None = None  # default: data/candidates.csv
    annotations: Path | None = None  # default: data/annotations.csv
    malignancy: Path | None = None  # default: data/annotations_with_malignancy.csv, if present
    excluded: Path | None = None  # default: data/annotations_excluded.csv, if present
    workers: int = max(1, os.cpu_count() or 1)
    max_samples: int = 1000
    max_mb: float = 1000.0
    strict: bool = False
    max_bad_rows: float = 1.0  # percent of a table's rows that may be left out (malformed or duplicate)
    overwrite: bool = False
    progress: bool = True
    task: str = "cls"  # what to cut: "cls" chunks per candidate, "seg" slice stacks and masks
    seg_negatives: int = 64  # seg: negative stacks per CT
    seg_val_every: int = 4  # seg: validate one block of slices without mask in this many

    def __post_init__(self):
        self.data, self.out = Path(self.data), Path(self.out)
        self.candidates = Path(self.candidates or self.data / "candidates.csv")
        self.annotations = Path(self.annotations or self.data / "annotations.csv")
        if self.malignancy is None and (self.data / "annotations_with_malignancy.csv").is_file():
            self.malignancy = self.data / "annotations_with_malignancy.csv"
        if self.excluded is None and (self.data / "annotations_excluded.csv").is_file():
            self.excluded = self.data / "annotations_excluded.csv"
        if self.workers < 1:
            raise BuildError(f"--workers must be at least 1, got {self.workers}")
        if self.max_samples < 1:
            raise BuildError(f"--max-samples must be at least 1, got {self.max_samples}")
        if self.task not in ("cls", "seg"):
            raise BuildError(f"--task must be cls or seg, got {self.task!r}")
        if self.seg_negatives < 0 or self.seg_val_every < 1:
            raise BuildError(f"--seg-negatives must be >= 0 and --seg-val-every >= 1, "
                             f"got {self.seg_negatives} and {self.seg_val_every}")
        if not 0 <= self.max_bad_rows <= 100:
            raise BuildError(f"--max-bad-rows must be a percentage in [0, 100], got {self.max_bad_rows}")
        if self.samples_per_shard < 1:
            raise BuildError(f"--max-mb {self.max_mb} is below one sample ({self.cutter.sample_bytes / 1e6:.2f} MB)")

    @property
    def samples_per_shard(self) -> int:
        return min(self.max_samples, int(self.max_mb * 1e6 // self.cutter.sample_bytes))

    @property
    def cutter(self) -> Cutter:
        if self.task == "seg":
            from luna_dist.seg_samples import SegmentCutter  # it builds on this module

            return SegmentCutter(self.seg_negatives, self.seg_val_every)
        return ChunkCutter()


@dataclass
class ShardRecord:
    name: str
    fold: int
    label: str  # "pos", "neg" or (segmentation) "val"
    samples: int
    bytes: int
    sha256: str


@dataclass
class SeriesTask:
    """Everything a worker needs to shard one CT; pickles for process pools."""

    series_uid: str
    mhd_path: str
    fold: int
    candidates: list[Candidate]
    out_dir: str
    neg_first_shard: int
    samples_per_shard: int
    cutter: Cutter
    annotations: list[Annotation] = field(default_factory=list)  # this CT's
    val_shard: int = 0  # number of this CT's validation shard, for cutters that write one

    def shard_names(self) -> list[str]:
        """The shards this CT owns in the plan: negatives numbered from `neg_first_shard`, its validation shard."""
        negatives = self.cutter.planned_negatives(self.candidates)
        names = [f"fold{self.fold}-neg-{self.neg_first_shard + i:06d}.tar"
                 for i in range(math.ceil(negatives / self.samples_per_shard))]
        if self.cutter.per_ct_validation:
            names.append(f"fold{self.fold}-val-{self.val_shard:06d}.tar")
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


@dataclass
class Cut:
    """What a task cut from one CT, encoded for the tar: positives (packed per fold once every CT
    is done), the negatives the plan counted, and validation samples (one shard per CT)."""

    pos: list[dict]
    neg: list[dict]
    val: list[dict] = field(default_factory=list)
    outside_volume: int = 0  # samples padded because they reach outside the CT
    val_slices: int = 0


class Cutter(Protocol):
    """A task's part of the build: what it cuts from a CT. The machinery around it is shared."""

    task: ClassVar[str]
    sample_bytes: ClassVar[int]  # upper bound of a pos/neg sample in a tar, for --max-mb
    per_ct_validation: ClassVar[bool]  # writes one fold{K}-val-NNNNNN.tar per CT

    def planned_negatives(self, candidates: list[Candidate]) -> int: ...  # known before the CT is read
    def identity(self) -> dict: ...  # what makes two builds of this task the same, beside the inputs
    def layout(self) -> dict: ...  # the manifest's description of the samples
    def cut(self, task: SeriesTask, ct: Ct) -> Cut: ...


def sample_key(series_uid: str, row: int) -> str:
    """WebDataset splits keys at the first dot, and UIDs are full of dots."""
    return f"{series_uid.replace('.', '_')}_{row}"


def npy_bytes(array: np.ndarray) -> bytes:
    """What np.save writes for `array`, built with a single copy of the data."""
    return b"".join((_npy_header(array.shape, array.dtype), memoryview(np.ascontiguousarray(array))))


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The `.npy` header of every chunk: written once, so each sample costs a single copy."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": shape})
    return buffer.getvalue()


CHUNK_NPY_HEADER = _npy_header(CHUNK_SHAPE, np.int16)


def encode_sample(candidate: Candidate, fold: int, center_irc: np.ndarray, outside: bool, chunk: np.ndarray) -> dict:
    """One sample as WebDataset stores it; `chunk.npy` is exactly what np.save writes."""
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
        "chunk.npy": b"".join((CHUNK_NPY_HEADER, memoryview(np.ascontiguousarray(chunk, dtype=np.int16)))),
        "cls": b"1" if candidate.is_nodule else b"0",
        "json": json.dumps(meta).encode(),
    }


def member_checksums(sample: dict) -> dict[str, int]:
    """CRC-32 of every member of a sample but its checksums; any shard kind, any members.

    CRC-32 costs ~25 µs per 147 KB chunk, a fraction of decoding it, and catches the
    random damage of disks and transfers; the manifest's sha256 per shard covers the rest.
    """
    return {name: zlib.crc32(value) for name, value in sorted(sample.items())
            if not name.startswith("__") and name != CHECKSUMS}


def with_checksums(sample: dict) -> dict:
    return {**sample, CHECKSUMS: json.dumps(member_checksums(sample)).encode()}


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
        self.records.append(ShardRecord(Path(name).name, self.fold, self.label, samples, file.size, file.sha256.hexdigest()))


def write_shards(samples: list[dict], out_dir: Path, fold: int, label: str, first: int, per_shard: int) -> list[ShardRecord]:
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


@dataclass(frozen=True)
class ChunkCutter:
    """The classification task: one 32x48x48 chunk per candidate of candidates.csv."""

    task: ClassVar[str] = "cls"
    sample_bytes: ClassVar[int] = SAMPLE_BYTES_MAX
    per_ct_validation: ClassVar[bool] = False

    def planned_negatives(self, candidates: list[Candidate]) -> int:
        return sum(not c.is_nodule for c in candidates)

    def identity(self) -> dict:
        return {"chunk_shape": list(CHUNK_SHAPE)}

    def layout(self) -> dict:
        return {"chunk": {"shape": list(CHUNK_SHAPE), "dtype": "int16", "axes": "IRC", "hu_range": [HU_MIN, HU_MAX]}}

    def cut(self, task: SeriesTask, ct: Ct) -> Cut:
        centers_xyz = np.array([c.center_xyz for c in task.candidates], dtype=np.float64)
        centers_irc = xyz_to_irc(centers_xyz, ct.geometry)
        chunks, outside = cut_chunks(ct.hu, centers_irc)
        encoded = {True: [], False: []}
        for candidate, irc, out, chunk in zip(task.candidates, centers_irc, outside, chunks):
            encoded[candidate.is_nodule].append(encode_sample(candidate, task.fold, irc, out, chunk))
        return Cut(pos=encoded[True], neg=encoded[False], outside_volume=int(outside.sum()))


def shard_series(task: SeriesTask) -> SeriesResult:
    """Read one CT, cut it, write its negative (and validation) shards and its positives' tar."""
    started = time.perf_counter()
    ct = read_ct(Path(task.mhd_path))
    cut = task.cutter.cut(task, ct)

    out_dir = Path(task.out_dir)
    shards = write_shards(cut.neg, out_dir, task.fold, "neg", task.neg_first_shard, task.samples_per_shard)
    shards += write_shards(cut.val, out_dir, task.fold, "val", task.val_shard, max(1, len(cut.val)))
    if cut.pos:
        pos_tar = _positives_tar(out_dir, task.series_uid)
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


def _positives_tar(out: Path, series_uid: str) -> Path:
    """Where a CT's positives wait until every CT is done and they are packed per fold."""
    return out / WORK / "pos" / f"{series_uid}.tar"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:
        raise BuildError(f"{path}: unreadable ({err}); remove it or build with --overwrite") from err


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _identity(options: BuildOptions) -> dict:
    """What makes two builds the same: the CSVs' content and the shard layout, not where the data lies.

    CTs are known by series UID, so a data folder moved or copied elsewhere resumes its build.
    """
    inputs = {"candidates": options.candidates, "annotations": options.annotations, "malignancy": options.malignancy,
              "excluded": options.excluded}
    return {
        "format_version": FORMAT_VERSION,
        "inputs_sha256": {name: sha256_file(path) if path and path.is_file() else None for name, path in inputs.items()},
        **options.cutter.identity(),
        "samples_per_shard": options.samples_per_shard,
    }


def _check_output(options: BuildOptions, identity: dict) -> dict | None:
    """Refuse an output folder holding another build (or clear it with --overwrite); return its manifest, if any.

    A plan without a finished CT is replaced: it holds nothing to keep.
    """
    out, work = options.out, options.out / WORK
    manifest = _read_json(out / MANIFEST)
    plan = _read_json(work / "plan.json")
    previous = (manifest or {}).get("identity") or (plan or {}).get("identity")
    if previous is None and out.is_dir() and any(out.glob("fold*.tar")):
        previous = {"unknown": "shards without a manifest"}
    if previous is None:
        return None
    nothing_finished = manifest is None and plan is not None and not any(work.glob("done/*.json"))
    if previous != identity and not (options.overwrite or nothing_finished):
        if "data" in previous:  # only builds of luna_dist 0.1.0 were known by their data folder's path
            raise BuildError(f"{out} holds a build of luna_dist 0.1.0, which lacks the evaluation findings; "
                             "pass --overwrite to rebuild it, or choose another --out")
        changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
        raise BuildError(
            f"{out} holds a different build (differs in: {', '.join(changed)}); "
            "pass --overwrite to replace it, or choose another --out"
        )
    if options.overwrite or previous != identity:
        for path in out.glob("fold*.tar*"):
            path.unlink()
        (out / MANIFEST).unlink(missing_ok=True)
        for path in work.glob("*"):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.name != LOCK:  # held by this build: another build must still see it
                path.unlink()
        return None
    return manifest


def _is_complete(manifest: dict | None, series: dict[str, Path]) -> bool:
    """Nothing left to do: no CT failed, and no skipped series has found its .mhd since."""
    if manifest is None or manifest["failed"]:
        return False
    return not any(skipped["series_uid"] in series for skipped in manifest["skipped"])


def _prepare_work(options: BuildOptions, identity: dict) -> None:
    work = options.out / WORK
    (work / "done").mkdir(parents=True, exist_ok=True)
    (work / "pos").mkdir(parents=True, exist_ok=True)
    _remove_partials(options.out)
    (work / LOCK).write_text(f"{os.getpid()}\n")  # held by this build (`_sole_writer`): a refused one names it
    write_json(work / "plan.json", {"identity": identity})


def _remove_partials(out: Path) -> None:
    """Files a killed or failed build was writing: never part of the result."""
    for partial in list(out.glob("*.partial")) + list((out / WORK).rglob("*.partial")):
        partial.unlink(missing_ok=True)


@contextmanager
def _sole_writer(out: Path):
    """Hold an exclusive lock on `.build/lock` while the build writes.

    Pool workers share the lock through the descriptor they inherit, so a rerun started
    while workers of a killed build still write waits for them to end, then refuses:
    their output never mixes into the new build. The holder writes its PID into the
    lock file once it starts writing (`_prepare_work`), so a refused build can name it.
    """
    lock = out / WORK / LOCK
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDONLY if lock.exists() else os.O_WRONLY | os.O_CREAT)
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = lock.read_text().strip() or "unknown"
                    raise BuildError(f"{out}: another build (pid {holder}) is writing there (or workers of a killed "
                                     "build still run); wait for it to end, then rerun") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def _end_with_parent() -> None:
    """Pool initializer: a worker ends when the build process dies, rather than writing on unseen."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = multiprocessing.parent_process()
    if parent is not None:  # elsewhere (and should the parent die before prctl): wait on its sentinel
        threading.Thread(target=_exit_after, args=(parent,), daemon=True).start()


def _exit_after(parent: multiprocessing.process.BaseProcess) -> None:
    parent.join()
    os._exit(1)


def _output_error(err: OSError, out: Path, series_uid: str | None = None) -> OutputError:
    """One line naming the path, and what a rerun does: finished CTs stay journaled."""
    done = len(list((out / WORK).glob("done/*.json")))
    during = f" while writing the shards of CT {series_uid}" if series_uid else ""
    fix = "free some space" if err.errno == errno.ENOSPC else "make it writable or choose another --out"
    return OutputError(f"{err.filename or out}: {err.strerror}{during}; nothing finished was lost "
                       f"({done} CT(s) done and kept): {fix}, then rerun the same command to resume")


def _load_done(work: Path, out: Path, task: SeriesTask) -> SeriesResult | None:
    """A CT's journal entry, if it matches today's plan and every file it names is still there.

    The plan moves a CT's shard numbers when another series of its fold appears (a
    restored `.mhd`), so an entry for other numbers is redone rather than trusted.
    """
    record = _read_json(work / "done" / f"{task.series_uid}.json")
    if record is None:
        return None
    result = SeriesResult(**{**record, "shards": [ShardRecord(**s) for s in record["shards"]]})
    if [s.name for s in result.shards] != task.shard_names() or result.negatives != task.cutter.planned_negatives(task.candidates):
        return None
    if result.positives and not _positives_tar(out, task.series_uid).is_file():
        return None
    if any(not (out / s.name).is_file() or (out / s.name).stat().st_size != s.bytes for s in result.shards):
        return None
    return result


def plan_tasks(candidates: list[Candidate], series: dict, folds: dict, options: BuildOptions,
               annotations: list[Annotation] = ()) -> list[SeriesTask]:
    """One task per CT; shard numbers are fixed here, per fold, in UID order."""
    by_series: dict[str, list[Candidate]] = defaultdict(list)
    for candidate in candidates:
        by_series[candidate.series_uid].append(candidate)
    nodules: dict[str, list[Annotation]] = defaultdict(list)
    for annotation in annotations:
        nodules[annotation.series_uid].append(annotation)
    next_neg, next_val = defaultdict(int), defaultdict(int)
    tasks = []
    for uid in sorted(by_series, key=lambda u: (folds[u], u)):
        fold = folds[uid]
        task = SeriesTask(uid, str(series[uid]), fold, by_series[uid], str(options.out), next_neg[fold],
                          options.samples_per_shard, options.cutter, nodules[uid], next_val[fold])
        tasks.append(task)
        next_neg[fold] += len(task.shard_names()) - task.cutter.per_ct_validation
        next_val[fold] += task.cutter.per_ct_validation
    return tasks


def pack_positives(results: list[SeriesResult], out: Path, per_shard: int) -> list[ShardRecord]:
    """Gather each fold's positives, a few per CT, into fold{K}-pos-NNNNNN.tar shards."""
    records = []
    by_fold = defaultdict(list)
    for result in sorted(results, key=lambda r: r.series_uid):
        if result.positives:
            by_fold[result.fold].append(str(_positives_tar(out, result.series_uid)))
    for path in out.glob("fold*-pos-*.tar"):
        path.unlink()  # an earlier packing, maybe with fewer CTs
    for fold, tars in sorted(by_fold.items()):
        samples = [
            {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
            for sample in wds.DataPipeline(wds.SimpleShardList(tars), wds.tarfile_to_samples())
        ]
        records += write_shards(samples, out, fold, "pos", 0, per_shard)
    return records


@dataclass
class Inputs:
    """The checked inputs of a build: its candidates (joined with the annotations), their CTs, what is left out."""

    candidates: list[Candidate]
    series: dict[str, Path]  # UID -> .mhd, for the series of `candidates` found under --data
    skipped: list[dict]
    bad_rows: list
    tables: dict[str, dict]  # per CSV: its path, its data rows and how many were left out
    warnings: list[str]
    findings: dict[str, list]  # "annotations" and "excluded" rows [uid, x, y, z, diameter], for the evaluation
    annotations: list[Annotation]


def read_inputs(options: BuildOptions) -> Inputs:
    """Read and check every input before anything is written, so a failed check leaves no trace in --out."""
    if not options.data.is_dir():
        raise BuildError(f"{options.data}: no such folder (--data names the LUNA16-format folder)")
    candidates, bad_rows = read_candidates(options.candidates)
    annotations, bad_annotations = read_annotations(options.annotations)
    malignancy, bad_malignancy = read_annotations(options.malignancy) if options.malignancy else ([], [])
    excluded, bad_excluded = read_annotations(options.excluded, allow_unknown_diameter=True) if options.excluded \
        else ([], [])
    tables = {name: {"path": str(path), "rows": len(kept) + len(bad), "left_out": len(bad)}
              for name, path, kept, bad in (("candidates", options.candidates, candidates, bad_rows),
                                            ("annotations", options.annotations, annotations, bad_annotations),
                                            ("malignancy", options.malignancy, malignancy, bad_malignancy),
                                            ("excluded", options.excluded, excluded, bad_excluded)) if path}
    bad_rows = bad_rows + bad_annotations + bad_malignancy + bad_excluded
    warnings = []
    if bad_rows:
        shown = "\n  ".join(str(row) for row in bad_rows[:20])
        more = f"\n  ... and {len(bad_rows) - 20} more" if len(bad_rows) > 20 else ""
        message = f"{len(bad_rows)} malformed or duplicate CSV row(s):\n  {shown}{more}"
        if options.strict:
            raise BuildError(message + "\n(--strict) fix the rows or run without --strict to leave them out")
        _check_left_out(tables, bad_rows, options.max_bad_rows)
        warnings.append(f"warning: {message}\nthose rows are left out and listed in the manifest")
    if not candidates:
        raise BuildError(f"{options.candidates}: no usable candidate rows; nothing to shard")

    found = find_series(options.data)
    listed = sorted({c.series_uid for c in candidates})
    skipped = [{"series_uid": uid, "reason": f"no {uid}.mhd under {options.data}"} for uid in listed if uid not in found]
    if len(skipped) == len(listed):
        raise BuildError(f"none of the {len(listed)} series of {options.candidates} has a .mhd under {options.data} "
                         f"(e.g. {listed[0]}.mhd); is --data the folder holding subset0..9?")
    if skipped:
        if options.strict:
            raise BuildError(f"{len(skipped)} series of {options.candidates} have no .mhd under {options.data}, "
                             f"e.g. {skipped[0]['series_uid']} (--strict)")
        warnings.append(f"warning: {len(skipped)} series of {options.candidates} have no .mhd under {options.data}; "
                        "skipped and listed in the manifest")
    findings = {name: [[a.series_uid, *a.center_xyz, a.diameter_mm] for a in table]
                for name, table in (("annotations", annotations), ("excluded", excluded))}
    return Inputs(join_annotations(candidates, annotations, malignancy),
                  {uid: found[uid] for uid in listed if uid in found}, skipped, bad_rows, tables, warnings, findings,
                  annotations)


def _check_left_out(tables: dict[str, dict], bad_rows: list, max_percent: float) -> None:
    """Refuse a table that loses more than `max_percent` of its rows: it is not in the layout the build
    reads (numbers written by another program, shifted columns), and a build from its remains would
    silently miss most candidates or nodules."""
    for table in tables.values():
        if table["rows"] and 100 * table["left_out"] / table["rows"] > max_percent:
            share = 100 * table["left_out"] / table["rows"]
            example = next(row for row in bad_rows if row.path == table["path"])
            raise BuildError(f"{table['path']}: {table['left_out']:,} of {table['rows']:,} rows ({share:.1f} %) cannot "
                             f"be used, e.g. {example}; more than {max_percent:g} % left out means the table is not in "
                             f"the layout the build reads: fix it, or pass --max-bad-rows {math.ceil(share)} to build "
                             f"from the {table['rows'] - table['left_out']:,} rows that can")


def left_out_summary(manifest: dict) -> str | None:
    """One line on the rows of each table a build left out, or None when it used them all."""
    tables = manifest.get("tables", {})
    parts = [f"{t['left_out']:,} of {t['rows']:,} rows of {t['path']}" for t in tables.values() if t["left_out"]]
    if not parts:
        return None
    return f"left out: {', '.join(parts)} (malformed or duplicate; listed in manifest.json under bad_rows)"


def build(options: BuildOptions) -> dict:
    """Build (or finish, or confirm) the shard set; returns the manifest."""
    inputs = read_inputs(options)
    try:
        with _sole_writer(options.out):
            return _build(options, inputs)
    except (OSError, OutputError) as err:
        with suppress(OSError):
            _remove_partials(options.out)  # frees what the failed writes took
        raise (err if isinstance(err, OutputError) else _output_error(err, options.out)) from None


def _build(options: BuildOptions, inputs: Inputs) -> dict:
    identity = _identity(options)
    finished = _check_output(options, identity)
    if _is_complete(finished, inputs.series):
        print(f"{options.out}: build already complete ({finished['counts']['samples']} samples); nothing to do")
        return finished
    for warning in inputs.warnings:
        print(warning, file=sys.stderr)
    _prepare_work(options, identity)

    skipped = inputs.skipped
    folds = assign_folds(inputs.series)
    tasks = plan_tasks([c for c in inputs.candidates if c.series_uid in folds], inputs.series, folds, options,
                       inputs.annotations)

    work = options.out / WORK
    results: dict[str, SeriesResult] = {}
    for task in tasks:
        if (done := _load_done(work, options.out, task)) is not None:
            results[task.series_uid] = done
    todo = [t for t in tasks if t.series_uid not in results]
    if results:
        print(f"resuming: {len(results)} of {len(tasks)} CTs already sharded, {len(todo)} to go")
    failed = _run_tasks(todo, results, options)

    shards = [s for r in results.values() for s in r.shards]
    named = {s.name for s in shards}
    for stale in options.out.glob("fold*.tar"):
        if stale.name not in named and "-pos-" not in stale.name:
            stale.unlink()  # numbered by an earlier plan, before a series appeared
    shards += pack_positives(list(results.values()), options.out, options.samples_per_shard)
    manifest = _manifest(options, identity, results, folds, shards, skipped, failed, inputs)
    write_json(options.out / MANIFEST, manifest)
    if failed:
        listing = "\n  ".join(f"{f['series_uid']}: {f['error']}" for f in failed)
        raise BuildError(f"{len(failed)} CT(s) could not be sharded; the others are in {options.out}:\n  {listing}\n"
                         "fix or remove those files and rerun the same command to add them")
    return manifest


def _run_tasks(todo: list[SeriesTask], results: dict, options: BuildOptions) -> list[dict]:
    """Shard the CTs in parallel, journaling each finished CT; returns the failures."""
    failed = []
    work = options.out / WORK
    bar = tqdm(total=len(todo), unit="CT", disable=not options.progress or not todo, dynamic_ncols=True)
    started, samples, megabytes = time.perf_counter(), 0, 0.0

    def finish(task: SeriesTask, result: SeriesResult | None, error: BaseException | None) -> None:
        nonlocal samples, megabytes
        if isinstance(error, OSError):  # --out cannot take more: every other CT would fail alike
            raise _output_error(error, options.out, task.series_uid)
        if error is not None:
            if not isinstance(error, CtError):
                error = f"{type(error).__name__}: {error}"
            failed.append({"series_uid": task.series_uid, "path": task.mhd_path, "error": str(error)})
            bar.write(f"error: {error}")
        else:
            write_json(work / "done" / f"{task.series_uid}.json", asdict(result))
            results[task.series_uid] = result
            samples += result.positives + result.negatives
            megabytes += (result.positives + result.negatives) * CHUNK_BYTES / 1e6
        elapsed = time.perf_counter() - started
        bar.set_postfix_str(f"{samples / elapsed:,.0f} samples/s, {megabytes / elapsed:,.0f} MB/s", refresh=False)
        bar.update()

    try:
        if options.workers <= 1:
            for task in todo:
                try:
                    finish(task, shard_series(task), None)
                except Exception as error:  # reported per CT; the other CTs go on
                    finish(task, None, error)
        else:
            with ProcessPoolExecutor(options.workers, initializer=_end_with_parent) as pool:
                pending = {pool.submit(shard_series, task): task for task in todo}
                try:
                    while pending:
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for future in done:
                            task = pending.pop(future)
                            error = future.exception()
                            finish(task, None if error else future.result(), error)
                finally:
                    pool.shutdown(cancel_futures=True)  # on an error, the queued CTs are not started
    except KeyboardInterrupt:
        bar.close()
        raise BuildError(f"interrupted: {len(results)} CTs are kept; rerun the same command to resume") from None
    bar.close()
    return failed


def _manifest(options, identity, results, folds, shards, skipped, failed, inputs: Inputs) -> dict:
    fold_counts = {}
    for fold in range(max(folds.values(), default=-1) + 1):
        members = [r for r in results.values() if r.fold == fold]
        series = {r.series_uid for r in members}
        fold_counts[str(fold)] = {
            "series": sorted(series),
            "positives": sum(r.positives for r in members),
            "negatives": sum(r.negatives for r in members),
            "samples": sum(r.positives + r.negatives for r in members),
            # What LUNA16's evaluation needs, so training scores a fold without the data folder.
            **{name: [row for row in rows if row[0] in series] for name, rows in inputs.findings.items()},
        }
        if options.cutter.per_ct_validation:
            fold_counts[str(fold)]["val_slices"] = sum(r.val_slices for r in members)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"luna_dist {__version__}",
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        "identity": identity,
        "task": options.cutter.task,
        **options.cutter.layout(),
        "counts": {
            "samples": sum(f["samples"] for f in fold_counts.values()),
            "positives": sum(f["positives"] for f in fold_counts.values()),
            "negatives": sum(f["negatives"] for f in fold_counts.values()),
            "outside_volume": sum(r.outside_volume for r in results.values()),
            **({"val_slices": sum(r.val_slices for r in results.values())} if options.cutter.per_ct_validation else {}),
        },
        "folds": fold_counts,
        "shards": sorted((asdict(s) for s in shards), key=lambda s: s["name"]),
        "skipped": skipped,
        "failed": failed,
        "tables": inputs.tables,
        "bad_rows": [asdict(row) for row in inputs.bad_rows],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m luna_dist.shard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="LUNA16-format folder (subset*/ with .mhd/.raw, CSVs)")
    parser.add_argument("--task", choices=["cls", "seg"], default="cls",
                        help="cls: a chunk per candidate (default); seg: slice stacks and nodule masks")
    parser.add_argument("--out", type=Path, help="output folder (default: shards/<name of --data>, -seg for --task seg)")
    parser.add_argument("--candidates", type=Path, help="default: DATA/candidates.csv")
    parser.add_argument("--annotations", type=Path, help="default: DATA/annotations.csv")
    parser.add_argument("--malignancy", type=Path,
                        help="malignancy table with mal_bool (default: DATA/annotations_with_malignancy.csv if present)")
    parser.add_argument("--excluded", type=Path,
                        help="findings the evaluation ignores (default: DATA/annotations_excluded.csv if present)")
    parser.add_argument("--workers", type=int, default=BuildOptions.workers, help="parallel CT readers (default: cores)")
    parser.add_argument("--max-samples", type=int, default=BuildOptions.max_samples, help="samples per shard at most")
    parser.add_argument("--max-mb", type=float, default=BuildOptions.max_mb, help="shard size at most, in MB")
    parser.add_argument("--strict", action="store_true", help="fail on malformed CSV rows and series without .mhd")
    parser.add_argument("--max-bad-rows", type=float, default=BuildOptions.max_bad_rows, metavar="PERCENT",
                        help="refuse a table with more than this share of its rows malformed or duplicate "
                             "(default %(default)s %%)")
    parser.add_argument("--overwrite", action="store_true", help="replace a different build found in --out")
    parser.add_argument("--seg-negatives", type=int, default=BuildOptions.seg_negatives,
                        help="seg: negative stacks per CT (default %(default)s)")
    parser.add_argument("--seg-val-every", type=int, default=BuildOptions.seg_val_every,
                        help="seg: validate every slice with mask and 1 block of slices without in N (default %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    default_out = Path("shards") / (args.data.resolve().name + ("-seg" if args.task == "seg" else ""))
    try:
        options = BuildOptions(**{**vars(args), "out": args.out or default_out})
        manifest = build(options)
    except (BuildError, CtError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    counts = manifest["counts"]
    validation = f", {counts['val_slices']} validation slices" if "val_slices" in counts else ""
    print(f"{options.out}: {counts['samples']} samples ({counts['positives']} pos, {counts['negatives']} neg){validation} "
          f"in {len(manifest['shards'])} shards from {sum(len(f['series']) for f in manifest['folds'].values())} CTs")
    if (left_out := left_out_summary(manifest)) is not None:
        print(left_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
