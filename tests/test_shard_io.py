"""Shard sets behind a URL (HTTP, a pipe command): read like the folder, checked against the manifest, cached,
and a frozen or dead server told apart from a damaged shard."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import sys
import time
from contextlib import suppress
from pathlib import Path

import pytest
from helpers import CLS_BATCHES, POS_NEG, web_server
from helpers import open_cls as open_shard_set
from webdataset.gopen import gopen

from luna_dist.data.streams import checked_samples, val_pipeline
from luna_dist.shards.format import MANIFEST, ShardSetError
from luna_dist.shards.sources import MAX_MANIFEST_BYTES, RemoteFile


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
    copies = sorted(cache.glob("*.tar"))
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


def test_a_manifest_never_runs_a_command_or_chooses_where_the_cache_writes(shard_dir, tmp_path):
    """A shard's name and sha256 come from the manifest, which the server sends: a name went into the `pipe:`
    command's shell line as it was, and the sha256 into the cache's file name."""
    marker = tmp_path / "ran"
    served = tmp_path / "served"
    served.mkdir()
    for file in shard_dir.iterdir():
        os.symlink(file, served / file.name)
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    name = manifest["shards"][0]["name"]
    hostile = {"name": f"{name}; touch {marker}"}, {"sha256": f"../../{tmp_path.name}-outside"}
    for damage in hostile:
        changed = json.loads(json.dumps(manifest))
        changed["shards"][0].update(damage)
        (served / "manifest.json").unlink()
        (served / "manifest.json").write_text(json.dumps(changed))
        field = next(iter(damage))
        with pytest.raises(ShardSetError) as err:
            shards = open_shard_set(f"pipe:cat {served}/{{name}}", cache_dir=tmp_path / "cache")
            list(val_pipeline(shards, [manifest["shards"][0]["fold"]], 16, POS_NEG, _keys))
        assert str(err.value).startswith(f"pipe:cat {served}/manifest.json: shard entry 0 has a {field} that is no "), \
            str(err.value)
        assert not marker.exists() and not list(tmp_path.parent.glob(f"*{tmp_path.name}-outside*"))


# -- servers that answer wrongly -------------------------------------------------------------------------------
CAP = 256 << 20
"""The most any endless answer below sends, so that a reader without bounds fails a test rather than the machine."""


@pytest.fixture
def odd_server(tmp_path):
    """(folder, URL, answers): a web server on 127.0.0.1 serving `folder`, in a thread of this process; a request
    for a path ending with a key of the dict `answers` is answered by its value, a function (handler, file, stop)
    that writes the whole answer (`stop`: set when the test ends). Stopped after the test."""
    import threading

    www = tmp_path / "odd-www"
    www.mkdir()
    answers: dict = {}
    stop = threading.Event()

    def answer(handler) -> bool:
        odd = next((value for key, value in answers.items() if handler.path.endswith(key)), None)
        if odd is None:
            return False
        with suppress(OSError):  # the reader hung up
            odd(handler, www / handler.path.lstrip("/"), stop)
        return True

    with web_server(www, answer) as url:
        try:
            yield www, url, answers
        finally:
            stop.set()


def _head(handler, status: int = 200, **headers) -> None:
    handler.send_response(status)
    for name, value in headers.items():
        handler.send_header(name.replace("_", "-"), str(value))
    handler.end_headers()


def endless(handler, file: Path, stop) -> None:
    """The file, then spaces for ever (up to CAP), without a Content-Length."""
    _head(handler, Content_Type="application/octet-stream")
    handler.wfile.write(file.read_bytes())
    block, sent = b" " * (1 << 16), 0
    while sent < CAP and not stop.is_set():
        handler.wfile.write(block)
        sent += len(block)


def drip(handler, file: Path, stop) -> None:
    """The file's bytes at 2 a second (for 20 s at most): never a second without a byte."""
    data = file.read_bytes()
    _head(handler, Content_Length=len(data))
    for n in range(40):
        handler.wfile.write(data[n:n + 1])
        handler.wfile.flush()
        if stop.wait(0.5):
            return


