"""Shared fixtures: one synthetic LUNA16-format data set per session, and its shard build.

Both are read-only for the tests that use them: a test that needs to change data or
shards copies them into its own `tmp_path` first.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from luna_dist.shard import BuildOptions, build
from luna_dist.synth import make_dataset

SYNTH_CTS = 10
SYNTH_SEED = 0
SHARD_WORKERS = 2
SHARD_MAX_SAMPLES = 150


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

    Built once per session with `luna_dist.shard.build` (2 workers, at most 150 samples
    per shard). Never modify it: rerunning a build in it, truncating or deleting files
    would change it for every later test; copy it first.
    """
    build(shard_build_options)
    return shard_build_options.out
