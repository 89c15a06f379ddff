"""A run's saved training state and its best model, written so that no kill or full disk loses the last good one.

`RUN/state/` is accelerate's `save_state` (model, optimizer, every rank's random states)
plus the `Progress` counters. A save goes to `state.partial/`; once every rank has written
its part, the main process marks it complete (`complete.json`) and swaps it in by two
renames (`state` -> `state.old`, `state.partial` -> `state`). A kill at any moment leaves
the newest complete state under one of those three names, and `recover` puts it back
under `state/` before a resume. `RUN/best.pt` holds the model with the best validation
score, written beside it as `best.pt.partial` and renamed once the state is in place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

STATE, PARTIAL, OLD = "state", "state.partial", "state.old"
COMPLETE = "complete.json"
"""Written into a state folder last, by the main process, after every rank wrote its part."""
BEST = "best.pt"

log = get_logger("luna_dist.train")


class CheckpointError(Exception):
    """A checkpoint could not be written; the previous one is intact and the message says so."""


@dataclass
class Progress:
    """Where training stands; saved with every state so a resume never guesses from folder names."""

    epoch: int = 0  # epochs completed
    samples_seen: int = 0  # training samples, all ranks together
    best_score: list[float] | None = None  # the best --best-by score so far; later entries break ties
    best_by: str | None = None  # the --best-by rule `best_score` was measured by
    step: int = 0  # steps of epoch `epoch + 1` done (mid-epoch states, --save-every)
    epoch_rngs: list[dict] | None = None  # each rank's random states when that epoch's stream began
    layout: dict | None = None  # processes, batch size and workers that a mid-epoch state's stream needs
    train_metrics: dict | None = None  # epoch `epoch`'s, for its logs should they have to be written again
    rank: int = field(default=0, repr=False)  # this process's rank: which of `epoch_rngs` is its own (not saved)

    @property
    def epoch_rng(self) -> dict | None:
        return None if self.epoch_rngs is None else self.epoch_rngs[self.rank]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "samples_seen": self.samples_seen, "best_score": self.best_score,
                "best_by": self.best_by, "step": self.step, "epoch_rngs": self.epoch_rngs, "layout": self.layout,
                "train_metrics": self.train_metrics}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.samples_seen, self.best_score = state["epoch"], state["samples_seen"], state["best_score"]
        self.best_by, self.step, self.epoch_rngs = state["best_by"], state["step"], state["epoch_rngs"]
        self.layout, self.train_metrics = state["layout"], state["train_metrics"]


    def resume_problem(self, layout: dict, state: Path) -> str | None:
        """Why a loaded mid-epoch state cannot go on with this command's `layout` (processes, batch size and
        workers decide which samples a rank's stream yields); None when it can."""
        if not self.step or self.layout == layout:
            return None
        saved = self.layout
        return (f"--resume: {state} was saved at step {self.step} of epoch {self.epoch + 1} by {saved['processes']} "
                f"process(es) with --batch-size {saved['batch_size']} and {saved['num_workers']} data worker(s) each; "
                f"this command has {layout['processes']}, {layout['batch_size']} and {layout['num_workers']}. The rest "
                "of the epoch needs the same to see the samples it would have: rerun with them (the next epoch may "
                "use others)")


def is_better(score: list[float], best: list[float] | None) -> bool:
    """Whether `score` beats `best`: compared entry by entry (ties go to the next), NaN below everything;
    a score whose first entry is not finite never wins."""
    if not math.isfinite(score[0]):
        return False
    if best is None:
        return True
    ranked = [tuple(-math.inf if math.isnan(v) else v for v in s) for s in (score, best)]
    return ranked[0] > ranked[1]


def recover(run: Path) -> Path | None:
    """Put the newest complete state of `run` under `state/`, whatever names a kill left it under; None if none.

    `state.partial/` is the newest when marked complete (killed between or before the
    renames); otherwise it is an unfinished save and removed. `state.old/` is the previous
    state, needed only when `state/` is gone (killed between the renames). A `best.pt.partial`
    belongs to the save it was written in: kept (as best.pt) when that state is complete,
    removed when it is not.
    """
    state, partial, old, best_partial = run / STATE, run / PARTIAL, run / OLD, run / (BEST + ".partial")
    if partial.exists() and not (partial / COMPLETE).is_file():
        shutil.rmtree(partial)
        best_partial.unlink(missing_ok=True)
    if partial.exists():
        if state.is_dir():
            shutil.rmtree(old, ignore_errors=True)
            state.rename(old)
        partial.rename(state)
    if not state.is_dir() and old.is_dir():
        old.rename(state)
    shutil.rmtree(old, ignore_errors=True)
    if best_partial.exists():
        os.replace(best_partial, run / BEST)
    return state if state.is_dir() else None


