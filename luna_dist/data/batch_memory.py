"""Batches in shared memory that a DataLoader worker reuses once the training process has let them go.

A worker hands each batch to the training process through shared memory. Decoding straight
into it (`new_batch`) saves the copy torch would make on the way, but a new segment for
every batch still costs its setting up, a page fault for each 4 kB page the worker writes
(1,152 for 32 chunks) and its tearing down: 2.5 ms of a 4.7 MB batch's 4.4 ms hand-over on
the 2-core VM of docs/benchmarks.md, more than decoding 32 uncompressed chunks. So each
worker keeps up to `SLOTS` segments and decodes the next batch into one the training
process has let go of.

Even a reused segment costs ~0.5 ms a tensor on each side when torch sends it: pickling,
and passing its file descriptor through multiprocessing's resource sharer. So a segment
travels once, with the first batch in it; the training process keeps it mapped, and every
later batch in that slot is sent as (slot, dtype, shape) and rebuilt over the mapping. The
small tensors of a batch that lie in no slot (labels, where each sample lies) travel inside
the pickle, by value.

Let go of means the training process can no longer read it: no tensor, view or batch built
over that delivery of the slot is left (a finalizer on the memory they share sees it), as
when the DataLoader's pin thread has copied the batch into pinned memory and dropped it.
The finalizer marks the slot free in a small shared array each worker sends with its first
batch; a worker that finds no slot free takes a new segment, sent as torch sends it. So a
consumer that keeps its batches still reads them intact, only more slowly. `PooledLoader`,
which every loader of `luna_dist.data.loaders` is, unwraps the batches and drops the mappings of
its workers when its iteration ends (its workers end with it: no persistent workers).

A device may read a batch after the training process has let go of it: a `non_blocking`
copy to Apple's MPS reads the host memory when the GPU reaches it, steps later, and the
worker may have decoded another batch into the slot by then (PyTorch promises no order for
copies from the CPU to devices other than CUDA's pinned ones). `held_until_copied` keeps each
batch until the device is past it.
"""

from __future__ import annotations

import math
import os
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

SLOTS = 8
"""Segments a worker keeps: the DataLoader's 2 batches in flight per worker, the one being
decoded, the batch in use and up to `COPIES_IN_FLIGHT` before it, and room."""
COPIES_IN_FLIGHT = 2
"""Steps a batch is kept after its own at most, for the device to finish reading it (`held_until_copied`)."""
BY_VALUE_BYTES = 64 * 1024
"""A tensor in no slot up to this size travels inside the pickle; a larger one as torch sends it."""
_FREE, _HELD = 0, 1


def new_batch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised batch for a collate to decode into: in a DataLoader worker, in one of its
    shared-memory slots (or a new segment when every slot is held); in-process, plain memory."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = _worker_slots().take(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


class _WorkerSlots:
    """This worker process's segments, whether the training process holds each, and whether it has it mapped."""

    def __init__(self) -> None:
        self.states = torch.zeros(SLOTS, dtype=torch.uint8).share_memory_()  # written by the training process
        self._states = self.states.numpy()
        self.token = int.from_bytes(os.urandom(8), "little")  # names this worker's slots in the training process
        self.storages: list[torch.UntypedStorage] = []
        self.sent: list[bool] = []  # whether the training process has slot n's segment (else it goes with the batch)
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
                return torch.UntypedStorage._new_shared(nbytes)  # every slot held: sent, and freed, as torch does
            slot = free[0] if free else len(self.storages)
            self.storages[slot:slot + 1] = [torch.UntypedStorage._new_shared(nbytes)]
            self.sent[slot:slot + 1] = [False]
        self._states[slot] = _HELD
        self.taken[self.storages[slot].data_ptr()] = slot
        return self.storages[slot]

    def lease(self, batch: tuple) -> _Leased:
        """`batch` as it travels: its tensors in slots as `_InSlot`s, its small ones by value."""
        parts = tuple(self._part(item) for item in batch)
        for slot in set(self.taken.values()) - {part.slot for part in parts if isinstance(part, _InSlot)}:
            self._states[slot] = _FREE  # made but not in the batch: nobody else holds it
        self.taken.clear()
        states, self.announced = (None if self.announced else self.states), True
        return _Leased(self.token, states, parts)

    def _part(self, item: object) -> object:
        if not isinstance(item, torch.Tensor):
            return item
        slot = self.taken.get(item.untyped_storage().data_ptr())
        if slot is not None:
            segment = None if self.sent[slot] else self.storages[slot]
            self.sent[slot] = True
            return _InSlot(slot, segment, item.dtype, tuple(item.shape), item.stride(), item.storage_offset())
        if item.nbytes <= BY_VALUE_BYTES:
            return _ByValue(item.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), item.dtype,
                            tuple(item.shape))
        return item


_SLOTS: _WorkerSlots | None = None


def _worker_slots() -> _WorkerSlots:
    global _SLOTS
    if _SLOTS is None:
        _SLOTS = _WorkerSlots()
    return _SLOTS


@dataclass(frozen=True)
class _InSlot:
    """A tensor lying in a worker's slot: its segment only when the training process does not have it yet."""

    slot: int
    segment: torch.UntypedStorage | None
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    def over(self, memory: np.ndarray) -> torch.Tensor:
        """The tensor, over `memory` (the slot's bytes in the training process)."""
        return torch.from_numpy(memory).view(self.dtype).as_strided(self.shape, self.stride, self.offset)


