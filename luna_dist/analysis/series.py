"""Which CTs an analysis takes, read and checked before the first is analysed."""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from luna_dist.common.out_folder import file_name
from luna_dist.evaluation.files import shard_findings
from luna_dist.evaluation.luna16 import EvaluationError
from luna_dist.imaging.ct import MAX_CT_VOXELS, CtError, find_ct
from luna_dist.imaging.files import CtSource
from luna_dist.tables.candidates import CsvError, find_series, folds_as_built, read_candidates
from luna_dist.tables.layout import find_tables


class AnalysisError(Exception):
    """The analysis cannot start or finish; the message names the file or flag to fix."""


def ct_sources(paths: list[Path], max_voxels: int = MAX_CT_VOXELS, warn: bool = True) -> dict[str, Path]:
    """The series of `--ct`'s CTs by their uid (`ct_uid`), each one's headers read and checked before the first
    CT is analysed; with `warn` (the main process), a warning line for each file a DICOM folder holds that
    cannot be read (a dangling link)."""
    series: dict[str, Path] = {}
    for path in paths:
        try:
            source = find_ct(path, max_voxels)
        except CtError as err:
            raise AnalysisError(f"--ct {err}") from None
        for skipped in source.skipped if warn else ():
            print(f"warning: --ct {skipped}: skipped; the series is checked without it", file=sys.stderr)
        uid = ct_uid(source)
        if uid in series:
            raise AnalysisError(f"--ct {path}: series {uid} again (also {series[uid]}): give each series once")
        series[uid] = path
    return series


DICOM_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
"""A DICOM UID (PS3.5 9.1): digits and dots."""


def ct_uid(source: CtSource) -> str:
    """The uid a `--ct` CT is known by, which names its results (`ct/<name>.json`, its rows): DICOM's
    SeriesInstanceUID where its files have one; the file's name where that is a UID (LUNA16 names its
    files so); else the folder's and the file's names, `anna_scan` for `anna/scan.nii.gz`, so that two
    scans of one name in two folders are two CTs.

    The uid is a file's text: it names files only as `out_folder.file_name` makes it safe.
    """
    named_as_uid = DICOM_UID.fullmatch(source.series_uid) and "." in source.series_uid
    if source.dicom_uid or source.path.is_dir() or named_as_uid:
        return source.series_uid
    return f"{source.path.resolve().parent.name}_{source.series_uid}"


def check_names(series: dict[str, Path]) -> None:
    """Refuse a series whose uid its outputs cannot hold as it is: one with a control character (a newline
    in submission.csv, quoted or not, is a row to many readers) or a space at either end (every CSV reader
    of the project strips it); and two whose file names (`out_folder.file_name`) differ only in case, one
    file to a case-insensitive file system (macOS, Windows)."""
    named: dict[str, str] = {}
    for uid, path in series.items():
        if not uid.isprintable() or uid != uid.strip():
            shown = str(path) if str(path).isprintable() else repr(str(path))  # the message stays one line
            raise AnalysisError(f"{shown}: series uid {uid!r} holds a control character or a space at an end, which "
                                "the CSVs of its findings cannot hold as it is: rename the file, or fix its "
                                "SeriesInstanceUID (0020|000e)")
        other = named.setdefault(file_name(uid).casefold(), uid)
        if other != uid:
            raise AnalysisError(f"{path}: series {uid} and {other} ({series[other]}) differ only in case, so their "
                                "files would be one on a case-insensitive file system: rename one")


def find_on_disk(data: Path) -> dict[str, Path]:
    """Every series of the data folder and its .mhd file."""
    if not data.is_dir():
        raise AnalysisError(f"--data {data}: not a folder")
    try:
        return find_series(data)
    except CsvError as err:
        raise AnalysisError(f"--data {data}: {err}") from None


def select_series(args: argparse.Namespace, found: dict[str, Path]) -> tuple[dict[str, Path], str | None]:
    """The series to analyse and their .mhd files; and a note on how the folds were dealt, if it needs one."""
    note = None
    if args.series:
        unknown = [uid for uid in args.series if uid not in found]
        if unknown:
            raise AnalysisError(f"--series: no .mhd under {args.data} for {', '.join(unknown[:5])}")
        series = {uid: found[uid] for uid in args.series}
    elif args.shards:
        series = build_series(args.shards, args.folds, found, args.data)
    elif args.folds:
        folds, note = dealt_folds(args.data, found)
        series = {uid: found[uid] for uid, fold in folds.items() if fold in set(args.folds)}
    else:
        series = found
    if not series:
        raise AnalysisError(f"no series to analyse under {args.data}"
                            + (f" in folds {args.folds}" if args.folds else ""))
    return series, note


