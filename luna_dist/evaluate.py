"""LUNA16 FROC and CPM by the rules of the challenge's official evaluation script.

    python -m luna_dist.evaluate --annotations annotations.csv --excluded annotations_excluded.csv \\
        --seriesuids seriesuids.csv --predictions predictions.csv [--json OUT] [--plot froc.png]
    python -m luna_dist.evaluate --shards shards/NAME [--folds 0 1 ...] --predictions predictions.csv

(the second takes the series, nodules and excluded findings of the folds from the shard manifest).

A prediction ("mark") is `seriesuid,coordX,coordY,coordZ,probability` in mm. The rules:

- a mark hits a finding when its squared distance is strictly below (diameter / 2)^2;
  a negative diameter means 10 mm (as `annotations_excluded.csv` uses -1);
- at most the MAX_MARKS most probable marks of a scan count: those above its
  (MAX_MARKS + 1)-th probability, so marks tied at that cut all drop;
- an included nodule with hits is one true positive with its hits' highest
  probability; its other hits are ignored ("double"); a mark inside two nodules
  counts for both; a nodule without hits is missed;
- a mark on no included nodule but inside an excluded finding is ignored; every other
  mark is a false positive;
- FP per scan divides by the number of listed series, scans without marks included;
  sensitivity divides by every included nodule, missed ones included;
- the FROC curve (one point per distinct probability, from (0, 0)) is interpolated
  linearly at 10,001 points from 1/8 to 8 FP/scan, holding the last sensitivity beyond
  its last point; the sensitivities are read at the grid points nearest to 1/8 ... 8
  and CPM is their mean;
- the confidence interval resamples scans with replacement and takes the sorted
  bootstrap values at floor(2.5 %) and floor(97.5 %) of their count (draws without
  any nodule have no sensitivity and are left out).

Everything is vectorised: the matching pairs each finding only with the marks of its
own scan, so LUNA16's 888 scans with 600 marks each score in seconds.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from luna_dist import cli
from luna_dist.atomic import atomic_open, write_json
from luna_dist.candidates import (
    CsvError,
    finite_number,
    non_blank_rows,
    open_csv,
    parse_row,
    read_annotations,
    read_rows,
    read_series_list,
)

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""False positives per scan at which LUNA16 reads the sensitivity."""
MAX_MARKS = 100
"""Marks per scan that count, the most probable ones."""
EXCLUDED_UNKNOWN_DIAMETER_MM = 10.0
"""Diameter of a finding listed with a negative one."""
GRID_POINTS = 10001
CONFIDENCE = 0.95
PREDICTION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")


class EvaluationError(ValueError):
    """Input that cannot be scored; the message names the file and line."""


@dataclass(frozen=True)
class Findings:
    """Nodules or excluded findings: series (N,), centre (N, 3) mm X/Y/Z, diameter (N,) mm."""

    series: np.ndarray
    xyz: np.ndarray
    diameter: np.ndarray

    @classmethod
    def empty(cls) -> Findings:
        return cls(np.zeros(0, dtype=str), np.zeros((0, 3)), np.zeros(0))


@dataclass(frozen=True)
class Marks:
    """Predictions: series (M,), centre (M, 3) mm X/Y/Z, probability (M,)."""

    series: np.ndarray
    xyz: np.ndarray
    probability: np.ndarray


