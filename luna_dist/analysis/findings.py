"""What the analysis found, written and scored: detections.csv, the book's confusion table, LUNA16's FROC.

The scoring tables of the data folder (`annotations.csv`, with malignancy from
`annotations_with_malignancy.csv` and the excluded findings of `annotations_excluded.csv`
when present) are read and checked before the first CT is analysed (`read_truth`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from accelerate.logging import get_logger

from luna_dist.common.atomic import atomic_open
from luna_dist.common.out_folder import below
from luna_dist.evaluation.files import plot_froc, read_findings
from luna_dist.evaluation.luna16 import EvaluationError, Findings, Marks, froc
from luna_dist.tables.candidates import Annotation, CsvError, read_annotations
from luna_dist.tables.layout import TABLES, find_table

log = get_logger("luna_dist.analyze")

MATCH_DISTANCE = 0.7
"""A detection matches a nodule when its distance divided by the nodule's diameter is below this."""

DETECTION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "index", "row", "col", "voxels",
                     "diameter_mm", "volume_mm3", "p_nodule", "p_malignant")
"""detections.csv: position (mm, and continuous voxel indices), the group's voxels, longest axial diameter (mm)
and volume (mm³), both probabilities; sizes and p_malignant are empty where there are none."""

CONFUSION_ROWS = ("non-nodule", "benign", "malignant")

CONFUSION_COLUMNS = ("complete miss", "filtered out", "predicted benign", "predicted malignant")


# -- scoring ---------------------------------------------------------------------------------------
def confusion(detections: list[dict], nodules: list, threshold: float = 0.5, mal_threshold: float = 0.5) -> np.ndarray:
    """The 3x4 table of rows CONFUSION_ROWS by columns CONFUSION_COLUMNS, counting nodules and detections.

    A detection matches a nodule of its series when distance / diameter < MATCH_DISTANCE.
    A nodule takes the most advanced outcome among its matching detections (a miss when
    none matches); a detection matching no nodule is a non-nodule, filtered out below
    `threshold` of p_nodule. A detection is predicted malignant when p_malignant is at
    least `mal_threshold` (benign without a malignancy model). Unknown malignancy counts
    as benign, as in the book. The detections are sorted by series in one pass (LUNA16's
    candidates are 754,975 marks over 888 scans).
    """
    table = np.zeros((3, 4), dtype=np.int64)
    by_series: dict[str, tuple[list, list]] = {}
    for detection in detections:
        by_series.setdefault(detection["series_uid"], ([], []))[0].append(detection)
    for nodule in nodules:
        by_series.setdefault(nodule.series_uid, ([], []))[1].append(nodule)
    for found, truth in by_series.values():
        outcome = np.array([_outcome(d, threshold, mal_threshold) for d in found], dtype=np.int64)
        matches = relative_distances(np.array([d["xyz"] for d in found]), truth) < MATCH_DISTANCE
        for nodule, row in zip(truth, matches):
            table[2 if nodule.is_malignant else 1, outcome[row].max() if row.any() else 0] += 1
        for column in outcome[~matches.any(axis=0)]:
            table[0, column] += 1
    return table


def relative_distances(xyz: np.ndarray, nodules: list[Annotation]) -> np.ndarray:
    """(T, D) distance of each detection (D, 3) mm from each of T nodules, divided by the nodule's diameter:
    a detection matches a nodule below MATCH_DISTANCE."""
    xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    centres = np.array([n.center_xyz for n in nodules], dtype=np.float64).reshape(-1, 3)  # (T, 3)
    diameters = np.array([n.diameter_mm for n in nodules], dtype=np.float64)
    return np.linalg.norm(xyz[None] - centres[:, None], axis=2) / diameters[:, None]


def _outcome(detection: dict, threshold: float, mal_threshold: float) -> int:
    if detection["p_nodule"] < threshold:
        return 1
    p_malignant = detection["p_malignant"]
    return 3 if p_malignant is not None and p_malignant >= mal_threshold else 2


def confusion_cells(table: np.ndarray) -> list[list[str]]:
    """The table's cells as text, row by row; a non-nodule is never "missed", so that cell reads `-`."""
    return [["-" if name == "non-nodule" and column == 0 else str(v) for column, v in enumerate(row)]
            for name, row in zip(CONFUSION_ROWS, table)]


