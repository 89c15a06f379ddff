"""A full-scale stand-in of the real LUNA16 download, built from the real tables: every one of its
888 series, its layout, its real annotations, and a candidate table of LUNA16's size and mix, with
small synthetic CTs. What needs the real scale (a shard build over 551,065 candidates, a 10-fold
run, the evaluation of 888 scans) can be rehearsed and timed before the 120 GB arrive.

Layout under OUT (where the download and its evaluation kit put each file)::

    subset0/ .. subset9/                     <uid>.mhd + <uid>.raw (int16 HU), one CT per series
    annotations.csv                          the real rows of the kept series, as text
    annotations_with_malignancy.csv          the book's table (mal_bool, mal_details, ...), likewise
    candidates.csv                           synthetic: seriesuid,coordX,coordY,coordZ,class
    evaluationScript/annotations/annotations_excluded.csv   the real rows, as text
    evaluationScript/annotations/seriesuids.csv             the real lines, no header

What is real and what is not:

- The tables are copied line by line (numbers are never re-formatted) for the first --series
  series of seriesuids.csv, in its order; every table row of another series is left out.
- Subsets: the k-th series of seriesuids.csv goes to subset{k % 10}. The real membership is
  not in the tables, so the folds are not the real folds (their sizes are: 88 or 89 series).
- Geometry: each CT's box holds all of its series' annotated nodules and excluded findings
  with MARGIN_MM around them, and at least a chest (MIN_FOV_MM across, MIN_LENGTH_MM long);
  a series without findings gets that chest around DEFAULT_CENTRE_MM. The voxel counts are
  --shape, so the spacing follows: square in-plane pixels, another slice spacing, as in a CT.
  The direction is the identity, as in every LUNA16 scan.
- Contents: the chest phantom of `luna_dist.synthetic.phantom` (body, fat, spine, lungs, vessels) laid
  out over the box, with the real nodules drawn at their annotated centres and diameters,
  malignant-looking where the malignancy table says so. The phantom's anatomy is scaled to
  the box, not fitted to the findings, so a nodule may sit in soft tissue or fat rather than
  lung, and one smaller than a voxel may cover no voxel centre at the default shape. Excluded
  findings are not drawn.
- Candidates (synthetic; the real table is not in the kit's tables): FULL_CANDIDATES rows of
  which FULL_POSITIVES class 1 at 888 series, both scaled by series / 888 (or --candidates
  for the total). Class 1: at least one inside each annotated nodule, within half its radius
  of the centre, the rows beyond one per nodule going to the largest nodules first, so the
  build's join (a class-1 candidate takes the annotation whose sphere holds it) finds each.
  Class 0: one near each excluded finding (within FINDING_JITTER_MM; a random share of them
  when the total is too small), the rest anywhere in the body; none inside a nodule's sphere.
  Rows are grouped by series in sorted UID order, as in the real table, shuffled within one.

Series k draws its CT from its own generator seeded by (seed, k), as `luna_dist.synthetic.generator`
does, so CT k is the same whatever --series or --candidates; its candidates draw from (seed, k, 1).
The same arguments give byte-identical files. A CT is written into OUT.partial/ (beside OUT, where
no reader looks for .mhd files) and moved into its subset once complete, and each table is
written whole (`luna_dist.common.atomic`), so a killed run leaves only whole files in OUT; a
rerun rewrites them (CTs of series a rerun no longer keeps are left where they are).

The command is `luna_dist/rehearsal.py` (``python -m luna_dist.rehearsal OUT --tables DIR``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from luna_dist.common.atomic import atomic_open
from luna_dist.common.out_folder import file_name
from luna_dist.synthetic.generator import CANDIDATES_HEADER, MIN_SHAPE, N_SUBSETS, write_ct
from luna_dist.synthetic.phantom import Phantom, ScanGeometry, draw_nodule, draw_phantom, render, unit_ball
from luna_dist.synthetic.placing import in_body
from luna_dist.tables.candidates import Annotation, read_annotations, read_series_list

TABLES = {
    "annotations": "annotations.csv",
    "excluded": "annotations_excluded.csv",
    "seriesuids": "seriesuids.csv",
    "malignancy": "annotations_with_malignancy.csv",
}
"""The real tables --tables must hold, by the name this module gives each."""
COPIED_TO = {
    "annotations": Path("annotations.csv"),
    "malignancy": Path("annotations_with_malignancy.csv"),
    "excluded": Path("evaluationScript", "annotations", "annotations_excluded.csv"),
    "seriesuids": Path("evaluationScript", "annotations", "seriesuids.csv"),
}
"""Where under OUT each real table's rows go: where the download and its evaluation kit keep it."""

