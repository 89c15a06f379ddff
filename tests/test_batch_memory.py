"""Shared-memory batches a worker reuses: made in shared memory, reused once let go of, never while held."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import webdataset as wds

from luna_dist import batch_memory
from luna_dist.batch_memory import SLOTS, PooledLoader, leased, new_batch
from luna_dist.stream import pooled_loader

BATCHES = 3 * SLOTS


def _numbered_batches():
    """Batch n: a (4, 64, 64) int16 made by `new_batch` and filled with n, the segments its worker has made
    so far, and whether the batch lies in shared memory."""
    for n in range(BATCHES):
        batch = new_batch((4, 64, 64), torch.int16)
        batch.fill_(n)
        slots = batch_memory._SLOTS
        yield batch, torch.tensor(0 if slots is None else slots.made), torch.tensor(batch.is_shared())


def _loader(workers: int, **options) -> PooledLoader:
    return pooled_loader(wds.DataPipeline(_numbered_batches), workers, pin_memory=False, **options)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_workers_batch_is_made_in_shared_memory_so_handing_it_over_copies_nothing(workers):
    for n, (batch, _, shared) in enumerate(_loader(workers)):
        assert bool(shared) == (workers > 0)
        assert torch.equal(batch, torch.full((4, 64, 64), n, dtype=torch.int16))


def test_a_worker_reuses_the_segments_of_the_batches_let_go_of():
    made = [int(made) for _, made, _ in _loader(1)]  # each batch dropped before the next is taken
    assert made[-1] < SLOTS  # of 24 batches: the others reused a slot


def test_batches_kept_are_never_written_over():
    kept = list(_loader(1))  # every batch held: no slot is ever let go of
    assert int(kept[-1][1]) == BATCHES  # so each took a segment of its own
    views = [batch[0, 0] for batch, _, _ in _loader(1)]  # only a view of each: the batch's memory is still held
    for n, ((batch, _, _), view) in enumerate(zip(kept, views)):
        assert torch.equal(batch, torch.full((4, 64, 64), n, dtype=torch.int16))
        assert torch.equal(view, torch.full((64,), n, dtype=torch.int16))


def test_a_slot_goes_back_when_its_batch_is_let_go_of_and_at_once_when_a_copy_arrived():
    """After the DataLoader's pin thread, what arrives is a copy: the worker's segment is read no more."""
    states = torch.ones(SLOTS, dtype=torch.uint8).share_memory_()  # every slot held by the training process
    copy, shared = torch.zeros(4, dtype=torch.int16), torch.zeros(4, dtype=torch.int16).share_memory_()
    arriving = [batch_memory._Leased((copy, shared), 7, ((0, 2), (1, 5)), states),
                batch_memory._Leased((copy,), 7, (), None)]
    batches = iter(PooledLoader(arriving.pop(0) for _ in range(2)))
    first = next(batches)
    assert states.tolist() == [1, 1, 0, 1, 1, 1, 1, 1]  # the copy's slot is back; the shared batch's is held
    del first, shared
    next(batches)
    assert states.tolist() == [1, 1, 0, 1, 1, 0, 1, 1]


def test_in_process_batches_pass_through_unleased():
    batches = [(torch.zeros(2),), (torch.ones(2),)]
    assert list(leased(iter(batches))) == batches
    assert np.array_equal(torch.cat([b for b, in PooledLoader(batches)]).numpy(), [0, 0, 1, 1])


@pytest.mark.slow
def test_pooled_batches_pickle_and_run_in_spawn_workers():
    """macOS starts workers with spawn: the leasing stage and what it sends must pickle."""
    batches = [batch.clone() for batch, _, _ in _loader(1, multiprocessing_context="spawn")]
    assert [int(batch[0, 0, 0]) for batch in batches] == list(range(BATCHES))