@dataclass
class Froc:
    """The score of one set of marks; `fps`/`sensitivity` is the raw curve, for plotting."""

    cpm: float
    sensitivities: list[float]
    nodules: int
    detected: int
    false_positives: int
    scans: int
    marks: int
    marks_counted: int
    ignored_excluded: int
    ignored_double: int
    fps: np.ndarray = field(repr=False)
    sensitivity: np.ndarray = field(repr=False)
    bootstrap: int = 0
    seed: int | None = None
    cpm_ci: list[float] | None = None
    sensitivity_ci: list[list[float]] | None = None
    band: dict | None = field(default=None, repr=False)  # "fps", "low", "high" arrays for the plot

    def to_json(self) -> dict:
        return {
            "cpm": _or_none(self.cpm),
            "fp_rates": list(FP_RATES),
            "sensitivities": [_or_none(s) for s in self.sensitivities],
            "cpm_ci": self.cpm_ci,
            "sensitivity_ci": self.sensitivity_ci,
            "nodules": self.nodules,
            "detected": self.detected,
            "false_positives": self.false_positives,
            "scans": self.scans,
            "marks": self.marks,
            "marks_counted": self.marks_counted,
            "ignored_excluded": self.ignored_excluded,
            "ignored_double": self.ignored_double,
            "bootstrap": self.bootstrap,
            "seed": self.seed,
        }

    def summary(self) -> str:
        return format_score(self.cpm, self.sensitivities)


def format_score(cpm: float, sensitivities: list[float]) -> str:
    """`0.8571 cpm, sensitivity at 1/8…8: 0.5000, …` (n/a where undefined)."""
    return f"{format_value(cpm)} cpm, sensitivity at 1/8…8: {', '.join(format_value(s) for s in sensitivities)}"


def _or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def format_value(value: float) -> str:
    """A score with 4 decimals, or n/a where undefined."""
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def _rate_indices() -> np.ndarray:
    """Grid points read for each rate: the one nearest to it (within 3e-4, as the official script checks)."""
    grid = np.linspace(FP_RATES[0], FP_RATES[-1], GRID_POINTS)
    indices = np.abs(grid[None, :] - np.array(FP_RATES)[:, None]).argmin(axis=1)
    return grid, indices


FROC_GRID, RATE_INDICES = _rate_indices()


