"""The shard cache's disk budget (`--cache-dir D --cache-limit SIZE`): the shards used last are kept, those no
process reads are evicted, a shard being written is never read, and processes and runs share one folder."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import open_cls, run_or_show_stacks, web_server

from luna_dist.common.cli import byte_size
from luna_dist.shards.cache import ShardCache
from luna_dist.shards.format import ShardSetError
from luna_dist.training.options import parse_args

SHARD = 100  # bytes of each stand-in shard of the cache's own tests


def _shard(name: str) -> tuple[bytes, str]:
    payload = name.encode() * (SHARD // len(name)) + b"." * (SHARD % len(name))
    return payload, hashlib.sha256(payload).hexdigest()


class _Server:
    """Where the cache's own tests download from: counts each shard's downloads."""

    def __init__(self):
        self.downloads = Counter()

    def open(self, cache: ShardCache, name: str):
        payload, sha256 = _shard(name)

        def download(file):
            self.downloads[name] += 1
            file.write(payload)

        return cache.open(f"{sha256[:16]}-{name}.tar", SHARD, sha256, download)


def _cached(folder: Path) -> set[str]:
    return {path.name.split("-", 1)[1].removesuffix(".tar") for path in folder.glob("*.tar")}


def test_the_cache_keeps_the_shards_used_last_within_its_budget_and_never_evicts_one_being_read(tmp_path):
    cache, server = ShardCache(str(tmp_path / "cache"), limit=int(2.5 * SHARD)), _Server()
    a = server.open(cache, "a")
    with server.open(cache, "b") as b:
        assert b.read() == _shard("b")[0]
    with server.open(cache, "c"):  # room for c: b goes, a is being read though used longer ago
        assert _cached(tmp_path / "cache") == {"a", "c"}
    assert a.read() == _shard("a")[0]
    a.close()
    with server.open(cache, "a"):  # a used again, from the cache
        pass
    with server.open(cache, "b"):  # evicted before: downloaded again; c is now the one used longest ago
        pass
    assert _cached(tmp_path / "cache") == {"a", "b"} and cache.usage() <= cache.limit
    assert server.downloads == {"a": 1, "b": 2, "c": 1}


def test_a_shard_the_budget_cannot_hold_beside_the_shards_being_read_is_left_to_be_streamed(tmp_path):
    cache, server = ShardCache(str(tmp_path / "cache"), limit=2 * SHARD), _Server()
    with server.open(cache, "a"), server.open(cache, "b"):
        assert server.open(cache, "c") is None  # read from its URL instead
        assert _cached(tmp_path / "cache") == {"a", "b"} and server.downloads["c"] == 0
    with server.open(cache, "c") as c:
        assert c.read() == _shard("c")[0]
    assert cache.usage() == 2 * SHARD


def test_a_damaged_copy_is_downloaded_again(tmp_path):
    cache, server = ShardCache(str(tmp_path / "cache")), _Server()
    server.open(cache, "a").close()
    copy = next((tmp_path / "cache").glob("*.tar"))
    copy.write_bytes(b"\0" * SHARD)
    with server.open(cache, "a") as a:
        assert a.read() == _shard("a")[0]
    assert server.downloads["a"] == 2


WRITER = """
import sys, time
from pathlib import Path
from luna_dist.shards.cache import ShardCache
name, size, sha256, ready = sys.argv[1:5]

def download(file):
    file.write(b"half")
    file.flush()
    Path(ready).touch()
    time.sleep(600)

