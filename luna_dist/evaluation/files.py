"""The files of a LUNA16 evaluation: findings and marks read and checked, marks written, the FROC drawn."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from luna_dist.common.atomic import atomic_open
from luna_dist.evaluation.luna16 import (
    CONFIDENCE,
    FP_RATES,
    FROC_GRID,
    PREDICTION_COLUMNS,
    EvaluationError,
    Findings,
    Froc,
    Marks,
    format_value,
)
from luna_dist.tables.candidates import (
    CsvError,
    finite_number,
    non_blank_rows,
    open_csv,
    parse_row,
    read_annotations,
    read_rows,
)


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
    """Draw the FROC curve (and its bootstrap band) on a log FP axis; returns the figure (needs matplotlib).

    A bare `Figure`, not pyplot's: pyplot would need a backend, and switching the process's to
    Agg left a notebook that trained or analysed with no pictures of its own.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
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
    from luna_dist.shards.format import ShardSetError
    from luna_dist.shards.sources import read_manifest, shard_location  # webdataset's gopen only for this

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
