"""launch/cv.sh: one run per validation fold, their predictions merged and scored over every series."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest

from luna_dist.shard import BuildOptions, build
from luna_dist.synth import make_dataset

ROOT = Path(__file__).resolve().parents[1]
NEGATIVES_PER_CT = 12


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    """4 CTs (folds 0-3) with every positive and a few negatives each: a fold trains in seconds."""
    data = tmp_path_factory.mktemp("cv") / "data"
    make_dataset(data, n_cts=4, seed=2)
    with open(data / "candidates.csv", newline="") as f:
        rows = list(csv.reader(f))
    kept, negatives = [rows[0]], {}
    for row in rows[1:]:
        negatives[row[0]] = negatives.get(row[0], 0) + (row[4] == "0")
        if row[4] == "1" or negatives[row[0]] <= NEGATIVES_PER_CT:
            kept.append(row)
    (data / "candidates.csv").write_text("".join(",".join(row) + "\n" for row in kept))
    out = data.parent / "shards"
    build(BuildOptions(data=data, out=out, workers=1, progress=False))
    return out


def cv(shards: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["launch/cv.sh", str(shards), "--epochs", "2", "--max-steps", "2", "--batch-size", "4",
                             "--balanced", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_cv_trains_each_fold_merges_and_scores_every_series(tiny_shards, tmp_path):
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    out = tmp_path / "cv"
    first = cv(tiny_shards, out)
    for fold in range(4):
        args = json.loads((out / f"fold{fold}" / "args.json").read_text())
        assert args["val_folds"] == f"[{fold}]"
        assert (out / f"fold{fold}" / "val-predictions-E2.csv").is_file()
    with open(out / "predictions.csv", newline="") as f:
        merged = list(csv.DictReader(f))
    # Every candidate once: each validation fold scored its own series, and together they are all series.
    assert len(merged) == manifest["counts"]["samples"]
    assert {row["seriesuid"] for row in merged} == {uid for entry in manifest["folds"].values() for uid in entry["series"]}
    score = json.loads((out / "cv-score.json").read_text())
    assert score["scans"] == 4
    assert score["nodules"] == sum(len(entry["annotations"]) for entry in manifest["folds"].values()) > 0
    assert score["cpm_ci"] is not None and 0 <= score["cpm"] <= 1
    assert "CPM" in first.stdout and "cross-validation of folds 0 1 2 3" in first.stdout

    # A rerun with the same flags trains nothing and gives the same merged file and score.
    before = (out / "predictions.csv").read_bytes()
    again = cv(tiny_shards, out)
    assert again.stdout.count("done, skipped") == 4
    assert (out / "predictions.csv").read_bytes() == before
    assert json.loads((out / "cv-score.json").read_text()) == score