def _hits(findings: Findings, marks_xyz: np.ndarray, mark_start: np.ndarray, mark_count: np.ndarray,
          finding_scan: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(finding, mark) index pairs where the mark lies strictly inside the finding's sphere.

    Marks are sorted by scan; a finding is only compared with the marks of its scan.
    """
    per_finding = mark_count[finding_scan]
    finding = np.repeat(np.arange(len(finding_scan)), per_finding)
    offset = np.arange(len(finding)) - np.repeat(np.cumsum(per_finding) - per_finding, per_finding)
    mark = mark_start[finding_scan][finding] + offset
    diameter = np.where(findings.diameter < 0, EXCLUDED_UNKNOWN_DIAMETER_MM, findings.diameter)
    distance2 = ((marks_xyz[mark] - findings.xyz[finding]) ** 2).sum(axis=1)
    inside = distance2 < (diameter[finding] / 2) ** 2
    return finding[inside], mark[inside]


def _scan_index(series: np.ndarray, scans: dict[str, int]) -> np.ndarray:
    return np.fromiter((scans.get(uid, -1) for uid in series.tolist()), dtype=np.int64, count=len(series))


def froc(series_uids: list[str], nodules: Findings, marks: Marks, excluded: Findings | None = None,
         bootstrap: int = 0, seed: int = 0, band_points: int = 0) -> Froc:
    """Score `marks` over the scans `series_uids` by the LUNA16 rules (see the module docstring).

    Findings of series outside the list are left out; a mark of a series outside the
    list is an error (ValueError). `bootstrap` > 0 adds 95 % intervals from that many
    scan resamplings drawn with `seed`; `band_points` > 0 also keeps the interval of
    the whole curve at that many log-spaced FP rates (for a plot).
    """
    scans = {uid: index for index, uid in enumerate(series_uids)}
    n_scans = len(scans)
    excluded = excluded if excluded is not None else Findings.empty()

    if not np.isfinite(marks.probability).all():
        raise ValueError(f"{int((~np.isfinite(marks.probability)).sum()):,} marks have a probability that is not a "
                         "finite number: a diverged model is not scored")
    mark_scan = _scan_index(marks.series, scans)
    if (mark_scan < 0).any():
        raise ValueError(f"mark of series {marks.series[np.argmax(mark_scan < 0)]} not in the series list")
    # Keep the MAX_MARKS most probable marks of each scan: those above its (MAX_MARKS+1)-th probability.
    order = np.lexsort((-marks.probability, mark_scan))
    sorted_scan, sorted_prob = mark_scan[order], marks.probability[order]
    count = np.bincount(sorted_scan, minlength=n_scans)
    start = np.cumsum(count) - count
    cut = np.full(n_scans, -np.inf)
    crowded = count > MAX_MARKS
    cut[crowded] = sorted_prob[start[crowded] + MAX_MARKS]
    kept = order[sorted_prob > cut[sorted_scan]]  # still sorted by scan
    scan, xyz, prob = mark_scan[kept], marks.xyz[kept], marks.probability[kept]
    count = np.bincount(scan, minlength=n_scans)
    start = np.cumsum(count) - count

    nodule_scan = _scan_index(nodules.series, scans)
    nodules = Findings(nodules.series[nodule_scan >= 0], nodules.xyz[nodule_scan >= 0],
                       nodules.diameter[nodule_scan >= 0])
    nodule_scan = nodule_scan[nodule_scan >= 0]
    excluded_scan = _scan_index(excluded.series, scans)
    excluded = Findings(excluded.series[excluded_scan >= 0], excluded.xyz[excluded_scan >= 0],
                        excluded.diameter[excluded_scan >= 0])
    excluded_scan = excluded_scan[excluded_scan >= 0]

    hit_nodule, hit_mark = _hits(nodules, xyz, start, count, nodule_scan)
    hits_per_nodule = np.bincount(hit_nodule, minlength=len(nodule_scan))
    detected = hits_per_nodule > 0
    best = np.full(len(nodule_scan), -np.inf)
    np.maximum.at(best, hit_nodule, prob[hit_mark])
    on_nodule = np.zeros(len(prob), dtype=bool)
    on_nodule[hit_mark] = True
    on_excluded = np.zeros(len(prob), dtype=bool)
    on_excluded[_hits(excluded, xyz, start, count, excluded_scan)[1]] = True
    false_positive = ~on_nodule & ~on_excluded

    # The FROC entries: a true positive per detected nodule, a false positive per FP mark.
    entry_prob = np.concatenate([best[detected], prob[false_positive]])
    entry_is_tp = np.concatenate([np.ones(int(detected.sum())), np.zeros(int(false_positive.sum()))])
    entry_scan = np.concatenate([nodule_scan[detected], scan[false_positive]])
    order = np.argsort(-entry_prob, kind="stable")
    entry_is_tp, entry_scan = entry_is_tp[order], entry_scan[order]
    # One curve point per distinct probability: the last entry of each run of ties.
    sorted_entry_prob = entry_prob[order]
    point_end = np.flatnonzero(np.r_[sorted_entry_prob[1:] != sorted_entry_prob[:-1], True]) if len(order) else \
        np.zeros(0, dtype=np.int64)

    def curve(weight_tp: np.ndarray, weight_fp: np.ndarray, total_nodules: float, total_scans: float):
        fps = np.r_[0.0, np.cumsum(weight_fp)[point_end] / total_scans]
        sens = np.r_[0.0, np.cumsum(weight_tp)[point_end] / total_nodules] if total_nodules else \
            np.full(len(fps), np.nan)
        return fps, sens

    fps, sens = curve(entry_is_tp, 1 - entry_is_tp, len(nodule_scan), max(n_scans, 1))
    sens_at = np.interp(FROC_GRID[RATE_INDICES], fps, sens)
    result = Froc(
        cpm=float(sens_at.mean()),
        sensitivities=[float(s) for s in sens_at],
        nodules=len(nodule_scan),
        detected=int(detected.sum()),
        false_positives=int(false_positive.sum()),
        scans=n_scans,
        marks=len(marks.probability),
        marks_counted=len(prob),
        ignored_excluded=int((~on_nodule & on_excluded).sum()),
        ignored_double=int((hits_per_nodule[detected] - 1).sum()),
        fps=fps,
        sensitivity=sens,
    )
    if bootstrap > 0 and n_scans:
        _bootstrap(result, curve, entry_is_tp, entry_scan, nodule_scan, n_scans, bootstrap, seed, band_points)
    return result


def _bootstrap(result: Froc, curve, entry_is_tp: np.ndarray, entry_scan: np.ndarray, nodule_scan: np.ndarray,
               n_scans: int, samples: int, seed: int, band_points: int) -> None:
    """Resample scans with replacement; each entry weighs as often as its scan was drawn."""
    rng = np.random.default_rng(seed)
    nodules_per_scan = np.bincount(nodule_scan, minlength=n_scans)
    band_fps = np.geomspace(FP_RATES[0], FP_RATES[-1], band_points) if band_points else np.zeros(0)
    points = np.r_[FROC_GRID[RATE_INDICES], band_fps]
    values = np.empty((samples, len(points)))
    for b in range(samples):
        drawn = np.bincount(rng.integers(0, n_scans, n_scans), minlength=n_scans).astype(np.float64)
        weight = drawn[entry_scan]
        fps, sens = curve(weight * entry_is_tp, weight * (1 - entry_is_tp), float(drawn @ nodules_per_scan), n_scans)
        values[b] = np.interp(points, fps, sens)
    values = values[~np.isnan(values[:, 0])]  # a draw without nodules has no sensitivity
    if not len(values):
        return
    cpm = values[:, :len(FP_RATES)].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2
    low, high = math.floor(tail * len(values)), min(math.floor((1 - tail) * len(values)), len(values) - 1)

    def interval(column: np.ndarray) -> list[float]:
        ranked = np.sort(column)
        return [float(ranked[low]), float(ranked[high])]

    result.bootstrap, result.seed = samples, seed
    result.cpm_ci = interval(cpm)
    result.sensitivity_ci = [interval(values[:, k]) for k in range(len(FP_RATES))]
    if band_points:
        ranked = np.sort(values[:, len(FP_RATES):], axis=0)
        result.band = {"fps": band_fps, "low": ranked[low], "high": ranked[high]}


def fold_findings(manifest: dict, folds) -> tuple[list[str], Findings, Findings]:
    """The series, nodules and excluded findings of some folds of a shard build's manifest.

    Raises KeyError naming what is missing when the build predates findings in its manifest.
    """
    entries = [manifest["folds"][str(fold)] for fold in sorted(folds) if str(fold) in manifest["folds"]]
    if any("annotations" not in entry for entry in entries):
        raise KeyError("the shard manifest lists no annotations per fold (built before they were added): "
                       "rebuild the shards with --overwrite to score LUNA16 CPM")
    series = [uid for entry in entries for uid in entry["series"]]

    def findings(name: str) -> Findings:
        rows = [row for entry in entries for row in entry[name]]
        return Findings(np.array([row[0] for row in rows], dtype=str),
                        np.array([row[1:4] for row in rows], dtype=np.float64).reshape(-1, 3),
                        np.array([row[4] for row in rows], dtype=np.float64))

    return series, findings("annotations"), findings("excluded")


# -- reading the files -----------------------------------------------------------------------------
def read_findings(path: Path, excluded: bool = False) -> Findings:
    """Included nodules (`annotations.csv`) or, with `excluded`, irrelevant findings (negative diameter allowed)."""
    try:
        annotations, bad = read_annotations(path, allow_unknown_diameter=excluded)
    except CsvError as err:
        raise EvaluationError(str(err)) from None
    if bad:
        raise EvaluationError(str(bad[0]))
    return Findings(
        np.array([a.series_uid for a in annotations], dtype=str),
        np.array([a.center_xyz for a in annotations], dtype=np.float64).reshape(-1, 3),
        np.array([a.diameter_mm for a in annotations], dtype=np.float64),
    )


def read_marks(path: Path, series_uids: list[str] | None = None) -> Marks:
    """Read a predictions CSV, columns found by header name; every value is checked.

    With `series_uids`, a mark of another series is an error naming its line. The rows
    are converted column by column; only a bad file is read a second time, line by
    line, to name the culprit.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path}: file not found")
    with open_csv(path) as f:
        rows = non_blank_rows(csv.reader(f))  # as read_rows reads every other table
        header_line, header = next(rows, (1, []))
        header = [name.strip() for name in header]
        missing = [name for name in PREDICTION_COLUMNS if name not in header]
        if missing:
            raise EvaluationError(f"{path}:{header_line}: header lacks column(s) {', '.join(missing)}; "
                                  f"expected {','.join(PREDICTION_COLUMNS)}")
        rows = [row for _, row in rows]
    columns = [header.index(name) for name in PREDICTION_COLUMNS]
    try:
        if any(len(row) != len(header) for row in rows):
            raise ValueError
        fields = list(zip(*rows)) or [()] * len(header)
        uids = [uid.strip() for uid in fields[columns[0]]]
        if series_uids is not None and not set(series_uids).issuperset(uids):
            raise ValueError
        values = np.stack([np.array(fields[c], dtype=np.float64) for c in columns[1:]], axis=1).reshape(-1, 4)
        if not np.isfinite(values).all():
            raise ValueError
        series = np.array(uids, dtype=str)
    except ValueError:
        _find_bad_mark(path, series_uids)
        raise EvaluationError(f"{path}: a value could not be read as a number") from None
    return Marks(series, values[:, :3], values[:, 3])


