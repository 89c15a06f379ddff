"""WebDataset pipelines from a shard set to batches on the host, the same for every task.

Training: every (rank, worker) draws shards at random with replacement from the
training shards of each kind of sample (`ClassStream`: a label, what passes, its share),
shuffles them in a buffer, mixes the kinds at their shares and stops after its share of
a fixed number of batches, so every rank runs the same number of steps whatever the
shard count and whatever its number of workers: no DDP hang.

Validation: the shard list is split by node, then by worker, and read once, so each
validation sample is scored by exactly one process. Ranks may get unequal numbers of
batches; the training loop gathers with padding.

Every shard is read through `checked_samples`: each sample's members must match their
CRC-32 (`crc32.json`) and each shard must yield the samples its manifest entry counts
(Python's tar reader takes a damaged header in mid-archive for the end of the file and
stops silently). Either fault stops the run with the shard (and sample) named: a model
trained or scored on garbage, or on silently fewer samples, is worse than a stopped run.
The bytes come from a folder, a URL or a cache through `luna_dist.shards.sources`; what a
sample holds is its sample module's (`luna_dist.shards.chunk_samples`, `seg_samples`), and
batches are made of samples by `luna_dist.data.batches` (the `collate` and `batcher` given here).
Every stage is a module-level function or a partial of one, so pipelines pickle: workers are
started by a fork server (Linux) or spawned (macOS), never forked from the training process
(`luna_dist.data.loaders.worker_start`), and a pipeline carries the rank it was built for
(`Rank`).
"""

from __future__ import annotations

import bisect
import io
import itertools
import json
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType

import torch
import webdataset as wds

from luna_dist.shards.format import MANIFEST, REBUILD, ShardSetError, check_manifest, check_sample
from luna_dist.shards.sources import DEFAULT_READ_TIMEOUT, ShardSource, is_remote, read_manifest, shard_location
from luna_dist.shards.tar import read_samples


@dataclass
class ShardSet:
    """A checked shard set, in a folder or behind a URL: its manifest and the shards of each fold and label.

    `cache_dir`: remote shards are copied there and read from the copy, the folder holding at most
    `cache_limit` bytes (`luna_dist.shards.cache`). `read_timeout`: a remote shard of which less than
    `luna_dist.shards.sources.MIN_PROGRESS` arrives in that many seconds of waiting fails.
    """

    root: Path | str
    manifest: dict
    cache_dir: str | None = None
    read_timeout: float = DEFAULT_READ_TIMEOUT
    cache_limit: int | None = None

    def _select(self, folds: Iterable[int], label: str) -> list[dict]:
        folds = set(folds)
        return [s for s in self.manifest["shards"] if s["fold"] in folds and s["label"] == label]

    def shards(self, folds: Iterable[int], label: str) -> list[str]:
        return [shard_location(self.root, s["name"]) for s in self._select(folds, label)]

    def count(self, folds: Iterable[int], label: str) -> int:
        return sum(s["samples"] for s in self._select(folds, label))

    @property
    def source(self) -> ShardSource:
        """What the readers need to open and check each shard; pickles for spawn workers."""
        entries = {shard_location(self.root, s["name"]): (s["samples"], s["bytes"], s["sha256"])
                   for s in self.manifest["shards"]}
        return ShardSource(entries, is_remote(self.root), self.cache_dir, self.read_timeout, self.cache_limit)

    def verify(self) -> tuple[list[str], float]:
        """sha256 of every shard (read or streamed whole) against the manifest: the problems found, and the seconds."""
        started = time.perf_counter()
        problems = []
        source = self.source
        for location in sorted(source.entries):
            try:
                with source.open(location, checked=True) as stream:
                    stream.raw.check()
            except ShardSetError as err:
                problems.append(str(err))
            except OSError as err:
                problems.append(f"{location}: unreadable ({err})")
        return problems, time.perf_counter() - started

    @property
    def folds(self) -> list[int]:
        return sorted(int(k) for k in self.manifest["folds"])