def build_series(shards: str, folds: list[int] | None, found: dict[str, Path], data: Path) -> dict[str, Path]:
    """The series a shard build's manifest holds (in `folds`, all without), each of which must be on disk."""
    try:
        uids, _, _ = shard_findings(shards, folds)
    except EvaluationError as err:
        raise AnalysisError(f"--shards: {err}") from None
    missing = [uid for uid in uids if uid not in found]
    if missing:
        raise AnalysisError(f"--shards {shards}: {len(missing)} of the build's {len(uids)} series"
                            f"{f' in folds {folds}' if folds else ''} have no .mhd under --data {data}, e.g. "
                            f"{missing[0]}; give the --data that build read")
    return {uid: found[uid] for uid in uids}


def dealt_folds(data: Path, found: dict[str, Path]) -> tuple[dict[str, int], str | None]:
    """The fold of each series as the shard build deals them, and a note when that needed the candidate table.

    Series in subsetN folders are in fold N. Others are dealt over the series that
    the candidate table lists (found as the build finds it), as the build deals them: dealt over the files on
    disk instead, one extra .mhd would shift every later fold and put training CTs in
    the held-out one.
    """
    in_subsets = folds_as_built(found, ())
    loose = len(found) - len(in_subsets)
    if not loose:
        return in_subsets, None
    try:
        table = find_tables(data, {}, ("candidates",)).paths["candidates"]
    except CsvError as err:
        raise AnalysisError(f"--folds: {loose} series under {data} lie outside subsetN folders, and their folds are "
                            f"dealt over the candidate table: {err}; or give --shards BUILD to analyse a build's "
                            "folds") from None
    try:
        listed = {candidate.series_uid for candidate in read_candidates(table)[0]}
    except CsvError as err:
        raise AnalysisError(f"--folds: {err}") from None
    folds = folds_as_built(found, listed)
    note = (f"note: {loose} series lie outside subsetN folders: --folds deals them over the series {table} lists, "
            f"as the shard build does ({len(found) - len(folds)} unlisted left out); --shards BUILD gives a "
            "build's exact series")
    return folds, note


@dataclass
class Positions:
    """The candidates of the analysed series, and what `--candidates` held besides."""

    xyz: dict[str, np.ndarray]  # (N, 3) mm per analysed series, in the table's order; none for a series without
    malformed: list  # BadRow
    not_on_disk: dict[str, int]  # rows per series that has no .mhd under --data


def candidate_positions(path: Path, series: dict[str, Path], found: dict[str, Path]) -> Positions:
    """Candidate centres (mm) of each analysed series, counting the rows of series not on disk."""
    try:
        candidates, bad, _ = read_candidates(path)
    except CsvError as err:
        raise AnalysisError(f"--candidates: {err}") from None
    xyz: dict[str, list] = {uid: [] for uid in series}
    not_on_disk: dict[str, int] = {}
    for candidate in candidates:
        if candidate.series_uid in xyz:
            xyz[candidate.series_uid].append(candidate.center_xyz)
        elif candidate.series_uid not in found:
            not_on_disk[candidate.series_uid] = not_on_disk.get(candidate.series_uid, 0) + 1
    return Positions({uid: np.array(p, dtype=np.float64).reshape(-1, 3) for uid, p in xyz.items()}, bad, not_on_disk)


def candidate_warnings(positions: Positions, path: Path, data: Path) -> list[str]:
    warnings = []
    if positions.malformed:
        warnings.append(f"warning: {len(positions.malformed)} malformed row(s) of {path} left out, "
                        f"e.g. {positions.malformed[0]}")
    if positions.not_on_disk:
        counts = sorted(positions.not_on_disk.items(), key=lambda item: (-item[1], item[0]))
        shown = ", ".join(f"{uid}: {rows}" for uid, rows in counts[:3])
        more = f" and {len(counts) - 3} more series" if len(counts) > 3 else ""
        warnings.append(f"warning: {sum(positions.not_on_disk.values())} row(s) of --candidates {path} are of "
                        f"{len(counts)} series with no .mhd under {data} ({shown}{more}); they are not scored")
    return warnings
