"""A data worker slower than --worker-timeout is waited for: it beats while it works. (Workers that die or
freeze: test_train's test_a_data_worker_that_dies_or_freezes_stops_the_run_naming_it.)"""

from __future__ import annotations

import time

import pytest
import torch
import webdataset as wds

from luna_dist.data.loaders import pooled_loader

BATCHES = 6


def _slow_batches():
    """Pipeline source: numbered batches from each worker; worker 1 takes 3 s over its third."""
    info = torch.utils.data.get_worker_info()
    for n in range(BATCHES):
        if info.id == 1 and n == 2:
            time.sleep(3)  # alive, but slower than the timeout: a shard on its way from a server
        yield torch.tensor([info.id, n]),


@pytest.mark.slow
def test_a_slow_worker_is_waited_for():
    loader = pooled_loader(wds.DataPipeline(_slow_batches), 2, pin_memory=False, worker_timeout=2)
    assert sorted(tuple(batch.tolist()) for batch, in loader) == [(w, n) for w in (0, 1) for n in range(BATCHES)]
