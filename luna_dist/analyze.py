"""`python -m luna_dist.analyze`: from CT files to scored nodule findings, over any number of processes.

    accelerate launch -m luna_dist.analyze --data DIR --seg-model S --cls-model C [--mal-model M] \\
        [--folds 9 | --series UID ...] [--candidates candidates.csv] --out RESULTS
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m luna_dist.analyze ...   # CPU ranks

For each CT: the UNet segments every slice from its 7-slice context (stacks built on
the device, slices in batches), probability > 0.5, one binary erosion; 3-D connected
components are the groups, each placed at its centre of mass weighted by HU + 1001;
each group's 32x48x48 chunk is cut as the shard build cuts it and scored by the nodule
classifier, then by the malignancy model. With `--candidates` the given positions are
scored instead of the segmentation's groups (LUNA16's false-positive reduction track).

Each CT is analysed by exactly one process (CTs dealt largest first to the least
loaded process, so ranks finish together), its findings written atomically to
`RESULTS/ct/<uid>.json`; a rerun skips finished CTs, and a CT that cannot be read is
reported and left out. The main process gathers every process's findings and writes
`detections.csv` (every group with both probabilities), `submission.csv` (LUNA16
format, probability = p_nodule) and `summary.json`. When `DIR/annotations.csv`
exists it also scores them: the confusion table of nodules found, filtered out and
predicted benign or malignant, and LUNA16's FROC/CPM of `submission.csv`.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from scipy import ndimage
from torch import Tensor, nn

from luna_dist.atomic import atomic_open, write_json
from luna_dist.candidates import (
    CsvError,
    assign_folds,
    find_series,
    read_annotations,
    read_candidates,
)
from luna_dist.ct import HU_MAX, HU_MIN, CtError, cut_chunks, read_ct
from luna_dist.evaluate import Marks, froc, plot_froc, read_findings, write_marks
from luna_dist.geometry import irc_to_xyz, xyz_to_irc
from luna_dist.model import LunaModel, SegmentationModel, WeightsError, load_into
from luna_dist.seg_samples import CONTEXT

log = get_logger("luna_dist.analyze")

MATCH_DISTANCE = 0.7
"""A detection matches a nodule when its distance divided by the nodule's diameter is below this."""
DETECTION_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "index", "row", "col", "voxels",
                     "p_nodule", "p_malignant")
CONFUSION_ROWS = ("non-nodule", "benign", "malignant")
CONFUSION_COLUMNS = ("complete miss", "filtered out", "predicted benign", "predicted malignant")


class AnalysisError(Exception):
    """The analysis cannot start; the message names the file or flag to fix."""


@dataclass
class Models:
    """The networks of the pipeline, in eval mode on one device."""

    seg: nn.Module | None  # None in candidates mode
    nodule: nn.Module
    malignancy: nn.Module | None


def load_model(model: nn.Module, path: Path, device: torch.device) -> nn.Module:
    """Weights from a best.pt or a run's state/ folder into `model`, ready for inference on `device`."""
    try:
        load_into(model, Path(path))
    except (FileNotFoundError, WeightsError) as err:
        raise AnalysisError(str(err)) from None
    return model.to(device).eval()


# -- the three stages of one CT -----------------------------------------------------------------
@torch.no_grad()
def segment(hu: Tensor, model: nn.Module, batch_size: int, autocast) -> Tensor:
    """Nodule probability > 0.5 of every voxel, (I, R, C) bool on hu's device.

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
        mask[centre] = probability[:, 0] > 0.5
    return mask


def group(mask: np.ndarray, hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected groups of a segmentation after one erosion: centres (N, 3) IRC float and voxel counts (N,).

    A centre is the group's centre of mass weighted by HU + 1001 (HU clipped to
    [-1000, 1000]), so denser voxels pull harder and air still weighs a little.
    """
    eroded = ndimage.binary_erosion(mask, iterations=1)
    labels, count = ndimage.label(eroded)
    if not count:
        return np.zeros((0, 3)), np.zeros(0, dtype=np.int64)
    weights = np.clip(hu, HU_MIN, HU_MAX).astype(np.float32) + 1001
    index = np.arange(1, count + 1)
    centres = np.array(ndimage.center_of_mass(weights, labels, index), dtype=np.float64).reshape(-1, 3)
    voxels = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    return centres, voxels


@torch.no_grad()
def classify(hu: np.ndarray, centres_irc: np.ndarray, models: Models, device: torch.device, batch_size: int,
             autocast) -> tuple[np.ndarray, np.ndarray]:
    """p_nodule and p_malignant (NaN without a malignancy model) of the chunk around each centre."""
    p_nodule, p_malignant = np.zeros(len(centres_irc)), np.full(len(centres_irc), np.nan)
    for start in range(0, len(centres_irc), batch_size):
        chunks, _ = cut_chunks(hu, np.rint(centres_irc[start:start + batch_size]).astype(np.int64))
        x = torch.from_numpy(chunks).to(device, non_blocking=True).float()[:, None]  # (B, 1, 32, 48, 48)
        end = start + len(chunks)
        with autocast():
            p_nodule[start:end] = models.nodule(x)[1][:, 1].float().cpu().numpy()
            if models.malignancy is not None:
                p_malignant[start:end] = models.malignancy(x)[1][:, 1].float().cpu().numpy()
    return p_nodule, p_malignant


