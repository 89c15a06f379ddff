"""The candidate table: parse and validate the LUNA16 CSVs, join them, assign folds.

`candidates.csv` lists every point to classify (one sample each); `annotations.csv`
gives the true nodules with their diameters; `annotations_with_malignancy.csv` (the
LIDC-derived table, optional) adds `mal_bool`. Columns are found by header name, so
extra columns are fine. A row that cannot be parsed is reported with its file and
line and left out; the caller decides whether that is fatal.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

import numpy as np

N_FOLDS = 10
"""LUNA16 ships ten subsets; a fold is one subset, so 10-fold cross-validation needs no re-sharding."""


@dataclass(frozen=True)
class Candidate:
    row: int  # 0-based data row in candidates.csv (lines after the header): stable whatever is filtered out
    series_uid: str
    center_xyz: tuple[float, float, float]  # mm, patient space
    is_nodule: bool
    diameter_mm: float = 0.0  # 0 where unknown or not a nodule
    is_malignant: bool | None = None  # None where unknown or not a nodule


@dataclass(frozen=True)
class Annotation:
    series_uid: str
    center_xyz: tuple[float, float, float]
    diameter_mm: float
    is_malignant: bool | None = None


@dataclass(frozen=True)
class BadRow:
    path: str
    line: int  # 1-based line in the file, the header being line 1
    problem: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.problem}"


class CsvError(ValueError):
    """A CSV that cannot be used at all (missing, or missing a required column)."""


_TRUE = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def open_csv(path: Path) -> TextIO:
    """A table opened for `csv.reader`. Spreadsheet programs start UTF-8 files with a byte-order
    mark; read as part of the first column's name it would turn the header into a data row."""
    return Path(path).open(newline="", encoding="utf-8-sig")


def is_blank(fields: list[str]) -> bool:
    """A CSV row with nothing in it (an empty line, or only commas and spaces)."""
    return not fields or all(not field.strip() for field in fields)


def non_blank_rows(reader) -> Iterator[tuple[int, list[str]]]:
    """(physical line number, fields) of every row of a `csv.reader` that is not blank."""
    for fields in reader:
        if not is_blank(fields):
            yield reader.line_num, fields


def shown(names: list[str]) -> str:
    """Column names for a message: one holding an invisible character is shown quoted, escapes and all."""
    return ", ".join(name if name.isprintable() else repr(name) for name in names)


def read_rows(path: Path, required: tuple[str, ...]):
    """Yield (line number, data row, header, fields) for each row that is not blank, after checking the
    header: the first row that is not blank. The data row counts the file's lines after the header
    from 0, so leading blank lines never renumber the rows."""
    path = Path(path)
    if not path.is_file():
        raise CsvError(f"{path}: file not found")
    with open_csv(path) as f:
        rows = non_blank_rows(csv.reader(f))
        header_line, header = next(rows, (0, None))
        if header is None:
            raise CsvError(f"{path}: empty file, expected a header with {', '.join(required)}")
        header = [name.strip() for name in header]
        missing = [name for name in required if name not in header]
        if missing:
            raise CsvError(f"{path}:{header_line}: header lacks column(s) {', '.join(missing)}; "
                           f"found {shown(header)}")
        for line, fields in rows:
            yield line, line - header_line - 1, header, fields


def parse_row(header: list[str], fields: list[str]) -> dict:
    """Fields by header name, with the centre checked and parsed into `xyz`."""
    if len(fields) != len(header):
        raise ValueError(f"expected {len(header)} fields, found {len(fields)}: {','.join(fields)!r}")
    row = dict(zip(header, (field.strip() for field in fields)))
    if not row["seriesuid"]:
        raise ValueError("empty seriesuid")
    row["xyz"] = tuple(finite_number(row, name) for name in ("coordX", "coordY", "coordZ"))
    return row


def finite_number(row: dict, name: str) -> float:
    """The field `name` of a parsed row as a finite float; ValueError naming the field otherwise."""
    try:
        value = float(row[name])
    except ValueError:
        raise ValueError(f"{name} is not a number: {row[name]!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} is not finite: {row[name]!r}")
    return value


