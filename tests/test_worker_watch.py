"""Data workers that die or freeze stop the reading with one line naming them; slow ones are waited for."""

from __future__ import annotations

import os
import re
import signal
import time
from functools import partial

import pytest
import torch
import webdataset as wds

from luna_dist.stream import pooled_loader
from luna_dist.worker_watch import WorkerLost

BATCHES = 6


def _batches(fault: str):
    """Pipeline source: numbered batches from each of 2 workers; worker 1 then does `fault` before its third."""
    info = torch.utils.data.get_worker_info()
    for n in range(BATCHES):
        if info.id == 1 and n == 2:
            if fault == "slow":
                time.sleep(5)  # alive, but slower than the timeout: a shard on its way from a server
            else:
                os.kill(os.getpid(), signal.SIGSTOP if fault == "freeze" else signal.SIGKILL)
        yield torch.tensor([info.id, n]), torch.tensor(os.getpid())


def _read(fault: str) -> list[tuple[int, int]]:
    loader = pooled_loader(wds.DataPipeline(partial(_batches, fault=fault)), 2, pin_memory=False, worker_timeout=2)
    return [tuple(batch.tolist()) for batch, _ in loader]


@pytest.mark.slow
def test_a_slow_worker_is_waited_for():
    """A worker beats while it waits: a first batch slower than --worker-timeout is not taken for a frozen one."""
    assert sorted(_read("slow")) == [(worker, n) for worker in (0, 1) for n in range(BATCHES)]


@pytest.mark.slow
@pytest.mark.parametrize("fault, said", [
    ("die", r"data worker 2 of 2 \(pid (\d+)\) died \(killed\? out of memory\?\)$"),
    ("freeze", r"data worker 2 of 2 \(pid (\d+)\) showed no sign of life for \d+ s \(frozen or stopped; "
               r"--worker-timeout 2\) and was killed$"),
])
def test_a_worker_that_dies_or_freezes_is_named(fault, said):
    """A killed worker gave torch's 85-line traceback; a frozen one (stopped, or holding its interpreter's lock)
    hung the reading for ever."""
    pids = set()
    started = time.monotonic()
    with pytest.raises(WorkerLost) as lost:
        loader = pooled_loader(wds.DataPipeline(partial(_batches, fault=fault)), 2, pin_memory=False, worker_timeout=2)
        for (worker, _), pid in loader:
            pids.add((int(worker), int(pid)))
    assert time.monotonic() - started < 30
    named = re.match(said, str(lost.value))
    assert named, str(lost.value)
    assert (1, int(named.group(1))) in pids  # the pid of worker 1 (the second)
