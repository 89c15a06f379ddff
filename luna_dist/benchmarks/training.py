"""The benchmarks of training (`python -m luna_dist.bench train|seg`): end-to-end samples/s against the compute
ceiling of the same model and batch already on the device, layout and precision variants, 1 against 2 CPU
ranks, and the segmentation task's UNet. Each returns its figures as a dict; `luna_dist.bench` prints them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from luna_dist.data.streams import open_shard_set
from luna_dist.devices.speed import device_rate, synchronize, timed_steps
from luna_dist.imaging.ct import HU_MAX, HU_MIN, read_ct
from luna_dist.shards import chunk_samples, seg_samples
from luna_dist.shards.build import build
from luna_dist.shards.options import BuildOptions
from luna_dist.tables.candidates import find_series


# -- train ------------------------------------------------------------------------------------------------
def _trainer(shards_dir: Path, out: Path, batch_size: int, steps: int, extra: list[str], task: str = "cls"):
    from luna_dist.training.options import parse_args
    from luna_dist.training.trainer import Trainer

    samples = seg_samples if task == "seg" else chunk_samples
    last_fold = open_shard_set(shards_dir, samples).folds[-1]  # a validation fold that exists; no epoch validates
    # An epoch of exactly `steps` batches, however small the data: per-epoch start-up (the
    # shuffle buffer's first fill) is then paid over the same work in every benchmark.
    args = parse_args(["--task", task, "--shards", str(shards_dir), "--batch-size", str(batch_size),
                       "--max-steps", str(steps), "--epoch-samples", str(steps * batch_size),
                       "--out", str(out), "--run-name", f"bench-{batch_size}", "--overwrite",
                       *(["--balanced", "1"] if task == "cls" else []), "--val-folds", str(last_fold), *extra])
    return Trainer(args)


def compute_ceiling(device: torch.device, batch_size: int, steps: int, channels_last: bool, bf16: bool) -> float:
    """Train steps on one int16 batch already on the device: what the model alone can do.

    Each step does what a training step does to its input (float conversion, layout), so the
    ratio to end-to-end isolates the cost of feeding the model (`luna_dist.devices.speed`, as the
    doctor times it).
    """
    return device_rate("cls", device, batch_size, steps, "bf16" if bf16 else "no", channels_last)


def end_to_end(trainer, epoch: int) -> float:
    started = time.perf_counter()
    metrics = trainer.train_epoch(epoch)
    synchronize(trainer.device)
    return metrics["count/all"] / (time.perf_counter() - started)


def bench_train(shards_dir: Path, out: Path, batch_sizes: list[int], steps: int, ranks: bool,
                variants: list[str], extra: list[str]) -> dict:
    result = {"steps": steps, "end_to_end": {}, "ceiling": {}, "ratio": {}, "variants": {}}
    for batch_size in batch_sizes:
        trainer = _trainer(shards_dir, out, batch_size, steps, extra)
        end_to_end(trainer, 0)  # warm-up epoch: first-touch costs of the loader and the model
        key = str(batch_size)
        result["end_to_end"][key] = end_to_end(trainer, 1)
        result["ceiling"][key] = compute_ceiling(trainer.device, batch_size, steps, trainer.task.channels_last,
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
    last_fold = open_shard_set(shards_dir, chunk_samples).folds[-1]  # validation runs after each epoch; keep it small
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "-m", "luna_dist.train", "--shards", str(shards_dir), "--batch-size", str(batch_size),
               "--max-steps", str(steps), "--epochs", "2", "--out", str(out), "--run-name", f"ranks-{processes}",
               "--overwrite",
               "--balanced", "1", "--val-folds", str(last_fold), "--metrics-json", str(metrics)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(metrics.read_text())["train_samples_per_s"]  # the second epoch: warm


# -- seg --------------------------------------------------------------------------------------------------
def bench_seg(data: Path, work: Path, workers: int, batch_size: int, steps: int, extra: list[str]) -> dict:
    """Bytes per segmentation sample, and UNet training end to end against its compute ceiling."""
    shards = work / "shards"
    build(BuildOptions(data=data, out=shards, workers=workers, task="seg", progress=False))
    manifest = json.loads((shards / "manifest.json").read_text())
    size = {label: sum(s["bytes"] for s in manifest["shards"] if s["label"] == label)
            for label in ("pos", "neg", "val")}
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
    from luna_dist.shards.seg_samples import CROP, STACK

    device = trainer.device
    stacks = torch.randint(HU_MIN, HU_MAX, (batch_size, STACK, CROP, CROP), dtype=torch.int16, device=device)
    masks = torch.rand(batch_size, 1, CROP, CROP, device=device) < 0.05
    trainer.model.train()

    def step():
        loss, _ = trainer.task.forward(trainer.model, (stacks, masks), train=True)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.accelerator.backward(loss.mean())
        trainer.optimizer.step()

    return timed_steps(step, device, steps, batch_size)
