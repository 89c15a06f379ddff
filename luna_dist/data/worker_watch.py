"""A data worker that dies or freezes stops the reading with one line naming it, never a traceback or a hang.

A worker killed (the out-of-memory killer, a `kill`) made torch raise its own error with an
85-line traceback and nothing said of what to do; a frozen one (stopped, or stuck with the
interpreter's lock held) hung the run for ever, the loader waiting for its next batch.

Each worker beats: a thread of its own counts quarter seconds in a small shared array (`Beats`).
A worker that is slow but alive goes on beating: a first batch that waits on remote shards
(each read bounded by --read-timeout), a long decode. One that stops beating is frozen: its
process is stopped, or something holds its interpreter's lock. The training process watches
the counts from a thread of its own while it reads (`WatchedLoader`); a worker silent for
`timeout` seconds of the training process's own running (its own stops, a laptop's sleep or a
Ctrl-Z, stop the workers too and do not count) is killed: SIGKILL also ends a stopped process.
The DataLoader then finds it gone, within the 5 s of torch's own check, as it finds a worker
that died by itself, and `WorkerLost` says which worker it was and what happened to it.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterable, Iterator

import numpy as np
import torch

WORKER_TIMEOUT = 120.0
"""Seconds a data worker may go without a beat before it is taken for frozen (`--worker-timeout`)."""
BEAT_S = 0.25
"""Seconds between a worker's beats, and between the training process's looks at them."""
LEAST_TIMEOUT = 2.0
"""The shortest `--worker-timeout`: 8 beats, so that a beat late by a busy machine is not taken for a freeze."""


class WorkerLost(Exception):
    """A data worker died or froze; the message names it (number and pid) and what happened."""


class Beats:
    """Each worker's pid and count of beats, in shared memory: written by the workers, read by the watch."""

    def __init__(self, workers: int) -> None:
        self.table = torch.zeros((workers, 2), dtype=torch.int64).share_memory_()  # (pid, beats) per worker

    def start(self, worker: int) -> None:
        """DataLoader's `worker_init_fn`: in worker `worker`, note its pid and beat from a thread until it ends."""
        table = self.table.numpy()
        table[worker] = (os.getpid(), 0)
        threading.Thread(target=_beat, args=(table[worker],), name="luna_dist beats", daemon=True).start()


def _beat(row: np.ndarray) -> None:
    while True:
        time.sleep(BEAT_S)
        row[1] += 1


class WatchedLoader:
    """A DataLoader whose workers beat (`Beats.start` is its `worker_init_fn`): iterates as it does; a worker
    silent for `timeout` seconds is killed, and a worker gone raises `WorkerLost`."""

    def __init__(self, loader: Iterable, beats: Beats, timeout: float = WORKER_TIMEOUT) -> None:
        self.loader, self.beats, self.timeout = loader, beats, timeout

    def __iter__(self) -> Iterator:
        self.beats.table.zero_()
        silenced: dict[int, float] = {}  # pid -> the seconds it was silent, of the workers killed as frozen
        done = threading.Event()
        watch = threading.Thread(target=self._watch, args=(done, silenced), name="luna_dist worker watch",
                                 daemon=True)
        watch.start()
        try:
            yield from self.loader
        except (RuntimeError, ConnectionError, EOFError) as err:
            done.set()
            watch.join()  # it kills nobody from here on
            if (lost := self._lost(err, silenced)) is None:
                raise
            raise lost from None
        finally:
            done.set()
            watch.join()

    def _watch(self, done: threading.Event, silenced: dict[int, float]) -> None:
        table = self.beats.table.numpy()
        seen, silent = table[:, 1].copy(), np.zeros(len(table))
        handles: dict[int, int | None] = {}  # pid -> a pidfd of the worker, taken as its pid first shows (Linux)
        before = time.monotonic()
        try:
            while not done.wait(BEAT_S):
                now = time.monotonic()
                ran, before = min(now - before, 2 * BEAT_S), now  # a stop of this process itself does not count
                handles.update({int(pid): _handle(int(pid)) for pid in table[:, 0] if pid and pid not in handles})
                beating = (table[:, 1] != seen) | (table[:, 0] == 0)  # a worker not started yet is not silent
                seen = table[:, 1].copy()
                silent = np.where(beating, 0.0, silent + ran)
                for worker in np.flatnonzero(silent > self.timeout):
                    pid = int(table[worker, 0])
                    if pid not in silenced:
                        silenced[pid] = float(silent[worker])  # before the kill: the reading may fail at once
                        if not _killed(pid, handles[pid]):
                            del silenced[pid]  # it had died by itself
        finally:
            for handle in handles.values():
                if handle is not None:
                    os.close(handle)

    def _lost(self, err: Exception, silenced: dict[int, float]) -> WorkerLost | None:
        """`err` as `WorkerLost`, naming the worker whose end it shows; None for an error of another kind.

        The reading fails when a worker ends: torch's error naming its pid, or, where the worker
        was sending a new segment (its file descriptor goes through a connection to the worker),
        that connection's end.
        """
        pids = self.beats.table[:, 0].tolist()
        named = re.match(r"DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\)", str(err))
        if silenced:
            pid = next(iter(silenced))
        elif isinstance(err, RuntimeError) and named:
            pid = int(named.group(1).split(",")[0])
        elif isinstance(err, (ConnectionError, EOFError)) and (ended := [pid for pid in pids if pid and _ended(pid)]):
            pid = ended[0]
        else:
            return None
        which = f"data worker {pids.index(pid) + 1} of {len(pids)}" if pid in pids else "a data worker"
        if pid in silenced:
            return WorkerLost(f"{which} (pid {pid}) showed no sign of life for {silenced[pid]:.0f} s (frozen or "
                              f"stopped; --worker-timeout {self.timeout:g}) and was killed")
        return WorkerLost(f"{which} (pid {pid}) died (killed? out of memory?)")


def _ended(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _handle(pid: int) -> int | None:
    """A pidfd of a live worker: a signal sent through it never reaches another process that took its pid since."""
    try:
        return os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
    except ProcessLookupError:
        return None


def _killed(pid: int, pidfd: int | None) -> bool:
    """SIGKILL to a worker; False where it had ended already."""
    try:
        if not hasattr(os, "pidfd_open"):
            os.kill(pid, signal.SIGKILL)
        elif pidfd is None:  # the worker ended before its pid showed
            return False
        else:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True
