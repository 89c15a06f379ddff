"""`python -m luna_dist.shard --plan`: what a build would write and how long it would take, before hours of work.

The plan reads the tables and the CT headers only, each checked as the build checks it (a
`.raw` shorter than its header declares is unreadable, not terabytes of samples): SimpleITK
reads a MetaImage header without its voxels, so the plan of the 888 CTs of LUNA16 takes
seconds. Per fold it counts the series, candidates, nodules and excluded findings, the
samples the task's cutter would write (`Cutter.planned_samples`), their bytes and the
CTs' voxels.

Bytes and time are measured on this machine, not assumed: the plan builds two synthetic
CTs of the data's median size (`luna_dist.synth`) with the same cutter, and takes from them
the bytes a sample (and a validation slice) occupies in a shard, the seconds reading a
voxel costs, and the seconds cutting and writing a sample costs. A CT then costs
voxels x the first + samples x the second, and the build spreads its CTs over
`--workers` readers. That is the time with the CTs in the page cache; from a disk the
build reads at least the raw bytes printed beside it at the disk's rate. Compressed
(`--codec lz4`, the default, or zstd), a sample's bytes depend on the scans' noise, which the
synthetic CTs only stand in for: the sizes are then estimates.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from luna_dist.imaging.ct import MAX_CT_VOXELS, CtError, find_ct, read_ct
from luna_dist.imaging.geometry import Geometry
from luna_dist.shards.build import build, read_build_inputs
from luna_dist.shards.format import MANIFEST, SeriesInputs
from luna_dist.shards.inputs import Inputs
from luna_dist.shards.options import BuildOptions
from luna_dist.shards.tar import MEAN_END_BYTES
from luna_dist.shards.writer import WORK
from luna_dist.synthetic.generator import MIN_SHAPE, make_dataset
from luna_dist.tables.candidates import assign_folds


@dataclass(frozen=True)
class Header:
    """What a CT's header says: its array shape (slices, rows, columns) and where it lies."""

    shape: tuple[int, int, int]
    geometry: Geometry

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape))


def read_header(mhd: Path, max_voxels: int = MAX_CT_VOXELS) -> Header:
    """A CT's shape and geometry as the build reads it (turned to LPS), from its headers alone, checked as the
    build checks them (`find_ct`: its data file holds the bytes the header declares, its voxels are not
    more than `max_voxels`); CtError naming the file when it cannot be read."""
    source = find_ct(mhd, max_voxels)
    return Header(source.size_irc, source.geometry)


@dataclass(frozen=True)
class Rate:
    """This machine's measured cost of a build, from two synthetic CTs cut by the build's cutter."""

    shape: tuple[int, int, int]  # about that of the CTs it was measured on (the slices vary)
    seconds_per_voxel: float  # reading the CT
    seconds_per_sample: float  # cutting, encoding and writing one sample
    bytes_per_sample: float  # in a shard, tar headers included, each shard's end (MEAN_END_BYTES) not
    bytes_per_val_slice: float  # segmentation's validation slabs, per slice (0 for other tasks), the same


@dataclass
class FoldPlan:
    series: int = 0
    candidates: int = 0
    nodules: int = 0
    excluded: int = 0
    samples: int = 0
    val_slices: int = 0
    voxels: int = 0
    shard_bytes: int = 0
    positive_bytes: int = 0  # written twice: per CT first, then packed per fold
    seconds: float = 0.0  # of one reader
    unreadable: list[str] = field(default_factory=list)


def measure_rate(options, shape: tuple[int, int, int]) -> Rate:
    """Build two synthetic CTs of about `shape` with `options`' cutter in a temporary folder, and time them.

    Each CT's own seconds come from the build's journal (read, cut, encode, write and hash
    the shards, in the worker), so what a build of one or two CTs costs once (checking the
    tables, the manifest) is not charged to every sample; reading is timed again alone.
    """
    shape = tuple(max(s, m) for s, m in zip(shape, MIN_SHAPE))
    with tempfile.TemporaryDirectory(prefix="luna_dist-plan-") as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "out"
        made = make_dataset(data, n_cts=2, seed=0, shape=shape)
        with contextlib.redirect_stdout(io.StringIO()):  # its tables are not the user's
            build(BuildOptions(data=data, out=out, workers=1, task=options.task, progress=False, codec=options.codec,
                               seg_negatives=options.seg_negatives, seg_val_every=options.seg_val_every))
        cut_seconds = sum(json.loads(done.read_text())["seconds"] for done in (out / WORK / "done").glob("*.json"))
        started = time.perf_counter()
        voxels = sum(read_ct(mhd).hu.size for mhd in made.mhd_paths)
        read_seconds = time.perf_counter() - started
        manifest = json.loads((out / MANIFEST).read_text())
    samples = manifest["counts"]["samples"]
    train_bytes = sum(s["bytes"] - MEAN_END_BYTES for s in manifest["shards"] if s["label"] != "val")
    val_bytes = sum(s["bytes"] - MEAN_END_BYTES for s in manifest["shards"] if s["label"] == "val")
    return Rate(shape, read_seconds / voxels, max(cut_seconds - read_seconds, 0.0) / max(samples, 1),
                train_bytes / max(samples, 1), val_bytes / max(manifest["counts"].get("val_slices", 0), 1))


