"""Shared fixtures: one synthetic LUNA16-format data set per session, and its shard build.

Both are read-only for the tests that use them: a test that needs to change data or
shards copies them into its own `tmp_path` first.
"""

from __future__ import annotations

import csv
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import (
    SEG_NEGATIVES,
    SHARD_MAX_SAMPLES,
    SHARD_WORKERS,
    SYNTH_CTS,
    SYNTH_SEED,
    TINY_NEGATIVES,
    web_server,
)

from luna_dist.shards.build import build
from luna_dist.shards.options import BuildOptions
from luna_dist.synthetic.generator import make_dataset


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """Folder of a synthetic LUNA16-format data set: 10 small CTs (seed 0), CT k in subset{k}.

    Holds `subsetK/<uid>.mhd` + `.raw`, `candidates.csv`, `annotations.csv` and
    `annotations_with_malignancy.csv`. Shared by the whole session: never modify it;
    copy it (`shutil.copytree`) into `tmp_path` to change anything.
    """
    out = tmp_path_factory.mktemp("synth") / "luna"
    make_dataset(out, n_cts=SYNTH_CTS, seed=SYNTH_SEED)
    return out


@pytest.fixture(scope="session")
def shard_build_options(synth_data, tmp_path_factory) -> BuildOptions:
    """The options `shard_dir` was built with (workers 2, 150 samples per shard, no progress bar)."""
    return BuildOptions(
        data=synth_data,
        out=tmp_path_factory.mktemp("shards") / "luna",
        workers=SHARD_WORKERS,
        max_samples=SHARD_MAX_SAMPLES,
        progress=False,
    )


@pytest.fixture(scope="session")
def shard_dir(shard_build_options) -> Path:
    """Folder of a finished shard build of `synth_data` (manifest.json + fold{K}-{pos,neg}-NNNNNN.tar).

    Built once per session with `luna_dist.shards.build.build` (2 workers, at most 150 samples
    per shard). Never modify it: rerunning a build in it, truncating or deleting files
    would change it for every later test; copy it first.
    """
    build(shard_build_options)
    return shard_build_options.out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A synthetic data set of 4 CTs (seed 2, CT k in subset{k}) with every positive and 12 negatives of
    each: a fold of about 20 samples, so a run trains and validates in a few seconds. Never modify it."""
    data = tmp_path_factory.mktemp("tiny") / "data"
    make_dataset(data, n_cts=4, seed=2)
    with open(data / "candidates.csv", newline="") as f:
        rows = list(csv.reader(f))
    kept, negatives = [rows[0]], {}
    for row in rows[1:]:
        negatives[row[0]] = negatives.get(row[0], 0) + (row[4] == "0")
        if row[4] == "1" or negatives[row[0]] <= TINY_NEGATIVES:
            kept.append(row)
    (data / "candidates.csv").write_text("".join(",".join(row) + "\n" for row in kept))
    return data


@pytest.fixture(scope="session")
def tiny_shards(tiny_data) -> Path:
    """The classification build of `tiny_data`, at most 10 samples a shard (so the training folds 0-2 hold
    an odd number of shards of unequal sizes). Never modify it; copy it first."""
    out = tiny_data.parent / "shards"
    build(BuildOptions(data=tiny_data, out=out, workers=1, max_samples=10, progress=False))
    return out


@pytest.fixture(scope="session")
def tiny_seg_shards(tiny_data) -> Path:
    """The segmentation build of `tiny_data` (12 negative stacks per CT). Never modify it; copy it first."""
    out = tiny_data.parent / "seg-shards"
    build(BuildOptions(data=tiny_data, out=out, task="seg", workers=1, seg_negatives=SEG_NEGATIVES, progress=False))
    return out


@pytest.fixture(scope="session")
def seg_shard_dir(synth_data, tmp_path_factory) -> Path:
    """Folder of a finished `--task seg` build of `synth_data` (12 negatives per CT, 2 workers).

    Never modify it; copy it first.
    """
    out = tmp_path_factory.mktemp("seg") / "shards"
    build(BuildOptions(data=synth_data, out=out, task="seg", workers=SHARD_WORKERS, seg_negatives=SEG_NEGATIVES,
                       progress=False))
    return out


@pytest.fixture
def served(tmp_path):
    """(folder, URL): an empty folder the test fills, served on 127.0.0.1 by `python -m http.server`, stopped after."""
    www = tmp_path / "www"
    www.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                               str(www)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "http.server did not start"
                time.sleep(0.1)
        yield www, url
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def stalling_server(tmp_path):
    """(folder, URL, stall): a web server on 127.0.0.1 serving `folder`, in a thread of this process; a
    request for a file whose name ends with one of the suffixes in the set `stall` is accepted and never
    answered, as by a frozen server. Stopped after the test."""
    import threading

    www = tmp_path / "frozen-www"
    www.mkdir()
    stall: set[str] = set()
    stopped = threading.Event()

    def answer(handler) -> bool:
        if not any(handler.path.endswith(suffix) for suffix in stall):
            return False
        stopped.wait(60)  # holds the connection open, sending nothing
        return True

    with web_server(www, answer) as url:
        try:
            yield www, url, stall
        finally:
            stopped.set()


@pytest.fixture
def sigterm_raises():
    """SIGTERM raises KeyboardInterrupt in this test where the code under test does not handle it, rather than
    ending the test run."""
    def raise_keyboard_interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt in this test, also where the suite was started ignoring it (nohup)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