class Checkpointer:
    """Writes a run's state after every epoch (and mid-epoch with --save-every) and its best model."""

    def __init__(self, run: Path, accelerator: Accelerator):
        self.run, self.accelerator = run, accelerator

    def save_epoch(self, progress: Progress, model: torch.nn.Module, task, val_metrics: dict | None) -> None:
        """The state (model, optimizer, RNG, progress) and, when the task's score improved, best.pt; mid-epoch
        (`val_metrics` None, --save-every) the state alone.

        `task` gives the score (`score`, `best_by`, `best_by_rules`). The saved progress holds
        this epoch's best score, so a resumed run never replaces best.pt with a worse model.
        """
        best, previous = None, (progress.best_score, progress.best_by)
        if val_metrics is not None and is_better(score := task.score(val_metrics), progress.best_score):
            progress.best_score, progress.best_by = score, task.best_by
            best = {"task": task.name, "epoch": progress.epoch, "samples_seen": progress.samples_seen,
                    "val_metrics": val_metrics, "best_by": task.best_by, "score": score,
                    "score_of": list(task.best_by_rules[task.best_by])}
        try:
            self.save(progress, model, best)
        except CheckpointError:
            progress.best_score, progress.best_by = previous
            raise
        if best is not None:
            scores = " then ".join(f"{name} {value:.4f}" for name, value in zip(best["score_of"], score))
            log.info(f"E{progress.epoch} new best model by {task.best_by}, {scores}: {self.run / BEST}")

    def kept(self, progress: Progress) -> str:
        """What a stopped run keeps, for its last message."""
        if not (self.run / STATE).is_dir():
            return "Nothing was saved"
        at = f"epoch {progress.epoch}" if not progress.step else f"step {progress.step} of epoch {progress.epoch + 1}"
        return f"The last saved state, {self.run / STATE} (after {at}), is kept"

    def save(self, progress: Progress, model: torch.nn.Module, best: dict | None) -> None:
        """The state of every rank, swapped in once complete; with `best` (its metadata), best.pt too.

        Every rank learns whether every rank wrote its part, so a full disk on one rank
        fails them all with one message instead of leaving the others waiting; the
        previous state and best.pt stay in place.
        """
        accelerator = self.accelerator
        partial, best_partial = self.run / PARTIAL, self.run / (BEST + ".partial")
        failure = None
        try:
            accelerator.save_state(str(partial))
            if best is not None and accelerator.is_main_process:
                torch.save({"model": accelerator.unwrap_model(model).state_dict(), **best}, best_partial)
        except Exception as err:  # whatever the storage layer raises: reported below, on every rank
            failure = err
        if accelerator.gather(torch.tensor([int(failure is not None)], device=accelerator.device)).any():
            if accelerator.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
                best_partial.unlink(missing_ok=True)
            raise CheckpointError(self._failure(failure, progress))
        accelerator.wait_for_everyone()  # every rank's files are in state.partial
        if accelerator.is_main_process:
            try:
                (partial / COMPLETE).write_text(json.dumps({"epoch": progress.epoch, "step": progress.step}))
            except OSError as err:
                shutil.rmtree(partial, ignore_errors=True)
                best_partial.unlink(missing_ok=True)
                raise CheckpointError(self._failure(err, progress)) from None
            recover(self.run)  # the swap (and best.pt's): a kill inside it is finished by the same call on resume
        accelerator.wait_for_everyone()

    def _failure(self, error: BaseException | None, progress: Progress) -> str:
        where, final = self.run, self.run / STATE
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            free = None
        if error is None:
            reason = "another process could not write its part of it"
        elif isinstance(error, OSError) and error.errno is not None:
            reason = os.strerror(error.errno)
        elif free is not None and free < 16 * 2**20:
            reason = "No space left on device"  # torch and safetensors report it as a bare write failure
        else:
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if progress.step:  # mid-epoch (--save-every)
            what, previous = f"epoch {progress.epoch + 1}, step {progress.step}", "the last one saved"
        else:
            what, previous = f"epoch {progress.epoch}", f"epoch {progress.epoch - 1}"
        kept = (f"the previous state {final} ({previous}) is intact; "
                "free space and rerun with --resume" if final.is_dir() else "no earlier state existed")
        return f"could not write the checkpoint of {what} under {where}: {reason}; {kept}"