def format_confusion(table: np.ndarray) -> str:
    width = max(map(len, CONFUSION_COLUMNS)) + 1
    lines = [" " * 11 + "".join(f"{c:>{width}}" for c in CONFUSION_COLUMNS)]
    for name, cells in zip(CONFUSION_ROWS, confusion_cells(table)):
        lines.append(f"{name:>11}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


@dataclass
class Truth:
    """The data folder's answer tables, read and checked before the first CT is analysed."""

    nodules: list[Annotation]  # for the confusion table, with malignancy where the malignancy table is present
    findings: Findings  # annotations.csv, for LUNA16's FROC
    excluded: Findings | None  # annotations_excluded.csv, where present


def read_truth(data: Path) -> Truth | None:
    """The tables that score the findings (None without `annotations.csv`), found where the shard build
    finds them (`luna_dist.tables.layout`); a malformed row is an EvaluationError naming its file and line,
    found now rather than after every CT was analysed."""
    try:
        annotations_csv, malignancy_csv, excluded_csv = (find_table(data, TABLES[name].names[0])
                                                         for name in ("annotations", "malignancy", "excluded"))
        if annotations_csv is None:
            return None
        findings = read_findings(annotations_csv)
        excluded = read_findings(excluded_csv, excluded=True) if excluded_csv else None
        nodules, bad = read_annotations(malignancy_csv or annotations_csv)
        if bad:
            raise EvaluationError(str(bad[0]))
    except (EvaluationError, CsvError) as err:
        raise EvaluationError(f"{err} (this table scores the findings: fix it, or move it out of {data} to "
                              "analyse without scoring)") from None
    return Truth(nodules, findings, excluded)


def score(analysed: list[str], detections: list[dict], marks: Marks, truth: Truth, out: Path) -> dict:
    """Confusion table and LUNA16 FROC/CPM of the findings (`marks`: the same as submission marks)."""
    wanted = set(analysed)
    nodules = [n for n in truth.nodules if n.series_uid in wanted]
    table = confusion(detections, nodules)
    matched, predicted = int(table[1:, 1:].sum()), int(table[1:, 2:].sum())
    summary = {"confusion": {"rows": list(CONFUSION_ROWS), "columns": list(CONFUSION_COLUMNS),
                             "table": table.tolist()},
               "nodules": len(nodules), "nodules_matched": matched, "nodules_predicted": predicted,
               "detections_predicted": int(table[:, 2:].sum()), "false_detections_predicted": int(table[0, 2:].sum())}
    result = froc(analysed, truth.findings, marks, truth.excluded, bootstrap=1000, band_points=200)
    summary["froc"] = result.to_json()
    try:
        plot_froc(result, below(out, "froc.png"), title=f"FROC of {out / 'submission.csv'}")
    except ImportError:
        log.warning("matplotlib is not installed: no froc.png (pip install 'luna_dist[plot]')")
    log.info(f"{matched} of {len(nodules)} nodules matched by a detection, {predicted} of them predicted nodules\n"
             f"{format_confusion(table)}\nLUNA16: {result.summary()}")
    return summary


def marks_of(detections: list[dict]) -> Marks:
    """The detections as LUNA16 marks, probability = p_nodule."""
    return Marks(np.array([d["series_uid"] for d in detections], dtype=str),
                 np.array([d["xyz"] for d in detections], dtype=np.float64).reshape(-1, 3),
                 np.array([d["p_nodule"] for d in detections], dtype=np.float64))


def write_detections(path: Path, results: list[dict]) -> None:
    with atomic_open(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(DETECTION_COLUMNS)
        for r in sorted(results, key=lambda r: r["series_uid"]):
            for d in sorted(r["detections"], key=lambda d: -d["p_nodule"]):
                optional = ["" if d[key] is None else f"{d[key]:.6g}" for key in ("diameter_mm", "volume_mm3")]
                p_malignant = "" if d["p_malignant"] is None else f"{d['p_malignant']:.6g}"
                writer.writerow([r["series_uid"], *(f"{v:.3f}" for v in d["xyz"]), *d["irc"], d["voxels"],
                                 *optional, f"{d['p_nodule']:.6g}", p_malignant])
