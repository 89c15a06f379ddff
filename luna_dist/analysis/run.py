"""An analysis, from CT files to scored nodule findings, over any number of processes (the command:
`luna_dist/analyze.py`, which shows how it is started).

For each CT (`luna_dist.analysis.detect`): the UNet segments every slice, the segmentation's
groups are placed at their centres of mass, and each group's chunk is scored by the
nodule classifier, then by the malignancy model. With `--candidates` the given positions
are scored instead of the segmentation's groups (LUNA16's false-positive reduction
track), and reported at exactly the positions given.

`--ct` analyses CTs of one's own instead (a DICOM series folder, NIfTI, .mha, .nrrd, .mhd:
`luna_dist.imaging.ct.find_ct`), in their patient coordinates, unscored.

`--folds` takes a fold's series as the shard build deals them
(`luna_dist.tables.candidates.folds_as_built`); `--shards BUILD --folds K` takes exactly the
series that build holds in fold K (the choice: `luna_dist.analysis.series`).

Each CT is analysed by exactly one process (CTs dealt by the main process, largest first
to the least loaded process, so ranks finish together; checked once gathered), its
findings written atomically to `RESULTS/ct/<name>.json` (its uid as a safe file name:
`luna_dist.common.out_folder.file_name`) with what produced them (`produced_by`: analysis
version, mode, the sha256 of each model's weights and of the CT's candidates, thresholds,
mixed precision, the sha256 of the CT's voxels and geometry: `luna_dist.analysis.identity`).
A rerun reuses a CT only when all of that is the same and redoes it otherwise; a CT that
fails for any reason (unreadable, out of memory, probabilities that are not finite numbers)
is reported and left out, and the others go on. Positions are in LPS, as LUNA16's tables
give them (`luna_dist.imaging.geometry.LPS`), whatever the axes a CT is stored in. The main
process gathers every process's findings and writes `detections.csv` (every group with both
probabilities), `submission.csv` (LUNA16 format, probability = p_nodule) and `summary.json` (with what
the check of the device before the first CT found: `luna_dist.devices.start`).
When DIR holds `annotations.csv` (where the download puts it, `luna_dist.tables.layout`; its
tables are checked before the first CT) it also scores them (`luna_dist.analysis.findings`):
the confusion table of nodules found, filtered out and predicted benign or malignant, and
LUNA16's FROC/CPM of `submission.csv`. A model that trained or was selected on a CT it would
score is refused before the first CT (`luna_dist.analysis.leaks`), and `submission.provenance.json`
says what the models of `submission.csv` saw.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object

from luna_dist import __version__
from luna_dist.analysis import leaks
from luna_dist.analysis.detect import Models, analyze_ct, load_model
from luna_dist.analysis.findings import Truth, marks_of, read_truth, score, write_detections
from luna_dist.analysis.groups import MIN_EXTENT
from luna_dist.analysis.identity import (
    ANALYSIS_VERSION,
    ct_produced_by,
    finished_result,
    known_unchanged,
    produced_by,
    read_known,
)
from luna_dist.analysis.report import draw_ct, write_report
from luna_dist.analysis.segment import NonFiniteError
from luna_dist.analysis.series import (
    AnalysisError,
    Positions,
    candidate_positions,
    candidate_warnings,
    check_names,
    ct_sources,
    find_on_disk,
    select_series,
)
from luna_dist.common import cli
from luna_dist.common.atomic import write_json
from luna_dist.common.hardware import seg_memory_format
from luna_dist.common.out_folder import OutsideError, below, file_name
from luna_dist.common.peers import lost_peer_reason, silent_ranks
from luna_dist.devices.start import DeviceCheckError, check_every_rank
from luna_dist.evaluation.files import write_marks
from luna_dist.evaluation.luna16 import EvaluationError
from luna_dist.imaging.ct import CtError, find_ct
from luna_dist.imaging.geometry import LPS
from luna_dist.models.classifier import LunaModel
from luna_dist.models.unet import SegmentationModel
from luna_dist.models.weights import WeightsError
from luna_dist.shards.format import sha256_file
from luna_dist.tables.candidates import Annotation

log = get_logger("luna_dist.analyze")


def load_models(args: argparse.Namespace, device: torch.device, candidates_mode: bool) -> Models:
    """The networks the mode needs (no segmentation model in candidates mode), each with its weights' sha256."""
    def loaded_from(model: torch.nn.Module, path: Path) -> tuple:
        try:
            return load_model(model, path, device)
        except (FileNotFoundError, WeightsError) as err:
            raise AnalysisError(str(err)) from None

    loaded = {"seg": None if candidates_mode else loaded_from(SegmentationModel(), args.seg_model),
              "nodule": loaded_from(LunaModel(), args.cls_model),
              "malignancy": loaded_from(LunaModel(), args.mal_model) if args.mal_model else None}
    network = {name: pair[0] if pair else None for name, pair in loaded.items()}
    return Models(network["seg"], network["nodule"], network["malignancy"],
                  {name: pair[1] if pair else None for name, pair in loaded.items()},
                  {"seg": None if candidates_mode else args.seg_model, "nodule": args.cls_model,
                   "malignancy": args.mal_model})


