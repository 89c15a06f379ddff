"""`python -m luna_dist.analyze`: from CT files to scored nodule findings, over any number of processes.

    accelerate launch -m luna_dist.analyze --data DIR --seg-model S --cls-model C [--mal-model M] \\
        [--shards BUILD] [--folds 9 | --series UID ...] [--candidates candidates.csv] --out RESULTS
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m luna_dist.analyze ...   # CPU ranks

For each CT: the UNet segments every slice from its 7-slice context (stacks built on
the device, slices in batches), probability > SEG_THRESHOLD, EROSION_ITERATIONS binary
erosion; 3-D connected components are the groups, each placed at its centre of mass
weighted by HU + 1001; each group's 32x48x48 chunk is cut as the shard build cuts it
and scored by the nodule classifier, then by the malignancy model. With `--candidates`
the given positions are scored instead of the segmentation's groups (LUNA16's
false-positive reduction track), and reported at exactly the positions given.

`--folds` takes a fold's series as the shard build deals them (`folds_as_built`);
`--shards BUILD --folds K` takes exactly the series that build holds in fold K.

Each CT is analysed by exactly one process (CTs dealt largest first to the least
loaded process, so ranks finish together), its findings written atomically to
`RESULTS/ct/<uid>.json` with what produced them (`produced_by`: analysis version,
mode, the sha256 of each model's weights and of the CT's candidates, thresholds,
mixed precision, the CT's header and data size). A rerun reuses a CT only when all of
that is the same and redoes it otherwise; a CT that cannot be read is reported and
left out. The main process gathers every process's findings and writes
`detections.csv` (every group with both probabilities), `submission.csv` (LUNA16
format, probability = p_nodule) and `summary.json`. When `DIR/annotations.csv`
exists (its tables are checked before the first CT) it also scores them: the
confusion table of nodules found, filtered out and predicted benign or malignant, and
LUNA16's FROC/CPM of `submission.csv`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from scipy import ndimage
from torch import Tensor, nn

from luna_dist import __version__
from luna_dist.atomic import atomic_open, write_json
from luna_dist.candidates import (
    Annotation,
    CsvError,
    find_series,
    folds_as_built,
    read_annotations,
    read_candidates,
)
from luna_dist.ct import HU_MAX, HU_MIN, CtError, cut_chunks, read_ct
from luna_dist.evaluate import (
    EvaluationError,
    Findings,
    Marks,
    shard_findings,
    froc,
    plot_froc,
    read_findings,
    write_marks,
)
from luna_dist.geometry import irc_to_xyz, nearest_voxel, xyz_to_irc_float
from luna_dist.model import LunaModel, SegmentationModel, WeightsError, load_into
from luna_dist.seg_samples import CONTEXT

log = get_logger("luna_dist.analyze")

ANALYSIS_VERSION = 2
"""Part of every CT's `produced_by`: bumped whenever the same inputs would give other findings, so a rerun
redoes the CTs of an earlier version (version 1 wrote no `produced_by`; its findings sat on voxel centres)."""
SEG_THRESHOLD = 0.5
"""A voxel is segmented where the UNet's probability exceeds this."""
EROSION_ITERATIONS = 1
"""Binary erosions of the segmentation before grouping: they cut the thin bridges between structures."""
MIN_EXTENT = 2 * EROSION_ITERATIONS + 1
"""Voxels a CT needs along each axis for anything to survive the erosion (the volume's border erodes too)."""
GROUP_SLAB_SHARE = 16
"""A group's bounding box is summed a slab of slices at a time, each at most 1/16 of the CT (one slice at
least): the slab's temporaries (5 bytes a voxel) stay below a third of a byte per voxel of the CT."""
MATCH_DISTANCE = 0.7
"""A detection matches a nodule when its distance divided by the nodule's diameter is below this."""
DETECTION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "index", "row", "col", "voxels",
                     "p_nodule", "p_malignant")
CONFUSION_ROWS = ("non-nodule", "benign", "malignant")
CONFUSION_COLUMNS = ("complete miss", "filtered out", "predicted benign", "predicted malignant")


class AnalysisError(Exception):
    """The analysis cannot start or finish; the message names the file or flag to fix."""