def analyze_ct(mhd: Path, models: Models, device: torch.device, batch_size: int, autocast,
               candidates_xyz: np.ndarray | None = None) -> dict:
    """Findings of one CT, with the seconds each stage took."""
    seconds = {}
    started = time.perf_counter()
    ct = read_ct(mhd)
    seconds["read"] = time.perf_counter() - started
    if candidates_xyz is None:
        started = time.perf_counter()
        hu = torch.from_numpy(np.require(ct.hu, requirements='W')).to(device).float().clamp_(HU_MIN, HU_MAX)
        mask = segment(hu, models.seg, batch_size, autocast).cpu().numpy()
        del hu
        seconds["segment"] = time.perf_counter() - started
        started = time.perf_counter()
        centres_irc, voxels = group(mask, ct.hu)
        seconds["group"] = time.perf_counter() - started
    else:
        centres_irc = xyz_to_irc(candidates_xyz, ct.geometry).astype(np.float64)
        voxels = np.zeros(len(centres_irc), dtype=np.int64)
    started = time.perf_counter()
    p_nodule, p_malignant = classify(ct.hu, centres_irc, models, device, batch_size, autocast)
    seconds["classify"] = time.perf_counter() - started
    centres_xyz = irc_to_xyz(centres_irc, ct.geometry)
    detections = [
        {"xyz": [round(v, 3) for v in xyz], "irc": [round(v, 2) for v in irc], "voxels": int(n),
         "p_nodule": float(pn), "p_malignant": None if np.isnan(pm) else float(pm)}
        for xyz, irc, n, pn, pm in zip(centres_xyz.tolist(), centres_irc.tolist(), voxels, p_nodule, p_malignant)
    ]
    return {"series_uid": ct.series_uid, "voxels": int(ct.hu.size), "seconds": seconds, "detections": detections}


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


# -- scoring ---------------------------------------------------------------------------------------
def confusion(detections: list[dict], nodules: list, threshold: float = 0.5, mal_threshold: float = 0.5) -> np.ndarray:
    """The 3x4 table of rows CONFUSION_ROWS by columns CONFUSION_COLUMNS, counting nodules and detections.

    A detection matches a nodule of its series when distance / diameter < MATCH_DISTANCE.
    A nodule takes the most advanced outcome among its matching detections (a miss when
    none matches); a detection matching no nodule is a non-nodule, filtered out below
    `threshold` of p_nodule. A detection is predicted malignant when p_malignant is at
    least `mal_threshold` (benign without a malignancy model). Unknown malignancy counts
    as benign, as in the book.
    """
    table = np.zeros((3, 4), dtype=np.int64)
    by_series: dict[str, list] = {}
    for nodule in nodules:
        by_series.setdefault(nodule.series_uid, []).append(nodule)
    for uid in {d["series_uid"] for d in detections} | set(by_series):
        found = [d for d in detections if d["series_uid"] == uid]
        truth = by_series.get(uid, [])
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


def score(analysed: list[str], detections: list[dict], marks: Marks, data: Path, out: Path) -> dict:
    """Confusion table and LUNA16 FROC/CPM of the findings (`marks`: the same as submission marks), when the
    data folder has annotations."""
    annotations_csv = data / "annotations.csv"
    if not annotations_csv.is_file():
        return {}
    malignancy_csv = data / "annotations_with_malignancy.csv"
    nodules, _ = read_annotations(malignancy_csv if malignancy_csv.is_file() else annotations_csv)
    wanted = set(analysed)
    nodules = [n for n in nodules if n.series_uid in wanted]
    table = confusion(detections, nodules)
    matched, predicted = int(table[1:, 1:].sum()), int(table[1:, 2:].sum())
    summary = {"confusion": {"rows": list(CONFUSION_ROWS), "columns": list(CONFUSION_COLUMNS),
                             "table": table.tolist()},
               "nodules": len(nodules), "nodules_matched": matched, "nodules_predicted": predicted,
               "detections_predicted": int(table[:, 2:].sum()), "false_detections_predicted": int(table[0, 2:].sum())}
    excluded_csv = data / "annotations_excluded.csv"
    result = froc(analysed, read_findings(annotations_csv), marks,
                  read_findings(excluded_csv, excluded=True) if excluded_csv.is_file() else None,
                  bootstrap=1000, band_points=200)
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


