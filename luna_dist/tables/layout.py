"""Where a LUNA16 download keeps its tables: found as it comes, or named missing with the flag to pass.

The download unpacks `subset0..9/` (the CTs), `annotations.csv`, `candidates.csv` and
`candidates_V2.csv` (at the top, or each in a folder of its own when unzipped so), and the
evaluation kit, whose `evaluationScript/annotations/` holds `annotations_excluded.csv` and
the header-less `seriesuids.csv`. The book's `annotations_with_malignancy.csv` lies wherever
its user put it. A table is looked for at the top of the data folder and up to two folders
down; the shallowest copy wins, and two different copies at one depth are refused rather than
guessed between.

LUNA16 says `candidates.csv` "should not be used, use candidates_V2.csv instead" (V2 is
what its false-positive-reduction track scores), so V2 is preferred when both are there, and
the choice is said.
"""

from __future__ import annotations

import filecmp
from dataclasses import dataclass, field
from pathlib import Path

from luna_dist.tables.candidates import CsvError

SEARCH_DEPTH = 2
"""Folders below the data folder a table is looked for in: `candidates_V2/`, `evaluationScript/annotations/`."""


@dataclass(frozen=True)
class Table:
    """One input table: the names it goes by (preferred first), the flag that names it, and whether a build needs it."""

    names: tuple[str, ...]
    flag: str
    required: bool
    what: str


TABLES = {
    "candidates": Table(("candidates_V2.csv", "candidates.csv"), "--candidates", True, "the points to classify"),
    "annotations": Table(("annotations.csv",), "--annotations", True, "the nodules"),
    "excluded": Table(("annotations_excluded.csv",), "--excluded", False, "findings LUNA16's evaluation ignores"),
    "series_list": Table(("seriesuids.csv",), "--seriesuids", False, "the series LUNA16 scores"),
    "malignancy": Table(("annotations_with_malignancy.csv",), "--malignancy", False, "the nodules' malignancy"),
}


@dataclass
class Found:
    """The tables a command uses (None: absent and not required), and how each was chosen."""

    paths: dict[str, Path | None]
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        """The lines a command prints before its work: which file it uses for what."""
        lines = [f"  {name:<12} {path}" for name, path in self.paths.items() if path is not None]
        return "\n".join(["tables:", *lines, *self.notes])


def find_table(data: Path, name: str) -> Path | None:
    """The shallowest file of `data` (and up to SEARCH_DEPTH folders down) called `name`, or None.

    Two different files of that name at the same depth are refused with both paths: which
    one is meant cannot be told. Identical copies (the download's and the evaluation kit's
    `annotations.csv`) are one table.
    """
    for depth in range(SEARCH_DEPTH + 1):
        pattern = "/".join(["*"] * depth + [name])
        copies = sorted(path for path in data.glob(pattern) if path.is_file())
        if not copies:
            continue
        different = [path for path in copies[1:] if not filecmp.cmp(copies[0], path, shallow=False)]
        if different:
            raise CsvError(f"{copies[0]} and {different[0]} differ; pass {_flag_of(name)} to say which to use")
        return copies[0]
    return None


def _flag_of(file_name: str) -> str:
    return next(table.flag for table in TABLES.values() if file_name in table.names)


def find_tables(data: Path, given: dict[str, Path | None], wanted: tuple[str, ...] = tuple(TABLES)) -> Found:
    """The `wanted` tables: as given by their flags, else as found under `data`.

    A required table found nowhere is a CsvError naming the files looked for and its flag;
    a given path that is not a file likewise.
    """
    paths, notes = {}, []
    for name in wanted:
        table = TABLES[name]
        if given.get(name) is not None:
            path = Path(given[name])
            if not path.is_file():
                raise CsvError(f"{table.flag} {path}: no such file")
            paths[name] = path
            continue
        found = {file_name: find_table(data, file_name) for file_name in table.names}
        present = [path for path in found.values() if path is not None]
        if not present and table.required:
            looked_for = " or ".join(table.names)
            raise CsvError(f"no {looked_for} ({table.what}) in {data} or up to {SEARCH_DEPTH} folders below it; "
                           f"pass {table.flag} PATH")
        paths[name] = present[0] if present else None
        if len(present) > 1:
            notes.append(f"note: using {present[0].name}, not {present[1]}: LUNA16 says candidates.csv "
                         f"\"should not be used, use candidates_V2.csv instead\"; pass {table.flag} to choose")
    return Found(paths, notes)