def checked_models(models: Models, device: torch.device) -> list[tuple[torch.nn.Module, torch.memory_format]]:
    """What the start's device check runs (`luna_dist.devices.start`): CPU copies of the UNet and the nodule
    classifier as loaded, each in the layout the analysis gives its input (the malignancy model is the
    classifier's network again: the same kernels)."""
    return [(copy.deepcopy(model).cpu(), layout) for model, layout in
            ((models.seg, seg_memory_format(device)), (models.nodule, torch.contiguous_format)) if model is not None]


# -- distribution ---------------------------------------------------------------------------------
def ct_voxels(path: Path, max_voxels: int) -> int:
    """Voxel count from the image's headers alone (0 when unreadable or refused: the analysis reports it)."""
    try:
        return int(np.prod(find_ct(path, max_voxels).size_irc))
    except CtError:
        return 0


def assign(sizes: dict[str, int], processes: int) -> list[list[str]]:
    """Deal series to processes largest first, each to the least loaded: every series exactly once."""
    loads, shares = [0] * processes, [[] for _ in range(processes)]
    for uid in sorted(sizes, key=lambda u: (-sizes[u], u)):
        rank = min(range(processes), key=lambda r: (loads[r], r))
        shares[rank].append(uid)
        loads[rank] += max(1, sizes[uid])
    return shares


def deal(series: dict[str, Path], max_voxels: int, accelerator: Accelerator) -> tuple[dict[str, Path], list[list[str]]]:
    """The main process's series and its deal of them (`assign`, by the voxel counts of its headers), the
    same on every process.

    Dealt by each process from its own view of the disk, views that differ (a node's copy
    still being synced, a header one node cannot read) made two deals: a CT was analysed
    twice and another by none.
    """
    dealt = [series, assign({uid: ct_voxels(path, max_voxels) for uid, path in series.items()},
                                  accelerator.num_processes)] \
        if accelerator.is_main_process else [None, None]
    broadcast_object_list(dealt)
    return dealt[0], dealt[1]


def check_dealt(series: dict[str, Path], taken: list[str]) -> None:
    """AnalysisError unless the processes took up (analysed, reused or failed) each series exactly once."""
    counts = Counter(taken)
    twice, missing = sorted(uid for uid, n in counts.items() if n > 1), sorted(set(series) - counts.keys())
    unknown = sorted(counts.keys() - set(series))
    if twice or missing or unknown:
        problems = [f"{len(uids)} {what} (e.g. {uids[0]})" for uids, what in
                    ((twice, "more than once"), (missing, "by none"), (unknown, "not listed")) if uids]
        raise AnalysisError(f"the processes' CTs are not the {len(series)} listed, each once: {'; '.join(problems)}; "
                            "nothing is written beyond each CT's own findings: rerun the same command")


# -- the command ------------------------------------------------------------------------------------
@dataclass
class Share:
    """What one process did with its CTs."""

    results: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    reused: int = 0  # found finished, produced as this run would produce them
    redone: int = 0  # found finished but produced otherwise: analysed again and overwritten
    write_error: str | None = None  # why a result could not be written; the share stops there


