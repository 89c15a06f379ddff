"""A shard build's inputs, read and checked before anything is written: the CSV tables, the CTs they name,
and the rows and series left out (listed in the manifest).

A table that loses more than --max-bad-rows of its rows is refused: it is not in the
layout the build reads, and a build from its remains would silently miss most of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from luna_dist.candidates import Annotation, Candidate, find_series, join_annotations, read_annotations, read_candidates


class InputError(ValueError):
    """The inputs cannot be built from; nothing was written. The message names the file or flag to fix."""


@dataclass
class Inputs:
    """The checked inputs of a build: its candidates (joined with the annotations), their CTs, what is left out."""

    candidates: list[Candidate]
    series: dict[str, Path]  # UID -> .mhd, for the series of `candidates` found under --data
    skipped: list[dict]
    bad_rows: list
    tables: dict[str, dict]  # per CSV: its path, its data rows and how many were left out
    warnings: list[str]
    findings: dict[str, list]  # "annotations" and "excluded" rows [uid, x, y, z, diameter], for the evaluation
    annotations: list[Annotation]


def read_inputs(data: Path, tables: dict[str, Path | None], strict: bool, max_bad_rows: float) -> Inputs:
    """Read and check every input before anything is written, so a failed check leaves no trace in --out.

    `tables`: the CSVs by name (candidates, annotations, and malignancy and excluded or
    None); `strict` refuses any row left out, `max_bad_rows` a table that loses more than
    this percentage of its rows.
    """
    if not data.is_dir():
        raise InputError(f"{data}: no such folder (--data names the LUNA16-format folder)")
    candidates, bad_rows = read_candidates(tables["candidates"])
    annotations, bad_annotations = read_annotations(tables["annotations"])
    malignancy, bad_malignancy = read_annotations(tables["malignancy"]) if tables["malignancy"] else ([], [])
    excluded, bad_excluded = read_annotations(tables["excluded"], allow_unknown_diameter=True) \
        if tables["excluded"] else ([], [])
    read = {name: {"path": str(tables[name]), "rows": len(kept) + len(bad), "left_out": len(bad)}
            for name, kept, bad in (("candidates", candidates, bad_rows), ("annotations", annotations, bad_annotations),
                                    ("malignancy", malignancy, bad_malignancy), ("excluded", excluded, bad_excluded))
            if tables[name]}
    bad_rows = bad_rows + bad_annotations + bad_malignancy + bad_excluded
    warnings = []
    if bad_rows:
        shown = "\n  ".join(str(row) for row in bad_rows[:20])
        more = f"\n  ... and {len(bad_rows) - 20} more" if len(bad_rows) > 20 else ""
        message = f"{len(bad_rows)} malformed or duplicate CSV row(s):\n  {shown}{more}"
        if strict:
            raise InputError(message + "\n(--strict) fix the rows or run without --strict to leave them out")
        _check_left_out(read, bad_rows, max_bad_rows)
        warnings.append(f"warning: {message}\nthose rows are left out and listed in the manifest")
    if not candidates:
        raise InputError(f"{tables['candidates']}: no usable candidate rows; nothing to shard")

    found = find_series(data)
    listed = sorted({c.series_uid for c in candidates})
    skipped = [{"series_uid": uid, "reason": f"no {uid}.mhd under {data}"}
               for uid in listed if uid not in found]
    if len(skipped) == len(listed):
        raise InputError(f"none of the {len(listed)} series of {tables['candidates']} has a .mhd under {data} "
                         f"(e.g. {listed[0]}.mhd); is --data the folder holding subset0..9?")
    if skipped:
        if strict:
            raise InputError(f"{len(skipped)} series of {tables['candidates']} have no .mhd under {data}, "
                             f"e.g. {skipped[0]['series_uid']} (--strict)")
        warnings.append(f"warning: {len(skipped)} series of {tables['candidates']} have no .mhd under {data}; "
                        "skipped and listed in the manifest")
    findings = {name: [[a.series_uid, *a.center_xyz, a.diameter_mm] for a in table]
                for name, table in (("annotations", annotations), ("excluded", excluded))}
    return Inputs(join_annotations(candidates, annotations, malignancy),
                  {uid: found[uid] for uid in listed if uid in found}, skipped, bad_rows, read, warnings, findings,
                  annotations)


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
    """One line on the rows of each table a build left out, or None when it used them all."""
    tables = manifest.get("tables", {})
    parts = [f"{t['left_out']:,} of {t['rows']:,} rows of {t['path']}" for t in tables.values() if t["left_out"]]
    if not parts:
        return None
    return f"left out: {', '.join(parts)} (malformed or duplicate; listed in manifest.json under bad_rows)"
