"""The benchmarks of the data path (`python -m luna_dist.bench shard|loader|analyze|evaluate`): building shards
against only reading the CTs, loading them against a per-candidate Dataset, analysing CTs, and scoring marks at
LUNA16's size. Each returns its figures as a dict; `luna_dist.bench` runs them and prints the table.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from luna_dist import chunk_samples
from luna_dist.candidates import Annotation, Candidate, find_series, read_candidates, read_series_list
from luna_dist.ct import CHUNK_SHAPE, HU_MAX, HU_MIN, ReadAhead, cut_chunks, read_ct
from luna_dist.detect import body_box, group, load_model, segment
from luna_dist.evaluate import Findings, Marks, froc, read_findings, read_marks, write_marks
from luna_dist.findings import confusion
from luna_dist.geometry import xyz_to_irc
from luna_dist.hardware import native_bf16, seg_memory_format
from luna_dist.model import LunaModel, SegmentationModel
from luna_dist.seg_samples import CONTEXT
from luna_dist.shard import BuildOptions, build
from luna_dist.shard_format import CODECS, copy_payloads, load_array, stored_arrays
from luna_dist.shard_write import WORK
from luna_dist.stream import (
    ShardSet,
    TrainStreamConfig,
    checked_samples,
    open_shard_set,
    pos_neg_streams,
    train_loader,
)

# -- shard ------------------------------------------------------------------------------------------------

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


def read_all(pool: ProcessPoolExecutor, paths: list[str], workers: int) -> int:
    """Read every CT in `pool`, reading ahead as a build does (`ct.ReadAhead`), so that build / read compares
    the build with the fastest reading it does itself; the voxels' bytes."""
    ahead, read = ReadAhead(paths, workers), 0
    for future in as_completed([pool.submit(_read_only, path) for path in paths]):
        ahead.more()
        read += future.result()
    return read


def bench_shard(data: Path, out: Path, workers: int) -> dict:
    """Build shards from `data` and compare with only reading its CTs, same number of processes.

    Measured twice: with the CTs in the page cache (memory speed: any extra pass over
    the chunks shows) and with them evicted first (disk speed: the real data set, too
    large to cache, is always read this way).
    """
    candidates = read_candidates(data / "candidates.csv")[0]
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
            input_bytes = read_all(pool, paths, workers)
            read_seconds = time.perf_counter() - started
        result[cache] = {"read_seconds": read_seconds}
        for codec in reversed(CODECS):  # the default last: its build is the one measured further
            if cache == "cold":
                evict_from_page_cache(files)
            shutil.rmtree(out, ignore_errors=True)
            started = time.perf_counter()
            manifest = build(BuildOptions(data=data, out=out, workers=workers, codec=codec, progress=False))
            seconds = time.perf_counter() - started
            result.setdefault("bytes_per_sample_by_codec", {})[codec] = (sum(s["bytes"] for s in manifest["shards"])
                                                                         / manifest["counts"]["samples"])
            result[cache][f"{codec}_build_seconds"] = seconds
            result[cache][f"{codec}_build_over_read"] = seconds / read_seconds
            result[cache][f"{codec}_worker_seconds_per_ct"] = _stage_seconds_per_ct(out)
        samples, build_seconds = manifest["counts"]["samples"], result[cache][f"{CODECS[0]}_build_seconds"]
        result[cache] |= {
            "build_seconds": build_seconds,
            "build_to_read_ratio": build_seconds / read_seconds,
            "cts_per_s": len(paths) / build_seconds,
            "samples_per_s": samples / build_seconds,
            "chunk_mb_per_s": samples * np.prod(CHUNK_SHAPE) * 2 / 1e6 / build_seconds,
            "input_mb_per_s": input_bytes / 1e6 / build_seconds,
        }
    result["samples"] = samples
    result["input_mb"] = input_bytes / 1e6
    result["bytes_per_sample"] = result["bytes_per_sample_by_codec"][CODECS[0]]
    result["codec"] = manifest["chunk"]["codec"]
    result["codecs"] = bench_codecs(out)
    # The same samples as built with --codec none, in this run: measured, not estimated from the codecs' figures.
    result["bytes_per_sample_uncompressed"] = result["bytes_per_sample_by_codec"]["none"]
    # The headline: the CTs read from disk, as the real data set (too large to cache) always is.
    result["build_over_read"] = result["cold"]["build_to_read_ratio"]
    result["build_over_read_page_cache"] = result["warm"]["build_to_read_ratio"]
    return result


def _stage_seconds_per_ct(out: Path) -> dict[str, float]:
    """Where a build's workers spent their time, per CT on average: reading, cutting (with encoding and
    compressing), writing; from the journal each CT's worker wrote."""
    journal = [json.loads(path.read_text()) for path in (out / WORK / "done").glob("*.json")]
    return {stage: sum(r["stage_seconds"][stage] for r in journal) / len(journal) for stage in ("read", "cut", "write")}