DEFAULT_SHAPE = (64, 128, 128)
"""(slices, rows, columns): 2 MB a CT, so the 888 CTs take 1.9 GB (about 15 s with 2 workers on 2 cores)."""
MARGIN_MM = 30.0
"""Room around every finding: more than the 24 mm half-width of a 48-voxel chunk at 1 mm."""
MIN_FOV_MM = 320.0
MIN_LENGTH_MM = 280.0
"""A chest-sized box (field of view across, scan length along z) even around a single finding."""
DEFAULT_CENTRE_MM = (0.0, 0.0, -150.0)
"""X/Y/Z centre of a series without findings: about the median centre of the real series' findings."""

FULL_SERIES = 888
FULL_CANDIDATES = 551_065
FULL_POSITIVES = 1_351
"""LUNA16's candidates.csv: its rows and its class-1 rows, over its 888 series."""
POSITIVE_REACH = 0.5
"""Class-1 rows lie within this fraction of their nodule's radius from its centre."""
FINDING_JITTER_MM = 3.0
"""A class-0 row on an excluded finding lies within this of it: near the mark, as a CAD system reports it."""
MAX_REDRAWS = 100
"""Rounds of drawing again the rows that land in a nodule or on another row; a handful suffice."""


class RehearsalError(ValueError):
    """The tables or flags cannot make a rehearsal; the message names the file or flag to fix."""


@dataclass(frozen=True, eq=False)
class Series:
    """One series of the real tables: what its CT must hold and its candidates must mark."""

    k: int  # its line in seriesuids.csv, from 0: seeds its CT and candidates, picks subset{k % 10}
    uid: str
    nodules: np.ndarray  # (n, 4) X/Y/Z mm and diameter mm, the rows of annotations.csv
    malignant: tuple[bool | None, ...]  # per nodule, from the malignancy table; None where no row matches
    excluded: np.ndarray  # (m, 4) likewise from annotations_excluded.csv; diameter -1 where unknown


@dataclass(frozen=True, eq=False)
class _Job:
    """What one worker needs to write a series' CT and draw its candidates."""

    series: Series
    positives: np.ndarray  # (n,) class-1 rows per nodule
    negatives: int
    seed: int
    shape: tuple[int, int, int]
    out: Path
    partial: Path


@dataclass(frozen=True)
class RehearsalSummary:
    """What make_rehearsal wrote, for callers and tests."""

    out: Path
    series: int
    candidates: int
    positives: int
    nodules: int
    excluded: int
    bytes: int
    seconds: float

    def __str__(self) -> str:
        return (f"wrote {self.series} CTs to {self.out}: {self.candidates:,} candidates ({self.positives:,} class 1), "
                f"{self.nodules:,} nodules, {self.excluded:,} excluded findings; {self.bytes / 1e9:.2f} GB in "
                f"{self.seconds:.0f} s")


def _read_findings(path: Path, excluded: bool = False) -> dict[str, list[Annotation]]:
    """A table's rows by series; a row that does not parse is refused, as it could not be copied unread."""
    rows, bad = read_annotations(path, allow_unknown_diameter=excluded)
    if bad:
        raise RehearsalError(f"{bad[0]}; --tables must hold the LUNA16 tables unchanged")
    by_series: dict[str, list[Annotation]] = defaultdict(list)
    for row in rows:
        by_series[row.series_uid].append(row)
    return by_series


def _as_array(rows: list[Annotation]) -> np.ndarray:
    return np.array([[*row.center_xyz, row.diameter_mm] for row in rows], dtype=np.float64).reshape(-1, 4)


def _malignancy_of(nodules: np.ndarray, rated: list[Annotation]) -> tuple[bool | None, ...]:
    """Each nodule's mal_bool: the nearest row of the malignancy table whose sphere holds its centre.

    The book's table repeats annotations.csv's nodules with centres that differ in the last
    digits (and lacks four), so rows are matched by place, as the build's join matches them.
    """
    if not rated:
        return (None,) * len(nodules)
    rated_xyz = np.array([row.center_xyz for row in rated])
    rated_radius = np.array([row.diameter_mm / 2 for row in rated])
    gap = np.linalg.norm(nodules[:, None, :3] - rated_xyz[None], axis=2)
    gap[gap > rated_radius] = np.inf
    nearest = gap.argmin(axis=1)
    return tuple(rated[j].is_malignant if np.isfinite(gap[i, j]) else None for i, j in enumerate(nearest))