@dataclass
class Models:
    """The networks of the pipeline, in eval mode on one device, and the sha256 of each one's weights."""

    seg: nn.Module | None  # None in candidates mode
    nodule: nn.Module
    malignancy: nn.Module | None
    sha256: dict[str, str | None] = field(default_factory=dict)  # "seg", "nodule", "malignancy"; None: absent


def load_model(model: nn.Module, path: Path, device: torch.device) -> tuple[nn.Module, str]:
    """Weights from a best.pt or a run's state/ folder into `model`, ready for inference on `device`; and
    their sha256 (`weights_sha256`)."""
    try:
        load_into(model, Path(path))
    except (FileNotFoundError, WeightsError) as err:
        raise AnalysisError(str(err)) from None
    sha256 = weights_sha256(model)  # before the move: no copy back from the device
    return model.to(device).eval(), sha256


def weights_sha256(model: nn.Module) -> str:
    """sha256 of a network's state: each tensor's name, dtype, shape and bytes, in name order.

    Hashes what was loaded rather than the file, so a best.pt and the state/ folder of the
    same weights agree, and a re-saved file of the same weights changes nothing.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name} {tensor.dtype} {list(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy())
    return digest.hexdigest()


def load_models(args: argparse.Namespace, device: torch.device, candidates_mode: bool) -> Models:
    """The networks the mode needs (no segmentation model in candidates mode), each with its weights' sha256."""
    loaded = {"seg": None if candidates_mode else load_model(SegmentationModel(), args.seg_model, device),
              "nodule": load_model(LunaModel(), args.cls_model, device),
              "malignancy": load_model(LunaModel(), args.mal_model, device) if args.mal_model else None}
    network = {name: pair[0] if pair else None for name, pair in loaded.items()}
    return Models(network["seg"], network["nodule"], network["malignancy"],
                  {name: pair[1] if pair else None for name, pair in loaded.items()})


# -- the three stages of one CT -----------------------------------------------------------------
@torch.no_grad()
def segment(hu: Tensor, model: nn.Module, batch_size: int, autocast) -> Tensor:
    """Nodule probability > SEG_THRESHOLD of every voxel, (I, R, C) bool on hu's device.

    `hu` is the CT (I, R, C) float32 on the device. The context stacks are gathered
    there by index (the slice and CONTEXT on each side, clamped at the volume's ends,
    as the segmentation shards cut them).
    """
    slices = hu.shape[0]
    offsets = torch.arange(-CONTEXT, CONTEXT + 1, device=hu.device)
    mask = torch.empty(hu.shape, dtype=torch.bool, device=hu.device)
    for start in range(0, slices, batch_size):
        centre = torch.arange(start, min(start + batch_size, slices), device=hu.device)
        stacks = hu[(centre[:, None] + offsets).clamp(0, slices - 1)]  # (B, 7, R, C)
        with autocast():
            probability = model(stacks)  # (B, 1, R, C)
        mask[centre] = probability[:, 0] > SEG_THRESHOLD
    return mask