def open_shard_set(root: Path | str, samples: ModuleType, cache_dir: str | Path | None = None,
                   read_timeout: float = DEFAULT_READ_TIMEOUT, cache_limit: int | None = None) -> ShardSet:
    """Read and check `manifest.json` for the samples of a sample module (`chunk_samples`, `seg_samples`: the
    task they were built for, the layout its `READS` names) and every shard's presence and size.

    `root` is a folder or a URL (`is_remote`); behind a URL, each shard's size and sha256 are
    checked on the bytes streamed instead, as they are read, and with `cache_dir` copied there,
    within `cache_limit` bytes, which must hold the largest shard.
    """
    if cache_limit is not None and cache_dir is None:
        raise ShardSetError("--cache-limit bounds the cache folder: give --cache-dir too")
    root = root if is_remote(root) else Path(root)
    path = shard_location(root, MANIFEST)
    try:
        manifest = read_manifest(root, read_timeout)
    except FileNotFoundError:
        if is_remote(root):
            raise ShardSetError(f"{path} not found: {root} must be where the files of a finished shard build "
                                "are served (its manifest.json and .tar shards, copied as they are); check the URL"
                                ) from None
        raise ShardSetError(f"{path} not found: is {root} a finished shard build? "
                            f"Run `python -m luna_dist.shard --data DIR --out {root}` (again) to finish it.") from None
    except json.JSONDecodeError as err:
        raise ShardSetError(f"{path}: not valid JSON ({err}); rebuild the shards") from None
    check_manifest(manifest, path, samples.TASK, samples.READS)
    problems = []
    for shard in [] if is_remote(root) else manifest["shards"]:
        file = root / shard["name"]
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif file.stat().st_size != shard["bytes"]:
            problems.append(f"{file}: {file.stat().st_size} bytes, the manifest says {shard['bytes']} (truncated?)")
    if problems:
        raise ShardSetError(f"{root} does not match its manifest:\n  " + "\n  ".join(problems[:20])
                            + "\nrebuild with `python -m luna_dist.shard ... --overwrite`")
    largest = max(manifest["shards"], key=lambda shard: shard["bytes"], default=None)
    if cache_limit is not None and is_remote(root) and largest is not None and largest["bytes"] > cache_limit:
        raise ShardSetError(f"--cache-limit {cache_limit:,} bytes cannot hold {shard_location(root, largest['name'])} "
                            f"({largest['bytes']:,} bytes), the largest shard: raise it (a few shards a data worker "
                            "at least), or leave out --cache-dir to stream every shard")
    if manifest["failed"]:
        warnings.warn(f"{root}: {len(manifest['failed'])} CT(s) failed to shard and are left out "
                      f"(e.g. {manifest['failed'][0]['path']}); fix them and rerun the shard build to add them",
                      stacklevel=2)
    return ShardSet(root, manifest, None if cache_dir is None else str(cache_dir), read_timeout, cache_limit)


def checked_samples(shards: Iterator[dict], source: ShardSource) -> Iterator[dict]:
    """Pipeline stage replacing `wds.tarfile_to_samples`: samples of each shard, checked.

    Raises ShardSetError naming the shard when a sample's bytes differ from its
    checksums, when the tar cannot be read, when the shard ends before (or after) the
    number of samples its manifest entry holds, or when the bytes streamed from a URL
    differ from the manifest's size and sha256. A remote shard whose server or network
    failed (unreachable, stalled for the read timeout, cut off) is reported as that, not as
    a damaged shard.
    """
    for shard in shards:
        url, read = shard["url"], 0
        expected = source.entries[url][0]
        stream = None
        try:
            stream = source.open(url)
            for sample in read_samples(stream, url, source.entries[url][1]):
                check_sample(sample)
                read += 1
                yield sample
            if source.remote:
                stream.raw.check()
            stream.close()
        except (OSError, ValueError) as err:  # a TarReadError, a damaged sample's bytes
            raise _unreadable(url, read, err, stream) from None
        finally:
            if stream is not None:
                with suppress(OSError):
                    stream.close()  # also when the consumer stops early: a remote file's reader is ended
        if read != expected:
            raise ShardSetError(f"{url}: {read} samples read, its manifest entry says {expected}: the shard is "
                                f"damaged (a broken tar header ends it early): {REBUILD}")


