"""The loader benchmark: samples/s from shards against a per-candidate Dataset."""

from __future__ import annotations

import functools
import random
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from luna_dist.benchmarks.build import first_samples
from luna_dist.data.batches import collate
from luna_dist.data.loaders import train_loader
from luna_dist.data.streams import ShardSet, TrainStreamConfig, open_shard_set, pos_neg_streams
from luna_dist.imaging.chunks import cut_chunks
from luna_dist.imaging.ct import read_ct
from luna_dist.imaging.geometry import xyz_to_irc
from luna_dist.shards import chunk_samples
from luna_dist.shards.codecs import load_array
from luna_dist.tables.candidates import Candidate, find_series, read_candidates


class PerCandidateDataset(Dataset):
    """The approach shards replace: each item opens its CT (through a small LRU cache) and cuts one chunk."""

    def __init__(self, data: Path, candidates: list[Candidate], cached_cts: int = 2, disk_cache: Path | None = None):
        self.series = {uid: str(path) for uid, path in find_series(data).items()}
        self.candidates = [c for c in candidates if c.series_uid in self.series]
        self.disk_cache = disk_cache
        self.cached_cts = cached_cts
        self._read = None  # the LRU cache lives in each worker process

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_read": None}  # a cache of CTs neither pickles nor should travel

    def __len__(self) -> int:
        return len(self.candidates)

    def _cut(self, candidate: Candidate) -> np.ndarray:
        if self._read is None:
            self._read = functools.lru_cache(maxsize=self.cached_cts)(read_ct)
        ct = self._read(Path(self.series[candidate.series_uid]))
        chunks, _ = cut_chunks(ct.hu, xyz_to_irc(np.array(candidate.center_xyz), ct.geometry))
        return chunks[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        candidate = self.candidates[index]
        if self.disk_cache is None:
            chunk = self._cut(candidate)
        else:
            path = self.disk_cache / f"{candidate.series_uid}_{candidate.row}.npy"
            if path.is_file():
                chunk = np.load(path)
            else:
                chunk = self._cut(candidate)
                np.save(path, chunk)
        return torch.from_numpy(chunk).unsqueeze(0).float(), int(candidate.is_nodule)


class SeriesOrderSampler(torch.utils.data.Sampler):
    """Candidates grouped by series (the LRU cache's best case), series in random order."""

    def __init__(self, dataset: PerCandidateDataset, seed: int = 0):
        self.groups: dict[str, list[int]] = {}
        for index, candidate in enumerate(dataset.candidates):
            self.groups.setdefault(candidate.series_uid, []).append(index)
        self.seed = seed

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups.values())

    def __iter__(self):
        order = sorted(self.groups)
        random.Random(self.seed).shuffle(order)
        for uid in order:
            yield from self.groups[uid]


def _rate(batches, limit_samples: int) -> float:
    """Samples/s after the first batch (worker start-up excluded), up to `limit_samples`."""
    iterator = iter(batches)
    next(iterator)
    started, seen = time.perf_counter(), 0
    for batch in iterator:
        seen += len(batch[1])
        if seen >= limit_samples:
            break
    return seen / (time.perf_counter() - started)


def plain_tar_loop(shard_paths: list[str], limit_samples: int) -> float:
    """The naive reader: tarfile + np.load + float tensor, one sample at a time."""
    started, seen = time.perf_counter(), 0
    for path in shard_paths:
        with tarfile.open(path) as tar:
            for member in tar:
                name = member.name.split(".", 1)[1]
                if name.startswith("chunk.npy"):
                    array = load_array({name: tar.extractfile(member).read()}, "chunk.npy")
                    torch.from_numpy(array).float()
                    seen += 1
                    if seen >= limit_samples:
                        return seen / (time.perf_counter() - started)
    return seen / (time.perf_counter() - started)


def decode_rate(shards: ShardSet, batch_size: int, samples: int) -> float:
    """Samples/s one core turns into batches (`collate`) from samples already read: the decoding
    a loader worker does, the shards as built (compressed by default)."""
    read = first_samples(shards, samples)
    started = time.process_time()  # one thread's work: CPU time, whatever else the machine runs
    for start in range(0, len(read), batch_size):
        collate(read[start:start + batch_size])
    return len(read) / (time.process_time() - started)


def bench_loader(data: Path, shards_dir: Path, workers: list[int], batch_size: int, samples: int,
                 baseline_samples: int, cache_dir: Path) -> dict:
    shards = open_shard_set(shards_dir, chunk_samples)
    folds = shards.folds
    balanced = pos_neg_streams(1)
    result = {"batch_size": batch_size, "shards": {}, "per_candidate_random": {}, "per_candidate_series_order": {},
              "per_candidate_disk_cache": {}}
    for w in workers:
        steps = max(2, samples // batch_size)
        config = TrainStreamConfig(tuple(folds), batch_size, steps, w, balanced, shuffle_buffer=500)
        loader = train_loader(shards, config, 0, collate)
        result["shards"][str(w)] = _rate(loader, (steps - 1) * batch_size)
    result["plain_tar_loop"] = plain_tar_loop(shards.shards(folds, "neg"), samples)
    if {"0", "1"} <= set(result["shards"]):
        result["worker_over_in_process"] = result["shards"]["1"] / result["shards"]["0"]
    result["decode_samples_per_s_per_core"] = decode_rate(shards, batch_size, samples)

    candidates = read_candidates(data / "candidates.csv")[0]
    cache_dir.mkdir(parents=True, exist_ok=True)
    for w in workers:
        dataset = PerCandidateDataset(data, candidates)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=w)
        result["per_candidate_random"][str(w)] = _rate(loader, baseline_samples)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=SeriesOrderSampler(dataset), num_workers=w)
        result["per_candidate_series_order"][str(w)] = _rate(loader, samples)
    cached = PerCandidateDataset(data, candidates, disk_cache=cache_dir)
    for _ in DataLoader(cached, batch_size=batch_size, num_workers=max(workers)):
        pass  # warm the disk cache, as the book's prepcache step does
    for w in workers:
        loader = DataLoader(cached, batch_size=batch_size, shuffle=True, num_workers=w)
        result["per_candidate_disk_cache"][str(w)] = _rate(loader, samples)
    result["shards_vs_random_baseline"] = {
        w: result["shards"][w] / result["per_candidate_random"][w] for w in result["shards"]}
    result["shards_vs_disk_cache"] = {
        w: result["shards"][w] / result["per_candidate_disk_cache"][w] for w in result["shards"]}
    return result
