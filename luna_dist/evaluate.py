"""`python -m luna_dist.evaluate`: LUNA16's FROC and CPM of a predictions file, by the official rules.

    python -m luna_dist.evaluate --annotations annotations.csv --excluded annotations_excluded.csv \\
        --seriesuids seriesuids.csv --predictions predictions.csv [--json OUT] [--plot froc.png]
    python -m luna_dist.evaluate --shards shards/NAME [--folds 0 1 ...] --predictions predictions.csv

(the second takes the series, nodules and excluded findings of the folds from the shard manifest). The
rules are `luna_dist.evaluation.luna16`'s. Several predictions files (a cross-validation's folds) are scored
as one. A file's sidecar (`NAME.provenance.json`, `luna_dist.models.provenance`) says which models made its
marks and what they saw: a model that trained or was selected on a scored series it marked is refused.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from luna_dist.common import cli
from luna_dist.common.atomic import write_json
from luna_dist.evaluation.files import plot_froc, read_findings, read_marks, shard_findings, write_marks
from luna_dist.evaluation.luna16 import FP_RATES, EvaluationError, Marks, format_value, froc
from luna_dist.models import provenance
from luna_dist.tables.candidates import CsvError, read_series_list


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
    parser.add_argument("--predictions", type=Path, nargs="+", required=True,
                        help="CSV with seriesuid,coordX,coordY,coordZ,probability (mm); several (each fold's of a "
                             "cross-validation) are scored as one, each series marked in one of them at most")
    parser.add_argument("--merged", type=Path,
                        help="write the marks of every --predictions here, as one file (and what made them: its "
                             ".provenance.json)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--plot", type=Path, help="draw the FROC curve here (PNG; needs matplotlib)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="scan resamplings for the 95%% interval (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    return parser


def joined(marks: list[Marks], paths: list[Path]) -> Marks:
    """The marks of several files as one; EvaluationError naming a series marked in two of them (its marks would
    count twice)."""
    owner: dict[str, Path] = {}
    for found, path in zip(marks, paths):
        for uid in np.unique(found.series).tolist():
            if (other := owner.setdefault(uid, path)) != path:
                raise EvaluationError(f"{path}: series {uid} is marked in {other} too; give each series' marks in one "
                                      "file")
    return Marks(np.concatenate([m.series for m in marks]), np.concatenate([m.xyz for m in marks]).reshape(-1, 3),
                 np.concatenate([m.probability for m in marks]))


def made_by(path: Path, marks: Marks, scored: list[str]) -> list[provenance.Part]:
    """What made the marks of `path`, from its sidecar (`luna_dist.models.provenance`); EvaluationError naming the
    model and the fold when one trained or was selected on a scored series it marked. Without a sidecar, one
    part of unknown models, and a note."""
    parts = provenance.read_sidecar(path)
    if parts is None:
        print(f"note: {path} has no {provenance.sidecar(path).name} (luna_dist's training and analysis write one "
              "beside their predictions): whether the models that made it saw the scored series is not checked",
              file=sys.stderr)
        return [provenance.Part(tuple(np.unique(marks.series).tolist()), None)]
    listed = set(scored)
    for part in parts:
        for name, record in (part.models or {}).items():
            named = f"{name} (the marks of {path})"
            if (problem := provenance.leak(named, record, listed.intersection(part.series))) is not None:
                raise EvaluationError(problem)
            if warning := provenance.unchecked(named, record):
                print(warning, file=sys.stderr)
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.check_at_least(parser, args, {"bootstrap": 0})
    if args.merged and args.merged.resolve() in {path.resolve() for path in args.predictions}:
        parser.error(f"--merged {args.merged} is one of --predictions: write the merged marks to another file")
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
        read = [(path, read_marks(path, series_uids)) for path in args.predictions]
        marks = joined([found for _, found in read], args.predictions)
        parts = [part for path, found in read for part in made_by(path, found, series_uids)]
    except (EvaluationError, CsvError, ValueError) as err:
        return cli.fail(str(err))
    if args.merged:
        try:
            write_marks(args.merged, marks)
            provenance.write_sidecar(args.merged, parts)
        except OSError as err:
            return cli.fail(f"--merged: could not write {err.filename}: {err.strerror}")
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