def analyse_share(share: list[str], series: dict[str, Path], positions: Positions | None, truth: Truth | None,
                  models: Models, shared: dict, args: argparse.Namespace, accelerator: Accelerator) -> Share:
    """Analyse (or reuse) this process's CTs, writing each one's findings and images as soon as it is done."""
    done = Share()
    nodules_of: dict[str, list[Annotation]] = {}
    for nodule in truth.nodules if truth else []:
        nodules_of.setdefault(nodule.series_uid, []).append(nodule)
    for uid in share:
        cli.raise_if_interrupted()
        xyz, nodules = None if positions is None else positions.xyz[uid], nodules_of.get(uid, []) if truth else None
        wanted = ct_produced_by(shared, xyz, nodules)
        try:  # any CT's failure (unreadable, out of memory, probabilities not finite) leaves the others to go on
            path = below(args.out, "ct", f"{file_name(uid)}.json")
            stored, existed = finished_result(path, wanted)
            if stored is not None and known_unchanged(stored, series[uid], args.max_ct_voxels):
                done.results.append(stored)
                done.reused += 1
                continue
            ct, identity, read_seconds = read_known(series[uid], uid, args.max_ct_voxels)
            same_voxels = stored is not None and stored["produced_by"]["ct"].get("sha256") == identity["sha256"]
            analysed = None if same_voxels else analyze_ct(ct, models, accelerator.device, args.batch_size,
                                                           accelerator.autocast, xyz, args.body_crop)
            del ct  # analysed holds it while its images are drawn
        except Exception as err:
            done.failed.append(failure(uid, series[uid], err))
            continue
        if same_voxels:  # its files copied, moved or touched: reused, and rewritten to be known unread next time
            result = {**stored, "produced_by": {**wanted, "ct": identity}}
        else:
            result = analysed.result
            result["series_uid"] = uid  # the run's name for it (a .mhd's file name), whatever its header says
            result["seconds"] = {"read": read_seconds, **result["seconds"]}
            result["produced_by"] = {**wanted, "ct": identity}
        try:
            if analysed is not None:
                started = time.perf_counter()
                draw_ct(analysed, nodules, args.out)  # while the CT and its groups are in memory
                result["seconds"]["images"] = time.perf_counter() - started
                del analysed
            write_json(path, result)
        except OSError as err:
            done.write_error = f"{err.strerror or err}: {err.filename or path}"
            break  # the others would not be written either; what is written stays
        except Exception as err:  # its images could not be drawn (a link in --out leading outside it, ...)
            done.failed.append(failure(uid, series[uid], err))
            continue
        done.results.append(result)
        if same_voxels:
            done.reused += 1
            continue
        done.redone += existed
        print(f"rank {accelerator.process_index}: {uid}: {len(result['detections'])} groups in "
              f"{sum(result['seconds'].values()):.1f} s", file=sys.stderr)
        if xyz is None and min(result["shape"]) < MIN_EXTENT:
            print(f"warning: {series[uid]}: {'x'.join(map(str, result['shape']))} voxels, under {MIN_EXTENT} along "
                  f"an axis: the segmentation's erosion leaves nothing, so it can give no detection (--candidates "
                  "scores given positions)", file=sys.stderr)
    return done


def failure(uid: str, path: Path, err: Exception) -> dict:
    """A CT that could not be analysed, as summary.json lists it, its reason printed at once: the path and
    what went wrong, with advice where it is out of memory."""
    if isinstance(err, (CtError, OutsideError)):  # each names the file
        reason = str(err)
    elif isinstance(err, NonFiniteError):  # names the network
        reason = f"{path}: {err}"
    else:
        said = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        reason = f"{path}: {type(err).__name__}" + (f": {said}" if said else "")
    if isinstance(err, MemoryError) or "out of memory" in reason.lower():
        reason += " (out of memory: a smaller --batch-size needs less)"
    print(f"error: {reason}; {uid} left out", file=sys.stderr)
    return {"series_uid": uid, "path": str(path), "error": reason}


def unwritable(reason: str, out: Path, kept: int) -> str:
    return (f"cannot write in --out {out} ({reason}); nothing finished was lost: {kept} CT(s) are kept in "
            f"{out / 'ct'}; free space or make it writable, and rerunning the same command resumes")


def run(args: argparse.Namespace) -> dict:
    # A process that dies or freezes (a node lost, a driver hung) leaves the others waiting in a collective:
    # they fail after --dist-timeout rather than torch's default of 10 to 30 minutes.
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.dist_timeout))])
    processes: list[str] = []  # each rank's host and pid, to name the ones lost
    try:
        processes = gather_object([f"{socket.gethostname()}, pid {os.getpid()}"])
        return _run(args, accelerator)
    except RuntimeError as err:
        if len(processes) < 2 or (reason := lost_peer_reason(err)) is None:
            raise
        rank, world = accelerator.process_index, accelerator.num_processes
        raise AnalysisError(f"rank {rank} of {world} lost the others: "
                            f"{silent_ranks(rank, world, processes, min(10.0, args.dist_timeout))} ({reason}). Every "
                            f"process stops; the finished CTs are kept in {args.out / 'ct'}: once the nodes are back, "
                            "the same command on every node resumes") from None
    finally:
        accelerator.end_training()  # a process group left to the interpreter's exit can abort it