def _unreadable(url: str, read: int, error: Exception, stream: io.BufferedReader | None) -> ShardSetError:
    """The message for a shard whose reading failed: the server's or network's fault, the disk's, or the shard's."""
    checked = getattr(stream, "raw", None)
    if hasattr(checked, "fault") and (fault := checked.fault()) is not None:
        return fault
    if isinstance(error, OSError) and error.errno is not None:
        return ShardSetError(f"{url}: cannot be read after {read} samples ({error.strerror}); check the disk or copy, "
                             "then rerun with --resume")
    return ShardSetError(f"{url}: unreadable after {read} samples ({error}); the shard is damaged: {REBUILD}")


def batched(samples: Iterator[dict], batch_size: int, collate: Callable[[list[dict]], tuple],
            partial_last: bool = True) -> Iterator[tuple]:
    """Pipeline stage: group raw samples and collate each group once (a `collate` of `luna_dist.data.batches`)."""
    group = []
    for sample in samples:
        group.append(sample)
        if len(group) == batch_size:
            yield collate(group)
            group = []
    if group and partial_last:
        yield collate(group)


@dataclass(frozen=True)
class Rank:
    """The process a pipeline is built for, among `world`: taken where it is built, and carried to its workers.

    webdataset's stages ask in the worker (the environment's RANK, else the process group),
    but a worker started by a fork server (`luna_dist.data.loaders.worker_start`) has the
    environment of the moment the server started and no process group: a rank it got wrong
    would read every rank's validation shards, or train on another rank's samples.
    """

    rank: int
    world: int

    @classmethod
    def here(cls) -> Rank:
        rank, world, _, _ = wds.utils.pytorch_worker_info()
        return cls(rank, world)

    def worker_seed(self) -> int:
        """This (rank, DataLoader worker)'s seed, as webdataset's `pytorch_worker_seed` makes it."""
        info = torch.utils.data.get_worker_info()
        return self.rank * 1000 + (info.id if info is not None else 0)

    def split(self, shard_urls: Iterable) -> Iterator:
        """Pipeline stage: this rank's part of a shard list (every `world`th, from its own)."""
        yield from itertools.islice(shard_urls, self.rank, None, self.world)


def _worker_rng(seed: int, rank: Rank) -> random.Random:
    """A generator of this (rank, DataLoader worker)'s own, from `seed`; its stages make it as iteration starts."""
    return random.Random(wds.utils.make_seed(seed, rank.worker_seed()))


def shuffled(samples: Iterator[dict], buffer: int, seed: int, rank: Rank) -> Iterator[dict]:
    """Pipeline stage: buffer shuffle seeded per (seed, rank, worker), decided when iteration starts."""
    yield from wds.shuffle(buffer, initial=buffer, rng=_worker_rng(seed, rank))(samples)


# -- training --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassStream:
    """One kind of training sample: the shards of a label, the stages its samples must pass, its share of a batch."""

    label: str  # "pos" or "neg"
    share: float | None  # its weight in the mix; None: the label's samples in the training folds (natural)
    salt: int  # seeds this kind's stream apart from the others
    select: tuple = ()  # pipeline stages (filters) before the shuffle, e.g. a partial of with_malignancy
    buffer: float = 1.0  # its shuffle buffer, as a share of --shuffle-buffer (rare kinds need fewer)


def pos_neg_streams(negatives_per_positive: float) -> tuple[ClassStream, ClassStream]:
    """Positives and negatives mixed `negatives_per_positive` to 1; 0: at their natural frequencies."""
    ratio = negatives_per_positive
    return (ClassStream("pos", 1.0 if ratio else None, salt=1, buffer=0.1), ClassStream("neg", ratio or None, salt=0))