def gzipped(handler, file: Path, stop) -> None:
    data = gzip.compress(file.read_bytes())
    _head(handler, Content_Type="application/json", Content_Encoding="gzip", Content_Length=len(data))
    handler.wfile.write(data)


def short_length(handler, file: Path, stop) -> None:
    """A Content-Length of half the file (a proxy's, a broken server's), then the whole file."""
    data = file.read_bytes()
    _head(handler, Content_Type="application/octet-stream", Content_Length=len(data) // 2)
    handler.wfile.write(data)


def portal(handler, file: Path, stop) -> None:
    """What a network's login page answers for any URL."""
    data = b"<html><body>Please sign in to use this network</body></html>"
    _head(handler, Content_Type="text/html; charset=utf-8", Content_Length=len(data))
    handler.wfile.write(data)


def to_file(handler, file: Path, stop) -> None:
    _head(handler, 302, Location=f"file://{file}")


def _one_shard(shards, fold: int = 3) -> str:
    return sorted(shards.shards([fold], "neg"))[0]


def test_an_endless_manifest_is_refused_after_its_bound(tiny_shards, odd_server):
    """It grew the reader's memory to 5 GB in 10 s."""
    www, url, answers = odd_server
    shutil.copytree(tiny_shards, www / "shards")
    answers["manifest.json"] = endless
    started = time.monotonic()
    with pytest.raises(ShardSetError) as err:
        open_shard_set(f"{url}/shards")
    assert str(err.value) == (f"{url}/shards/manifest.json: the server sends more than {MAX_MANIFEST_BYTES:,} bytes, "
                              "~10 times a LUNA16 build's manifest: not a shard manifest (an endless answer?); check "
                              "the URL and the server")
    assert time.monotonic() - started < 20


def test_a_shard_that_goes_on_past_its_size_is_refused_naming_it(tiny_shards, odd_server):
    """Its reader drained the stream to its end, and an endless one never ended."""
    www, url, answers = odd_server
    shutil.copytree(tiny_shards, www / "shards")
    shards = open_shard_set(f"{url}/shards", read_timeout=2)
    location = _one_shard(shards)
    answers[location.rsplit("/", 1)[1]] = endless
    started = time.monotonic()
    with pytest.raises(ShardSetError) as err:
        list(checked_samples(iter([{"url": location}]), shards.source))
    size = shards.source.entries[location][1]
    assert str(err.value) == (f"{location}: the server sends more than the {size:,} bytes the manifest gives this "
                              "shard: another file is there (or one that never ends); check what it serves, then "
                              "rerun with --resume")
    assert time.monotonic() - started < 20


def test_a_server_that_drips_fails_within_the_read_timeout(tiny_shards, odd_server):
    """Two bytes a second never tripped curl's `--speed-limit 1`: a timeout per read is not a bound."""
    www, url, answers = odd_server
    shutil.copytree(tiny_shards, www / "shards")
    shards = open_shard_set(f"{url}/shards", read_timeout=1)
    location = _one_shard(shards)
    answers[location.rsplit("/", 1)[1]] = drip
    started = time.monotonic()
    with pytest.raises(ShardSetError) as err:
        list(checked_samples(iter([{"url": location}]), shards.source))
    assert time.monotonic() - started < 10
    assert re.fullmatch(rf"{re.escape(location)}: reading it from its server failed after \d bytes: only \d bytes "
                        r"arrived in 1 s, less than the 1 MiB due in that time \(a stalled or dripping server or "
                        r"network; --read-timeout sets this bound\)\. A fault of the server or the network, not of "
                        r"the shard: check it \(or the pipe: command\), then rerun with --resume", str(err.value))


def test_a_gzip_encoded_manifest_is_read(tiny_shards, odd_server):
    www, url, answers = odd_server
    shutil.copytree(tiny_shards, www / "shards")
    answers["manifest.json"] = gzipped
    assert open_shard_set(f"{url}/shards").manifest == json.loads((tiny_shards / MANIFEST).read_text())


@pytest.mark.parametrize("answer, told", [
    (portal, r"HTTP 200, Content-Type text/html; charset=utf-8, 60 bytes\) is not a shard manifest \(Expecting value"),
    (short_length, r"HTTP 200, Content-Type application/octet-stream, [\d,]+ bytes\) is not a shard manifest \("),
], ids=["login-page", "short-content-length"])
def test_a_server_answering_something_else_for_the_manifest_is_blamed_not_the_shards(tiny_shards, odd_server, answer,
                                                                                      told):
    """A network's login page, or a Content-Length cut short, were called shards to rebuild."""
    www, url, answers = odd_server
    shutil.copytree(tiny_shards, www / "shards")
    answers["manifest.json"] = answer
    with pytest.raises(ShardSetError) as err:
        open_shard_set(f"{url}/shards")
    assert re.fullmatch(rf"{re.escape(url)}/shards/manifest.json: what the server answered \({told}.*\): check the "
                        r"URL and what the server sends there \(a network's login page\? a cut answer\?\)",
                        str(err.value)), str(err.value)
    assert "rebuild" not in str(err.value)


def test_a_shard_answered_with_a_short_content_length_is_the_servers_fault(tiny_shards, odd_server):
    www, url, answers = odd_server
    shutil.copytree(tiny_shards, www / "shards")
    shards = open_shard_set(f"{url}/shards")
    location = _one_shard(shards)
    answers[location.rsplit("/", 1)[1]] = short_length
    with pytest.raises(ShardSetError) as err:
        list(checked_samples(iter([{"url": location}]), shards.source))
    size = shards.source.entries[location][1]
    assert str(err.value) == (f"{location}: the server ended its answer (HTTP 200, Content-Type application/octet-stream, "
                              f"{size // 2:,} bytes) short of the {size:,} bytes the manifest gives this shard: it "
                              "answers wrongly (a cut or other file at that URL, a proxy?), not a damaged shard: "
                              "check what it serves, then rerun with --resume")


def test_a_redirect_to_a_local_file_is_refused_saying_so(tiny_shards, odd_server):
    www, url, answers = odd_server
    shutil.copytree(tiny_shards, www / "shards")
    answers["manifest.json"] = to_file
    with pytest.raises(ShardSetError) as err:
        open_shard_set(f"{url}/shards")
    assert str(err.value) == (f"{url}/shards/manifest.json: it redirects to file://{www}/shards/manifest.json, which "
                              "is refused: only http:// and https:// redirects are followed")


def _piped(script: str, read_timeout: float) -> RemoteFile:
    """What a `pipe:` command running the Python `script` prints, as a remote file."""
    location = f"pipe:{sys.executable} -c '{script}'"
    return RemoteFile(location, gopen(location), read_timeout)


def test_a_slow_but_steady_file_and_a_reader_that_pauses_are_not_stalls():
    """The bound is a rate, not a deadline: 10 MiB sent over twice the read timeout (0.4 s), at five times the
    least rate it asks, are read whole; and time the consumer spends away (longer than the timeout) does not count."""
    steady = ("import sys, time\n"
              "for _ in range(80): sys.stdout.buffer.write(bytes(1 << 17)); sys.stdout.flush(); time.sleep(0.01)")
    with _piped(steady, read_timeout=0.4) as remote:
        first = remote.read(1)
        time.sleep(0.6)
        data = first + b"".join(iter(lambda: remote.read(1 << 20), b""))
    assert len(data) == 80 << 17 and remote.ended
    with _piped("import time; time.sleep(30)", read_timeout=0.5) as frozen:
        started = time.monotonic()
        with pytest.raises(ShardSetError, match=r"failed after 0 bytes: nothing arrived for 0.5 s"):
            frozen.read(1)
        assert time.monotonic() - started < 5
        process = frozen.process
    assert process.poll() is not None  # ended with the file
