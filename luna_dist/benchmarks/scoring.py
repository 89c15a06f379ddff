"""The scoring benchmark: LUNA16's FROC at its size."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from luna_dist.evaluation.files import read_findings, read_marks, write_marks
from luna_dist.evaluation.luna16 import Findings, Marks, froc
from luna_dist.tables.candidates import read_series_list


def _write_findings(path: Path, found: Findings) -> None:
    lines = ["seriesuid,coordX,coordY,coordZ,diameter_mm"]
    lines += [f"{uid},{x:.3f},{y:.3f},{z:.3f},{d:.2f}" for uid, (x, y, z), d in
              zip(found.series.tolist(), found.xyz.tolist(), found.diameter.tolist())]
    path.write_text("\n".join(lines) + "\n")


def bench_evaluate(work: Path, scans: int, marks_per_scan: int, bootstrap: int) -> dict:
    """Score `scans` x ~`marks_per_scan` generated marks (LUNA16: 888 scans, 1,186 nodules).

    Marks lie in a 300 mm cube, a few on each nodule, and their probabilities favour
    the nodules, so every rule (hits, doubles, excluded findings, the 100-mark cap) works.
    """
    rng = np.random.default_rng(0)
    uids = np.array([f"1.3.6.1.4.1.14519.5.2.1.6279.6001.{i:030d}" for i in range(scans)])
    n_nodules = round(scans * 1186 / 888)
    nodules = Findings(uids[rng.integers(0, scans, n_nodules)], rng.uniform(-150, 150, (n_nodules, 3)),
                       rng.uniform(3, 30, n_nodules))
    n_excluded = 2 * n_nodules
    excluded = Findings(uids[rng.integers(0, scans, n_excluded)], rng.uniform(-150, 150, (n_excluded, 3)),
                        rng.choice([-1.0, 2.0, 5.0], n_excluded))
    n_random = scans * marks_per_scan - 3 * n_nodules
    on_nodule = np.repeat(np.arange(n_nodules), 3)
    marks = Marks(
        np.concatenate([uids[rng.integers(0, scans, n_random)], nodules.series[on_nodule]]),
        np.concatenate([rng.uniform(-150, 150, (n_random, 3)),
                        nodules.xyz[on_nodule] + rng.normal(0, 1, (3 * n_nodules, 3))]),
        np.concatenate([rng.beta(1, 8, n_random), rng.beta(4, 2, 3 * n_nodules)]),
    )
    work.mkdir(parents=True, exist_ok=True)
    paths = {name: work / f"{name}.csv" for name in ("seriesuids", "annotations", "excluded", "predictions")}
    paths["seriesuids"].write_text("seriesuid\n" + "\n".join(uids.tolist()) + "\n")
    _write_findings(paths["annotations"], nodules)
    _write_findings(paths["excluded"], excluded)
    write_marks(paths["predictions"], marks)

    started = time.perf_counter()
    series = read_series_list(paths["seriesuids"])
    read = (read_findings(paths["annotations"]), read_marks(paths["predictions"], series),
            read_findings(paths["excluded"], excluded=True))
    read_seconds = time.perf_counter() - started
    started = time.perf_counter()
    result = froc(series, read[0], read[1], read[2])
    score_seconds = time.perf_counter() - started
    started = time.perf_counter()
    froc(series, read[0], read[1], read[2], bootstrap=bootstrap)
    with_bootstrap_seconds = time.perf_counter() - started
    return {
        "scans": scans,
        "marks": len(marks.probability),
        "nodules": n_nodules,
        "cpm": result.cpm,
        "read_seconds": read_seconds,
        "score_seconds": score_seconds,
        "bootstrap": bootstrap,
        "score_with_bootstrap_seconds": with_bootstrap_seconds,
        "total_seconds": read_seconds + with_bootstrap_seconds,
    }
