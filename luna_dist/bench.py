"""`python -m luna_dist.bench {shard,loader,train,seg,analyze,evaluate,all}`: the project's speed claims, measured in one run.

- shard:  build time against the time of only reading the same CTs with SimpleITK.
- loader: samples/s delivered as batched tensors from shards (0, 1, 2 workers) against
          a per-candidate `Dataset` like the book's (a small LRU cache of CTs, read in
          random and in series order, and with a warm per-candidate disk cache), and
          against a plain tarfile + np.load loop.
- train:  end-to-end training samples/s (shards -> loss.backward -> step) against the
          pure-compute ceiling (same model and batch on tensors already on the device),
          layout and precision variants, and 1 against 2 CPU ranks.
- seg:    the segmentation task: its shard build's bytes per training sample and per
          validation slice, and UNet training end to end (shards -> device crop ->
          loss.backward -> step) against the same steps on a batch already on the device.
- analyze: `python -m luna_dist.analyze` on a few CTs: seconds per CT in segmentation,
          grouping and classification (one process), and 2 CPU ranks against 1 (wall
          time of the whole command, start-up included); the peak memory of grouping
          one CT (bytes per voxel), and the seconds of the confusion table over 888
          scans x 850 generated marks.
- evaluate: LUNA16 scoring of generated marks at the full data set's size (888 scans,
          ~600 marks each): reading the CSVs, the FROC/CPM, and its bootstrap interval.

Without --data/--shards it makes a synthetic data set first. Figures print as one
table; --json writes them, --plot draws them (needs matplotlib).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from luna_dist.analyze import confusion, group
from luna_dist.candidates import Annotation, Candidate, find_series, read_candidates
from luna_dist.ct import CHUNK_SHAPE, HU_MAX, HU_MIN, cut_chunks, read_ct
from luna_dist.evaluate import Findings, Marks, froc, read_findings, read_marks, read_series_list, write_marks
from luna_dist.geometry import xyz_to_irc
from luna_dist.hardware import cpu_features, native_bf16
from luna_dist.model import LunaModel, SegmentationModel
from luna_dist.shard import BuildOptions, build
from luna_dist.stream import TrainStreamConfig, open_shard_set, train_loader
from luna_dist.synth import make_dataset


# -- shard -----------------------------------------------------------------------------------------
def _read_only(path: str) -> int:
    return read_ct(Path(path)).hu.nbytes


def evict_from_page_cache(paths: list[Path]) -> None:
    """Make the next read of these files come from disk, as on a first build of 120 GB of CTs."""
    os.sync()  # dirty pages (freshly written data) cannot be dropped
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_shard(data: Path, out: Path, workers: int) -> dict:
    """Build shards from `data` and compare with only reading its CTs, same number of processes.

    Measured twice: with the CTs in the page cache (memory speed: any extra pass over
    the chunks shows) and with them evicted first (disk speed: the real data set, too
    large to cache, is always read this way).
    """
    candidates, _ = read_candidates(data / "candidates.csv")
    wanted = {c.series_uid for c in candidates}
    paths = [str(p) for uid, p in find_series(data).items() if uid in wanted]
    files = [f for p in paths for f in (Path(p), Path(p).with_suffix(".raw"))]
    result = {"cts": len(paths), "workers": workers}
    for cache in ("cold", "warm"):
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_read_only, paths[:workers]))  # start the workers outside the timing
            if cache == "cold":
                evict_from_page_cache(files)
            else:
                list(pool.map(_read_only, paths))
            started = time.perf_counter()
            input_bytes = sum(pool.map(_read_only, paths))
            read_seconds = time.perf_counter() - started
        if cache == "cold":
            evict_from_page_cache(files)
        shutil.rmtree(out, ignore_errors=True)
        started = time.perf_counter()
        manifest = build(BuildOptions(data=data, out=out, workers=workers, progress=False))
        build_seconds = time.perf_counter() - started
        samples = manifest["counts"]["samples"]
        result[cache] = {
            "read_seconds": read_seconds,
            "build_seconds": build_seconds,
            "build_to_read_ratio": build_seconds / read_seconds,
            "cts_per_s": len(paths) / build_seconds,
            "samples_per_s": samples / build_seconds,
            "chunk_mb_per_s": samples * np.prod(CHUNK_SHAPE) * 2 / 1e6 / build_seconds,
            "input_mb_per_s": input_bytes / 1e6 / build_seconds,
        }
    result["samples"] = samples
    result["input_mb"] = input_bytes / 1e6
    result["bytes_per_sample"] = sum(s["bytes"] for s in manifest["shards"]) / samples
    return result


# -- loader ----------------------------------------------------------------------------------------
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
                if member.name.endswith(".npy"):
                    array = np.load(io.BytesIO(tar.extractfile(member).read()))
                    torch.from_numpy(array).float()
                    seen += 1
                    if seen >= limit_samples:
                        return seen / (time.perf_counter() - started)
    return seen / (time.perf_counter() - started)


def bench_loader(data: Path, shards_dir: Path, workers: list[int], batch_size: int, samples: int,
                 baseline_samples: int, cache_dir: Path) -> dict:
    shards = open_shard_set(shards_dir)
    folds = shards.folds
    result = {"batch_size": batch_size, "shards": {}, "per_candidate_random": {}, "per_candidate_series_order": {},
              "per_candidate_disk_cache": {}}
    for w in workers:
        steps = max(2, samples // batch_size)
        config = TrainStreamConfig(tuple(folds), batch_size, steps, w, neg_per_pos=1, shuffle_buffer=500)
        result["shards"][str(w)] = _rate(train_loader(shards, config, epoch=0), (steps - 1) * batch_size)
    result["plain_tar_loop"] = plain_tar_loop(shards.shards(folds, "neg"), samples)

    candidates, _ = read_candidates(data / "candidates.csv")
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


# -- train -----------------------------------------------------------------------------------------
def _trainer(shards_dir: Path, out: Path, batch_size: int, steps: int, extra: list[str], task: str = "cls"):
    from luna_dist.train import Trainer, parse_args

    last_fold = open_shard_set(shards_dir, task).folds[-1]  # a validation fold that exists, though no epoch validates
    # An epoch of exactly `steps` batches, however small the data: per-epoch start-up (the
    # shuffle buffer's first fill) is then paid over the same work in every benchmark.
    args = parse_args(["--task", task, "--shards", str(shards_dir), "--batch-size", str(batch_size),
                       "--max-steps", str(steps), "--epoch-samples", str(steps * batch_size),
                       "--out", str(out), "--run-name", f"bench-{batch_size}", "--overwrite", "--balanced", "1",
                       "--val-folds", str(last_fold), *extra])
    return Trainer(args)


def compute_ceiling(device: torch.device, batch_size: int, steps: int, channels_last: bool, bf16: bool) -> float:
    """Train steps on one int16 batch already on the device: what the model alone can do.

    Each step does what a training step does to its input (float conversion, layout),
    so the ratio to end-to-end isolates the cost of feeding the model.
    """
    model = LunaModel().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.99)
    chunks = torch.randint(HU_MIN, HU_MAX, (batch_size, 1, *CHUNK_SHAPE), dtype=torch.int16, device=device)
    labels = torch.randint(0, 2, (batch_size,), device=device)

    def step():
        x = chunks.float()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return _timed_steps(step, device, steps, batch_size)


def _timed_steps(step, device: torch.device, steps: int, batch_size: int) -> float:
    """Samples/s of `steps` calls of `step`, after one warm-up call (kernel selection, allocator)."""
    step()
    _synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    return steps * batch_size / (time.perf_counter() - started)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def end_to_end(trainer, epoch: int) -> float:
    started = time.perf_counter()
    metrics = trainer.train_epoch(epoch)
    _synchronize(trainer.device)
    return metrics["count/all"] / (time.perf_counter() - started)


def bench_train(shards_dir: Path, out: Path, batch_sizes: list[int], steps: int, ranks: bool,
                variants: list[str], extra: list[str]) -> dict:
    result = {"steps": steps, "end_to_end": {}, "ceiling": {}, "ratio": {}, "variants": {}}
    for batch_size in batch_sizes:
        trainer = _trainer(shards_dir, out, batch_size, steps, extra)
        end_to_end(trainer, 0)  # warm-up epoch: first-touch costs of the loader and the model
        key = str(batch_size)
        result["end_to_end"][key] = end_to_end(trainer, 1)
        result["ceiling"][key] = compute_ceiling(trainer.device, batch_size, steps, trainer.channels_last,
                                                 trainer.accelerator.mixed_precision == "bf16")
        result["ratio"][key] = result["end_to_end"][key] / result["ceiling"][key]
        device = trainer.device
        trainer.close()
    for variant in variants:
        layout, precision = variant.split("+")
        result["variants"][variant] = compute_ceiling(device, batch_sizes[0], max(3, steps // 2), layout == "cl3d",
                                                      precision == "bf16")
    if ranks:
        result["ranks"] = {str(n): _rank_rate(shards_dir, out, n, batch_sizes[0], steps) for n in (1, 2)}
        result["ranks"]["2_vs_1"] = result["ranks"]["2"] / result["ranks"]["1"]
    return result


def _rank_rate(shards_dir: Path, out: Path, processes: int, batch_size: int, steps: int) -> float:
    """Total training samples/s of `processes` CPU ranks (torchrun, gloo), from the run's own figures."""
    metrics = out / f"ranks-{processes}.json"
    last_fold = open_shard_set(shards_dir).folds[-1]  # validation runs after each epoch; keep it small
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "-m", "luna_dist.train", "--shards", str(shards_dir), "--batch-size", str(batch_size),
               "--max-steps", str(steps), "--epochs", "2", "--out", str(out), "--run-name", f"ranks-{processes}", "--overwrite",
               "--balanced", "1", "--val-folds", str(last_fold), "--metrics-json", str(metrics)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(metrics.read_text())["train_samples_per_s"]  # the second epoch: warm