ShardCache(sys.argv[5]).open(name, int(size), sha256, download)
"""


def test_a_shard_being_written_is_never_read_and_one_whose_writer_died_is_downloaded_again(tmp_path):
    """Another process's download is not read: the reader streams the shard; once that process is killed, its
    half-written file is removed and the shard downloaded and kept."""
    folder, ready = tmp_path / "cache", tmp_path / "ready"
    payload, sha256 = _shard("a")
    name = f"{sha256[:16]}-a.tar"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, name, str(SHARD), sha256, str(ready), str(folder)])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert writer.poll() is None and time.monotonic() < deadline, "the writer did not start its download"
            time.sleep(0.02)
        cache, server = ShardCache(str(folder)), _Server()
        assert server.open(cache, "a") is None and server.downloads["a"] == 0
        assert not (folder / name).exists() and (folder / f"{name}.partial").stat().st_size == SHARD  # reserved
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    with server.open(cache, "a") as a:
        assert a.read() == payload
    assert server.downloads["a"] == 1 and sorted(path.name for path in folder.iterdir()) == [".lock", name]


HOLDER = """
import fcntl, sys, time
from pathlib import Path
lock = open(Path(sys.argv[1]) / ".lock", "a+b")
fcntl.flock(lock, fcntl.LOCK_EX)
Path(sys.argv[2]).touch()
time.sleep(600)
"""


def test_a_process_that_holds_the_lock_too_long_is_named_not_waited_for(tmp_path):
    """A process stopped while it holds the lock (as SIGSTOP leaves it) would leave every other one waiting."""
    folder, ready = tmp_path / "cache", tmp_path / "ready"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(ready)])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline, "the holder did not take the lock"
            time.sleep(0.02)
        started = time.monotonic()
        with pytest.raises(ShardSetError) as err:
            _Server().open(ShardCache(str(folder), lock_timeout=0.5), "a")
        assert time.monotonic() - started < 5
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert str(err.value) == (f"{folder / '.lock'}: another process has held the shard cache's lock for 0.5 s (every "
                              "process sharing --cache-dir takes it for a moment): is one stopped? End it, or give "
                              "this run another --cache-dir")


def test_cache_limit_needs_cache_dir(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--shards", "https://host/shards/", "--cache-limit", "40GB"])
    assert "error: --cache-limit bounds the cache folder: give --cache-dir too" in capsys.readouterr().err
    assert parse_args(["--shards", "x", "--cache-dir", "c", "--cache-limit", "40GB"]).cache_limit == 40 * 10**9


@pytest.mark.parametrize(("text", "size"), [("40GB", 40 * 10**9), ("40G", 40 * 10**9), ("40GiB", 40 * 2**30),
                                            ("1.5tb", 1_500_000_000_000), ("500 MB", 500 * 10**6), ("1024", 1024)])
def test_cache_limit_sizes(text, size):
    assert byte_size(text) == size


@pytest.mark.parametrize("text", ["40XB", "GB", "-1GB", "4 0GB", "40iB"])
def test_a_cache_limit_that_is_no_size_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="is not a size: give e.g. 40GB"):
        byte_size(text)


def test_a_shard_larger_than_the_budget_is_refused_before_anything_is_read(tiny_shards, served, tmp_path):
    www, url = served
    shutil.copytree(tiny_shards, www / "shards")
    largest = max(json.loads((tiny_shards / "manifest.json").read_text())["shards"], key=lambda s: s["bytes"])
    with pytest.raises(ShardSetError) as err:
        open_cls(f"{url}/shards", cache_dir=tmp_path / "cache", cache_limit=largest["bytes"] - 1)
    assert str(err.value) == (f"--cache-limit {largest['bytes'] - 1:,} bytes cannot hold {url}/shards/{largest['name']} "
                              f"({largest['bytes']:,} bytes), the largest shard: raise it (a few shards a data worker "
                              "at least), or leave out --cache-dir to stream every shard")
    assert not (tmp_path / "cache").exists()


# -- training runs sharing a cache --------------------------------------------------------------------------------
@pytest.fixture
def counting_server(tmp_path):
    """(folder, URL, requests): a web server on 127.0.0.1 serving `folder` from a thread of this process,
    counting the requests for each path. Stopped after the test."""
    www = tmp_path / "www"
    www.mkdir()
    requests: Counter = Counter()

    def answer(handler) -> bool:
        requests[handler.path] += 1
        return False  # served from the folder

    with web_server(www, answer) as url:
        yield www, url, requests


@pytest.mark.slow
def test_two_runs_on_one_small_cache_stay_within_its_budget_and_read_every_sample(tiny_shards, counting_server,
                                                                                  tmp_path):
    """Two runs at once (a data worker each, every process streaming through one cache folder) of shards that
    total 3.5 times the budget: the folder never holds more (sampled every few milliseconds), and both runs
    read every sample (each shard's counts and sha256, each
    sample's CRC-32 are checked) and score the same."""
    www, url, requests = counting_server
    shutil.copytree(tiny_shards, www / "shards")
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    total = sum(shard["bytes"] for shard in manifest["shards"])
    limit = total * 2 // 7
    cache = ShardCache(str(tmp_path / "cache"), limit)
    sampled, done = [], threading.Event()

    def sample():
        while not done.is_set():
            sampled.append(cache.usage())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    commands = [[sys.executable, "-m", "luna_dist.train", "--shards", f"{url}/shards", "--cache-dir", cache.folder,
                 "--cache-limit", str(limit), "--out", str(tmp_path / "runs"), "--run-name", name, "--epochs", "2",
                 "--max-steps", "3", "--batch-size", "8", "--num-workers", "1", "--shuffle-buffer", "16", "--val-folds", "3",
                 "--metrics-json", str(tmp_path / f"{name}.json")] for name in ("one", "two")]
    try:
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda command: run_or_show_stacks(command, 300, env), commands))
    finally:
        done.set()
        sampler.join()
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    assert len(sampled) > 100 and limit // 2 < max(sampled) <= limit, (max(sampled), limit)
    fetched = {shard["name"]: shard["bytes"] for shard in manifest["shards"] if requests[f"/shards/{shard['name']}"]}
    assert sum(fetched.values()) > 2 * limit  # read from the server, far more than the cache could keep at once
    assert any(requests[f"/shards/{name}"] > 1 for name in fetched)  # evicted (or read as others held the budget)
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    counted = open_cls(tiny_shards)
    assert one["count/all"] == counted.count([3], "pos") + counted.count([3], "neg")
    assert {k: v for k, v in one.items() if k != "train_samples_per_s"} == \
           {k: v for k, v in two.items() if k != "train_samples_per_s"}
