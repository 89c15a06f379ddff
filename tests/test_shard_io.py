"""Shard sets behind a URL (HTTP, a pipe command): read like the folder, checked against the manifest, cached,
and a frozen or dead server told apart from a damaged shard."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import pytest
from helpers import CLS_BATCHES, POS_NEG
from helpers import open_cls as open_shard_set

from luna_dist.shard_format import ShardSetError
from luna_dist.stream import val_pipeline


def _serve_copy(shard_dir, www) -> Path:
    shutil.copytree(shard_dir, www / "shards")
    return www / "shards"


@pytest.mark.slow
def test_shards_over_http_read_like_the_folder(shard_dir, served, tmp_path):
    www, url = served
    _serve_copy(shard_dir, www)
    local, remote = open_shard_set(shard_dir), open_shard_set(f"{url}/shards/")
    assert remote.manifest == local.manifest
    assert remote.shards([9], "neg") == [f"{url}/shards/{Path(p).name}" for p in local.shards([9], "neg")]
    keys = {}
    for name, shards in (("local", local), ("http", remote)):
        keys[name] = [key for batch in val_pipeline(shards, [9], 16, POS_NEG, _keys) for key in batch]
    assert keys["http"] == keys["local"] and len(keys["local"]) == local.count([9], "pos") + local.count([9], "neg")
    assert remote.verify()[0] == []


def _keys(samples, batch_size: int):
    """A batcher that keeps only the sample keys."""
    batch = []
    for sample in samples:
        batch.append(sample["__key__"])
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


@pytest.mark.slow
def test_bytes_served_must_match_the_manifest(shard_dir, served):
    """A byte changed after the tar's end: no sample differs, but the sha256 of the stream does."""
    www, url = served
    copy = _serve_copy(shard_dir, www)
    victim = sorted(copy.glob("fold9-neg-*.tar"))[0]
    with open(victim, "r+b") as file:
        file.seek(-1, 2)
        file.write(b"\1")
    shards = open_shard_set(f"{url}/shards")
    with pytest.raises(ShardSetError) as err:
        list(val_pipeline(shards, [9], 16, POS_NEG, CLS_BATCHES))
    assert str(err.value).startswith(f"{url}/shards/{victim.name}: {victim.stat().st_size} bytes streamed with sha256")
    problems = shards.verify()[0]
    assert len(problems) == 1 and problems[0].startswith(f"{url}/shards/{victim.name}: ")


def test_cache_keeps_checked_copies_and_replaces_a_damaged_one(shard_dir, served, tmp_path):
    www, url = served
    _serve_copy(shard_dir, www)
    cache = tmp_path / "cache"
    shards = open_shard_set(f"{url}/shards", cache_dir=cache)
    first = list(val_pipeline(shards, [9], 16, POS_NEG, _keys))
    copies = sorted(cache.iterdir())
    assert len(copies) == len(shards.shards([9], "pos") + shards.shards([9], "neg"))
    damaged = copies[0]
    damaged.write_bytes(b"\0" * damaged.stat().st_size)  # same size, other bytes
    assert list(val_pipeline(shards, [9], 16, POS_NEG, _keys)) == first  # fetched again, not used
    source = shards.source
    location = next(loc for loc in source.entries if damaged.name.endswith(loc.rsplit("/", 1)[-1]))
    assert damaged.read_bytes()[:512] != b"\0" * 512
    assert source.entries[location][2] == sha256_of(damaged)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_frozen_server_fails_within_the_read_timeout_naming_the_url(tiny_shards, stalling_server):
    """curl had a connect timeout only: a server that accepts and then sends nothing hung the reader for ever."""
    www, url, stall = stalling_server
    shutil.copytree(tiny_shards, www / "shards")
    stall.add("manifest.json")
    started = time.monotonic()
    with pytest.raises(ShardSetError) as err:
        open_shard_set(f"{url}/shards", read_timeout=1)
    assert str(err.value) == f"{url}/shards/manifest.json: nothing arrived for 1 s (a stalled server or network; " \
                             "--read-timeout sets this bound)"
    stall.clear()
    stall.add(".tar")
    shards = open_shard_set(f"{url}/shards", read_timeout=1)
    with pytest.raises(ShardSetError) as err:
        list(val_pipeline(shards, [3], 16, POS_NEG, CLS_BATCHES))
    assert time.monotonic() - started < 20
    first = sorted(shards.shards([3], "neg") + shards.shards([3], "pos"))[0]
    assert str(err.value).startswith(f"{first}: reading it from its server failed after 0 bytes: nothing arrived for "
                                     "1 s"), str(err.value)
    assert "not of the shard" in str(err.value) and "damaged" not in str(err.value)


def test_a_dead_server_is_not_called_a_damaged_shard(tiny_shards, stalling_server, tmp_path):
    www, url, _ = stalling_server
    shutil.copytree(tiny_shards, www / "shards")
    shards = open_shard_set(f"{url}/shards", read_timeout=2)
    shutil.rmtree(www / "shards")  # the manifest was read; now the server has nothing (404)
    with pytest.raises(ShardSetError) as err:
        list(val_pipeline(shards, [3], 16, POS_NEG, CLS_BATCHES))
    assert "reading it from its server failed after 0 bytes: the server answers with an HTTP error" in str(err.value)
    assert "damaged" not in str(err.value) and "rebuild" not in str(err.value)
    with pytest.raises(ShardSetError) as err:
        open_shard_set(f"{url}/shards")
    assert str(err.value).startswith(f"{url}/shards/manifest.json not found: {url}/shards must be where the files of a "
                                     "finished shard build are served")
    assert "luna_dist.shard" not in str(err.value)  # no hint to build shards at a URL


def test_pipe_shard_set_runs_a_command_per_file(shard_dir):
    local, piped = open_shard_set(shard_dir), open_shard_set(f"pipe:cat {shard_dir}/{{name}}")
    assert piped.manifest == local.manifest
    keys = [[key for batch in val_pipeline(shards, [9], 16, POS_NEG, _keys) for key in batch]
            for shards in (local, piped)]
    assert keys[0] == keys[1]
    with pytest.raises(ShardSetError, match="needs {name}"):
        open_shard_set(f"pipe:cat {shard_dir}/manifest.json")
