"""launch/cv.sh: one run per validation fold, their predictions merged and scored over every series."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from luna_dist.models import provenance

ROOT = Path(__file__).resolve().parents[1]


def cv(shards: Path, out: Path, cwd: Path, *flags: str, check: bool = True) -> subprocess.CompletedProcess:
    """launch/cv.sh started in `cwd` (where relative SHARDS and OUT are taken from) with the test's train flags."""
    # `python` in the script is the interpreter running the tests, as in an activated venv.
    env = {**os.environ, "OUT": str(out), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([str(ROOT / "launch" / "cv.sh"), str(shards), "--epochs", "1", "--max-steps", "2",
                             "--batch-size", "4", "--balanced", "1", "--num-workers", "0", *flags], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=240)
    if check:
        assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_cv_trains_each_fold_merges_and_scores_every_series(tiny_shards, tmp_path):
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    # Started elsewhere, with SHARDS and OUT relative to where it is started: results land there.
    (tmp_path / "shards").symlink_to(tiny_shards)
    out = tmp_path / "cv"
    first = cv(Path("shards"), Path("cv"), tmp_path)
    for fold in range(4):
        record = json.loads((out / f"fold{fold}" / "args.json").read_text())
        assert record["arguments"]["val_folds"] == f"[{fold}]"
        # Each fold's best.pt is its last epoch, chosen on no fold: fold K can be scored with it.
        assert record["provenance"]["selected_on"] == [] and fold not in record["provenance"]["trained_on"]
        assert (out / f"fold{fold}" / "val-predictions-E1.csv").is_file()
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
    # What made the merged marks goes with them: each fold's marks, by a model that did not see that fold.
    parts = provenance.read_sidecar(out / "predictions.csv")
    assert sorted(part.series for part in parts) == sorted(tuple(entry["series"]) for entry in manifest["folds"].values())

    # A rerun with the same flags trains nothing and gives the same merged file and score.
    before = (out / "predictions.csv").read_bytes()
    again = cv(tiny_shards, out, tmp_path)
    assert again.stdout.count("done, skipped") == 4
    assert (out / "predictions.csv").read_bytes() == before
    assert json.loads((out / "cv-score.json").read_text()) == score

    # With another learning rate the trained folds are not relabelled as its results: refused, naming the flag.
    done = (out / "fold0" / "cv-done").read_text()
    other = cv(tiny_shards, out, tmp_path, "--lr", "0.01", check=False)
    assert other.returncode == 1
    assert "--lr 0.001 (now 0.01)" in other.stderr and "fold 0 failed" in other.stderr
    assert (out / "fold0" / "cv-done").read_text() == done
    assert json.loads((out / "fold0" / "args.json").read_text())["arguments"]["lr"] == "0.001"
    assert (out / "predictions.csv").read_bytes() == before
