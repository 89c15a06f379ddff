"""`--plan`: every stage of the protocol, what it reads and writes, whether it is done, and the time it would take.

A stage done shows the time it took (measured). The others are estimated (marked `*`) for
one process on this machine's device: a build from its own plan (`luna_dist.shards.plan`:
the tables and CT headers read, its cost measured on two synthetic CTs), a training from its
flags (epochs, samples an epoch, the validation fold's samples) at the speed measured here
now of its model's step, an analysis from its fold's voxels at the UNet's speed and
GROUPS_PER_CT chunks a CT at the classifier's. The data path, start-up and each epoch's
scoring are not counted; a launcher of N processes divides training and the analysis by up
to N.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from pathlib import Path

import torch

from luna_dist.benchmarks.training import compute_ceiling
from luna_dist.cv.recipe import Recipe
from luna_dist.cv.runner import Runner, read_record
from luna_dist.cv.stages import KINDS, Layout, Stage, fold_stages, merge_stage, shard_stages
from luna_dist.imaging.chunks import CHUNK_SHAPE
from luna_dist.imaging.ct import HU_MAX, HU_MIN
from luna_dist.models.classifier import LunaModel
from luna_dist.models.unet import SegmentationModel
from luna_dist.shards import plan as shard_plan
from luna_dist.shards.build import read_build_inputs
from luna_dist.shards.seg_samples import STACK

GROUPS_PER_CT = 100
"""Chunks an analysis classifies a CT, assumed: the UNets of the rehearsal kept 16 and 90 groups a CT."""

SCORING_SECONDS_PER_SCAN = 0.012
"""`evaluate` with 1,000 bootstrap resamplings: 888 scans, 551,065 marks in 9-10 s (measured, docs/luna16.md)."""


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")


def _per_second(step, work: int, device: torch.device, calls: int = 2) -> float:
    """`work` units a second of `step`, after one warm-up call."""
    step()
    started = time.perf_counter()
    for _ in range(calls):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return calls * work / (time.perf_counter() - started)


def measure(on: torch.device, slice_shape: tuple[int, int]) -> dict[str, float]:
    """This machine's speed of each model's step, on random input: samples a second of LunaModel's training
    and inference, stacks of the UNet's training, voxels a second of its segmentation of `slice_shape` slices."""
    batch = 64 if on.type != "cpu" else 8  # a CPU's rate hardly depends on it: seconds, not a minute
    rates = {"cls_train": compute_ceiling(on, batch, 2, on.type != "mps", False)}
    luna = LunaModel().to(on).eval()
    chunks = torch.randint(HU_MIN, HU_MAX, (batch, 1, *CHUNK_SHAPE), device=on).float()
    with torch.no_grad():
        rates["cls_infer"] = _per_second(lambda: luna(chunks), batch, on)
    unet = SegmentationModel().to(on)
    optimizer = torch.optim.Adam(unet.parameters())
    stacks = torch.randint(HU_MIN, HU_MAX, (batch, STACK, 64, 64), device=on).float()

    def train_step():
        loss = unet(stacks).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    rates["seg_train"] = _per_second(train_step, batch, on)
    unet.eval()
    rows, cols = (size - size % 4 for size in slice_shape)  # the UNet's input: a multiple of 4
    slices = torch.randint(HU_MIN, HU_MAX, (1, STACK, rows, cols), device=on).float()
    with torch.no_grad():
        rates["seg_voxels"] = _per_second(lambda: unet(slices), rows * cols, on)
    return rates


