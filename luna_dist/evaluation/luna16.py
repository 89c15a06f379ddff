"""LUNA16 FROC and CPM by the rules of the challenge's official evaluation script.

The scoring alone, of findings and marks in memory: their files are read and written by
`luna_dist.evaluation.files`, and a predictions file is scored from the command line by
`luna_dist/evaluate.py` (`python -m luna_dist.evaluate`).

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

import math
from dataclasses import dataclass, field

import numpy as np

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