def read_series_list(path: Path) -> list[str]:
    """One series UID a line (the first field of a CSV row), blank lines skipped; a `seriesuid`
    header on the first line that is not blank is skipped (the official script would count it as
    one more scan without marks)."""
    path = Path(path)
    if not path.is_file():
        raise CsvError(f"{path}: file not found")
    uids: dict[str, int] = {}
    with open_csv(path) as f:
        for n, (line, row) in enumerate(non_blank_rows(csv.reader(f))):
            uid = row[0].strip()
            if not uid or (n == 0 and uid == "seriesuid"):
                continue
            if uid in uids:
                raise CsvError(f"{path}:{line}: series {uid} listed twice (first on line {uids[uid]})")
            uids[uid] = line
    if not uids:
        raise CsvError(f"{path}: no series listed")
    return list(uids)


def read_candidates(path: Path) -> tuple[list[Candidate], list[BadRow], list[BadRow]]:
    """Parse `candidates.csv` (seriesuid, coordX, coordY, coordZ, class): the candidates, the rows that
    cannot be read, and the rows that repeat an earlier one.

    A row equal to an earlier one (same series, same centre as numbers, same class) is a
    duplicate: the first is kept, the others are returned apart, so each distinct candidate
    is one sample and a positive is never counted twice. They are not malformed: tables
    derived from LUNA16's findings repeat many rows (its excluded findings repeat 11,106
    of their 35,192 positions), and the rows are whole.
    """
    required = ("seriesuid", "coordX", "coordY", "coordZ", "class")
    candidates, bad, repeated = [], [], []
    first_line: dict[tuple, int] = {}
    for line, data_row, header, fields in read_rows(path, required):
        try:
            row = parse_row(header, fields)
            if row["class"] not in ("0", "1"):
                raise ValueError(f"class must be 0 or 1, found {row['class']!r}")
        except ValueError as err:
            bad.append(BadRow(str(path), line, str(err)))
            continue
        identity = (row["seriesuid"], row["xyz"], row["class"])
        if identity in first_line:
            repeated.append(BadRow(str(path), line, f"duplicate of line {first_line[identity]}"))
            continue
        first_line[identity] = line
        candidates.append(Candidate(data_row, row["seriesuid"], row["xyz"], row["class"] == "1"))
    return candidates, bad, repeated


def read_annotations(path: Path, allow_unknown_diameter: bool = False) -> tuple[list[Annotation], list[BadRow]]:
    """Parse `annotations.csv`, or the malignancy table when it has a `mal_bool` column.

    `allow_unknown_diameter` accepts a negative diameter, which `annotations_excluded.csv`
    uses for findings of unknown size (kept as it is; the evaluation reads it as 10 mm).
    """
    required = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")
    annotations, bad = [], []
    for line, _, header, fields in read_rows(path, required):
        try:
            row = parse_row(header, fields)
            try:
                diameter = float(row["diameter_mm"])
            except ValueError:
                raise ValueError(f"diameter_mm is not a number: {row['diameter_mm']!r}") from None
            if not (math.isfinite(diameter) and (diameter > 0 or (allow_unknown_diameter and diameter < 0))):
                raise ValueError(f"diameter_mm must be positive, found {row['diameter_mm']!r}")
            malignant = None
            if "mal_bool" in row:
                if row["mal_bool"].lower() not in _TRUE:
                    raise ValueError(f"mal_bool must be True or False, found {row['mal_bool']!r}")
                malignant = _TRUE[row["mal_bool"].lower()]
        except ValueError as err:
            bad.append(BadRow(str(path), line, str(err)))
            continue
        annotations.append(Annotation(row["seriesuid"], row["xyz"], diameter, malignant))
    return annotations, bad


def _nearest_within_radius(center_xyz: tuple[float, float, float], annotations: list[Annotation]) -> Annotation | None:
    if not annotations:
        return None
    centers = np.array([a.center_xyz for a in annotations])
    radii = np.array([a.diameter_mm / 2 for a in annotations])
    distances = np.linalg.norm(centers - np.asarray(center_xyz), axis=1)
    inside = np.flatnonzero(distances <= radii)
    if inside.size == 0:
        return None
    return annotations[inside[np.argmin(distances[inside])]]