@dataclass(frozen=True)
class _ByValue:
    """A small tensor's bytes, carried in the pickle."""

    data: bytes
    dtype: torch.dtype
    shape: tuple[int, ...]

    def tensor(self) -> torch.Tensor:
        return torch.frombuffer(bytearray(self.data), dtype=torch.uint8).view(self.dtype).reshape(self.shape)


@dataclass(frozen=True)
class _Leased:
    """A worker's batch on its way to the training process, which unpickles it as a `_Delivered` (`_arrived`)."""

    worker: int  # the worker's token
    states: torch.Tensor | None  # the worker's slot states, sent with its first batch
    parts: tuple

    def __reduce__(self) -> tuple:
        return _arrived, (self.worker, self.states, self.parts)


@dataclass(frozen=True)
class _Delivered:
    """A batch rebuilt in the training process, and the worker it came from."""

    worker: int
    batch: tuple

    def pin_memory(self) -> _Delivered:
        """What the DataLoader's pin thread calls: the batch is copied, and the slots go back once it is dropped."""
        return replace(self, batch=tuple(t.pin_memory() if isinstance(t, torch.Tensor) else t for t in self.batch))


_WORKERS: dict[int, tuple[np.ndarray, dict[int, torch.UntypedStorage]]] = {}
"""In the training process: each worker's slot states, and the segments of its slots it has (slot -> segment)."""


def _arrived(worker: int, states: torch.Tensor | None, parts: tuple) -> _Delivered:
    """Unpickling a `_Leased` in the training process: each tensor rebuilt, over the mapping of its slot."""
    if states is not None:  # the worker's first batch
        _WORKERS[worker] = (states.numpy(), {})
    worker_states, mapped = _WORKERS[worker]
    memory: dict[int, np.ndarray] = {}  # slot -> its bytes, shared by the tensors of this batch in it
    batch = []
    for part in parts:
        if isinstance(part, _InSlot):
            if part.segment is not None:
                mapped[part.slot] = part.segment
            if part.slot not in memory:
                memory[part.slot] = _slot_memory(mapped[part.slot], worker_states, part.slot)
            batch.append(part.over(memory[part.slot]))
        else:
            batch.append(part.tensor() if isinstance(part, _ByValue) else part)
    return _Delivered(worker, tuple(batch))


def _slot_memory(segment: torch.UntypedStorage, states: np.ndarray, slot: int) -> np.ndarray:
    """The bytes of `segment`, as an array whose end (no tensor built over it is left) gives the slot back."""
    memory = torch.empty(0, dtype=torch.uint8).set_(segment).numpy()
    weakref.finalize(memory, _give_back, states, slot).atexit = False
    return memory


def _give_back(states: np.ndarray, slot: int) -> None:
    states[slot] = _FREE


def leased(batches: Iterator[tuple]) -> Iterator:
    """Pipeline stage, last in a worker: each batch as it travels to `PooledLoader`; in-process, unchanged."""
    if torch.utils.data.get_worker_info() is None:
        yield from batches
        return
    slots = _worker_slots()
    for batch in batches:
        yield slots.lease(batch)


class PooledLoader:
    """A DataLoader of `leased` batches: iterates as it does, giving the batches; drops its workers' mappings
    when done (see the module's docstring)."""

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[tuple]:
        workers: set[int] = set()
        try:
            for item in self.loader:
                if isinstance(item, _Delivered):
                    workers.add(item.worker)
                    item = item.batch
                yield item
        finally:
            for worker in workers:
                _WORKERS.pop(worker, None)


def held_until_copied(batches: Iterable[tuple], device: torch.device) -> Iterator[tuple]:
    """The batches, each kept (and its slots held) until every copy to `device` made during its step is done.

    After each step an event is recorded on the device's stream; a batch goes once the event
    after its step is done, seen without waiting (`query`), or when `COPIES_IN_FLIGHT` newer
    ones wait, by waiting for its event alone: never a sync of the whole device in a step, so
    the device still works while the next batch is copied. On CUDA the batches are pinned
    copies, whose memory torch's pinned allocator does not reuse before the copy is done
    either: holding them costs nothing. The CPU copies at once: nothing is kept. When the
    batches end, or the loop stops, the device is waited for once: the memory under a batch
    may be unmapped once it goes.
    """
    waiting: deque[tuple[object, tuple]] = deque()  # (event after the step, its batch), oldest first
    try:
        for batch in batches:
            yield batch
            if (event := copied_event(device)) is not None:
                waiting.append((event, batch))
            while waiting and (len(waiting) > COPIES_IN_FLIGHT or waiting[0][0].query()):
                waiting[0][0].synchronize()
                waiting.popleft()  # only now: the batch goes with it
            del batch
    finally:
        if (event := copied_event(device)) is not None:
            event.synchronize()  # every copy issued so far: also of a batch whose step stopped half-way


def copied_event(device: torch.device) -> torch.Event | None:
    """An event recorded now on `device`'s current stream, done once every copy issued before it is; None on
    the CPU, where a copy is done when `to` returns."""
    if device.type == "cpu":
        return None
    event = torch.mps.Event() if device.type == "mps" else torch.Event(device=device)
    event.record()
    return event