def group(mask: np.ndarray, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected groups of a segmentation after the erosion: centres (N, 3) IRC float and voxel counts (N,).

    `hu` is the CT's int16 HU. A centre is the group's centre of mass weighted by
    HU + 1001 (HU clipped to [-1000, 1000]), so denser voxels pull harder and air still
    weighs a little. The eroded mask (1 byte a voxel) and the labels (4 bytes) are the
    only arrays the size of the CT; each group is summed within its bounding box, in
    integers: the same centres as scipy's `center_of_mass` (whose float64 sums of these
    integer weights are exact too) without its whole-volume float64 temporaries.
    """
    eroded = ndimage.binary_erosion(mask, iterations=EROSION_ITERATIONS)
    labels, count = ndimage.label(eroded)
    del eroded  # labelled: the grouping needs only the labels from here on
    centres, voxels = np.zeros((count, 3)), np.zeros(count, dtype=np.int64)
    slab_voxels = labels.size // GROUP_SLAB_SHARE
    for index, box in enumerate(ndimage.find_objects(labels)):
        voxels[index], centres[index] = _box_centre(labels, hu, index + 1, box, slab_voxels)
    return centres, voxels


def _box_centre(labels: np.ndarray, hu: np.ndarray, label: int, box: tuple[slice, slice, slice],
                slab_voxels: int) -> tuple[int, np.ndarray]:
    """Voxel count and weighted centre (3,) IRC of group `label`, from the per-axis sums of its weights
    over its bounding box `box`, a slab of slices at a time."""
    step = max(1, slab_voxels // ((box[1].stop - box[1].start) * (box[2].stop - box[2].start)))
    count, per_slice, per_row, per_column = 0, [], 0, 0
    for first in range(box[0].start, box[0].stop, step):
        slab = (slice(first, min(first + step, box[0].stop)), box[1], box[2])
        inside = labels[slab] == label
        weight = hu[slab].astype(np.int32)
        np.clip(weight, HU_MIN, HU_MAX, out=weight)
        weight += 1001
        weight *= inside
        count += int(np.count_nonzero(inside))
        per_slice.append(weight.sum(axis=(1, 2), dtype=np.int64))
        per_row = per_row + weight.sum(axis=(0, 2), dtype=np.int64)
        per_column = per_column + weight.sum(axis=(0, 1), dtype=np.int64)
    sums = [np.concatenate(per_slice), per_row, per_column]
    moments = [int(s @ np.arange(b.start, b.stop, dtype=np.int64)) for s, b in zip(sums, box)]
    return count, np.array(moments, dtype=np.float64) / float(sums[0].sum())


@torch.no_grad()
def classify(hu: np.ndarray, centres_irc: np.ndarray, models: Models, device: torch.device, batch_size: int,
             autocast) -> tuple[np.ndarray, np.ndarray]:
    """p_nodule and p_malignant (NaN without a malignancy model) of the chunk around each centre.

    A chunk is cut around the voxel holding the centre, halves rounded up as the shard
    build rounds them, so the classifier sees what it was trained on.
    """
    p_nodule, p_malignant = np.zeros(len(centres_irc)), np.full(len(centres_irc), np.nan)
    for start in range(0, len(centres_irc), batch_size):
        chunks, _ = cut_chunks(hu, nearest_voxel(centres_irc[start:start + batch_size]))
        x = torch.from_numpy(chunks).to(device, non_blocking=True).float()[:, None]  # (B, 1, 32, 48, 48)
        end = start + len(chunks)
        with autocast():
            p_nodule[start:end] = models.nodule(x)[1][:, 1].float().cpu().numpy()
            if models.malignancy is not None:
                p_malignant[start:end] = models.malignancy(x)[1][:, 1].float().cpu().numpy()
    return p_nodule, p_malignant


def analyze_ct(mhd: Path, models: Models, device: torch.device, batch_size: int, autocast,
               candidates_xyz: np.ndarray | None = None) -> dict:
    """Findings of one CT, with the seconds each stage took.

    Given candidates keep their coordinates: only the chunk's cut rounds them to a voxel.
    """
    seconds = {}
    started = time.perf_counter()
    ct = read_ct(mhd)
    seconds["read"] = time.perf_counter() - started
    if candidates_xyz is None:
        centres_irc, voxels = _segment_and_group(ct.hu, models.seg, device, batch_size, autocast, seconds)
        centres_xyz = irc_to_xyz(centres_irc, ct.geometry)
    else:
        centres_xyz = np.asarray(candidates_xyz, dtype=np.float64).reshape(-1, 3)
        centres_irc = xyz_to_irc_float(centres_xyz, ct.geometry)
        voxels = np.zeros(len(centres_irc), dtype=np.int64)
    started = time.perf_counter()
    p_nodule, p_malignant = classify(ct.hu, centres_irc, models, device, batch_size, autocast)
    seconds["classify"] = time.perf_counter() - started
    detections = [
        {"xyz": [round(v, 3) for v in xyz], "irc": [round(v, 2) for v in irc], "voxels": int(n),
         "p_nodule": float(pn), "p_malignant": None if np.isnan(pm) else float(pm)}
        for xyz, irc, n, pn, pm in zip(centres_xyz.tolist(), centres_irc.tolist(), voxels, p_nodule, p_malignant)
    ]
    return {"series_uid": ct.series_uid, "voxels": int(ct.hu.size), "shape": list(ct.hu.shape), "seconds": seconds,
            "detections": detections}


def _segment_and_group(hu: np.ndarray, model: nn.Module, device: torch.device, batch_size: int, autocast,
                       seconds: dict) -> tuple[np.ndarray, np.ndarray]:
    """The groups' centres (IRC) and sizes; the host copy of the mask lives only as long as this call."""
    started = time.perf_counter()
    on_device = torch.from_numpy(np.require(hu, requirements='W')).to(device).float().clamp_(HU_MIN, HU_MAX)
    mask = segment(on_device, model, batch_size, autocast).cpu().numpy()
    del on_device
    seconds["segment"] = time.perf_counter() - started
    started = time.perf_counter()
    grouped = group(mask, hu)
    seconds["group"] = time.perf_counter() - started
    return grouped


