"""Batches in shared memory that a DataLoader worker reuses once the training process has let them go.

A worker hands each batch to the training process through shared memory. Decoding straight
into it (`new_batch`) saves the copy torch would make on the way, but a new segment for
every batch still costs its setting up, a page fault for each 4 kB page the worker writes
(1,152 for 32 chunks) and its tearing down: 2.5 ms of a 4.7 MB batch's 4.4 ms hand-over on
the 2-core VM of docs/benchmarks.md, more than decoding 32 uncompressed chunks. So each
worker keeps up to `SLOTS` segments and decodes the next batch into one the training
process has let go of.

Let go of means the training process can no longer read it: torch has freed its storage of
the segment (`StorageWeakRef.expired`: no tensor, view or batch refers to it), or what it
received is a copy (the DataLoader's pin thread copies each batch into pinned memory, and a
copy is complete before it is delivered). `PooledLoader`, which every loader of
`luna_dist.stream` is, marks those slots free in a small shared array each worker sends
with its first batch; a worker that finds no slot free takes a new segment, as before. So a
consumer that keeps its batches still reads them intact, only more slowly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef

SLOTS = 8
"""Segments a worker keeps: the DataLoader's 2 batches in flight per worker, the one being
decoded, the batch in use and the one before it, which is released a step late, and room."""
_FREE, _HELD = 0, 1


def new_batch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised batch for a collate to decode into: in a DataLoader worker, in one of its
    shared-memory slots (or a new segment when every slot is held); in-process, plain memory."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = _worker_slots().take(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


class _WorkerSlots:
    """This worker process's segments, and whether the training process holds each."""

    def __init__(self) -> None:
        self.states = torch.zeros(SLOTS, dtype=torch.uint8).share_memory_()  # written by the training process
        self._states = self.states.numpy()
        self.storages: list[torch.UntypedStorage] = []
        self.taken: dict[int, int] = {}  # data_ptr -> slot, of the batches made since the last `lease`
        self.announced = False
        self.made = 0  # segments made so far: one per batch when none is reused

    def take(self, nbytes: int) -> torch.UntypedStorage:
        """A free slot of `nbytes` (else a free one of another size, remade), a new slot, or a segment of its own."""
        free = [slot for slot in range(len(self.storages)) if self._states[slot] == _FREE]
        fitting = [slot for slot in free if self.storages[slot].nbytes() == nbytes]
        if fitting:
            slot = fitting[0]
        else:
            self.made += 1
            if not free and len(self.storages) == SLOTS:
                return torch.UntypedStorage._new_shared(nbytes)  # every slot held: freed with its batch
            slot = free[0] if free else len(self.storages)
            self.storages[slot:slot + 1] = [torch.UntypedStorage._new_shared(nbytes)]
        self._states[slot] = _HELD
        self.taken[self.storages[slot].data_ptr()] = slot
        return self.storages[slot]

    def lease(self, batch: tuple) -> _Leased:
        """`batch` with the slots its tensors lie in, for the training process to give back."""
        slots = tuple((position, self.taken.pop(tensor.untyped_storage().data_ptr()))
                      for position, tensor in enumerate(batch)
                      if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() in self.taken)
        for slot in self.taken.values():  # made but not in the batch: nobody else holds it
            self._states[slot] = _FREE
        self.taken.clear()
        states, self.announced = (None if self.announced else self.states), True
        return _Leased(tuple(batch), os.getpid(), slots, states)


_SLOTS: _WorkerSlots | None = None


def _worker_slots() -> _WorkerSlots:
    global _SLOTS
    if _SLOTS is None:
        _SLOTS = _WorkerSlots()
    return _SLOTS


@dataclass(frozen=True)
class _Leased:
    """A worker's batch on its way to the training process, with the slots it occupies."""

    batch: tuple
    worker: int  # the worker's process id: whose slot states `slots` index
    slots: tuple[tuple[int, int], ...]  # (position of a tensor in `batch`, its slot)
    states: torch.Tensor | None  # the worker's slot states, sent with its first batch

    def pin_memory(self) -> _Leased:
        """What the DataLoader's pin thread calls: the batch is copied, the slot states stay shared."""
        return replace(self, batch=tuple(t.pin_memory() if isinstance(t, torch.Tensor) else t for t in self.batch))


def leased(batches: Iterator[tuple]) -> Iterator:
    """Pipeline stage, last in a worker: each batch with its slots for `PooledLoader`; in-process, unchanged."""
    if torch.utils.data.get_worker_info() is None:
        yield from batches
        return
    slots = _worker_slots()
    for batch in batches:
        yield slots.lease(batch)


class PooledLoader:
    """A DataLoader of `leased` batches: iterates as it does, giving each batch's slots back to its worker
    once the batch is let go of (see the module's docstring)."""

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[tuple]:
        states: dict[int, np.ndarray] = {}
        held: list[tuple[StorageWeakRef, np.ndarray, int]] = []
        for item in self.loader:
            held = [entry for entry in held if not _given_back(entry)]
            yield _received(item, states, held) if isinstance(item, _Leased) else item


def _received(item: _Leased, states: dict[int, np.ndarray], held: list) -> tuple:
    """The batch of `item`; each of its slots goes into `held` until torch frees the training process's
    storage of it, or back to the worker now when the batch delivered is a copy."""
    if item.states is not None:
        states[item.worker] = item.states.numpy()
    worker_states = states[item.worker]
    for position, slot in item.slots:
        tensor = item.batch[position]
        if tensor.is_shared():
            held.append((StorageWeakRef(tensor.untyped_storage()), worker_states, slot))
        else:  # a copy, already complete: the worker's segment is read no more
            worker_states[slot] = _FREE
    return item.batch


def _given_back(entry: tuple[StorageWeakRef, np.ndarray, int]) -> bool:
    storage, worker_states, slot = entry
    if not storage.expired():
        return False
    worker_states[slot] = _FREE
    return True
