"""When a collective fails because another process died or froze: who stopped answering, and how to go on.

A rank whose sockets close (a crash, SIGKILL) fails the others at once; one that freezes
or vanishes (power, network, a hung driver) leaves them waiting until --dist-timeout. The
survivors then ask the launcher's rendezvous store who still answers: each checks in, and
the ranks that do not are named with their host and pid. The store lives with the
launcher of node 0; when it is gone too, node 0 is what died.
"""

from __future__ import annotations

import os
import re
import time
from datetime import timedelta

import torch

LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "Broken pipe",
             "Application timeout caused pair closure",
             "NCCL communicator was aborted", "Watchdog caught collective operation timeout")
"""How gloo and NCCL word a collective that failed because another process died (its sockets closed) or froze."""


def lost_peer_reason(error: BaseException) -> str | None:
    """The fact in a collective's error when another process died or froze ("Connection closed by peer"); None
    for any other error."""
    if not any(text in str(error) for text in LOST_PEER):
        return None
    # "[gloo/.../pair.cc:553] Connection closed by peer [127.0.0.1]:30084. This is typically ..." -> the fact.
    return re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip().splitlines()[-1]).split(". ")[0]


def silent_ranks(rank: int, world: int, processes: list[str], wait: float) -> str:
    """Which ranks stopped answering, by the rendezvous store at MASTER_ADDR:MASTER_PORT (`processes`: each
    rank's "host, pid"); every survivor checks in and waits up to `wait` seconds for the others."""
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 29500))
    try:
        store = torch.distributed.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=wait))
        store.set(f"luna_dist/alive/{rank}", "1")
        deadline = time.monotonic() + wait
        while (silent := [r for r in range(world) if not store.check([f"luna_dist/alive/{r}"])]) and \
                time.monotonic() < deadline:
            time.sleep(0.2)
    except (RuntimeError, OSError):
        node0 = range(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        silent = [r for r in node0 if r != rank]
        return (f"node 0, which holds the rendezvous at {host}:{port}, is unreachable "
                f"(rank(s) {', '.join(f'{r} on {processes[r]}' for r in silent)})")
    if not silent:
        return "every process checked in afterwards (a network fault?)"
    return f"rank(s) {', '.join(f'{r} on {processes[r]}' for r in silent)} stopped answering"


def lost_peers_message(error: BaseException, rank: int, processes: list[str], epoch: int, go_on: str,
                       wait: float) -> str | None:
    """The one line for a collective that failed because another process died or froze, else None.

    `epoch` is the epoch the run was in; `go_on` says what is saved and how to go on from it
    once the nodes are back.
    """
    world = len(processes)
    if world == 1 or (reason := lost_peer_reason(error)) is None:
        return None
    return (f"rank {rank} of {world} lost the others in epoch {epoch}: "
            f"{silent_ranks(rank, world, processes, wait)} ({reason}). Every process stops. {go_on}")