def _find_bad_mark(path: Path, series_uids: list[str] | None) -> None:
    """Raise an EvaluationError naming the first bad line of a predictions CSV."""
    known = set(series_uids) if series_uids is not None else None
    for line, _, header, fields in read_rows(path, PREDICTION_COLUMNS):
        try:
            row = parse_row(header, fields)
            finite_number(row, "probability")
            if known is not None and row["seriesuid"] not in known:
                raise ValueError(f"series {row['seriesuid']} is not in the series list")
        except ValueError as err:
            raise EvaluationError(f"{path}:{line}: {err}") from None


def write_marks(path: Path, marks: Marks) -> None:
    """Write marks as a predictions CSV (the format `read_marks` and the official script read), atomically;
    a series name holding a comma, a quote or a newline is quoted as the csv module quotes it. A probability
    that is not a finite number is refused (ValueError): no reader may take it for a score."""
    if not np.isfinite(marks.probability).all():
        first = int(np.argmax(~np.isfinite(marks.probability)))
        raise ValueError(f"{path}: not written: the probability of the mark of series {marks.series[first]} at "
                         f"{marks.xyz[first].tolist()} is {marks.probability[first]}, not a finite number")
    with atomic_open(path, newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(PREDICTION_COLUMNS)
        writer.writerows((uid, f"{x:.3f}", f"{y:.3f}", f"{z:.3f}", f"{p:.9g}")  # 9 digits: a float32 exactly
                         for uid, (x, y, z), p in zip(marks.series.tolist(), marks.xyz.tolist(),
                                                      marks.probability.tolist()))


def plot_froc(result: Froc, path: Path | None, title: str = "FROC"):
    """Draw the FROC curve (and its bootstrap band) on a log FP axis; returns the figure (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    shown = np.interp(FROC_GRID, result.fps, result.sensitivity)
    ax.plot(FROC_GRID, shown, label=f"CPM {format_value(result.cpm)}")
    if result.band is not None:
        ax.fill_between(result.band["fps"], result.band["low"], result.band["high"], alpha=0.25,
                        label=f"{CONFIDENCE:.0%} interval ({result.bootstrap} bootstraps)")
    ax.plot(FP_RATES, result.sensitivities, "o", color="C0")
    ax.set_xscale("log", base=2)
    ax.set_xticks(FP_RATES, ["1/8", "1/4", "1/2", "1", "2", "4", "8"])
    ax.set_xlim(FP_RATES[0], FP_RATES[-1])
    ax.set_ylim(0, 1)
    ax.set_xlabel("average false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig


def shard_findings(shards: str, folds: list[int] | None) -> tuple[list[str], Findings, Findings]:
    """The series, nodules and excluded findings of `folds` (all when None) of a shard build, from its manifest;
    EvaluationError naming the manifest when it cannot be read or lacks a fold."""
    from luna_dist.shard_format import ShardSetError
    from luna_dist.shard_io import read_manifest, shard_location  # webdataset's gopen only for this

    path = shard_location(shards, "manifest.json")
    try:
        manifest = read_manifest(shards)
        folds = folds if folds is not None else sorted(int(fold) for fold in manifest["folds"])
        missing = [fold for fold in folds if str(fold) not in manifest["folds"]]
        if missing:
            raise EvaluationError(f"{path}: no fold {missing[0]} in this build (it has {sorted(manifest['folds'])})")
        return fold_findings(manifest, folds)
    except FileNotFoundError:
        raise EvaluationError(f"{path}: not found; is {shards} a finished shard build?") from None
    except ShardSetError as err:  # the server or the network failed
        raise EvaluationError(str(err)) from None
    except (json.JSONDecodeError, KeyError) as err:
        raise EvaluationError(f"{path}: {err.args[0] if isinstance(err, KeyError) else err}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m luna_dist.evaluate",
                                     description="LUNA16 FROC and CPM of a predictions CSV, by the official rules.")
    parser.add_argument("--annotations", type=Path, help="included nodules (annotations.csv)")
    parser.add_argument("--excluded", type=Path, help="irrelevant findings (annotations_excluded.csv)")
    parser.add_argument("--seriesuids", type=Path, help="the scans scored, one UID a line")
    parser.add_argument("--shards",
                        help="instead of the three above: a shard build (folder or URL), whose manifest lists them "
                             "per fold")
    parser.add_argument("--folds", type=int, nargs="+", help="with --shards: the folds scored (default: all)")
    parser.add_argument("--predictions", type=Path, required=True,
                        help="CSV with seriesuid,coordX,coordY,coordZ,probability (mm)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--plot", type=Path, help="draw the FROC curve here (PNG; needs matplotlib)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="scan resamplings for the 95%% interval (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.check_at_least(parser, args, {"bootstrap": 0})
    tables = (args.annotations, args.seriesuids, args.excluded)
    if (args.shards and any(tables)) or not (args.shards or (args.annotations and args.seriesuids)):
        parser.error("give either --annotations and --seriesuids (and --excluded), or --shards")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'luna_dist[plot]'")
    started = time.perf_counter()
    try:
        if args.shards:
            series_uids, nodules, excluded = shard_findings(args.shards, args.folds)
        else:
            series_uids = read_series_list(args.seriesuids)
            nodules = read_findings(args.annotations)
            excluded = read_findings(args.excluded, excluded=True) if args.excluded else None
        marks = read_marks(args.predictions, series_uids)
    except (EvaluationError, CsvError) as err:
        return cli.fail(str(err))
    result = froc(series_uids, nodules, marks, excluded, args.bootstrap, args.seed, band_points=200 if args.plot else 0)
    print(f"{result.scans} scans, {result.marks} marks ({result.marks_counted} counted), {result.nodules} nodules: "
          f"{result.detected} detected, {result.false_positives} false positives, "
          f"{result.ignored_excluded} marks on excluded findings and {result.ignored_double} double hits ignored")
    for rate, sens, ci in zip(FP_RATES, result.sensitivities, result.sensitivity_ci or [None] * len(FP_RATES)):
        interval = f"  [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
        print(f"  sensitivity at {rate:>5g} FP/scan  {format_value(sens)}{interval}")
    interval = f"  [{result.cpm_ci[0]:.4f}, {result.cpm_ci[1]:.4f}] (95%, {result.bootstrap} bootstraps)" \
        if result.cpm_ci else ""
    print(f"CPM {format_value(result.cpm)}{interval}   ({time.perf_counter() - started:.2f} s)")
    if args.json:
        write_json(args.json, result.to_json())
    if args.plot:
        plot_froc(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