@dataclass(frozen=True)
class TrainStreamConfig:
    folds: tuple[int, ...]
    batch_size: int  # per process
    steps: int  # per process per epoch, exactly, whatever the number of workers (see `worker_share`)
    num_workers: int
    streams: tuple[ClassStream, ...]
    shuffle_buffer: int = 1000
    seed: int = 0


def mixed(streams: list[wds.DataPipeline], weights: list[float], seed: int, rank: Rank) -> Iterator[dict]:
    """Pipeline source: each sample from one of `streams`, drawn with chance proportional to its weight.

    webdataset's RandomMix recomputes the normalised cumulative weights with numpy for every
    sample (~30 µs, a tenth of a loader worker's time) and draws from the global `random`;
    here the sums are made once and the draws come from `_worker_rng`, seeded per (seed, rank,
    worker) as `shuffled`'s is. Ends when any stream ends (the training streams never do).
    """
    rng = _worker_rng(seed, rank)
    sources = [iter(stream) for stream in streams]
    cumulative = list(itertools.accumulate(weights))
    while True:
        try:
            yield next(sources[bisect.bisect_right(cumulative, rng.random() * cumulative[-1])])
        except StopIteration:
            return


def worker_share(batches: Iterator, steps: int) -> Iterator:
    """Pipeline stage: this DataLoader worker's part of an epoch of `steps` batches.

    The workers split the steps as evenly as whole batches allow (the first `steps % workers`
    take one more), so a rank yields exactly `steps` batches whatever its number of workers:
    ranks on nodes with more or fewer cores run the same steps, and DDP never waits in an
    all-reduce for a rank that has already stopped.
    """
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    yield from itertools.islice(batches, steps // workers + (worker < steps % workers))


def train_pipeline(shards: ShardSet, config: TrainStreamConfig, epoch: int,
                   collate: Callable[[list[dict]], tuple]) -> wds.DataPipeline:
    """What each worker runs: shuffled batches mixing `config.streams`, its `worker_share` of `config.steps`.

    A kind with a share of 0 is left out; every other kind needs shards (a resampled stream
    of no shard would never yield).
    """
    seed, rank = wds.utils.make_seed(config.seed, epoch), Rank.here()
    streams, weights = [], []
    for kind in config.streams:
        if kind.share == 0:
            continue
        urls = shards.shards(config.folds, kind.label)
        if not urls:
            raise ShardSetError(f"{shards.root}: training folds {list(config.folds)} have no {kind.label} shards; "
                                "both classes are needed (change --val-folds?)")
        buffer = max(1, int(config.shuffle_buffer * kind.buffer))
        streams.append(wds.DataPipeline(
            wds.ResampledShards(urls, seed=wds.utils.make_seed(seed, kind.salt), deterministic=True,
                                worker_seed=rank.worker_seed),
            partial(checked_samples, source=shards.source),
            *kind.select,
            partial(shuffled, buffer=buffer, seed=wds.utils.make_seed(seed, kind.salt), rank=rank),
        ))
        weights.append(shards.count(config.folds, kind.label) if kind.share is None else float(kind.share))
    return wds.DataPipeline(partial(mixed, streams, weights, seed, rank),
                            partial(batched, batch_size=config.batch_size, collate=collate),
                            partial(worker_share, steps=config.steps))


# -- validation ------------------------------------------------------------------------------------
def val_pipeline(shards: ShardSet, folds: Iterable[int], batch_size: int, labels: tuple[str, ...],
                 batcher: Callable[..., Iterator]) -> wds.DataPipeline:
    """Every validation sample once across all ranks and workers: split by node, then by worker, no resampling.

    `batcher(samples, batch_size=)` makes the batches: `batched` with the classifier's
    collate, or the segmentation's `batched_slices` (`luna_dist.data.batches`).
    """
    folds = list(folds)
    urls = sorted(url for label in labels for url in shards.shards(folds, label))
    if not urls:
        raise ShardSetError(f"{shards.root}: no shards in validation folds {sorted(folds)}")
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        Rank.here().split,
        wds.split_by_worker,
        partial(checked_samples, source=shards.source),
        partial(batcher, batch_size=batch_size),
    )
