"""Shared-memory batches a worker reuses: made in shared memory, reused once let go of, never while held."""

from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import LaggingDevice

from luna_dist.data import batch_memory, loaders
from luna_dist.data.batch_memory import SLOTS, PooledLoader, _ByValue, _InSlot, held_until_copied, leased, new_batch

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
    return loaders.pooled_loader(wds.DataPipeline(_numbered_batches), workers, pin_memory=False, **options)


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


def test_a_slot_goes_back_once_nothing_built_over_it_is_left(monkeypatch):
    """Two tensors of a batch in one slot hold it together; a later batch in the slot is rebuilt over the
    segment sent first; a pinned copy gives the slot back at once; the loader drops its mappings when done."""
    monkeypatch.setattr(torch.Tensor, "pin_memory", torch.Tensor.clone)  # no accelerator here: a copy stands in
    states = torch.ones(SLOTS, dtype=torch.uint8).share_memory_()  # every slot held by the training process
    segment = torch.UntypedStorage._new_shared(64)
    torch.empty(0, dtype=torch.int16).set_(segment).copy_(torch.arange(32, dtype=torch.int16))
    whole, row = _InSlot(2, segment, torch.int16, (4, 8), (8, 1), 0), _InSlot(2, None, torch.int16, (8,), (1,), 8)
    first = batch_memory._arrived(5, states, (whole, row)).batch
    assert torch.equal(first[0].flatten(), torch.arange(32, dtype=torch.int16))
    assert torch.equal(first[1], torch.arange(8, 16, dtype=torch.int16))
    view = first[1][:2]
    del first
    assert states[2] == 1  # a view of one of its tensors still holds the slot
    del view
    assert states[2] == 0
    states[2] = 1  # the worker takes it again and sends only (slot, dtype, shape)
    pinned = batch_memory._arrived(5, None, (replace(whole, segment=None),)).pin_memory()
    assert states[2] == 0 and torch.equal(pinned.batch[0], torch.arange(32, dtype=torch.int16).view(4, 8))
    assert list(PooledLoader([pinned])) == [pinned.batch] and 5 not in batch_memory._WORKERS


@pytest.mark.parametrize("held", [False, True])
def test_a_device_that_reads_a_batch_late_reads_the_batch_it_was_given(monkeypatch, held):
    """Apple's MPS reads the host memory of a `non_blocking` copy when the GPU reaches it, steps later; by
    then the worker had decoded another batch into the slot, and the model trained on it. Held until an
    event after its step is done (the stand-in's events: its copies run in order), a batch stays intact."""
    device = LaggingDevice(lag=3)
    monkeypatch.setattr(batch_memory, "copied_event", lambda _: device.event())
    loader = _loader(1)
    for n, (batch, _, _) in enumerate(held_until_copied(loader, torch.device("mps")) if held else loader):
        device.copy(batch)
        if n == BATCHES - 1:
            device.finish()  # while the last batches' memory is mapped: the loop's end unmaps it
    got = [int(np.frombuffer(read, dtype=np.int16)[0]) for read in device.read]
    wrong = [(n, value) for n, value in enumerate(got) if value != n]
    assert len(got) == BATCHES and (not wrong if held else wrong), wrong


@pytest.mark.parametrize("tensor", [torch.tensor(3), torch.tensor([True, False]), torch.arange(6.0).view(2, 3).T,
                                    torch.ones(2, dtype=torch.bfloat16)])
def test_a_small_tensor_travels_by_value(tensor):
    part = batch_memory._WorkerSlots()._part(tensor)
    assert isinstance(part, _ByValue)
    travelled = pickle.loads(pickle.dumps(part)).tensor()
    assert travelled.dtype == tensor.dtype and torch.equal(travelled, tensor)


def test_in_process_batches_pass_through_unleased():
    batches = [(torch.zeros(2),), (torch.ones(2),)]
    assert list(leased(iter(batches))) == batches
    assert np.array_equal(torch.cat([b for b, in PooledLoader(batches)]).numpy(), [0, 0, 1, 1])


@pytest.mark.slow
def test_pooled_batches_pickle_and_run_in_spawn_workers():
    """macOS starts workers with spawn: the leasing stage and what it sends must pickle."""
    batches = [batch.clone() for batch, _, _ in _loader(1, multiprocessing_context="spawn")]
    assert [int(batch[0, 0, 0]) for batch in batches] == list(range(BATCHES))