# -- the command ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m luna_dist.analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="LUNA16-format folder (subset*/ with .mhd/.raw)")
    parser.add_argument("--seg-model", type=Path, help="segmentation model: best.pt or a run's state/ folder")
    parser.add_argument("--cls-model", type=Path, required=True, help="nodule classifier: best.pt or state/")
    parser.add_argument("--mal-model", type=Path, help="malignancy classifier: best.pt or state/ (optional)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--folds", type=int, nargs="+", help="analyse the series of these folds (default: all)")
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
    return args


def select_series(args: argparse.Namespace) -> dict[str, Path]:
    """The series to analyse and their .mhd files."""
    if not args.data.is_dir():
        raise AnalysisError(f"--data {args.data}: not a folder")
    series = find_series(args.data)
    if args.series:
        unknown = [uid for uid in args.series if uid not in series]
        if unknown:
            raise AnalysisError(f"--series: no .mhd under {args.data} for {', '.join(unknown[:5])}")
        series = {uid: series[uid] for uid in args.series}
    elif args.folds:
        folds = assign_folds(series)
        series = {uid: path for uid, path in series.items() if folds[uid] in set(args.folds)}
    if not series:
        raise AnalysisError(f"no series to analyse under {args.data}"
                            + (f" in folds {args.folds}" if args.folds else ""))
    return series


def candidate_positions(path: Path, series: dict[str, Path]) -> dict[str, np.ndarray]:
    """Candidate centres (mm) of each analysed series; a series without candidates gets none."""
    try:
        candidates, bad = read_candidates(path)
    except CsvError as err:
        raise AnalysisError(str(err)) from None
    if bad:
        log.warning(f"{len(bad)} malformed row(s) of {path} left out, e.g. {bad[0]}")
    positions: dict[str, list] = {uid: [] for uid in series}
    for candidate in candidates:
        if candidate.series_uid in positions:
            positions[candidate.series_uid].append(candidate.center_xyz)
    return {uid: np.array(xyz, dtype=np.float64).reshape(-1, 3) for uid, xyz in positions.items()}


def run(args: argparse.Namespace) -> dict:
    accelerator = Accelerator()
    try:
        return _run(args, accelerator)
    finally:
        accelerator.end_training()  # a process group left to the interpreter's exit can abort it


def _run(args: argparse.Namespace, accelerator: Accelerator) -> dict:
    device, rank = accelerator.device, accelerator.process_index
    series = select_series(args)
    positions = candidate_positions(args.candidates, series) if args.candidates else None
    models = Models(
        seg=None if positions is not None else load_model(SegmentationModel(), args.seg_model, device),
        nodule=load_model(LunaModel(), args.cls_model, device),
        malignancy=load_model(LunaModel(), args.mal_model, device) if args.mal_model else None,
    )
    per_ct = args.out / "ct"
    if accelerator.is_main_process:
        per_ct.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()

    share = assign({uid: ct_voxels(path) for uid, path in series.items()}, accelerator.num_processes)[rank]
    results, failed, skipped = [], [], 0
    for uid in share:
        done = per_ct / f"{uid}.json"
        if done.is_file():
            results.append(json.loads(done.read_text()))
            skipped += 1
            continue
        try:
            result = analyze_ct(series[uid], models, device, args.batch_size, accelerator.autocast,
                                None if positions is None else positions[uid])
        except CtError as err:
            failed.append({"series_uid": uid, "path": str(series[uid]), "error": str(err)})
            print(f"error: {err}; {uid} left out", file=sys.stderr)
            continue
        write_json(done, result)
        results.append(result)
        print(f"rank {rank}: {uid}: {len(result['detections'])} groups in "
              f"{sum(result['seconds'].values()):.1f} s", file=sys.stderr)
    results, failed = gather_object(results), gather_object(failed)
    skipped = sum(gather_object([skipped]))

    summary = {}
    if accelerator.is_main_process:
        write_detections(args.out / "detections.csv", results)
        detections = [{**d, "series_uid": r["series_uid"]} for r in results for d in r["detections"]]
        marks = _marks(detections)
        write_marks(args.out / "submission.csv", marks)
        seconds = {stage: sum(r["seconds"].get(stage, 0.0) for r in results) for stage in
                   ("read", "segment", "group", "classify")}
        summary = {"series": len(series), "analysed": len(results), "resumed": skipped, "failed": failed,
                   "processes": accelerator.num_processes, "detections": len(detections),
                   "mode": "candidates" if positions is not None else "segmentation", "seconds": seconds,
                   **score(sorted(r["series_uid"] for r in results), detections, marks, args.data, args.out)}
        write_json(args.out / "summary.json", summary)
        log.info(f"{len(results)} of {len(series)} CTs analysed ({skipped} from an earlier run), "
                 f"{len(detections)} detections: {args.out / 'detections.csv'}")
    accelerator.wait_for_everyone()
    if failed:
        raise AnalysisError(f"{len(failed)} CT(s) could not be analysed, the others are in {args.out}: "
                            + "; ".join(f["error"] for f in failed) + "; fix them and rerun to add them")
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        run(args)
    except AnalysisError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