def _run(args: argparse.Namespace, accelerator: Accelerator) -> dict:
    # Every input is read and checked before the first CT: a bad one costs seconds, not an analysis.
    is_main = accelerator.is_main_process
    if args.ct:
        series, note, truth = ct_sources(args.ct, args.max_ct_voxels, is_main), None, None
    else:
        found = find_on_disk(args.data)
        series, note = select_series(args, found)
        try:
            truth = read_truth(args.data)
        except EvaluationError as err:
            raise AnalysisError(str(err)) from None
    check_names(series)
    series, shares = deal(series, args.max_ct_voxels, accelerator)
    positions = candidate_positions(args.candidates, series, found) if args.candidates else None
    if is_main:
        for line in ([note] if note else []) + (candidate_warnings(positions, args.candidates, args.data)
                                                if positions else []):
            print(line, file=sys.stderr)
    models = load_models(args, accelerator.device, positions is not None)
    seen = leaks.records(models)
    warnings = leaks.check(models, seen, list(series)) if truth is not None else []
    if is_main:
        for line in warnings:
            print(line, file=sys.stderr)
    try:
        device_check = check_every_rank(accelerator, checked_models(models, accelerator.device), training=False,
                                        skip=args.skip_device_check)
    except DeviceCheckError as err:
        raise AnalysisError(str(err)) from None
    shared = produced_by(models, accelerator.mixed_precision, positions is not None, args.body_crop)
    try:
        (args.out / "ct").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AnalysisError(unwritable(f"{err.strerror}: {err.filename}", args.out, 0)) from None
    accelerator.wait_for_everyone()

    done = analyse_share(shares[accelerator.process_index], series, positions, truth, models, shared, args,
                         accelerator)
    results, failed = gather_object(done.results), gather_object(done.failed)
    reused, redone = (sum(gather_object([n])) for n in (done.reused, done.redone))
    write_errors = gather_object([done.write_error] if done.write_error else [])
    if write_errors:  # raised on every process alike, so none waits for the others
        raise AnalysisError(unwritable(write_errors[0], args.out, len(results)))
    check_dealt(series, [r["series_uid"] for r in results] + [f["series_uid"] for f in failed])

    summary, output_error = {}, None
    if is_main:
        if redone:
            log.info(f"{redone} CT(s) redone: their findings in {args.out / 'ct'} were produced otherwise "
                     "(another analysis version, mode, model, candidates, body crop, precision or CT)")
        summary = {"series": len(series), "analysed": len(results), "coordinates": LPS, "resumed": reused,
                   "redone": redone,
                   "failed": failed, "processes": accelerator.num_processes,
                   "candidate_rows_not_on_disk": sum(positions.not_on_disk.values()) if positions else 0,
                   "produced_by": run_produced_by(args, models, shared, seen), "device_check": device_check}
        try:
            summary = write_outputs(args, results, summary, truth)
            leaks.write_sidecar(below(args.out, "submission.csv"), models, seen, sorted(series))
            log.info(f"report: {write_report(args.out, results, summary, series)}")
        except OSError as err:
            output_error = unwritable(f"{err.strerror or err}: {err.filename}", args.out, len(results))
        except OutsideError as err:
            output_error = str(err)
    accelerator.wait_for_everyone()
    if output_error:
        raise AnalysisError(output_error)
    if failed:
        raise AnalysisError(f"{len(failed)} CT(s) could not be analysed, the others are in {args.out}: "
                            + "; ".join(f["error"] for f in failed) + "; fix them and rerun to add them")
    return summary


def run_produced_by(args: argparse.Namespace, models: Models, shared: dict, seen: dict) -> dict:
    """What produced the whole result folder, for summary.json: versions, arguments, models (with the folds each
    trained and was selected on) and inputs."""
    paths = {"seg": args.seg_model, "nodule": args.cls_model, "malignancy": args.mal_model}
    return {"luna_dist": __version__, "analysis_version": ANALYSIS_VERSION,
            "arguments": cli.arguments_json(vars(args)),
            "mode": shared["mode"],
            "models": {name: {"path": str(paths[name]), "sha256": sha,
                              "provenance": seen[name].folds() if seen.get(name) else None} if sha else None
                       for name, sha in models.sha256.items()},
            "candidates": {"path": str(args.candidates), "sha256": sha256_file(args.candidates)}
            if args.candidates else None,
            "seg_threshold": shared["seg_threshold"], "erosion_iterations": shared["erosion_iterations"],
            "body_crop": shared["body_crop"], "mixed_precision": shared["mixed_precision"]}


def write_outputs(args: argparse.Namespace, results: list[dict], summary: dict, truth: Truth | None) -> dict:
    """detections.csv, submission.csv, the scores and summary.json, from every process's findings."""
    write_detections(below(args.out, "detections.csv"), results)
    detections = [{**d, "series_uid": r["series_uid"]} for r in results for d in r["detections"]]
    marks = marks_of(detections)
    write_marks(below(args.out, "submission.csv"), marks)
    seconds = {stage: sum(r["seconds"].get(stage, 0.0) for r in results) for stage in
               ("read", "segment", "group", "classify", "images")}
    analysed = sorted(r["series_uid"] for r in results)
    summary = {**summary, "detections": len(detections), "mode": summary["produced_by"]["mode"], "seconds": seconds,
               **(score(analysed, detections, marks, truth, args.out) if truth else {})}
    write_json(below(args.out, "summary.json"), summary)
    log.info(f"{len(results)} of {summary['series']} CTs analysed ({summary['resumed']} reused from an earlier run, "
             f"{summary['redone']} redone), {len(detections)} detections: {args.out / 'detections.csv'}")
    return summary
