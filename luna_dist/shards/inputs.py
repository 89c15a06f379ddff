"""A shard build's inputs, read and checked before anything is written: the CSV tables, the CTs they name,
and the rows and series left out (listed in the manifest).

A table that loses more than --max-bad-rows of its rows is refused: it is not in the
layout the build reads, and a build from its remains would silently miss most of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from luna_dist.tables.candidates import (
    N_FOLDS,
    SUBSET_FOLDER,
    Annotation,
    Candidate,
    find_series,
    join_annotations,
    read_annotations,
    read_candidates,
    read_series_list,
)
from luna_dist.tables.layout import TABLES, Found, find_tables


class InputError(ValueError):
    """The inputs cannot be built from; nothing was written. The message names the file or flag to fix."""


@dataclass
class Inputs:
    """The checked inputs of a build: its candidates (joined with the annotations), their CTs, what is left out."""

    candidates: list[Candidate]
    series: dict[str, Path]  # UID -> .mhd, for the series of `candidates` found under --data
    skipped: list[dict]  # series of the candidate table without a .mhd
    unlisted: list[str]  # CTs under --data in no row of the candidate table
    bad_rows: list  # rows that cannot be read, left out
    duplicates: list  # candidate rows that repeat an earlier one, kept once
    tables: dict[str, dict]  # per CSV: its path, its data rows, how many were left out (and repeated)
    warnings: list[str]
    findings: dict[str, list]  # "annotations" and "excluded" rows [uid, x, y, z, diameter], for the evaluation
    annotations: list[Annotation]
    found: Found  # the tables used, and how each was chosen


def read_inputs(data: Path, given: dict[str, Path | None], strict: bool, max_bad_rows: float) -> Inputs:
    """Read and check every input before anything is written, so a failed check leaves no trace in --out.

    `given`: the tables named by their flags (candidates, annotations, malignancy,
    excluded, series_list; None: found under `data` as the download lays them out,
    `luna_dist.tables.layout`). `strict` refuses any row left out, any series or CT left out;
    `max_bad_rows` a table that loses more than this percentage of its rows.
    """
    if not data.is_dir():
        raise InputError(f"{data}: no such folder (--data names the LUNA16-format folder)")
    found = find_tables(data, given)
    paths = found.paths
    candidates, bad_rows, duplicates = read_candidates(paths["candidates"])
    annotations, bad_annotations = read_annotations(paths["annotations"])
    malignancy, bad_malignancy = read_annotations(paths["malignancy"]) if paths["malignancy"] else ([], [])
    excluded, bad_excluded = read_annotations(paths["excluded"], allow_unknown_diameter=True) \
        if paths["excluded"] else ([], [])
    series_list = read_series_list(paths["series_list"]) if paths["series_list"] else None
    read = {name: {"path": str(paths[name]), "rows": len(kept) + len(bad), "left_out": len(bad)}
            for name, kept, bad in (("candidates", candidates, bad_rows), ("annotations", annotations, bad_annotations),
                                    ("malignancy", malignancy, bad_malignancy), ("excluded", excluded, bad_excluded))
            if paths[name]}
    read["candidates"].update(rows=len(candidates) + len(bad_rows) + len(duplicates), duplicates=len(duplicates))
    if series_list is not None:
        read["series_list"] = {"path": str(paths["series_list"]), "rows": len(series_list), "left_out": 0}
    bad_rows = bad_rows + bad_annotations + bad_malignancy + bad_excluded
    warnings = []
    if bad_rows:
        message = f"{len(bad_rows)} malformed CSV row(s):{_listed(bad_rows)}"
        if strict:
            raise InputError(message + "\n(--strict) fix the rows or run without --strict to leave them out")
        _check_left_out(read, bad_rows, max_bad_rows)
        warnings.append(f"warning: {message}\nthose rows are left out and listed in the manifest")
    if duplicates:
        message = f"{len(duplicates)} duplicate row(s) of {paths['candidates']}:{_listed(duplicates)}"
        if strict:
            raise InputError(message + "\n(--strict) remove them or run without --strict to keep each row once")
        warnings.append(f"warning: {message}\neach candidate is kept once; the repeats are listed in the manifest "
                        "under duplicate_rows")
    if not candidates:
        raise InputError(f"{paths['candidates']}: no usable candidate rows; nothing to shard")

    listed = sorted({c.series_uid for c in candidates})
    tables = {"annotations": annotations, "malignancy": malignancy, "excluded": excluded}
    warnings += _check_series_of_tables(paths, listed, {name: {row.series_uid for row in rows}
                                                        for name, rows in tables.items() if rows}, series_list, strict)
    on_disk = find_series(data)
    skipped = [{"series_uid": uid, "reason": f"no {uid}.mhd under {data}"}
               for uid in listed if uid not in on_disk]
    if len(skipped) == len(listed):
        raise InputError(f"none of the {len(listed)} series of {paths['candidates']} has a .mhd under {data} "
                         f"(e.g. {listed[0]}.mhd); is --data the folder holding subset0..9?")
    if skipped:
        message = (f"{len(skipped)} series of {paths['candidates']} have no .mhd under {data}"
                   f"{_missing_subsets(data)}, e.g. {skipped[0]['series_uid']}")
        _left_out(message, "; skipped and listed in the manifest", strict, warnings)
    unlisted = sorted(set(on_disk) - set(listed))
    if unlisted:
        message = (f"{len(unlisted)} CT(s) under {data} are in no row of {paths['candidates']}, "
                   f"e.g. {on_disk[unlisted[0]]}")
        _left_out(message, "; they are left out and listed in the manifest under unlisted", strict, warnings)
    findings = {name: [[a.series_uid, *a.center_xyz, a.diameter_mm] for a in table]
                for name, table in (("annotations", annotations), ("excluded", excluded))}
    return Inputs(join_annotations(candidates, annotations, malignancy),
                  {uid: on_disk[uid] for uid in listed if uid in on_disk}, skipped, unlisted, bad_rows, duplicates,
                  read, warnings, findings, annotations, found)


def _listed(rows: list) -> str:
    """Rows for a message, one a line: the first 20, then how many more."""
    more = f"\n  ... and {len(rows) - 20} more" if len(rows) > 20 else ""
    return "".join(f"\n  {row}" for row in rows[:20]) + more


def _check_series_of_tables(paths: dict[str, Path | None], listed: list[str], series_of: dict[str, set[str]],
                            series_list: list[str] | None, strict: bool) -> list[str]:
    """Refuse a table none of whose series the candidate table lists: it belongs to another data set
    or another subset of it, and a build from it would hold no nodule (or score against nothing).
    A table that only partly agrees is one warning line (under --strict, refused)."""
    candidates_table = paths["candidates"]
    listed_set = set(listed)
    if series_list is not None:
        series_of["series_list"] = set(series_list)
    warnings = []
    for name, series in series_of.items():
        outside = sorted(series - listed_set)
        if not outside:
            continue
        if len(outside) == len(series):
            raise InputError(f"{paths[name]}: none of its {len(series):,} series is in {candidates_table} "
                             f"({len(listed_set):,} series), e.g. {outside[0]}: is it the table of another data set? "
                             f"pass {TABLES[name].flag} with the table of these series")
        message = (f"{len(outside):,} of the {len(series):,} series of {paths[name]} are not in "
                   f"{candidates_table}, e.g. {outside[0]}")
        _left_out(message, "; their rows are not in the build", strict, warnings)
    if series_list is not None and (unscored := sorted(listed_set - set(series_list))):
        message = (f"{len(unscored):,} series of {candidates_table} are not in {paths['series_list']}, the series "
                   f"LUNA16 scores, e.g. {unscored[0]}")
        _left_out(message, "", strict, warnings)
    return warnings


def _left_out(message: str, consequence: str, strict: bool, warnings: list[str]) -> None:
    """Inputs that do not all go into the build: refused under --strict, else one warning line."""
    if strict:
        raise InputError(message + " (--strict)")
    warnings.append(f"warning: {message}{consequence}")


def _missing_subsets(data: Path) -> str:
    """Which of subset0..9 are missing, when the data has some of them: the likeliest cause of series without CTs."""
    present = {int(m.group(1)) for path in data.glob("**/subset*") if path.is_dir()
               and (m := SUBSET_FOLDER.match(path.name))}
    missing = [f"subset{n}/" for n in range(N_FOLDS) if n not in present]
    if not present or not missing:
        return ""
    return f" (no {', '.join(missing)} folder: {'is it' if len(missing) == 1 else 'are they'} still to download?)"


def _check_left_out(tables: dict[str, dict], bad_rows: list, max_percent: float) -> None:
    """Refuse a table that loses more than `max_percent` of its rows: it is not in the layout the build
    reads (numbers written by another program, shifted columns), and a build from its remains would
    silently miss most candidates or nodules."""
    for table in tables.values():
        if table["rows"] and 100 * table["left_out"] / table["rows"] > max_percent:
            share = 100 * table["left_out"] / table["rows"]
            example = next(row for row in bad_rows if row.path == table["path"])
            raise InputError(f"{table['path']}: {table['left_out']:,} of {table['rows']:,} rows ({share:.1f} %) cannot "
                             f"be used, e.g. {example}; more than {max_percent:g} % left out means the table is not in "
                             f"the layout the build reads: fix it, or pass --max-bad-rows {math.ceil(share)} to build "
                             f"from the {table['rows'] - table['left_out']:,} rows that can")


def left_out_summary(manifest: dict) -> str | None:
    """One line on the rows of each table a build left out or kept once, or None when it used every row."""
    tables = manifest.get("tables", {}).values()
    parts = []
    if left_out := [f"{t['left_out']:,} of {t['rows']:,} rows of {t['path']}" for t in tables if t["left_out"]]:
        parts.append(f"left out: {', '.join(left_out)} (malformed; listed in manifest.json under bad_rows)")
    if repeated := [f"{t['duplicates']:,} duplicate rows of {t['path']}" for t in tables if t.get("duplicates")]:
        parts.append(f"kept once: {', '.join(repeated)} (listed in manifest.json under duplicate_rows)")
    return "; ".join(parts) or None
