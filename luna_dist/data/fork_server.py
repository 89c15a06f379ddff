"""Imported first by the fork server that starts the data workers (`luna_dist.data.loaders.worker_start`
preloads it), and by nothing else: from then on the server and every worker it forks end when the training
process ends, however it ends (Linux).

A data worker's parent is this server, not the training process. Killed with SIGKILL, the
training process left the server, its workers and multiprocessing's resource tracker running
for ever (about 1 GB), and the loader queues' 14 semaphores in /dev/shm: torch's watchdog in a
worker asks whether the worker's parent (the server) lives, and the server waits for every
holder of its "alive" pipe to close it, the workers among them. Here the kernel does it: the
server asks for SIGKILL when the training process ends (prctl PR_SET_PDEATHSIG), and each
worker, as it is forked, when the server ends. SIGKILL also ends a stopped (SIGSTOP) worker.
The resource tracker, whose pipe nobody holds any more, then unlinks the semaphores and exits.

The parent-death signal follows the thread that started the process: the loaders are iterated
in the main thread of the training process (a server started by a thread that ends would end
with it, and the next loader would start another). Elsewhere (macOS) the workers are spawned by
the training process itself, and torch's watchdog ends them.
"""

from __future__ import annotations

import os
import sys

from luna_dist.common.processes import killed_with_parent

_forked_by = os.getpid()
"""In a process just forked: the process that forked it (set just before each fork)."""


def _note_forking() -> None:
    global _forked_by
    _forked_by = os.getpid()


def _end_with_forking_process() -> None:
    """In a process just forked (a worker): killed when the process that forked it ends; gone at once where
    that ended before the prctl."""
    killed_with_parent()
    if os.getppid() != _forked_by:
        os._exit(1)


if sys.platform.startswith("linux"):
    # The server's own parent is the training process; should that end before the prctl, the
    # server has no worker yet and ends as its "alive" pipe closes.
    killed_with_parent()
    os.register_at_fork(before=_note_forking, after_in_child=_end_with_forking_process)