# -- seg -------------------------------------------------------------------------------------------
def bench_seg(data: Path, work: Path, workers: int, batch_size: int, steps: int, extra: list[str]) -> dict:
    """Bytes per segmentation sample, and UNet training end to end against its compute ceiling."""
    shards = work / "shards"
    build(BuildOptions(data=data, out=shards, workers=workers, task="seg", progress=False))
    manifest = json.loads((shards / "manifest.json").read_text())
    size = {label: sum(s["bytes"] for s in manifest["shards"] if s["label"] == label) for label in ("pos", "neg", "val")}
    counts = manifest["counts"]
    rows, cols = read_ct(next(iter(find_series(data).values()))).hu.shape[1:]
    result = {
        "batch_size": batch_size, "steps": steps,
        "bytes_per_training_sample": (size["pos"] + size["neg"]) / counts["samples"],
        "bytes_per_validation_slice": size["val"] / counts["val_slices"],
        "validation_slice_in_int16_slices": size["val"] / counts["val_slices"] / (rows * cols * 2),
    }
    trainer = _trainer(shards, work / "runs", batch_size, steps, extra, task="seg")
    end_to_end(trainer, 0)  # warm-up epoch
    result["end_to_end"] = end_to_end(trainer, 1)
    result["ceiling"] = seg_ceiling(trainer, batch_size, steps)
    result["ratio"] = result["end_to_end"] / result["ceiling"]
    trainer.close()
    return result