def read_series(tables: Path, n_series: int | None = None) -> list[Series]:
    """The first n_series series of seriesuids.csv (all with None) with their rows of the other tables."""
    missing = [name for name in TABLES.values() if not (tables / name).is_file()]
    if missing:
        raise RehearsalError(f"{tables}: lacks {', '.join(missing)}; --tables names the folder of the real LUNA16 "
                             f"tables ({', '.join(TABLES.values())})")
    uids = read_series_list(tables / TABLES["seriesuids"])
    if n_series is not None and n_series > len(uids):
        raise RehearsalError(f"--series {n_series} is more than the {len(uids)} series of "
                             f"{tables / TABLES['seriesuids']}")
    nodules = _read_findings(tables / TABLES["annotations"])
    excluded = _read_findings(tables / TABLES["excluded"], excluded=True)
    rated = _read_findings(tables / TABLES["malignancy"])
    for uid in uids[:n_series]:  # each names its files, as LUNA16's download does: it must name nothing else
        if file_name(uid) != uid:
            raise RehearsalError(f"{tables / TABLES['seriesuids']}: the series {uid!r} is not a uid that can name "
                                 "its files (LUNA16's are digits and dots); --tables names the folder of the real "
                                 "LUNA16 tables")
    series = []
    for k, uid in enumerate(uids[:n_series]):
        ours = _as_array(nodules[uid])
        series.append(Series(k, uid, ours, _malignancy_of(ours, rated[uid]), _as_array(excluded[uid])))
    return series


def scan_geometry(series: Series, shape: tuple[int, int, int]) -> ScanGeometry:
    """A box around the series' findings with MARGIN_MM to spare, at least a chest, in `shape` voxels.

    The extents are those of voxel centres (origin to last voxel), so every finding lies
    MARGIN_MM inside them; x and y share one spacing (square pixels, as CT slices have).
    """
    findings = np.vstack([series.nodules, series.excluded])
    if len(findings):
        reach = np.maximum(findings[:, 3:], 0) / 2 + MARGIN_MM  # diameter -1: a point
        low, high = (findings[:, :3] - reach).min(axis=0), (findings[:, :3] + reach).max(axis=0)
        centre, extent = (low + high) / 2, high - low
    else:
        centre, extent = np.array(DEFAULT_CENTRE_MM), np.zeros(3)
    slices, rows, columns = shape
    inplane = max(max(extent[0], MIN_FOV_MM) / (columns - 1), max(extent[1], MIN_FOV_MM) / (rows - 1))
    spacing = np.array([inplane, inplane, max(extent[2], MIN_LENGTH_MM) / (slices - 1)])
    origin = centre - spacing * (np.array([columns, rows, slices]) - 1) / 2
    return ScanGeometry(tuple(shape), spacing, origin)


def draw_ct(series: Series, seed: int, shape: tuple[int, int, int]) -> tuple[np.random.Generator, Phantom]:
    """Series k's generator and phantom: the phantom's own nodules replaced by the series' real ones.

    `render(phantom, generator)` then gives its CT; the generator is left where the noise starts.
    """
    rng = np.random.default_rng([seed, series.k])
    phantom = draw_phantom(rng, scan_geometry(series, shape))
    nodules = tuple(draw_nodule(rng, row[:3], float(row[3]), malignant)
                    for row, malignant in zip(series.nodules, series.malignant))
    return rng, replace(phantom, nodules=nodules)


def _as_written(points: np.ndarray) -> np.ndarray:
    """Centres rounded to the 2 decimals of the table (as LUNA16 writes them), so every check sees
    what a reader reads; + 0.0 turns -0.0 into 0.0, which would be written as -0.00."""
    return np.rint(points * 100) / 100 + 0.0


def _repeated(points: np.ndarray) -> np.ndarray:
    """Rows equal to an earlier row: the build reads them as duplicates and leaves them out."""
    _, first = np.unique(points, axis=0, return_index=True)
    repeated = np.ones(len(points), dtype=bool)
    repeated[first] = False
    return repeated