# -- distribution ---------------------------------------------------------------------------------
def ct_voxels(mhd: Path) -> int:
    """Voxel count from the image header alone (0 when unreadable: the analysis reports it)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(mhd))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return 0
    return int(np.prod(reader.GetSize()))


def assign(sizes: dict[str, int], processes: int) -> list[list[str]]:
    """Deal series to processes largest first, each to the least loaded: every series exactly once."""
    loads, shares = [0] * processes, [[] for _ in range(processes)]
    for uid in sorted(sizes, key=lambda u: (-sizes[u], u)):
        rank = min(range(processes), key=lambda r: (loads[r], r))
        shares[rank].append(uid)
        loads[rank] += max(1, sizes[uid])
    return shares


# -- what produced a CT's findings ------------------------------------------------------------------
_DATA_FILE = re.compile(rb"^\s*ElementDataFile\s*=\s*(.*?)\s*$", re.MULTILINE)


def ct_identity(mhd: Path) -> dict:
    """The CT without where it lies: sha256 of its header and the size of its data file (None: unknown).

    Cheap (no voxel is read), and a copied or moved data folder is still the same CT,
    while a new header or a replaced .raw of another size is not.
    """
    try:
        header = Path(mhd).read_bytes()
    except OSError:
        return {"header_sha256": None, "data_bytes": None}  # reading it fails too, and is reported
    named = _DATA_FILE.search(header)
    data_file = Path(mhd).parent / named.group(1).decode(errors="replace") if named else None
    return {"header_sha256": hashlib.sha256(header).hexdigest(),
            "data_bytes": data_file.stat().st_size if data_file is not None and data_file.is_file() else None}


def positions_sha256(xyz: np.ndarray) -> str:
    """sha256 of one CT's candidate positions as float64: editing another series' rows leaves it alone."""
    return hashlib.sha256(np.ascontiguousarray(xyz, dtype=np.float64).tobytes()).hexdigest()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def produced_by(models: Models, mixed_precision: str, candidates_mode: bool) -> dict:
    """What every CT of this run shares in its `produced_by`; `ct_produced_by` adds the CT's own part."""
    return {"analysis_version": ANALYSIS_VERSION, "mode": "candidates" if candidates_mode else "segmentation",
            "models": dict(models.sha256),
            "seg_threshold": None if candidates_mode else SEG_THRESHOLD,
            "erosion_iterations": None if candidates_mode else EROSION_ITERATIONS,
            "mixed_precision": mixed_precision}


def ct_produced_by(shared: dict, mhd: Path, candidates_xyz: np.ndarray | None) -> dict:
    return {**shared, "candidates_sha256": None if candidates_xyz is None else positions_sha256(candidates_xyz),
            "ct": ct_identity(mhd)}


def finished_result(path: Path, wanted: dict) -> tuple[dict | None, bool]:
    """The findings stored at `path` when `wanted` produced them, else None; and whether a file was there."""
    if not path.is_file():
        return None, False
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, True  # unreadable: redone and overwritten
    return (result if isinstance(result, dict) and result.get("produced_by") == wanted else None), True


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
        if found and truth:
            xyz = np.array([d["xyz"] for d in found], dtype=np.float64)  # (D, 3)
            centres = np.array([n.center_xyz for n in truth], dtype=np.float64)  # (T, 3)
            diameters = np.array([n.diameter_mm for n in truth], dtype=np.float64)
            distance = np.linalg.norm(xyz[None] - centres[:, None], axis=2) / diameters[:, None]  # (T, D)
            matches = distance < MATCH_DISTANCE
        else:
            matches = np.zeros((len(truth), len(found)), dtype=bool)
        for nodule, row in zip(truth, matches):
            table[2 if nodule.is_malignant else 1, outcome[row].max() if row.any() else 0] += 1
        for column in outcome[~matches.any(axis=0)]:
            table[0, column] += 1
    return table