def seg_ceiling(trainer, batch_size: int, steps: int) -> float:
    """The training step of the seg task on one int16 batch already on the device: the model's own speed.

    The step is the task's own forward (float conversion, 64 x 64 crop, layout, loss)
    with the loop's backward and optimizer step: only the loading is left out.
    """
    from luna_dist.seg_samples import CROP, STACK

    device = trainer.device
    stacks = torch.randint(HU_MIN, HU_MAX, (batch_size, STACK, CROP, CROP), dtype=torch.int16, device=device)
    masks = torch.rand(batch_size, 1, CROP, CROP, device=device) < 0.05
    trainer.model.train()

    def step():
        loss, _ = trainer.task.forward(trainer.model, (stacks, masks), train=True)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.accelerator.backward(loss.mean())
        trainer.optimizer.step()

    return _timed_steps(step, device, steps, batch_size)


# -- analyze ---------------------------------------------------------------------------------------
def bench_analyze(data: Path, work: Path, cts: int, seg_model: Path | None, cls_model: Path | None,
                  ranks: bool, confusion_scans: int = 888, confusion_marks: int = 850) -> dict:
    """Seconds per CT by stage on one process, and the wall time of 2 CPU ranks against 1; the peak memory
    of grouping one CT, and the seconds of the confusion table at LUNA16's size (888 scans, ~850 candidates
    each in candidates mode)."""
    work.mkdir(parents=True, exist_ok=True)
    if seg_model is None:
        seg_model = work / "seg-untrained.pt"
        torch.save({"model": SegmentationModel().state_dict()}, seg_model)
    if cls_model is None:
        cls_model = work / "cls-untrained.pt"
        torch.save({"model": LunaModel().state_dict()}, cls_model)
    series = sorted(find_series(data))[:cts]
    result = {"cts": len(series), "voxels_per_ct": 0, "seconds_per_ct": {}, "cts_per_s": {}}
    for processes in (1, 2) if ranks else (1,):
        out = work / f"ranks-{processes}"
        shutil.rmtree(out, ignore_errors=True)  # a finished CT would be skipped, not timed
        command = ["-m", "luna_dist.analyze", "--data", str(data), "--seg-model", str(seg_model),
                   "--cls-model", str(cls_model), "--series", *series, "--out", str(out)]
        if processes > 1:
            command = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), *command]
        env = {**os.environ, "ACCELERATE_USE_CPU": "true"} if processes > 1 else dict(os.environ)
        started = time.perf_counter()
        finished = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - started
        if finished.returncode != 0:
            raise RuntimeError(f"analyze on {processes} process(es) failed:\n{finished.stderr[-3000:]}")
        result["cts_per_s"][str(processes)] = len(series) / wall
        if processes == 1:
            summary = json.loads((out / "summary.json").read_text())
            result["seconds_per_ct"] = {stage: s / len(series) for stage, s in summary["seconds"].items()}
            result["voxels_per_ct"] = sum(json.loads(p.read_text())["voxels"] for p in (out / "ct").glob("*.json")) // len(series)
    if ranks:
        result["2_vs_1"] = result["cts_per_s"]["2"] / result["cts_per_s"]["1"]
    result["group_peak_bytes_per_voxel"] = group_peak_bytes_per_voxel(find_series(data)[series[0]])
    result["confusion"] = confusion_seconds(confusion_scans, confusion_marks)
    return result


