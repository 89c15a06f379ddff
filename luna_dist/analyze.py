"""`python -m luna_dist.analyze`: from CT files to scored nodule findings, over any number of processes.

    accelerate launch -m luna_dist.analyze --data DIR --seg-model S --cls-model C [--mal-model M] \\
        [--shards BUILD] [--folds 9 | --series UID ...] [--candidates candidates.csv] --out RESULTS
    python -m luna_dist.analyze --ct DICOM_FOLDER scan.nii.gz ... --seg-model S --cls-model C --out RESULTS
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m luna_dist.analyze ...   # CPU ranks

For each CT (`luna_dist.detect`): the UNet segments every slice, the segmentation's
groups are placed at their centres of mass, and each group's chunk is scored by the
nodule classifier, then by the malignancy model. With `--candidates` the given positions
are scored instead of the segmentation's groups (LUNA16's false-positive reduction
track), and reported at exactly the positions given.

`--ct` analyses CTs of one's own instead (a DICOM series folder, NIfTI, .mha, .nrrd, .mhd:
`luna_dist.ct.find_ct`), in their patient coordinates, unscored.

`--folds` takes a fold's series as the shard build deals them (`folds_as_built`);
`--shards BUILD --folds K` takes exactly the series that build holds in fold K.

Each CT is analysed by exactly one process (CTs dealt by the main process, largest first
to the least loaded process, so ranks finish together; checked once gathered), its
findings written atomically to `RESULTS/ct/<name>.json` (its uid as a safe file name:
`out_folder.file_name`) with what produced them (`produced_by`: analysis version,
mode, the sha256 of each model's weights and of the CT's candidates, thresholds,
mixed precision, the sha256 of the CT's voxels and geometry: `ct_identity`). A rerun
reuses a CT only when all of that is the same and redoes it otherwise; a CT that fails for
any reason (unreadable, out of memory, probabilities that are not finite numbers) is
reported and left out, and the others go on. Positions are in LPS, as LUNA16's tables give
them (`geometry.LPS`), whatever the axes a CT is stored in. The main process gathers every
process's findings and writes `detections.csv` (every group with both probabilities),
`submission.csv` (LUNA16 format, probability = p_nodule) and `summary.json`. When DIR holds `annotations.csv`
(where the download puts it, `luna_dist.layout`; its tables are checked before the first
CT) it also scores them
(`luna_dist.findings`): the confusion table of nodules found, filtered out and predicted
benign or malignant, and LUNA16's FROC/CPM of `submission.csv`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.logging import get_logger
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object

from luna_dist import __version__, cli
from luna_dist.atomic import write_json
from luna_dist.candidates import Annotation, CsvError, find_series, folds_as_built, read_candidates
from luna_dist.ct import MAX_CT_VOXELS, Ct, CtError, CtSource, find_ct, read_ct
from luna_dist.detect import (
    BODY_HU,
    EROSION_ITERATIONS,
    MIN_EXTENT,
    SEG_MARGIN,
    SEG_THRESHOLD,
    Models,
    NonFiniteError,
    analyze_ct,
    load_model,
)
from luna_dist.evaluate import EvaluationError, shard_findings, write_marks
from luna_dist.findings import Truth, marks_of, read_truth, score, write_detections
from luna_dist.geometry import LPS
from luna_dist.layout import find_tables
from luna_dist.model import LunaModel, SegmentationModel, WeightsError
from luna_dist.out_folder import OutsideError, below, file_name
from luna_dist.peers import lost_peer_reason, silent_ranks
from luna_dist.report import draw_ct, write_report

log = get_logger("luna_dist.analyze")

ANALYSIS_VERSION = 5
"""Part of every CT's `produced_by`: bumped whenever the same inputs would give other findings, so a rerun
redoes the CTs of an earlier version (version 1 wrote no `produced_by`; its findings sat on voxel centres;
version 2 gave no sizes and drew no images; version 3 segmented every pixel, also outside the body, and in
NCHW on a CPU; version 4 fed a CT in its stored axes order, knew a .mhd by its header and data size, and
measured each group's size on its eroded core, half the volume of a small nodule)."""


class AnalysisError(Exception):
    """The analysis cannot start or finish; the message names the file or flag to fix."""


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


# -- what produced a CT's findings ------------------------------------------------------------------
def ct_identity(ct: Ct) -> str:
    """sha256 of a CT as the models see it: its shape, its geometry and its int16 voxels, turned to LPS.

    What a CT's findings follow from, and nothing else: a CT copied, moved or saved again (in another
    format, compressed, its axes stored in another order) with the same voxels at the same points is the
    same CT; one voxel changed, or a header that places them elsewhere, makes another. Hashed from memory
    once the CT is read for its analysis, so its files are read once.
    """
    digest = hashlib.sha256(f"{ct.hu.shape} {ct.hu.dtype}\n".encode())
    for values in (ct.geometry.origin_xyz, ct.geometry.spacing_xyz, ct.geometry.direction):
        digest.update(np.ascontiguousarray(values, dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(ct.hu))
    return digest.hexdigest()


def read_known(path: Path, uid: str, max_voxels: int) -> tuple[Ct, dict, float]:
    """The CT at `path` read for its analysis and named `uid`; its identity: `ct_identity`, with its files'
    stat (`ct_files_stat`) as they were read; and the seconds all that took."""
    started, since_ns = time.perf_counter(), time.time_ns()
    ct = dataclasses.replace(read_ct(path, max_voxels), series_uid=uid)
    identity = {"sha256": ct_identity(ct), "files": ct_files_stat(path, max_voxels, since_ns)}
    return ct, identity, time.perf_counter() - started


def known_unchanged(stored: dict, path: Path, max_voxels: int) -> bool:
    """Whether the CT's files are those whose voxels `stored`'s identity hashed: their stat unchanged since."""
    recorded = stored["produced_by"]["ct"].get("files")
    return recorded is not None and recorded == ct_files_stat(path, max_voxels)


UNSETTLED_NS = 2_000_000_000
"""A file changed this recently (ns) before it is read is not known by its stat: a change within the same
tick of a file system's clock (1-2 s on some) would leave the stat as it was."""


def ct_files_stat(path: Path, max_voxels: int, before_ns: int | None = None) -> list[list] | None:
    """What the file system says of each file a CT's voxels are read from (`ct.find_ct`): name, device, inode,
    size, mtime and ctime (ns); None where it cannot say (the CT is unreadable, or, with `before_ns`, a
    file changed within UNSETTLED_NS of it).

    Its identity (`ct_identity`) is recorded with this, so a rerun knows the CT unread: the kernel sets a
    file's ctime to the present at every change of its bytes or its stat (`touch` and `cp -p` included)
    and nothing sets it back, so equal stats mean bytes unchanged since they were hashed. Where they
    differ (a CT copied or moved, a file touched) the CT is read and its voxels hashed again, and only
    new voxels are analysed anew. Not covered: a clock set back, and file systems without a change time
    (FAT keeps a creation time there).
    """
    try:
        files = find_ct(path, max_voxels).files
        stats = [(file.name, file.stat()) for file in files]
    except (CtError, OSError):
        return None
    if before_ns is not None and any(s.st_ctime_ns > before_ns - UNSETTLED_NS for _, s in stats):
        return None
    return [[name, s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns] for name, s in stats]


def positions_sha256(xyz: np.ndarray) -> str:
    """sha256 of one CT's candidate positions as float64: editing another series' rows leaves it alone."""
    return hashlib.sha256(np.ascontiguousarray(xyz, dtype=np.float64).tobytes()).hexdigest()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def produced_by(models: Models, mixed_precision: str, candidates_mode: bool, body_crop: bool) -> dict:
    """What every CT of this run shares in its `produced_by`; `ct_produced_by` adds the CT's own part."""
    return {"analysis_version": ANALYSIS_VERSION, "mode": "candidates" if candidates_mode else "segmentation",
            "models": dict(models.sha256),
            "seg_threshold": None if candidates_mode else SEG_THRESHOLD,
            "erosion_iterations": None if candidates_mode else EROSION_ITERATIONS,
            "body_crop": body_crop_setting(candidates_mode, body_crop),
            "mixed_precision": mixed_precision}


def body_crop_setting(candidates_mode: bool, body_crop: bool) -> dict | None:
    """The body crop's rule (`detect.body_box`), or None where every pixel is segmented (or none is: candidates
    mode): another rule can keep other groups, so it is part of what produced a CT's findings."""
    return {"body_hu": BODY_HU, "margin": SEG_MARGIN} if body_crop and not candidates_mode else None


def ct_produced_by(shared: dict, candidates_xyz: np.ndarray | None, nodules: list[Annotation] | None) -> dict:
    """`shared` and what is the CT's own but its identity (`ct_identity`, known once the CT is read): its
    candidates, and its annotated nodules, whose matches and images of missed ones its result holds."""
    return {**shared, "candidates_sha256": None if candidates_xyz is None else positions_sha256(candidates_xyz),
            "nodules_sha256": None if nodules is None else nodules_sha256(nodules)}


def nodules_sha256(nodules: list[Annotation]) -> str:
    """sha256 of one series' annotated nodules: centre, diameter and malignancy of each, in the table's order."""
    rows = "".join(f"{n.center_xyz!r} {n.diameter_mm!r} {n.is_malignant!r}\n" for n in nodules)
    return hashlib.sha256(rows.encode()).hexdigest()


def finished_result(path: Path, wanted: dict) -> tuple[dict | None, bool]:
    """The findings stored at `path` when `wanted` produced them (`ct_produced_by`: all but the CT's identity,
    which `produced_by["ct"]` holds), else None; and whether a file was there."""
    if not path.is_file():
        return None, False
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, True  # unreadable: redone and overwritten
    made_by = result.get("produced_by") if isinstance(result, dict) else None
    same = (isinstance(made_by, dict) and isinstance(made_by.get("ct"), dict)
            and {key: value for key, value in made_by.items() if key != "ct"} == wanted)
    return (result if same else None), True


# -- choosing the series ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m luna_dist.analyze", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="LUNA16-format folder (subset*/ with .mhd/.raw)")
    source.add_argument("--ct", type=Path, nargs="+", action="extend", metavar="PATH",
                        help="analyse these CTs instead (no tables, no scoring): a DICOM series folder, or a "
                             "NIfTI, .mha, .nrrd, .mhd or other 3-D file SimpleITK reads; may be given again")
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
    parser.add_argument("--max-ct-voxels", type=int, default=MAX_CT_VOXELS,
                        help="refuse a CT whose header declares more voxels, before they are read (LUNA16's largest "
                             "has 2.0e8)")
    parser.add_argument("--dist-timeout", type=float, default=300, metavar="SECONDS",
                        help="how long a process waits for the others in a collective before it fails (default: 300)")
    parser.add_argument("--no-body-crop", dest="body_crop", action="store_false",
                        help="segment every pixel of each slice, not only the body's box (for a CT of several "
                             "separate objects, a phantom: the box holds the largest only)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.check_at_least(parser, args, {"batch_size": 1, "max_ct_voxels": 1, "dist_timeout": 1})
    if args.candidates is None and args.seg_model is None:
        parser.error("--seg-model is needed (or --candidates CSV to score given positions)")
    if args.shards and args.series:
        parser.error("--shards takes the series of a build's folds: give --folds (or nothing), not --series")
    if args.ct:
        given = [flag for flag, value in (("--folds", args.folds), ("--series", args.series),
                                          ("--shards", args.shards), ("--candidates", args.candidates)) if value]
        if given:
            parser.error(f"--ct analyses the CTs given, with no LUNA16 folder or tables: leave out {given[0]}")
    return args


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
                   "produced_by": run_produced_by(args, models, shared)}
        try:
            summary = write_outputs(args, results, summary, truth)
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


def run_produced_by(args: argparse.Namespace, models: Models, shared: dict) -> dict:
    """What produced the whole result folder, for summary.json: versions, arguments, models and inputs."""
    paths = {"seg": args.seg_model, "nodule": args.cls_model, "malignancy": args.mal_model}
    return {"luna_dist": __version__, "analysis_version": ANALYSIS_VERSION,
            "arguments": cli.arguments_json(vars(args)),
            "mode": shared["mode"],
            "models": {name: {"path": str(paths[name]), "sha256": sha} if sha else None
                       for name, sha in models.sha256.items()},
            "candidates": {"path": str(args.candidates), "sha256": file_sha256(args.candidates)}
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


def main(argv: list[str] | None = None) -> int:
    cli.setup_logging()
    args = parse_args(argv)
    try:
        with cli.interrupts():
            run(args)
    except AnalysisError as err:
        return cli.fail(str(err))
    except KeyboardInterrupt:
        stopped, code = cli.interruption()
        if PartialState().is_main_process:  # one line for the run, as training says it (a launcher signals every rank)
            kept = len(list((args.out / "ct").glob("*.json")))
            cli.fail(f"{stopped}: {kept} finished CT(s) are kept in {args.out / 'ct'}; rerunning the same command "
                     "resumes from them")
        return code
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