def join_annotations(
    candidates: list[Candidate],
    annotations: list[Annotation],
    malignancy: list[Annotation] | None = None,
) -> list[Candidate]:
    """Give nodule candidates their diameter and malignancy.

    Matching rule: a nodule candidate (class 1) takes the diameter of the nearest
    annotation of the same series whose sphere (radius = diameter / 2, in mm) contains
    the candidate's centre, and its malignancy likewise from the nearest such row of
    the malignancy table. A nodule candidate with no such annotation keeps diameter 0
    and unknown malignancy; non-nodule candidates are never matched (diameter 0,
    malignancy unknown), as LUNA16's candidates near a nodule are labelled class 1.
    """
    by_series: dict[str, list[Annotation]] = defaultdict(list)
    for annotation in annotations:
        by_series[annotation.series_uid].append(annotation)
    malignancy_by_series: dict[str, list[Annotation]] = defaultdict(list)
    for annotation in malignancy or []:
        malignancy_by_series[annotation.series_uid].append(annotation)

    joined = []
    for candidate in candidates:
        if candidate.is_nodule:
            match = _nearest_within_radius(candidate.center_xyz, by_series[candidate.series_uid])
            mal_match = _nearest_within_radius(candidate.center_xyz, malignancy_by_series[candidate.series_uid])
            candidate = replace(
                candidate,
                diameter_mm=match.diameter_mm if match else (mal_match.diameter_mm if mal_match else 0.0),
                is_malignant=mal_match.is_malignant if mal_match else None,
            )
        joined.append(candidate)
    return joined


SUBSET_FOLDER = re.compile(r"subset(\d+)$")
"""A LUNA16 subset folder's name; its number is the fold of the series in it."""


def find_series(data_dir: Path) -> dict[str, Path]:
    """Map each series UID to its `.mhd` file anywhere under `data_dir`, symlinked folders followed."""
    found: dict[str, Path] = {}
    for mhd in sorted(_files_under(Path(data_dir), ".mhd", frozenset())):
        uid = mhd.stem
        if uid in found:
            raise CsvError(f"series {uid} is present twice: {found[uid]} and {mhd}; remove one")
        found[uid] = mhd
    return found


def _files_under(folder: Path, suffix: str, above: frozenset[tuple[int, int]]) -> Iterator[Path]:
    """The files named *`suffix` in `folder` and every folder below it, symlinked ones included: a subset
    kept on another disk and linked in is a fold like the others (`Path.rglob` passes links by). A link to
    a folder above it (`above`: their device and inode) is not walked again, which would never end; the
    same folder linked in twice is, so its series are found twice and refused by name."""
    try:
        status = folder.stat()
        if (identity := (status.st_dev, status.st_ino)) in above:
            return
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except (PermissionError, FileNotFoundError):  # unreadable, or gone: as with rglob, nothing found there
        return
    for entry in entries:
        if entry.is_dir():
            yield from _files_under(Path(entry.path), suffix, above | {identity})
        elif entry.name.endswith(suffix):
            yield Path(entry.path)


def assign_folds(series: dict[str, Path]) -> dict[str, int]:
    """One fold per series: its LUNA16 subset (`subset3/` -> fold 3).

    Series outside `subsetN` folders are dealt round-robin into N_FOLDS folds in
    sorted UID order, so the assignment never depends on how files were listed.
    """
    folds, loose = {}, []
    for uid in sorted(series):
        match = SUBSET_FOLDER.match(series[uid].parent.name)
        if match and int(match.group(1)) < N_FOLDS:
            folds[uid] = int(match.group(1))
        else:
            loose.append(uid)
    for index, uid in enumerate(loose):
        folds[uid] = index % N_FOLDS
    return folds


def folds_as_built(found: dict[str, Path], listed: Iterable[str]) -> dict[str, int]:
    """The fold of each series as a shard build deals them, for every command that must agree with a build.

    `found` is what `find_series` found on disk, `listed` the series of the candidate
    table. A series in a `subsetN` folder is in fold N whether listed or not; the others
    are dealt round-robin (`assign_folds`) over the listed ones only: the build holds no
    other series, and one more loose .mhd on disk would shift every fold after it.
    With nothing listed, only the series in `subsetN` folders get a fold.
    """
    listed = set(listed)
    kept = {}
    for uid, path in found.items():
        subset = SUBSET_FOLDER.match(path.parent.name)
        if uid in listed or (subset and int(subset.group(1)) < N_FOLDS):
            kept[uid] = path
    return assign_folds(kept)
