"""What produced a CT's findings: a rerun reuses them only when all of it is the same."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from luna_dist.analysis.detect import Models
from luna_dist.analysis.groups import EROSION_ITERATIONS
from luna_dist.analysis.segment import BODY_HU, SEG_MARGIN, SEG_THRESHOLD
from luna_dist.imaging.ct import Ct, CtError, find_ct, read_ct
from luna_dist.tables.candidates import Annotation

ANALYSIS_VERSION = 5
"""Part of every CT's `produced_by`: bumped whenever the same inputs would give other findings, so a rerun
redoes the CTs of an earlier version (version 1 wrote no `produced_by`; its findings sat on voxel centres;
version 2 gave no sizes and drew no images; version 3 segmented every pixel, also outside the body, and in
NCHW on a CPU; version 4 fed a CT in its stored axes order, knew a .mhd by its header and data size, and
measured each group's size on its eroded core, half the volume of a small nodule)."""


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
    """What the file system says of each file a CT's voxels are read from (`find_ct`): name, device, inode,
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


def produced_by(models: Models, mixed_precision: str, candidates_mode: bool, body_crop: bool) -> dict:
    """What every CT of this run shares in its `produced_by`; `ct_produced_by` adds the CT's own part."""
    return {"analysis_version": ANALYSIS_VERSION, "mode": "candidates" if candidates_mode else "segmentation",
            "models": dict(models.sha256),
            "seg_threshold": None if candidates_mode else SEG_THRESHOLD,
            "erosion_iterations": None if candidates_mode else EROSION_ITERATIONS,
            "body_crop": body_crop_setting(candidates_mode, body_crop),
            "mixed_precision": mixed_precision}


def body_crop_setting(candidates_mode: bool, body_crop: bool) -> dict | None:
    """The body crop's rule (`luna_dist.analysis.segment.body_box`), or None where every pixel is segmented (or
    none is: candidates mode): another rule can keep other groups, so it is part of what produced a CT's
    findings."""
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
