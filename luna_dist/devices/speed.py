"""How fast a device trains each task, how fast a data worker feeds it, and from the two the workers and batch
size to use: the doctor's check 4, and the default `--num-workers` of every training run.

The rule (`recommend_workers`): the fewest workers that leave the device waiting for data at most FED
of an epoch, each counted at 1/HEADROOM of its measured rate, within the cores there are (one is the
training process's own, which on a CPU also does the device's work). None where the training process
may read its batches itself at that cost: a CPU trains these models at tens of samples/s while one
core decodes thousands, so reading in the training process leaves it waiting ~1 % of the time, and a
worker would take a core's share and seconds to start. The device's rate is timed with the device
synchronised, on batches already there, so it is the model's own; a worker's is what one DataLoader
worker hands the training process (`worker_rate`), or at a run's start what one core reads, checks and
collates (`decode_rate`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from luna_dist.data.batches import collate, collate_stacks
from luna_dist.data.loaders import train_loader
from luna_dist.data.streams import ShardSet, TrainStreamConfig, checked_samples, pos_neg_streams
from luna_dist.devices.numbers import example_batch, layout_for, loss_of
from luna_dist.devices.ops import AUTOCAST_DTYPES
from luna_dist.models.classifier import LunaModel
from luna_dist.models.unet import SegmentationModel

HEADROOM = 1.5
"""A worker is counted at 1/HEADROOM of its measured rate: its rate varies with the shards it meets and
the other work of its core (±20 % on the 2-core VM of docs/benchmarks.md), and a device waits whenever
the workers fall behind, never when they are ahead."""
FED = 0.05
"""The waiting share the rule accepts: a device idle 5 % of an epoch or less is fed."""
STARVED = 1 / 3
"""The waiting share of a starved device: idle a third of an epoch or more (a run warns, the doctor fails)."""
BATCH_SIZES = (32, 64, 128, 256)
"""The batch sizes the doctor times on an accelerator; on a CPU the first alone, its rate per sample hardly
depending on the batch (45 and 44 samples/s at 32 and 128, docs/benchmarks.md)."""
NEAR_BEST = 0.9
"""The batch recommended is the smallest whose rate is within this share of the best one timed: a larger
batch changes training (fewer steps an epoch, another learning rate), so it must buy speed."""
TASKS = ("cls", "seg", "malignancy")


def synchronize(device: torch.device) -> None:
    """Wait until `device` has done all the work queued on it (the CPU has)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed_steps(step: Callable[[], None], device: torch.device, steps: int, batch_size: int) -> float:
    """Samples/s of `steps` calls of `step`, after one warm-up call (kernel selection, allocator)."""
    step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - started)


def training_step(task: str, device: torch.device, batch_size: int, precision: str = "no",
                  channels_last: bool = True) -> Callable[[], None]:
    """One training step of `task`'s model on an int16 batch already on `device`, as the task runs it: the float
    conversion and layout, the forward under autocast, the loss, the backward and the optimizer's step. The
    malignancy task trains LunaModel's head only (its default --finetune-depth 1)."""
    model = SegmentationModel() if task == "seg" else LunaModel()
    layout = layout_for(model, channels_last)
    model = model.to(device, memory_format=layout)
    if task == "malignancy":
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith("head_linear"))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=1e-3) if task == "seg" else torch.optim.SGD(trained, lr=1e-3,
                                                                                           momentum=0.99)
    batch = example_batch(model, batch_size).to(device, torch.int16)  # int16 travels; float on the device

    def step() -> None:
        with torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(precision, torch.float32),
                            enabled=precision in AUTOCAST_DTYPES):
            output = model(batch.float().contiguous(memory_format=layout))
        optimizer.zero_grad(set_to_none=True)
        loss_of(output).backward()
        optimizer.step()

    return step


def device_rate(task: str, device: torch.device, batch_size: int, steps: int, precision: str = "no",
                channels_last: bool = True) -> float:
    """Training samples/s of `task` on `device` (the model alone: no loading), from `steps` timed steps. The
    global random state is left as it was: a run that times its device first trains as one that does not."""
    with torch.random.fork_rng(devices=[]):
        return timed_steps(training_step(task, device, batch_size, precision, channels_last), device, steps,
                           batch_size)