def plan(recipe: Recipe, parsed: dict, layout: Layout, launcher: list[str], wanted: list[int] | None) -> str:
    """The plan as text: a line per stage, then what the estimates assume."""
    builds = {}
    with contextlib.redirect_stdout(sys.stderr):  # the tables each build would read: said once, on stderr
        for task in ("cls", "seg"):
            options = parsed[f"shard.{task}"]
            builds[task] = (options, *shard_plan.plan(options, read_build_inputs(options)))
    folds_plan = builds["cls"][1]
    with_series = [fold for fold, p in folds_plan.items() if p.series]
    folds = sorted(set(wanted) & set(with_series)) if wanted else with_series
    on = device()
    rate_shape = builds["cls"][2].shape
    rates = measure(on, rate_shape[1:])
    stages = [*shard_stages(recipe, layout),
              *(stage for fold in folds for stage in fold_stages(recipe, layout, fold, with_series)),
              merge_stage(recipe, layout, folds, plot=False)]
    runner = Runner(layout, launcher, set(KINDS))
    rows, total = [], 0.0
    for stage in stages:
        status, seconds, measured = _status(stage, runner, layout)
        if seconds is None:
            seconds = estimate(stage, parsed, builds, rates, folds, with_series)
        total += seconds
        rows.append((stage.name, _shown(stage.reads, layout), _shown([stage.writes], layout), status,
                     f"{_duration(seconds)}{'' if measured else '*'}"))
    rows.append(("all", "", "", "", f"{_duration(total)}*"))
    widths = [max(len(row[n]) for row in [HEADER, *rows]) for n in range(5)]
    lines = [f"The protocol of {layout.data} into {layout.out}: recipe {recipe.path} (select = {recipe.select!r}), "
             f"folds {folds}, launcher {' '.join(launcher)}", ""]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [HEADER, *rows]]
    lines += ["", f"* estimate, for one process on this machine's {on.type} (a launcher of N processes divides "
              "training and the analysis by up to N): the builds from their --plan (rates measured on two synthetic "
              f"CTs of about {'x'.join(map(str, rate_shape))}, the CTs in the page cache); training and the analysis "
              f"from the speed measured here now on random input: LunaModel trains {rates['cls_train']:,.0f} and "
              f"infers {rates['cls_infer']:,.0f} samples/s, the UNet trains {rates['seg_train']:,.0f} stacks/s and "
              f"segments {rates['seg_voxels'] / 1e6:,.2f} M voxels/s; the analysis assumes {GROUPS_PER_CT} groups a "
              "CT. Loading, start-up and each epoch's scoring are not counted."]
    return "\n".join(lines)


HEADER = ("stage", "reads", "writes", "status", "time")


def estimate(stage: Stage, parsed: dict, builds: dict, rates: dict, folds: list[int], with_series: list[int]) -> float:
    """Seconds `stage` would take (see the module's docstring)."""
    plans = builds["cls"][1]
    if stage.kind == "shards":
        options, fold_plans, _ = builds[stage.task]
        return sum(p.seconds for p in fold_plans.values()) / max(options.workers, 1)
    if stage.kind == "merge":
        return 2.0 + SCORING_SECONDS_PER_SCAN * sum(plans[fold].series for fold in folds)
    if stage.task is None:  # the analysis of a fold
        fold = plans[stage.fold]
        return fold.voxels / rates["seg_voxels"] + 2 * fold.series * GROUPS_PER_CT / rates["cls_infer"]
    args: argparse.Namespace = parsed[f"train.{stage.task}"]
    val = int(stage.command[stage.command.index("--val-folds") + 1])
    left_out = {val, stage.fold}
    train = [fold for fold in with_series if fold not in left_out]
    if stage.task == "seg":
        seg = builds["seg"][1]
        epoch = args.epoch_samples or sum(seg[fold].samples for fold in train)
        rows, cols = builds["seg"][2].shape[1:]
        val_seconds = seg[val].val_slices * rows * cols / rates["seg_voxels"]
        train_rate = rates["seg_train"]
    else:
        if stage.task == "malignancy":
            mix = args.mix
            labelled = sum(plans[fold].nodules for fold in train)
            epoch = args.epoch_samples or round(labelled * sum(mix) / max(sum(mix[:2]), 1e-9))
            val_samples = plans[val].nodules
        else:
            epoch = args.epoch_samples or sum(plans[fold].samples for fold in train)
            val_samples = plans[val].samples
        val_seconds = val_samples / rates["cls_infer"]
        train_rate = rates["cls_train"]
    if args.max_steps:
        epoch = min(epoch, args.max_steps * args.batch_size)
    return args.epochs * (epoch / train_rate + val_seconds)


def _status(stage: Stage, runner: Runner, layout: Layout) -> tuple[str, float | None, bool]:
    """(status, the seconds it took when done, whether measured)."""
    if (record := runner.done(stage)) is not None:
        return "done", record.get("seconds"), True
    if read_record(layout.record(stage.name)) is not None:
        return "redo (inputs changed)", None, False
    if read_record(layout.record(stage.name, started=True)) is not None:
        return "started: goes on", None, False
    return "to run", None, False


def _shown(paths: list[Path], layout: Layout) -> str:
    def short(path: Path) -> str:
        for root, name in ((layout.out, ""), (layout.data, "DATA")):
            if path == root:
                return name or "."
            if path.is_relative_to(root):
                return f"{name}/{path.relative_to(root)}" if name else str(path.relative_to(root))
        return str(path)
    shown = [short(path) for path in paths]
    if len(shown) > 3:  # every fold's file: said once, foldK standing for each
        shown = list(dict.fromkeys(re.sub(r"^fold\d+/", "foldK/", name) for name in shown))
    return ", ".join(shown)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