def _outcome(detection: dict, threshold: float, mal_threshold: float) -> int:
    if detection["p_nodule"] < threshold:
        return 1
    p_malignant = detection["p_malignant"]
    return 3 if p_malignant is not None and p_malignant >= mal_threshold else 2


def format_confusion(table: np.ndarray) -> str:
    width = max(map(len, CONFUSION_COLUMNS)) + 1
    lines = [" " * 11 + "".join(f"{c:>{width}}" for c in CONFUSION_COLUMNS)]
    for name, row in zip(CONFUSION_ROWS, table):
        # A non-nodule is never "missed": that cell has no meaning.
        cells = ["-" if name == "non-nodule" and column == 0 else str(v) for column, v in enumerate(row)]
        lines.append(f"{name:>11}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


@dataclass
class Truth:
    """The data folder's answer tables, read and checked before the first CT is analysed."""

    nodules: list[Annotation]  # for the confusion table, with malignancy where the malignancy table is present
    findings: Findings  # annotations.csv, for LUNA16's FROC
    excluded: Findings | None  # annotations_excluded.csv, where present


def read_truth(data: Path) -> Truth | None:
    """The tables that score the findings (None without `annotations.csv`); a malformed row is an
    AnalysisError naming its file and line, found now rather than after every CT was analysed."""
    annotations_csv = data / "annotations.csv"
    if not annotations_csv.is_file():
        return None
    malignancy_csv, excluded_csv = data / "annotations_with_malignancy.csv", data / "annotations_excluded.csv"
    try:
        findings = read_findings(annotations_csv)
        excluded = read_findings(excluded_csv, excluded=True) if excluded_csv.is_file() else None
        nodules, bad = read_annotations(malignancy_csv if malignancy_csv.is_file() else annotations_csv)
        if bad:
            raise EvaluationError(str(bad[0]))
    except (EvaluationError, CsvError) as err:
        raise AnalysisError(f"{err} (this table scores the findings: fix it, or move it out of {data} to "
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
        plot_froc(result, out / "froc.png", title=f"FROC of {out / 'submission.csv'}")
    except ImportError:
        log.warning("matplotlib is not installed: no froc.png (pip install 'luna_dist[plot]')")
    log.info(f"{matched} of {len(nodules)} nodules matched by a detection, {predicted} of them predicted nodules\n"
             f"{format_confusion(table)}\nLUNA16: {result.summary()}")
    return summary


def _marks(detections: list[dict]) -> Marks:
    return Marks(np.array([d["series_uid"] for d in detections], dtype=str),
                 np.array([d["xyz"] for d in detections], dtype=np.float64).reshape(-1, 3),
                 np.array([d["p_nodule"] for d in detections], dtype=np.float64))


def write_detections(path: Path, results: list[dict]) -> None:
    with atomic_open(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(DETECTION_COLUMNS)
        for r in sorted(results, key=lambda r: r["series_uid"]):
            for d in sorted(r["detections"], key=lambda d: -d["p_nodule"]):
                p_malignant = "" if d["p_malignant"] is None else f"{d['p_malignant']:.6g}"
                writer.writerow([r["series_uid"], *(f"{v:.3f}" for v in d["xyz"]), *d["irc"], d["voxels"],
                                 f"{d['p_nodule']:.6g}", p_malignant])


# -- choosing the series ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m luna_dist.analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="LUNA16-format folder (subset*/ with .mhd/.raw)")
    parser.add_argument("--seg-model", type=Path, help="segmentation model: best.pt or a run's state/ folder")
    parser.add_argument("--cls-model", type=Path, required=True, help="nodule classifier: best.pt or state/")
    parser.add_argument("--mal-model", type=Path, help="malignancy classifier: best.pt or state/ (optional)")
    parser.add_argument("--shards", help="a shard build (folder or URL): analyse the series its manifest holds "
                                         "(in --folds, when given), exactly")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--folds", type=int, nargs="+",
                       help="analyse the series of these folds, dealt as the shard build deals them (default: all)")
    which.add_argument("--series", nargs="+", help="analyse these series")
    parser.add_argument("--candidates", type=Path,
                        help="score these candidate positions instead of the segmentation's groups")
    parser.add_argument("--out", type=Path, required=True, help="results folder")
    parser.add_argument("--batch-size", type=int, default=32, help="slices, and chunks, per forward pass")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.candidates is None and args.seg_model is None:
        parser.error("--seg-model is needed (or --candidates CSV to score given positions)")
    if args.shards and args.series:
        parser.error("--shards takes the series of a build's folds: give --folds (or nothing), not --series")
    return args


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
    `DATA/candidates.csv` lists, as the build deals them: dealt over the files on
    disk instead, one extra .mhd would shift every later fold and put training CTs in
    the held-out one.
    """
    in_subsets = folds_as_built(found, ())
    loose = len(found) - len(in_subsets)
    if not loose:
        return in_subsets, None
    table = data / "candidates.csv"
    if not table.is_file():
        raise AnalysisError(f"--folds: {loose} series under {data} lie outside subsetN folders, and their folds are "
                            f"dealt over {table}, which is missing; give --shards BUILD to analyse a build's folds")
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
        candidates, bad = read_candidates(path)
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


# -- the command ------------------------------------------------------------------------------------
@dataclass
class Share:
    """What one process did with its CTs."""

    results: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    reused: int = 0  # found finished, produced as this run would produce them
    redone: int = 0  # found finished but produced otherwise: analysed again and overwritten
    write_error: str | None = None  # why a result could not be written; the share stops there


def analyse_share(share: list[str], series: dict[str, Path], positions: Positions | None, models: Models,
                  shared: dict, args: argparse.Namespace, accelerator: Accelerator) -> Share:
    """Analyse (or reuse) this process's CTs, writing each one's findings as soon as it is done."""
    done, per_ct = Share(), args.out / "ct"
    for uid in share:
        path, xyz = per_ct / f"{uid}.json", None if positions is None else positions.xyz[uid]
        wanted = ct_produced_by(shared, series[uid], xyz)
        result, existed = finished_result(path, wanted)
        if result is not None:
            done.results.append(result)
            done.reused += 1
            continue
        try:
            result = analyze_ct(series[uid], models, accelerator.device, args.batch_size, accelerator.autocast, xyz)
        except CtError as err:
            done.failed.append({"series_uid": uid, "path": str(series[uid]), "error": str(err)})
            print(f"error: {err}; {uid} left out", file=sys.stderr)
            continue
        result["produced_by"] = wanted
        try:
            write_json(path, result)
        except OSError as err:
            done.write_error = f"{err.strerror or err}: {err.filename or path}"
            break  # the others would not be written either; what is written stays
        done.results.append(result)
        done.redone += existed
        print(f"rank {accelerator.process_index}: {uid}: {len(result['detections'])} groups in "
              f"{sum(result['seconds'].values()):.1f} s", file=sys.stderr)
        if xyz is None and min(result["shape"]) < MIN_EXTENT:
            print(f"warning: {series[uid]}: {'x'.join(map(str, result['shape']))} voxels, under {MIN_EXTENT} along "
                  f"an axis: the segmentation's erosion leaves nothing, so it can give no detection (--candidates "
                  "scores given positions)", file=sys.stderr)
    return done


def unwritable(reason: str, out: Path, kept: int) -> str:
    return (f"cannot write in --out {out} ({reason}); nothing finished was lost: {kept} CT(s) are kept in "
            f"{out / 'ct'}; free space or make it writable, and rerunning the same command resumes")


def run(args: argparse.Namespace) -> dict:
    accelerator = Accelerator()
    try:
        return _run(args, accelerator)
    finally:
        accelerator.end_training()  # a process group left to the interpreter's exit can abort it


def _run(args: argparse.Namespace, accelerator: Accelerator) -> dict:
    # Every input is read and checked before the first CT: a bad one costs seconds, not an analysis.
    is_main = accelerator.is_main_process
    found = find_on_disk(args.data)
    series, note = select_series(args, found)
    truth = read_truth(args.data)
    positions = candidate_positions(args.candidates, series, found) if args.candidates else None
    if is_main:
        for line in ([note] if note else []) + (candidate_warnings(positions, args.candidates, args.data)
                                                if positions else []):
            print(line, file=sys.stderr)
    models = load_models(args, accelerator.device, positions is not None)
    shared = produced_by(models, accelerator.mixed_precision, positions is not None)
    try:
        (args.out / "ct").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AnalysisError(unwritable(f"{err.strerror}: {err.filename}", args.out, 0)) from None
    accelerator.wait_for_everyone()

    share = assign({uid: ct_voxels(path) for uid, path in series.items()}, accelerator.num_processes)
    done = analyse_share(share[accelerator.process_index], series, positions, models, shared, args, accelerator)
    results, failed = gather_object(done.results), gather_object(done.failed)
    reused, redone = (sum(gather_object([n])) for n in (done.reused, done.redone))
    write_errors = gather_object([done.write_error] if done.write_error else [])
    if write_errors:  # raised on every process alike, so none waits for the others
        raise AnalysisError(unwritable(write_errors[0], args.out, len(results)))

    summary, output_error = {}, None
    if is_main:
        if redone:
            log.info(f"{redone} CT(s) redone: their findings in {args.out / 'ct'} were produced otherwise "
                     "(another analysis version, mode, model, candidates, precision or CT)")
        summary = {"series": len(series), "analysed": len(results), "resumed": reused, "redone": redone,
                   "failed": failed, "processes": accelerator.num_processes,
                   "candidate_rows_not_on_disk": sum(positions.not_on_disk.values()) if positions else 0,
                   "produced_by": run_produced_by(args, models, shared)}
        try:
            summary = write_outputs(args, results, summary, truth)
        except OSError as err:
            output_error = unwritable(f"{err.strerror or err}: {err.filename}", args.out, len(results))
    accelerator.wait_for_everyone()
    if output_error:
        raise AnalysisError(output_error)
    if failed:
        raise AnalysisError(f"{len(failed)} CT(s) could not be analysed, the others are in {args.out}: "
                            + "; ".join(f["error"] for f in failed) + "; fix them and rerun to add them")
    return summary


def run_produced_by(args: argparse.Namespace, models: Models, shared: dict) -> dict:
    """What produced the whole result folder, for summary.json: versions, arguments, models and inputs."""
    paths = {"seg": args.seg_model, "nodule": args.cls_model, "malignancy": args.mal_model}
    return {"luna_dist": __version__, "analysis_version": ANALYSIS_VERSION,
            "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "mode": shared["mode"],
            "models": {name: {"path": str(paths[name]), "sha256": sha} if sha else None
                       for name, sha in models.sha256.items()},
            "candidates": {"path": str(args.candidates), "sha256": file_sha256(args.candidates)}
            if args.candidates else None,
            "seg_threshold": shared["seg_threshold"], "erosion_iterations": shared["erosion_iterations"],
            "mixed_precision": shared["mixed_precision"]}


def write_outputs(args: argparse.Namespace, results: list[dict], summary: dict, truth: Truth | None) -> dict:
    """detections.csv, submission.csv, the scores and summary.json, from every process's findings."""
    write_detections(args.out / "detections.csv", results)
    detections = [{**d, "series_uid": r["series_uid"]} for r in results for d in r["detections"]]
    marks = _marks(detections)
    write_marks(args.out / "submission.csv", marks)
    seconds = {stage: sum(r["seconds"].get(stage, 0.0) for r in results) for stage in
               ("read", "segment", "group", "classify")}
    analysed = sorted(r["series_uid"] for r in results)
    summary = {**summary, "detections": len(detections), "mode": summary["produced_by"]["mode"], "seconds": seconds,
               **(score(analysed, detections, marks, truth, args.out) if truth else {})}
    write_json(args.out / "summary.json", summary)
    log.info(f"{len(results)} of {summary['series']} CTs analysed ({summary['resumed']} reused from an earlier run, "
             f"{summary['redone']} redone), {len(detections)} detections: {args.out / 'detections.csv'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        run(args)
    except AnalysisError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        kept = len(list((args.out / "ct").glob("*.json")))
        print(f"interrupted: {kept} finished CT(s) are kept in {args.out / 'ct'}; rerunning the same command "
              "resumes from them", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