def plan(options: BuildOptions, inputs: Inputs | None = None,
         rate: Rate | None = None) -> tuple[dict[int, FoldPlan], Rate]:
    """The plan per fold of a build with `options` (of `inputs`, read and checked when not given; `format_plan`
    shows it); `rate` is measured when not given."""
    if inputs is None:
        inputs = read_build_inputs(options)
    folds = assign_folds(inputs.series)
    headers, unreadable = {}, {}
    for uid, mhd in inputs.series.items():
        try:
            headers[uid] = read_header(mhd, options.max_ct_voxels)
        except CtError as err:
            unreadable[uid] = str(err)
    if not headers:
        example = next(iter(unreadable.values()))
        raise CtError(f"none of the {len(inputs.series)} CT headers can be read, e.g. {example}")
    if rate is None:
        median = tuple(int(v) for v in np.median([h.shape for h in headers.values()], axis=0))
        rate = measure_rate(options, median)

    by_series = defaultdict(list)
    for candidate in inputs.candidates:
        by_series[candidate.series_uid].append(candidate)
    nodules, excluded = defaultdict(list), defaultdict(int)
    for annotation in inputs.annotations:
        nodules[annotation.series_uid].append(annotation)
    for row in inputs.findings["excluded"]:
        excluded[row[0]] += 1
    plans: dict[int, FoldPlan] = defaultdict(FoldPlan)
    positives: dict[int, int] = defaultdict(int)  # packed per fold, in shards of their own
    per_shard, cutter = options.samples_per_shard, options.cutter
    for uid in sorted(inputs.series):
        fold = plans[folds[uid]]
        if uid in unreadable:
            fold.unreadable.append(unreadable[uid])
            continue
        header = headers[uid]
        series = SeriesInputs(uid, folds[uid], by_series[uid], nodules[uid])
        samples, val_slices = cutter.planned_samples(series, header.shape, header.geometry)
        negatives = cutter.planned_negatives(by_series[uid])
        positives[folds[uid]] += samples - negatives
        fold.series += 1
        fold.candidates += len(by_series[uid])
        fold.nodules += len(nodules[uid])
        fold.excluded += excluded[uid]
        fold.samples += samples
        fold.val_slices += val_slices
        fold.voxels += header.voxels
        shards = math.ceil(negatives / per_shard) + cutter.per_ct_validation  # as the CT's worker writes them
        fold.shard_bytes += round(samples * rate.bytes_per_sample + val_slices * rate.bytes_per_val_slice
                                  + shards * MEAN_END_BYTES)
        fold.positive_bytes += round((samples - negatives) * rate.bytes_per_sample)
        fold.seconds += header.voxels * rate.seconds_per_voxel + samples * rate.seconds_per_sample
    for number, count in positives.items():
        plans[number].shard_bytes += math.ceil(count / per_shard) * MEAN_END_BYTES
    return dict(sorted(plans.items())), rate


def format_plan(plans: dict[int, FoldPlan], rate: Rate, workers: int, out: Path) -> str:
    """The plan as a table, per fold and in all, with the disk it needs beside the disk free at `out`."""
    total = FoldPlan()
    lines = [f"{'fold':>4} {'series':>7} {'candidates':>11} {'nodules':>8} {'excluded':>9} {'samples':>10} "
             f"{'val slices':>10} {'GB':>8} {'raw GB':>7} {'seconds':>8}"]
    for fold, p in plans.items():
        for name in ("series", "candidates", "nodules", "excluded", "samples", "val_slices", "voxels", "shard_bytes",
                     "positive_bytes", "seconds"):
            setattr(total, name, getattr(total, name) + getattr(p, name))
        total.unreadable += p.unreadable
        lines.append(_row(str(fold), p, workers))
    lines.append(_row("all", total, workers))
    needed = total.shard_bytes + total.positive_bytes
    free = shutil.disk_usage(next(p for p in [out, *out.parents] if p.exists())).free
    lines += [
        f"disk: {needed / 1e9:,.1f} GB at most while building ({total.shard_bytes / 1e9:,.1f} GB of shards, and "
        f"{total.positive_bytes / 1e9:,.1f} GB of positives written per CT before they are packed per fold); "
        f"{free / 1e9:,.1f} GB free at {out}" + ("" if free >= needed else " -- NOT ENOUGH"),
        f"time: {total.seconds / workers:,.0f} s ({total.seconds / workers / 3600:.1f} h) with {workers} reader(s) "
        "and the CTs in the page cache; from a disk "
        f"the build reads {total.voxels * 2 / 1e9:,.1f} GB of voxels (at 200 MB/s, {total.voxels * 2 / 2e8:,.0f} s)",
        f"rate measured here on two synthetic CTs of about {'x'.join(map(str, rate.shape))}: "
        f"{rate.seconds_per_voxel * 1e9:.2f} ns a voxel read, {rate.seconds_per_sample * 1e3:.2f} ms a sample cut and "
        f"written, {rate.bytes_per_sample / 1e3:.1f} kB a sample",
    ]
    if total.unreadable:
        lines.append(f"{len(total.unreadable)} CT header(s) cannot be read, e.g. {total.unreadable[0]}")
    return "\n".join(lines)


def _row(name: str, p: FoldPlan, workers: int) -> str:
    return (f"{name:>4} {p.series:>7,} {p.candidates:>11,} {p.nodules:>8,} {p.excluded:>9,} {p.samples:>10,} "
            f"{p.val_slices:>10,} {p.shard_bytes / 1e9:>8.2f} {p.voxels * 2 / 1e9:>7.1f} {p.seconds / workers:>8,.1f}")