def group_peak_bytes_per_voxel(mhd: Path) -> float:
    """Peak memory of grouping one CT segmented as dense tissue (HU > -250: body, vessels, nodules), beyond
    the CT and its mask, per voxel (numpy reports its arrays to tracemalloc)."""
    hu = read_ct(mhd).hu
    mask = hu > -250
    tracemalloc.start()
    try:
        group(mask, hu)
        return tracemalloc.get_traced_memory()[1] / hu.size
    finally:
        tracemalloc.stop()


def confusion_seconds(scans: int, marks_per_scan: int) -> dict:
    """Seconds of the analysis's confusion table for `scans` x `marks_per_scan` generated detections, a few on
    each of LUNA16's share of nodules."""
    rng = np.random.default_rng(0)
    uids = [f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{i:030d}" for i in range(scans)]
    n_nodules = round(scans * 1186 / 888)
    nodule_scan, nodule_xyz = rng.integers(0, scans, n_nodules), rng.uniform(-150, 150, (n_nodules, 3))
    diameters, malignant = rng.uniform(3, 30, n_nodules).tolist(), (rng.random(n_nodules) < 0.3).tolist()
    nodules = [Annotation(uids[s], tuple(xyz), d, m)
               for s, xyz, d, m in zip(nodule_scan.tolist(), nodule_xyz.tolist(), diameters, malignant)]
    on_nodule = np.repeat(np.arange(n_nodules), 3)
    scan = np.concatenate([rng.integers(0, scans, scans * marks_per_scan - len(on_nodule)), nodule_scan[on_nodule]])
    xyz = np.concatenate([rng.uniform(-150, 150, (len(scan) - len(on_nodule), 3)),
                          nodule_xyz[on_nodule] + rng.normal(0, 1, (len(on_nodule), 3))])
    detections = [{"series_uid": uids[s], "xyz": p, "p_nodule": pn, "p_malignant": pm} for s, p, pn, pm in
                  zip(scan.tolist(), xyz.tolist(), rng.beta(1, 8, len(scan)).tolist(), rng.random(len(scan)).tolist())]
    started = time.perf_counter()
    confusion(detections, nodules)
    return {"scans": scans, "marks": len(detections), "seconds": time.perf_counter() - started}


# -- report ----------------------------------------------------------------------------------------
# -- evaluate --------------------------------------------------------------------------------------
def _write_findings(path: Path, found: Findings) -> None:
    lines = ["seriesuid,coordX,coordY,coordZ,diameter_mm"]
    lines += [f"{uid},{x:.3f},{y:.3f},{z:.3f},{d:.2f}" for uid, (x, y, z), d in
              zip(found.series.tolist(), found.xyz.tolist(), found.diameter.tolist())]
    path.write_text("\n".join(lines) + "\n")


def bench_evaluate(work: Path, scans: int, marks_per_scan: int, bootstrap: int) -> dict:
    """Score `scans` x ~`marks_per_scan` generated marks (LUNA16: 888 scans, 1,186 nodules).

    Marks lie in a 300 mm cube, a few on each nodule, and their probabilities favour
    the nodules, so every rule (hits, doubles, excluded findings, the 100-mark cap) works.
    """
    rng = np.random.default_rng(0)
    uids = np.array([f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{i:030d}" for i in range(scans)])
    n_nodules = round(scans * 1186 / 888)
    nodules = Findings(uids[rng.integers(0, scans, n_nodules)], rng.uniform(-150, 150, (n_nodules, 3)),
                       rng.uniform(3, 30, n_nodules))
    n_excluded = 2 * n_nodules
    excluded = Findings(uids[rng.integers(0, scans, n_excluded)], rng.uniform(-150, 150, (n_excluded, 3)),
                        rng.choice([-1.0, 2.0, 5.0], n_excluded))
    n_random = scans * marks_per_scan - 3 * n_nodules
    on_nodule = np.repeat(np.arange(n_nodules), 3)
    marks = Marks(
        np.concatenate([uids[rng.integers(0, scans, n_random)], nodules.series[on_nodule]]),
        np.concatenate([rng.uniform(-150, 150, (n_random, 3)), nodules.xyz[on_nodule] + rng.normal(0, 1, (3 * n_nodules, 3))]),
        np.concatenate([rng.beta(1, 8, n_random), rng.beta(4, 2, 3 * n_nodules)]),
    )
    work.mkdir(parents=True, exist_ok=True)
    paths = {name: work / f"{name}.csv" for name in ("seriesuids", "annotations", "excluded", "predictions")}
    paths["seriesuids"].write_text("seriesuid\n" + "\n".join(uids.tolist()) + "\n")
    _write_findings(paths["annotations"], nodules)
    _write_findings(paths["excluded"], excluded)
    write_marks(paths["predictions"], marks)

    started = time.perf_counter()
    series = read_series_list(paths["seriesuids"])
    read = (read_findings(paths["annotations"]), read_marks(paths["predictions"], series),
            read_findings(paths["excluded"], excluded=True))
    read_seconds = time.perf_counter() - started
    started = time.perf_counter()
    result = froc(series, read[0], read[1], read[2])
    score_seconds = time.perf_counter() - started
    started = time.perf_counter()
    froc(series, read[0], read[1], read[2], bootstrap=bootstrap)
    with_bootstrap_seconds = time.perf_counter() - started
    return {
        "scans": scans,
        "marks": len(marks.probability),
        "nodules": n_nodules,
        "cpm": result.cpm,
        "read_seconds": read_seconds,
        "score_seconds": score_seconds,
        "bootstrap": bootstrap,
        "score_with_bootstrap_seconds": with_bootstrap_seconds,
        "total_seconds": read_seconds + with_bootstrap_seconds,
    }


def machine() -> dict:
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "cpu_features": " ".join(cpu_features()),
            "cpu_bf16_native": native_bf16(torch.device("cpu"))[0]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_bf16_native"] = native_bf16(torch.device("cuda"))[0]
    return info


def rows(results: dict) -> list[tuple[str, str]]:
    """Flatten the nested figures into (name, value) rows for the table."""
    flat = []

    def walk(prefix: str, value):
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, float):
            flat.append((prefix, f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"))
        else:
            flat.append((prefix, str(value)))

    walk("", results)
    return flat


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, results[name]) for name in ("loader", "train") if name in results]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4))
    for ax, (name, figures) in zip(np.atleast_1d(axes), panels):
        if name == "loader":
            series = {k: figures[k] for k in ("shards", "per_candidate_random", "per_candidate_series_order",
                                               "per_candidate_disk_cache")}
            labels = sorted(figures["shards"])
            for i, (label, values) in enumerate(series.items()):
                ax.bar(np.arange(len(labels)) + i * 0.2, [values[w] for w in labels], 0.2, label=label)
            ax.set_xticks(np.arange(len(labels)) + 0.3, [f"{w} workers" for w in labels])
            ax.set_yscale("log")
        else:
            labels = sorted(figures["end_to_end"], key=int)
            ax.bar(np.arange(len(labels)), [figures["end_to_end"][b] for b in labels], 0.4, label="end to end")
            ax.bar(np.arange(len(labels)) + 0.4, [figures["ceiling"][b] for b in labels], 0.4, label="compute ceiling")
            ax.set_xticks(np.arange(len(labels)) + 0.2, [f"batch {b}" for b in labels])
        ax.set_ylabel("samples/s")
        ax.set_title(name)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m luna_dist.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["shard", "loader", "train", "seg", "analyze", "evaluate", "all"])
    parser.add_argument("--data", type=Path, help="LUNA16-format folder (default: make a synthetic one)")
    parser.add_argument("--shards", type=Path, help="shard folder for loader/train (default: build from --data)")
    parser.add_argument("--cts", type=int, default=10, help="synthetic CTs to make")
    parser.add_argument("--shape", type=int, nargs=3, default=[200, 512, 512], metavar=("I", "R", "C"),
                        help="synthetic CT size (slices vary around I)")
    parser.add_argument("--workers", type=int, default=2, help="shard-build processes")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--loader-samples", type=int, default=3000)
    parser.add_argument("--baseline-samples", type=int, default=300, help="samples for the slow random-order baseline")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--train-workers", type=int, help="data workers while training (default: train's own)")
    parser.add_argument("--variants", nargs="*", default=["default+no", "cl3d+no", "default+bf16", "cl3d+bf16"],
                        help="compute-ceiling variants LAYOUT+PRECISION (LAYOUT default|cl3d, PRECISION no|bf16)")
    parser.add_argument("--eval-scans", type=int, default=888, help="scans of the generated evaluation set")
    parser.add_argument("--eval-marks", type=int, default=600, help="marks per scan of the generated evaluation set")
    parser.add_argument("--eval-bootstrap", type=int, default=1000, help="bootstrap resamplings timed")
    parser.add_argument("--analyze-cts", type=int, default=2, help="CTs analysed by the analyze benchmark")
    parser.add_argument("--seg-model", type=Path, help="analyze: segmentation model (default: untrained, same cost)")
    parser.add_argument("--cls-model", type=Path, help="analyze: nodule classifier (default: untrained, same cost)")
    parser.add_argument("--no-ranks", dest="ranks", action="store_false", help="skip the 1 vs 2 CPU ranks run")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--plot", type=Path, help="draw the figures here (PNG, needs matplotlib)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="training device (auto: what accelerate picks)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")

    work = args.work or Path(tempfile.mkdtemp(prefix="luna_dist-bench-"))
    results: dict = {"machine": machine()}
    if args.what in ("evaluate", "all"):
        results["evaluate"] = bench_evaluate(work / "evaluate", args.eval_scans, args.eval_marks, args.eval_bootstrap)
    if args.what != "evaluate":
        run_data_benchmarks(args, work, results)
    width = max(len(name) for name, _ in rows(results))
    for name, value in rows(results):
        print(f"{name:<{width}}  {value:>14}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)
    return 0


def run_data_benchmarks(args: argparse.Namespace, work: Path, results: dict) -> None:
    """The benchmarks that need CTs and shards: made synthetic unless --data/--shards are given."""
    data = args.data
    if data is None:
        data = work / "data"
        if not (data / "candidates.csv").is_file():
            make_dataset(data, n_cts=args.cts, seed=0, shape=tuple(args.shape))
    shards = args.shards
    if args.what in ("shard", "all") or (shards is None and args.what not in ("seg", "analyze")):
        shard_out = work / "shards"
        if args.what in ("shard", "all"):
            results["shard"] = bench_shard(data, shard_out, args.workers)
        else:
            build(BuildOptions(data=data, out=shard_out, workers=args.workers, progress=False))
        shards = shards or shard_out
    if args.what in ("loader", "all"):
        results["loader"] = bench_loader(data, shards, args.loader_workers, args.batch_sizes[0], args.loader_samples,
                                         args.baseline_samples, work / "diskcache")
    if args.what in ("train", "all"):
        extra = ["--num-workers", str(args.train_workers)] if args.train_workers is not None else []
        results["train"] = bench_train(shards, work / "runs", args.batch_sizes, args.train_steps, args.ranks,
                                       args.variants, extra)
    if args.what in ("seg", "all"):
        extra = ["--num-workers", str(args.train_workers)] if args.train_workers is not None else []
        results["seg"] = bench_seg(data, work / "seg", args.workers, args.batch_sizes[0], args.train_steps, extra)
    if args.what in ("analyze", "all"):
        results["analyze"] = bench_analyze(data, work / "analyze", args.analyze_cts, args.seg_model, args.cls_model,
                                           args.ranks)


if __name__ == "__main__":
    sys.exit(main())
