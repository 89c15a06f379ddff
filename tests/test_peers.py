"""The diagnosis of a collective that failed: which errors mean a lost peer, who stopped answering by the
rendezvous store, and the one line that says how to go on."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch

from luna_dist.common.peers import lost_peer_reason, lost_peers_message, silent_ranks

GLOO_CLOSED = ("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:30084. "
               "This is typically caused by a process that crashed")
PROCESSES = ["node-a, 101", "node-a, 102", "node-b, 201", "node-b, 202"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def store(monkeypatch):
    """A rendezvous store as the launcher of node 0 holds it."""
    port = _free_port()
    master = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, timeout=timedelta(seconds=5))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    return master


def test_a_lost_peer_is_told_from_other_errors():
    assert lost_peer_reason(RuntimeError(GLOO_CLOSED)) == "Connection closed by peer [127.0.0.1]:30084"
    assert lost_peer_reason(RuntimeError("Timed out waiting 300000ms for recv operation to complete")) == \
        "Timed out waiting 300000ms for recv operation to complete"
    assert lost_peer_reason(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) is None
    assert lost_peer_reason(ValueError("fold9-neg-000000.tar: sample x: chunk.npy does not match its CRC-32")) is None


def test_the_ranks_that_do_not_check_in_are_named_with_host_and_pid(store):
    store.set("luna_dist/alive/1", "1")  # another survivor checked in
    assert silent_ranks(0, 4, PROCESSES, wait=0.5) == "rank(s) 2 on node-b, 201, 3 on node-b, 202 stopped answering"


def test_every_rank_checking_in_is_called_a_network_fault(store):
    for rank in (1, 2, 3):
        store.set(f"luna_dist/alive/{rank}", "1")
    assert silent_ranks(0, 4, PROCESSES, wait=0.5) == "every process checked in afterwards (a network fault?)"


def test_an_unreachable_store_means_node_0_is_gone(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    port = _free_port()
    monkeypatch.setenv("MASTER_PORT", str(port))
    assert silent_ranks(2, 4, PROCESSES, wait=0.3) == \
        f"node 0, which holds the rendezvous at 127.0.0.1:{port}, is unreachable (rank(s) 0 on node-a, 101, 1 on node-a, 102)"


def test_the_message_names_the_epoch_and_says_how_to_go_on(store):
    error = RuntimeError(GLOO_CLOSED)
    message = lost_peers_message(error, 0, PROCESSES, epoch=3, go_on="The last saved state ... is kept", wait=0.2)
    assert message.startswith("rank 0 of 4 lost the others in epoch 3: rank(s) 1 on node-a, 102, ")
    assert message.endswith("(Connection closed by peer [127.0.0.1]:30084). Every process stops. The last saved "
                            "state ... is kept")


def test_no_message_for_one_process_or_another_error():
    assert lost_peers_message(RuntimeError(GLOO_CLOSED), 0, PROCESSES[:1], 1, "", 0.5) is None
    assert lost_peers_message(RuntimeError("CUDA out of memory"), 0, PROCESSES, 1, "", 0.5) is None
