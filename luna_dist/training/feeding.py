"""Whether the data keeps the device busy: the share of each training epoch the loop waits for its next batch,
and what to change when it waits too long.

The wait is the host's time blocked in the loader (`Waited`), with no device synchronisation in a step:
the loop runs at most `luna_dist.data.batch_memory.COPIES_IN_FLIGHT` steps ahead of the device, so time
the host spends waiting for a batch is time the device soon has nothing to do. The first batch of an
epoch is left out (the workers' start and their shuffle buffers' first fill): more workers do not
shorten it. A device that waits for more than `luna_dist.devices.speed.STARVED` of an epoch is
starved, and the run says once what to change, by the doctor's rule
(`luna_dist.devices.speed.recommend_workers`) from the epoch's own rates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator

from luna_dist.devices.machine import usable_cores
from luna_dist.devices.speed import recommend_workers, start_advice


class Waited:
    """`batches`, timing how long each after the first takes to arrive (and the end), and from the first's arrival
    on."""

    def __init__(self, batches: Iterable) -> None:
        self.batches = iter(batches)
        self.waited = 0.0  # seconds blocked for the batches after the first
        self.samples = 0  # in those batches
        self.first: float | None = None  # when the first batch arrived

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        asked = time.perf_counter()
        try:
            batch = next(self.batches)
        except StopIteration:  # the loader's end (its workers' last batches) is waited for too
            self.waited += time.perf_counter() - asked if self.first is not None else 0.0
            raise
        arrived = time.perf_counter()
        if self.first is None:
            self.first = arrived
        else:
            self.waited += arrived - asked
            self.samples += len(batch[1])
        return batch

    def figures(self) -> tuple[float, float, float]:
        """(waited seconds, seconds since the first batch arrived, samples after it), for `share` and `advice`."""
        since = 0.0 if self.first is None else time.perf_counter() - self.first
        return self.waited, since, float(self.samples)


def share(waited: float, seconds: float) -> float:
    """The share of `seconds` spent waiting; 0 for an epoch of one batch."""
    return waited / seconds if seconds > 0 else 0.0


def advice(waited: float, seconds: float, samples: float, workers: int, cores: int) -> str:
    """What to change for a device that waited `waited` of `seconds` for `samples` samples with `workers` workers and
    `cores` cores to its process: the device's own rate is what it did while not waiting; a worker's is what the
    workers delivered (each their share), or with none what the training process read while the device waited."""
    device = samples / max(seconds - waited, 1e-9)
    worker = samples / max(waited, 1e-9) if workers == 0 else samples / seconds / workers
    wanted = recommend_workers(device, worker, cores)
    if wanted.workers > workers:
        return f"pass --num-workers {wanted.workers} (now {workers}): {wanted.reason}"
    return (f"--num-workers {workers} is as many as {cores} core(s) allow: {wanted.reason}; read the shards from "
            "a faster disk, keep a local copy of remote ones (--cache-dir), or train where a device has more cores")


def default_workers(task, progress, precision: str, local_processes: int) -> int:
    """--num-workers where the command gives none: those of the epoch a resume finishes (which samples a rank
    reads depends on them), else the doctor's rule (`luna_dist.devices.speed.start_advice`) on this machine."""
    if progress.step and progress.layout:
        return progress.layout["num_workers"]
    cores = usable_cores() // max(1, local_processes)
    advice = start_advice(task.name, task.device, task.args.batch_size, precision, task.channels_last,
                          task.shards, task.train_folds or task.val_folds, cores)
    if task.accelerator.is_main_process:
        logging.getLogger(__name__).info(f"--num-workers {advice.workers} (not given): {advice.reason}")
    return advice.workers
