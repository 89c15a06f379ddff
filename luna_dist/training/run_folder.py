"""A training run's folder: which command may start or continue it, what it was trained with, its logs.

    RUN/args.json      the command's arguments, the processes, mixed precision and shard build it ran with, and
                       what the check of the device found when it last started
    RUN/state/, RUN/best.pt   the saved training state and the best model (luna_dist.training.checkpoint)
    RUN/trn/, RUN/val/, RUN/logged.json   the logs (luna_dist.training.run_log)

A run folder is started once: a command naming an existing run must say `--resume`
(continue it) or `--overwrite` (start it again), and a resume must train as the run was
trained, so that one run folder never mixes two recipes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from datetime import datetime
from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list

from luna_dist import __version__
from luna_dist.common.atomic import write_json
from luna_dist.training.checkpoint import BEST, OLD, PARTIAL, STATE, recover
from luna_dist.training.run_log import logged_epoch, raised_alike

log = get_logger("luna_dist.train")

ARGUMENTS = "args.json"
MAY_CHANGE = frozenset({
    "epochs", "resume", "overwrite", "run_name", "out", "eval_only", "metrics_json", "verify", "dist_timeout",
    "save_every", "cache_dir", "read_timeout", "worker_timeout", "checkpoint", "finetune", "num_workers", "shards",
    "skip_device_check", "cache_limit", "log_with",
})
"""Flags a resumed run may give differently: where it runs, how long, what it reports, how it reads the shards.
Every other flag shapes what an epoch computes. (`--shards` may move: the build's identity is compared
instead; `--num-workers` may change between epochs, not in the middle of one; `--finetune` only
initialises a run; `--skip-device-check` is recorded with each start's device check.)"""


class RunFolderError(Exception):
    """The command does not fit the run folder it names; the message says which flag to change."""


def record(args: argparse.Namespace, processes: int, mixed_precision: str, shards_identity: dict,
           device_check: dict, provenance: dict | None = None) -> dict:
    """What args.json holds: the arguments as given (as text), what else shapes the run, what this start's check
    of the device found (`luna_dist.devices.start`: passed, skipped and why, with its largest differences), and
    the folds its best model trained and was selected on (`luna_dist.models.provenance.Provenance.folds`)."""
    return {"luna_dist": __version__, "arguments": {k: str(v) for k, v in sorted(vars(args).items())},
            "processes": processes, "mixed_precision": mixed_precision,
            "shards_identity": hashlib.sha256(json.dumps(shards_identity, sort_keys=True).encode()).hexdigest(),
            "device_check": device_check, "provenance": provenance}


def differences(saved: dict, current: dict) -> list[str]:
    """The flags (and shard build) of `current` that differ from the run's `saved` record, for a message."""
    saved_args = saved["arguments"]
    found = [f"--{name.replace('_', '-')} {saved_args.get(name)} (now {value})"
             for name, value in current["arguments"].items()
             if name not in MAY_CHANGE and saved_args.get(name) != value]
    for key, what in (("shards_identity", "the shard build"), ("mixed_precision", "mixed precision")):
        if key in saved and saved[key] != current[key]:
            found.append(f"{what} {'differs' if key == 'shards_identity' else f'{saved[key]} (now {current[key]})'}")
    return found


def started(run: Path) -> bool:
    """Whether a run folder holds anything of a run (an empty folder made by hand does not count)."""
    return any((run / name).exists() for name in (ARGUMENTS, STATE, PARTIAL, OLD, BEST, "trn", "val"))


def check_new(run: Path, overwrite: bool) -> str | None:
    """Why a new run may not start in `run` (None: it may); with `overwrite`, what was there is removed."""
    if not started(run):
        return None
    if not overwrite:
        return (f"{run} holds a run already: pass --resume to continue it, --overwrite to start it again "
                "(its state, best model and logs are deleted), or another --run-name")
    for path in run.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return None


def check_resumed(run: Path, current: dict) -> str | None:
    """Why `current` may not continue the run in `run` (None: it may)."""
    try:
        saved = json.loads((run / ARGUMENTS).read_text())
        if saved.get("luna_dist") != __version__:
            return (f"--resume: {run} was trained by luna_dist {saved.get('luna_dist', 'before 0.2')}, this is "
                    f"{__version__}: resume it with that version, or start a new run from its weights with "
                    f"--checkpoint {run / STATE}")
    except FileNotFoundError:
        return f"--resume: {run} has no {ARGUMENTS}: it cannot be checked for --resume"
    except (OSError, ValueError) as err:
        return f"{run / ARGUMENTS}: unreadable ({err}); the run cannot be checked for --resume"
    found = differences(saved, current)
    if not found:
        return None
    return (f"--resume: {run} was trained with other settings: {'; '.join(found)}. Rerun with the run's flags, or "
            f"start a new run from its weights with --checkpoint {run / STATE} and a new --run-name")


def write_record(run: Path, current: dict) -> None:
    write_json(run / ARGUMENTS, current)


def run_path(args: argparse.Namespace, accelerator: Accelerator) -> Path:
    """The run folder a command names: `--out/--run-name`, the latest run for a bare `--resume`, else a time stamp."""
    if args.run_name:
        return args.out / args.run_name
    if args.resume:
        runs = sorted((p for p in args.out.glob("*") if (p / STATE).is_dir()), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise RunFolderError(f"--resume: no run with a saved state under {args.out}; pass --run-name")
        return runs[-1]
    # Every rank must agree on the name: the main process's clock decides.
    stamp = [datetime.now().strftime("%Y-%m-%d_%H.%M.%S")]
    broadcast_object_list(stamp)
    return args.out / stamp[0]


def agree(problem: str | None) -> None:
    """The main process's verdict on the run folder, raised on every rank alike (no rank left waiting)."""
    raised_alike(problem, RunFolderError)


class RunFolder:
    """The folder a command trains in: it is started, continued or refused here, before the first step."""

    def __init__(self, args: argparse.Namespace, accelerator: Accelerator, record: dict):
        self.args, self.accelerator, self.record = args, accelerator, record
        self.path = run_path(args, accelerator)

    def open(self, progress, layout: dict, run_log, checkpoints) -> None:
        """Continue (`--resume`: the flags checked, the newest complete state loaded by `checkpoints` into the
        model, the optimizer and `progress`), start (`--overwrite` clears it) or refuse the run; write args.json
        and open `run_log`. Evaluation only reads a resumed state."""
        args, accelerator, state = self.args, self.accelerator, self.path / STATE
        main = accelerator.is_main_process
        if args.resume:
            problem = None
            if main:  # a kill in the middle of a checkpoint swap left the state under another name
                if recover(self.path) is None:
                    problem = f"{state}: no saved state to resume; check --run-name and --out"
                elif not args.eval_only:
                    problem = check_resumed(self.path, self.record)
            agree(problem)
            checkpoints.load(progress)
            if problem := progress.resume_problem(layout, state):
                raise RunFolderError(problem)
            log.info(f"resumed {self.path} after {progress.saved_at()}, {progress.samples_seen:,} samples seen")
        elif not args.eval_only:
            agree(check_new(self.path, args.overwrite) if main else None)
        if args.eval_only:
            return
        problem = None
        if main:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                write_record(self.path, self.record)
                # Events a resumed run logged after its saved progress (killed during validation) are
                # purged; when the saved epoch's own logs are incomplete, they go too (they are rewritten).
                purge = progress.samples_seen + (0 if self.logs_behind(progress) else 1) if args.resume else None
                run_log.open(purge, new=not args.resume)
            except OSError as err:
                problem = (f"could not write {err.filename or self.path}: {err.strerror}; nothing of this command was "
                           "trained yet: free space (or choose another --out) and rerun it")
        agree(problem)

    def logs_behind(self, progress) -> bool:
        """Whether the resumed state's epoch was saved without all of its logs (main process: it reads the folder)."""
        logged = logged_epoch(self.path)
        return logged is not None and logged < progress.epoch and not progress.step
