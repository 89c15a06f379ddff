"""A training run's folder: which command may start or continue it, what it was trained with, its logs.

    RUN/args.json      the command's arguments, the processes, mixed precision and shard build it ran with
    RUN/trn/, RUN/val/ TensorBoard events (the main process writes them)
    RUN/state/, RUN/best.pt   the saved training state and the best model (luna_dist.checkpoint)
    RUN/logged.json    the last epoch whose logs and outputs are all written

A run folder is started once: a command naming an existing run must say `--resume`
(continue it) or `--overwrite` (start it again), and a resume must train as the run was
trained, so that one run folder never mixes two recipes. The state is saved before an
epoch's logs, so a kill or a full disk between them loses no training: `logged.json`
then lags behind the state, and the resume writes that epoch's logs again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

from luna_dist import __version__
from luna_dist.atomic import write_json
from luna_dist.checkpoint import BEST, OLD, PARTIAL, STATE

ARGUMENTS, LOGGED = "args.json", "logged.json"
MAY_CHANGE = frozenset({
    "epochs", "resume", "overwrite", "run_name", "out", "eval_only", "metrics_json", "verify", "dist_timeout",
    "save_every", "cache_dir", "read_timeout", "checkpoint", "finetune", "num_workers", "shards",
})
"""Flags a resumed run may give differently: where it runs, how long, what it reports, how it reads the shards.
Every other flag shapes what an epoch computes. (`--shards` may move: the build's identity is compared
instead; `--num-workers` may change between epochs, not in the middle of one; `--finetune` only
initialises a run.)"""


class RunFolderError(Exception):
    """The command does not fit the run folder it names; the message says which flag to change."""


def record(args: argparse.Namespace, processes: int, mixed_precision: str, shards_identity: dict) -> dict:
    """What args.json holds: the arguments as given (as text) and what else shapes the run."""
    return {"luna_dist": __version__, "arguments": {k: str(v) for k, v in sorted(vars(args).items())},
            "processes": processes, "mixed_precision": mixed_precision,
            "shards_identity": hashlib.sha256(json.dumps(shards_identity, sort_keys=True).encode()).hexdigest()}


def differences(saved: dict, current: dict) -> list[str]:
    """The flags (and shard build) of `current` that differ from the run's `saved` record, for a message.

    Flags that the saved record lacks (added to luna_dist after the run started) are not compared.
    """
    saved_args = saved.get("arguments", saved)  # older records held the arguments alone
    found = [f"--{name.replace('_', '-')} {saved_args[name]} (now {value})"
             for name, value in current["arguments"].items()
             if name not in MAY_CHANGE and name in saved_args and saved_args[name] != value]
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
    except FileNotFoundError:
        return None  # a run of luna_dist before args.json: nothing to compare
    except (OSError, ValueError) as err:
        return f"{run / ARGUMENTS}: unreadable ({err}); the run cannot be checked for --resume"
    found = differences(saved, current)
    if not found:
        return None
    return (f"--resume: {run} was trained with other settings: {'; '.join(found)}. Rerun with the run's flags, or "
            f"start a new run from its weights with --checkpoint {run / STATE} and a new --run-name")


def write_record(run: Path, current: dict) -> None:
    write_json(run / ARGUMENTS, current)


def logged_epoch(run: Path) -> int | None:
    """The last epoch whose logs and outputs were all written; None for runs from before logged.json."""
    try:
        return json.loads((run / LOGGED).read_text())["epoch"]
    except (FileNotFoundError, ValueError, KeyError):
        return None


def mark_logged(run: Path, epoch: int) -> None:
    write_json(run / LOGGED, {"epoch": epoch})