def worker_rate(shards: ShardSet, batch_size: int, samples: int) -> float:
    """Samples/s one DataLoader worker hands the training process from `shards`' training stream (both
    classes mixed 1:1, batches of `batch_size`), after its first batch (its start and first shuffle fill)."""
    steps = max(2, samples // batch_size)
    config = TrainStreamConfig(tuple(shards.folds), batch_size, steps, 1, pos_neg_streams(1), shuffle_buffer=256)
    batches = iter(train_loader(shards, config, 0, _collate_of(shards)))
    next(batches)
    started, seen = time.perf_counter(), 0
    for batch in batches:
        seen += len(batch[1])
    return seen / (time.perf_counter() - started)


def decode_rate(shards: ShardSet, folds: list[int], batch_size: int, samples: int) -> float:
    """Samples/s one core reads, checks and collates from the first training shard, in this process: what a
    worker does, less the hand-over and the shuffle (CPU time, whatever else the machine runs). A first batch is
    read untimed: a codec's first call loads its library, which a worker does once."""
    _read_and_collate(shards, folds, batch_size, batch_size)
    started = time.process_time()
    read = _read_and_collate(shards, folds, batch_size, samples)
    return read / max(time.process_time() - started, 1e-6)


def _read_and_collate(shards: ShardSet, folds: list[int], batch_size: int, samples: int) -> int:
    label = "neg" if shards.shards(folds, "neg") else "pos"
    read = []
    for sample in checked_samples(({"url": url} for url in shards.shards(folds, label)), shards.source):
        read.append(sample)
        if len(read) == samples:
            break
    collating = _collate_of(shards)
    for start in range(0, len(read), batch_size):
        collating(read[start:start + batch_size])
    return len(read)


def _collate_of(shards: ShardSet) -> Callable:
    return collate_stacks if shards.manifest.get("task") == "seg" else collate


@dataclass(frozen=True)
class Advice:
    """The data workers a device wants, and what it would wait with them."""

    workers: int
    waiting: float  # the share of a training epoch the device would wait for data with `workers`
    reason: str  # one line: the rates the choice rests on

    def as_dict(self) -> dict:
        return {"workers": self.workers, "waiting_share": self.waiting, "reason": self.reason}


def waiting_share(device: float, worker: float, workers: int) -> float:
    """The share of an epoch a device training `device` samples/s waits for data from `workers` workers of
    `worker` samples/s each; with none, the training process reads each batch itself while the device waits."""
    if workers == 0:
        return device / (device + worker)
    return max(0.0, 1 - workers * worker / device)


def recommend_workers(device: float, worker: float, cores: int) -> Advice:
    """The rule (see the module): the fewest workers, within `cores` - 1, that leave a device training `device`
    samples/s waiting at most FED of an epoch, each worker counted at `worker` / HEADROOM samples/s; the
    waiting share given is the one expected at `worker` itself."""
    most = max(0, cores - 1)
    workers = next((n for n in range(most + 1) if waiting_share(device, worker / HEADROOM, n) <= FED), most)
    limit = f", limited by {cores} core(s)" if waiting_share(device, worker / HEADROOM, workers) > FED else ""
    return Advice(workers, waiting_share(device, worker, workers),
                  f"the device trains {device:,.0f} samples/s, a worker delivers {worker:,.0f}{limit}")


def recommend_batch(rates: dict[int, float]) -> int:
    """The smallest batch size whose samples/s is within NEAR_BEST of the best of `rates` (batch -> rate)."""
    best = max(rates.values())
    return min(size for size, rate in rates.items() if rate >= NEAR_BEST * best)


START_STEPS = 2
"""Training steps a run times its device on to choose its default --num-workers (after one to warm up)."""
START_SAMPLES = 64
"""Samples of the run's first training shard a run reads to time a worker's work."""


def start_advice(task: str, device: torch.device, batch_size: int, precision: str, channels_last: bool,
                 shards: ShardSet, folds: list[int], cores: int) -> Advice:
    """The default --num-workers of a run with `cores` cores to its process, by `recommend_workers` from figures
    that cost well under a second: the device timed for START_STEPS steps at the run's batch (on the CPU at 4
    samples: its rate per sample hardly depends on the batch), a worker by what one core reads, checks and
    collates of START_SAMPLES samples of the first training shard (a worker's hand-over and shuffle, ~1/5 of
    its time, are left out: HEADROOM covers them). No spare core: no worker, and nothing timed."""
    if cores < 2:
        return Advice(0, float("nan"), f"{cores} core(s) to the process: none to spare for a data worker")
    timed = batch_size if device.type != "cpu" else min(batch_size, 4)
    return recommend_workers(device_rate(task, device, timed, START_STEPS, precision, channels_last),
                             decode_rate(shards, folds, batch_size, START_SAMPLES), cores)