def _redrawn_until_none(points: np.ndarray, rejected: Callable[[np.ndarray], np.ndarray],
                      draw: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`points` as written, those `rejected` (a bool per row) replaced by `draw(rejected)` until none is."""
    points = _as_written(points)
    for _ in range(MAX_REDRAWS):
        bad = rejected(points)
        if not bad.any():
            return points
        points[bad] = _as_written(draw(bad))
    raise RehearsalError(f"{int(bad.sum())} candidate(s) found no free place in {MAX_REDRAWS} draws")


def draw_candidates(series: Series, phantom: Phantom, positives: np.ndarray, negatives: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The series' candidates: centres (n, 3) X/Y/Z mm as written (2 decimals) and classes (n,), shuffled.

    `positives[j]` class-1 rows inside nodule j, then `negatives` class-0 rows: one near each
    excluded finding (a random share of them when there are fewer rows), the rest anywhere
    in the body; any that lands in a nodule's sphere or on another row is drawn again, in
    the body.
    """
    rng = np.random.default_rng([seed, series.k, 1])
    centres, radii = series.nodules[:, :3], series.nodules[:, 3] / 2
    owner = np.repeat(np.arange(len(radii)), positives)

    def in_their_nodule(rows: np.ndarray) -> np.ndarray:
        reach = POSITIVE_REACH * radii[owner[rows], None]
        return centres[owner[rows]] + unit_ball(rng, int(rows.sum())) * reach

    def in_a_nodule_or_repeated(points: np.ndarray) -> np.ndarray:
        gap = np.linalg.norm(points[:, None] - centres[None], axis=2)
        return (gap <= radii).any(axis=1) | _repeated(points)

    nodule_rows = _redrawn_until_none(in_their_nodule(np.ones(len(owner), dtype=bool)), _repeated, in_their_nodule)
    findings = series.excluded[rng.permutation(len(series.excluded))[:negatives], :3]
    near_findings = findings + unit_ball(rng, len(findings)) * FINDING_JITTER_MM
    first = np.vstack([near_findings, in_body(rng, phantom, negatives - len(findings))])
    other_rows = _redrawn_until_none(first, in_a_nodule_or_repeated, lambda rows: in_body(rng, phantom, rows.sum()))
    points = np.vstack([nodule_rows, other_rows])
    labels = np.repeat([1, 0], [len(nodule_rows), len(other_rows)])
    order = rng.permutation(len(points))
    return points[order], labels[order]


def candidate_rows(uid: str, points: np.ndarray, labels: np.ndarray) -> str:
    """The table's lines of one series, formatted in one operation rather than row by row."""
    values = np.column_stack([points, labels]).ravel().tolist()
    return (f"{uid},%.2f,%.2f,%.2f,%d\n" * len(labels)) % tuple(values)


def _write_ct_whole(job: _Job, volume: np.ndarray, geometry: ScanGeometry) -> int:
    """Write the CT into OUT.partial, then move it into its subset: .raw first, then the .mhd that
    names it, after removing an older .mhd, so a reader finds a whole CT or none. Returns its bytes."""
    staged = job.partial / f"{job.series.uid}.mhd"
    write_ct(staged, volume, geometry)
    final = job.out / f"subset{job.series.k % N_SUBSETS}" / staged.name
    final.unlink(missing_ok=True)
    os.replace(staged.with_suffix(".raw"), final.with_suffix(".raw"))
    os.replace(staged, final)
    return final.stat().st_size + final.with_suffix(".raw").stat().st_size


def _make_series(job: _Job) -> tuple[str, int]:
    """Write one series' CT; return its candidate lines and the CT's bytes (a pool task)."""
    rng, phantom = draw_ct(job.series, job.seed, job.shape)
    written = _write_ct_whole(job, render(phantom, rng), phantom.geometry)
    points, labels = draw_candidates(job.series, phantom, job.positives, job.negatives, job.seed)
    return candidate_rows(job.series.uid, points, labels), written


def allot(total: int, weights: np.ndarray) -> np.ndarray:
    """`total` split into whole numbers in proportion to `weights`: largest remainders first, ties to the earlier."""
    if total == 0:
        return np.zeros(len(weights), dtype=np.int64)
    quota = total * weights / weights.sum()
    counts = np.floor(quota).astype(np.int64)
    counts[np.argsort(counts - quota, kind="stable")[: total - counts.sum()]] += 1
    return counts


def positives_per_nodule(diameters: np.ndarray, total: int) -> np.ndarray:
    """One class-1 row per nodule, the rest one more each to the largest nodules first (round after round)."""
    rank = np.empty(len(diameters), dtype=np.int64)
    rank[np.argsort(-diameters, kind="stable")] = np.arange(len(diameters))
    extra = total - len(diameters)
    return 1 + extra // len(diameters) + (rank < extra % len(diameters))


def plan_counts(series: list[Series], n_candidates: int | None) -> tuple[list[np.ndarray], np.ndarray]:
    """Class-1 rows per nodule (per series) and class-0 rows per series.

    The total is n_candidates, or FULL_CANDIDATES scaled by series / FULL_SERIES; class 1 is
    FULL_POSITIVES scaled alike, but never fewer than one row per nodule. Class 0 goes one
    row per excluded finding first (proportionally fewer when there is no room), the rest
    evenly over the series.
    """
    share = n_candidates / FULL_CANDIDATES if n_candidates else len(series) / FULL_SERIES
    total = n_candidates or round(FULL_CANDIDATES * share)
    diameters = np.concatenate([s.nodules[:, 3] for s in series])
    n_positives = max(round(FULL_POSITIVES * share), len(diameters)) if len(diameters) else 0
    if total < n_positives:
        raise RehearsalError(f"--candidates {total} is fewer than the {len(diameters)} nodules of the kept series "
                             "(each gets a class-1 row)")
    per_nodule = positives_per_nodule(diameters, n_positives) if len(diameters) else diameters.astype(np.int64)
    bounds = np.cumsum([len(s.nodules) for s in series])[:-1]
    findings = np.array([len(s.excluded) for s in series], dtype=np.float64)
    negatives = total - n_positives
    on_findings = allot(min(negatives, int(findings.sum())), findings)
    rest = allot(negatives - int(on_findings.sum()), np.ones(len(series)))
    return np.split(per_nodule, bounds), on_findings + rest


def _copy_rows(source: Path, target: Path, kept: set[str], header: bool = True) -> int:
    """Copy the lines of `source` whose first field is a kept UID (and its header line), byte for byte."""
    lines = source.read_bytes().splitlines(keepends=True)
    rows = [line for line in lines[header:] if line.split(b",", 1)[0].strip().decode() in kept]
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(target, "wb") as f:
        f.write(b"".join(lines[:header] + rows))
    return target.stat().st_size


def check_shape(shape: tuple[int, ...]) -> None:
    """Refuse a CT shape below the generator's MIN_SHAPE, where the phantom's lungs become a few voxels."""
    if len(shape) != 3 or any(s < m for s, m in zip(shape, MIN_SHAPE)):
        raise RehearsalError(f"--shape must be 3 sizes of at least {' '.join(map(str, MIN_SHAPE))}, "
                             f"got {' '.join(map(str, shape))}")


def make_rehearsal(out: Path, tables: Path, shape: tuple[int, int, int] = DEFAULT_SHAPE, seed: int = 0,
                   n_series: int | None = None, n_candidates: int | None = None, workers: int = 1) -> RehearsalSummary:
    """Write the rehearsal data set of the first n_series series of `tables` (all with None) under `out`."""
    started = time.monotonic()
    check_shape(shape)
    out, tables = Path(out), Path(tables)
    series = read_series(tables, n_series)
    per_nodule, negatives = plan_counts(series, n_candidates)
    partial = out.resolve().with_name(out.resolve().name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # what a killed run was writing
    partial.mkdir(parents=True)
    for subset in range(N_SUBSETS):
        (out / f"subset{subset}").mkdir(parents=True, exist_ok=True)
    jobs = [_Job(s, p, int(n), seed, shape, out, partial) for s, p, n in zip(series, per_nodule, negatives)]
    if workers == 1:
        results = [_make_series(job) for job in jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_make_series, jobs))
    partial.rmdir()
    rows = dict(zip((s.uid for s in series), (lines for lines, _ in results)))
    with atomic_open(out / "candidates.csv", newline="\n") as f:
        f.write(CANDIDATES_HEADER + "\n" + "".join(rows[uid] for uid in sorted(rows)))
    written = sum(n for _, n in results) + (out / "candidates.csv").stat().st_size
    for name, target in COPIED_TO.items():
        written += _copy_rows(tables / TABLES[name], out / target, set(rows), header=name != "seriesuids")
    positives = sum(int(p.sum()) for p in per_nodule)
    return RehearsalSummary(
        out=out, series=len(series), candidates=positives + int(negatives.sum()), positives=positives,
        nodules=sum(len(s.nodules) for s in series), excluded=sum(len(s.excluded) for s in series), bytes=written,
        seconds=time.monotonic() - started)