def first_samples(shards: ShardSet, count: int) -> list[dict]:
    """The first `count` samples of a build's negative shards, read and checked as the loader reads them."""
    samples = []
    for sample in checked_samples(({"url": url} for url in shards.shards(shards.folds, "neg")), shards.source):
        samples.append(sample)
        if len(samples) == count:
            break
    return samples


def bench_codecs(shards_dir: Path, n_samples: int = 300) -> dict:
    """Each codec on `n_samples` chunks of a build: stored bytes, and samples/s encoded and decoded on one core.

    Twice: the chunks as built (the synthetic CTs carry Gaussian noise of 20 HU, rougher
    than real CT) and a low-noise variant, each chunk smoothed by a 3x3x3 mean, closer to
    what real scans compress to. Decoding is what a loader does: into a preallocated batch.
    """
    from scipy.ndimage import uniform_filter

    chunks = [load_array(sample, "chunk.npy")
              for sample in first_samples(open_shard_set(shards_dir, chunk_samples), n_samples)]
    variants = {"": chunks, "low_noise_": [uniform_filter(c.astype(np.float32), 3).round().astype(np.int16)
                                           for c in chunks]}
    batch = np.empty((1, *CHUNK_SHAPE), dtype=np.int16)
    result = {}
    for codec in CODECS:
        name, (data,) = stored_arrays("chunk.npy", chunks[0][None], codec)  # untimed: a codec's first call loads
        copy_payloads([{name: data}], "chunk.npy", batch, CHUNK_SHAPE)  # its library, which a process does once
        figures = {}
        for prefix, arrays in variants.items():
            started = time.perf_counter()
            name, stored = stored_arrays("chunk.npy", arrays, codec)
            encode_seconds = time.perf_counter() - started
            started = time.perf_counter()
            for data in stored:
                copy_payloads([{name: data}], "chunk.npy", batch, CHUNK_SHAPE)
            decode_seconds = time.perf_counter() - started
            figures |= {f"{prefix}member_bytes": float(np.mean([len(data) for data in stored])),
                        f"{prefix}encode_samples_per_s_per_core": len(arrays) / encode_seconds,
                        f"{prefix}decode_samples_per_s_per_core": len(arrays) / decode_seconds}
        result[codec] = figures
    for figures in result.values():
        for prefix in variants:
            figures[f"{prefix}bytes_ratio"] = result["none"][f"{prefix}member_bytes"] / figures[f"{prefix}member_bytes"]
    return result


# -- loader -----------------------------------------------------------------------------------------------

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
    """Samples/s one core turns into batches (`chunk_samples.collate`) from samples already read: the decoding
    a loader worker does, the shards as built (compressed by default)."""
    read = first_samples(shards, samples)
    started = time.process_time()  # one thread's work: CPU time, whatever else the machine runs
    for start in range(0, len(read), batch_size):
        chunk_samples.collate(read[start:start + batch_size])
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
        loader = train_loader(shards, config, 0, chunk_samples.collate)
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


# -- analyze ----------------------------------------------------------------------------------------------

THRESHOLD_HU = -250.0


def threshold_model() -> SegmentationModel:
    """A UNet that outputs probability > 0.5 exactly where the middle slice is above THRESHOLD_HU: the
    analysis benchmark's default, at an untrained UNet's cost but with the groups of real structures
    (an untrained one marks noise, thousands of groups a CT, and classifying them swamps the figures).

    Path: the input batch norm maps HU to (HU + 300) / 100; the first block passes the
    middle channel through (ReLU keeps the positive part); the skip connection carries
    it to the last block, which passes it on; the last 1x1 convolution subtracts 0.5.
    Every other weight is zero, so the deeper path adds nothing.
    """
    model = SegmentationModel()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.fill_(1.0)
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
        model.input_batchnorm.running_mean.fill_(-300.0)
        model.input_batchnorm.running_var.fill_(100.0**2)
        first, last_block = model.unet.down[0], model.unet.up[-1]
        first[0].weight[0, CONTEXT, 1, 1] = 1.0  # conv1: middle slice -> channel 0
        first[3].weight[0, 0, 1, 1] = 1.0  # conv2: channel 0 -> channel 0
        skip_channel = last_block[0].weight.shape[1] // 2  # the concat puts the up-sampled part first
        last_block[0].weight[0, skip_channel, 1, 1] = 1.0
        last_block[3].weight[0, 0, 1, 1] = 1.0
        model.unet.last.weight[0, 0, 0, 0] = 1.0
        model.unet.last.bias.fill_(-0.5)
    return model.eval()


