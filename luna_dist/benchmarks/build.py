"""The build benchmark (`python -m luna_dist.bench shard`): building shards against only reading the CTs, and
the codecs' bytes and speeds on the same chunks. Each returns its figures as a dict; `luna_dist.bench` runs them
and prints the table.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from luna_dist.data.streams import ShardSet, checked_samples, open_shard_set
from luna_dist.imaging.chunks import CHUNK_SHAPE
from luna_dist.imaging.ct import read_ct
from luna_dist.imaging.read_ahead import ReadAhead
from luna_dist.shards import chunk_samples
from luna_dist.shards.build import build
from luna_dist.shards.codecs import CODECS, copy_payloads, load_array, stored_arrays
from luna_dist.shards.options import BuildOptions
from luna_dist.shards.writer import WORK
from luna_dist.tables.candidates import find_series, read_candidates


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
    """Read every CT in `pool`, reading ahead as a build does (`ReadAhead`), so that build / read compares
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
# -- analyze ----------------------------------------------------------------------------------------------
# -- evaluate ---------------------------------------------------------------------------------------------