def bench_analyze(data: Path, work: Path, cts: int, seg_model: Path | None, cls_model: Path | None,
                  ranks: bool, confusion_scans: int, confusion_marks: int, seg_slices: int) -> dict:
    """Seconds per CT by stage on one process, and the wall time of 2 CPU ranks against 1; the UNet's
    slices/s in each of SEG_VARIANTS on `seg_slices` slices of one CT; the peak memory of grouping one CT,
    and the seconds of the confusion table at LUNA16's size (888 scans, ~850 candidates each in candidates
    mode)."""
    work.mkdir(parents=True, exist_ok=True)
    if seg_model is None:
        seg_model = work / "seg-threshold.pt"
        torch.save({"model": threshold_model().state_dict()}, seg_model)
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
            per_ct = [json.loads(p.read_text())["voxels"] for p in (out / "ct").glob("*.json")]
            result["voxels_per_ct"] = sum(per_ct) // len(series)
    if ranks:
        result["2_vs_1"] = result["cts_per_s"]["2"] / result["cts_per_s"]["1"]
    result["segment_variants"] = segment_variants(find_series(data)[series[0]], seg_model, seg_slices)
    result["group_peak_bytes_per_voxel"] = group_peak_bytes_per_voxel(find_series(data)[series[0]])
    result["confusion"] = confusion_seconds(confusion_scans, confusion_marks)
    return result


SEG_VARIANTS = {
    "whole_nchw": (False, torch.contiguous_format),  # analysis versions 2 and 3 on every device
    "whole": (False, None),  # the device's layout
    "body": (True, None),  # analysis version 4: also only the body's box
}
"""How the segmentation benchmark runs the UNet: body crop, and layout (None: the device's)."""
SEG_BATCH = 32
"""Slices per pass in every variant: `--batch-size`'s default (8 and 16 ran as fast in channels_last)."""


def segment_variants(mhd: Path, seg_model: Path, slices: int) -> dict:
    """Slices/s of the UNet over the middle `slices` of one CT in each of SEG_VARIANTS, in channels_last
    with the body crop where the device's layout is another (a GPU: the figure that would change its
    default), and bf16 autocast with the body crop where the device has bf16 arithmetic (measured, never a
    default: it moves the probabilities); and the voxels of each variant's mask that differ from version
    2's, inside the body's box and outside it. Each variant runs once untimed (oneDNN builds its kernels on
    first use), then twice in turns, the faster counted: the machine may be shared."""
    device = torch.device("cuda" if torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU") != "true"
                          else "cpu")
    hu = read_ct(mhd).hu
    first = max(0, (len(hu) - slices) // 2)
    hu = hu[first:first + slices]
    model, _ = load_model(SegmentationModel(), seg_model, device)
    box = body_box(hu)
    on_device = torch.from_numpy(np.require(hu, requirements="W")).to(device).float().clamp_(HU_MIN, HU_MAX)
    fp32 = functools.partial(torch.autocast, device.type, enabled=False)
    variants = {name: (crop, layout or seg_memory_format(device), fp32)
                for name, (crop, layout) in SEG_VARIANTS.items()}
    if variants["body"][1] != torch.channels_last:  # a GPU: measure the layout its default does not use
        variants["body_channels_last"] = (True, torch.channels_last, fp32)
    if native_bf16(device)[0]:
        variants["body_bf16"] = (*variants["body"][:2], functools.partial(torch.autocast, device.type, torch.bfloat16))
    masks, seconds = {}, {name: math.inf for name in variants}
    for turn in range(3):
        for name, (crop, layout, autocast) in variants.items():
            started = time.perf_counter()
            mask = segment(on_device if turn else on_device[:SEG_BATCH], model, SEG_BATCH, autocast,
                           box if crop else None, layout)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if turn:
                seconds[name] = min(seconds[name], time.perf_counter() - started)
                masks[name] = mask.cpu()
    inside = torch.zeros(hu.shape, dtype=torch.bool)
    inside[:, box[0], box[1]] = True
    reference = masks["whole_nchw"]
    return {"device": str(device), "slices": len(hu), "box_share_of_slice": inside[0].float().mean().item(),
            "slices_per_s": {name: len(hu) / s for name, s in seconds.items()},
            "mask_voxels": int(reference.sum()),
            "differing_voxels": {name: {"inside_box": int((mask != reference)[inside].sum()),
                                        "outside_box": int((mask != reference)[~inside].sum())}
                                 for name, mask in masks.items() if name != "whole_nchw"}}


def group_peak_bytes_per_voxel(mhd: Path) -> float:
    """Peak memory of grouping one CT segmented as dense tissue (HU > -250: body, vessels, nodules), beyond
    the CT and its mask, per voxel (numpy reports its arrays to tracemalloc)."""
    ct = read_ct(mhd)
    hu, mask = ct.hu, ct.hu > -250
    tracemalloc.start()
    try:
        group(mask, hu, ct.geometry.spacing_xyz[::-1])
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


# -- evaluate ---------------------------------------------------------------------------------------------

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
        np.concatenate([rng.uniform(-150, 150, (n_random, 3)),
                        nodules.xyz[on_nodule] + rng.normal(0, 1, (3 * n_nodules, 3))]),
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
