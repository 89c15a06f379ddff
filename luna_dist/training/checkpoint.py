"""A run's saved training state and its best model, written so that no kill or full disk loses the last good one,
and read back without running anything the folder holds.

`RUN/state/` is written by the main process alone:

    model.safetensors    the model's weights
    optimizer.bin        the optimizer's state: tensors and numbers, read by torch's weights-only loader
    scaler.json          the loss scale of fp16 mixed precision (only there)
    random_states.json   every rank's random states (Python, NumPy, torch, the accelerator's generator)
    progress.json        the `Progress` counters
    provenance.json      the folds its weights trained on (`luna_dist.models.provenance`)
    complete.json        written last, once every part is in

accelerate's `save_state` pickles the progress and the random states, and its `load_state`
unpickles them: a state shared between nodes or handed on could run code planted in it.
Here nothing is unpickled but tensors; a pickle in the folder (as earlier luna_dist versions
saved) is refused by name.

A save goes to `state.partial/`; once every rank has given its part, the main process marks it
complete (`complete.json`) and swaps it in by two renames (`state` -> `state.old`,
`state.partial` -> `state`). A kill at any moment leaves the newest complete state under one
of those three names, and `recover` puts it back under `state/` before a resume. `RUN/best.pt`
holds the model with the best validation score, written beside it as `best.pt.partial` and
renamed once the state is in place.

An epoch is saved twice: once trained, before its validation (`Progress.validated` one behind,
so a failure or Ctrl-C while validating loses no training: `--resume` validates that model), and
again once validated, with best.pt when it scored best.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from luna_dist.common.atomic import write_json
from luna_dist.models import provenance
from luna_dist.models.provenance import Provenance
from luna_dist.models.weights import load_tensors

STATE, PARTIAL, OLD = "state", "state.partial", "state.old"
COMPLETE = "complete.json"
"""Written into a state folder last, by the main process, after every rank gave its part."""
MODEL, OPTIMIZER, SCALER = "model.safetensors", "optimizer.bin", "scaler.json"
RANDOM_STATES, PROGRESS = "random_states.json", "progress.json"
BEST = "best.pt"

log = get_logger("luna_dist.train")


class CheckpointError(Exception):
    """A checkpoint could not be written; the previous one is intact and the message says so."""


class StateError(Exception):
    """A saved state that is not loaded (missing, damaged, or a pickle that could run code); the message names the
    file and how to go on."""


def stream_random_states() -> dict:
    """The random states a data stream draws from (Python's for the class mixing, torch's for worker seeds), as
    JSON values."""
    version, words, gauss = random.getstate()
    return {"python": [version, list(words), gauss], "torch": torch.get_rng_state().tolist()}


def random_states(device: torch.device) -> dict:
    """Every random state of this process as JSON values: the stream's, NumPy's and, on an accelerator, the
    generator of `device`."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    states = {**stream_random_states(), "numpy": [name, keys.tolist(), position, has_gauss, gauss]}
    if device.type != "cpu":
        states[device.type] = torch.get_device_module(device).get_rng_state(device).tolist()
    return states


def set_random_states(states: dict, device: torch.device) -> None:
    """Restore the states `random_states` or `stream_random_states` gave (those it holds)."""
    version, words, gauss = states["python"]
    random.setstate((version, tuple(words), gauss))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if "numpy" in states:
        name, keys, *rest = states["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    if device.type in states:
        torch.get_device_module(device).set_rng_state(torch.tensor(states[device.type], dtype=torch.uint8), device)


def check_stream_states(states: object) -> None:
    """ValueError unless `states` is what `stream_random_states` gives: tried on this process's generators, which
    are then put back as they were (a damaged entry fails here, when the state is read, not mid-resume)."""
    if not isinstance(states, dict) or set(states) != {"python", "torch"}:
        raise ValueError(f"holds {str(states)[:80]!r}, not a data stream's random states")
    before = stream_random_states()
    try:
        set_random_states(states, torch.device("cpu"))
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise ValueError(f"holds random states that do not load ({err})") from None
    finally:
        set_random_states(before, torch.device("cpu"))


@dataclass
class Progress:
    """Where training stands; saved with every state so a resume never guesses from folder names."""

    epoch: int = 0  # epochs trained
    samples_seen: int = 0  # training samples, all ranks together
    best_score: list[float] | None = None  # the best --best-by score so far; later entries break ties
    best_by: str | None = None  # the --best-by rule `best_score` was measured by
    step: int = 0  # steps of epoch `epoch + 1` done (mid-epoch states, --save-every)
    epoch_rngs: list[dict] | None = None  # each rank's random states when that epoch's stream began
    layout: dict | None = None  # processes, batch size and workers that a mid-epoch state's stream needs
    train_metrics: dict | None = None  # epoch `epoch`'s, for its logs should they have to be written again
    validated: int = 0  # the last epoch validated: `epoch - 1` when saved between its training and validation
    rank: int = field(default=0, repr=False)  # this process's rank: which of `epoch_rngs` is its own (not saved)

    SAVED = {"epoch": int, "samples_seen": int, "best_score": (list, type(None)), "best_by": (str, type(None)),
             "step": int, "epoch_rngs": (list, type(None)), "layout": (dict, type(None)),
             "train_metrics": (dict, type(None)), "validated": int}
    """What `state_dict` holds, and the types `load_state_dict` takes for each."""

    @property
    def epoch_rng(self) -> dict | None:
        return None if self.epoch_rngs is None else self.epoch_rngs[self.rank]

    @property
    def current(self) -> int:
        """The epoch being trained or validated."""
        return self.epoch if self.validated < self.epoch else self.epoch + 1

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.SAVED}

    def load_state_dict(self, state: dict) -> None:
        """ValueError naming the first entry that is missing or of another type."""
        for name, kind in self.SAVED.items():
            if not isinstance(state.get(name), kind):
                raise ValueError(f"{name} is {state.get(name)!r}")
        rngs, layout = state["epoch_rngs"], state["layout"]
        if rngs is not None:
            if layout is None or len(rngs) != layout.get("processes"):
                raise ValueError(f"epoch_rngs holds {len(rngs)} rank(s)' random states, its layout {layout}")
            for rank, entry in enumerate(rngs):
                try:
                    check_stream_states(entry)
                except ValueError as err:
                    raise ValueError(f"epoch_rngs[{rank}] {err}") from None
        for name in self.SAVED:
            setattr(self, name, state[name])

    def resume_problem(self, layout: dict, state: Path) -> str | None:
        """Why a loaded mid-epoch state cannot go on with this command's `layout` (processes, batch size and
        workers decide which samples a rank's stream yields; workers None: not given, so the epoch's); None when
        it can."""
        if self.step and layout["num_workers"] is None:
            layout = {**layout, "num_workers": self.layout["num_workers"]}
        if not self.step or self.layout == layout:
            return None
        saved = self.layout
        return (f"--resume: {state} was saved at step {self.step} of epoch {self.epoch + 1} by {saved['processes']} "
                f"process(es) with --batch-size {saved['batch_size']} and {saved['num_workers']} data worker(s) each; "
                f"this command has {layout['processes']}, {layout['batch_size']} and {layout['num_workers']}. The rest "
                "of the epoch needs the same to see the samples it would have: rerun with them (the next epoch may "
                "use others)")

    def saved_at(self) -> str:
        """Where this progress stands, for messages: "epoch 2", "step 4 of epoch 3", "epoch 2, not yet validated"."""
        if self.step:
            return f"step {self.step} of epoch {self.epoch + 1}"
        return f"epoch {self.epoch}" + (", not yet validated" if self.validated < self.epoch else "")


def is_better(score: list[float], best: list[float] | None) -> bool:
    """Whether `score` beats `best`: compared entry by entry (ties go to the next), NaN below everything;
    a score whose first entry is not finite never wins."""
    if not math.isfinite(score[0]):
        return False
    if best is None:
        return True
    ranked = [tuple(-math.inf if math.isnan(v) else v for v in s) for s in (score, best)]
    return ranked[0] > ranked[1]


def newest_state(run: Path) -> Path | None:
    """The folder of `run`'s newest complete state, under whatever name a kill left it (see `recover`); None if
    there is none."""
    if (run / PARTIAL / COMPLETE).is_file():
        return run / PARTIAL
    return next((run / name for name in (STATE, OLD) if (run / name).is_dir()), None)


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
    """Writes a run's state after every epoch's training, again after its validation (with its best model), and
    mid-epoch with --save-every; reads it back for --resume."""

    def __init__(self, run: Path, accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 provenance: tuple[Provenance, Provenance] | None = None):
        self.run, self.accelerator, self.model, self.optimizer = run, accelerator, model, optimizer
        self.provenance = provenance  # what a state's weights saw, and best.pt's (`luna_dist.models.provenance`)

    def save_epoch(self, progress: Progress, task, val_metrics: dict | None) -> None:
        """The state (model, optimizer, random states, progress) and, with `val_metrics` (the epoch validated), best.pt
        when the task's score improved; without them (trained, not yet validated, or mid-epoch) the state alone.

        `task` gives the score (`score`, `best_by`, `best_by_rules`). The saved progress holds
        this epoch's best score, so a resumed run never replaces best.pt with a worse model.
        With `--select-on last` every validated epoch is kept as best.pt, whatever it scored.
        """
        best, previous = None, (progress.best_score, progress.best_by, progress.validated)
        last = task.args.select_on == "last"
        if val_metrics is not None:
            progress.validated = progress.epoch
            if is_better(score := task.score(val_metrics), progress.best_score) or last:
                progress.best_score, progress.best_by = score, task.best_by
                best = {"task": task.name, "epoch": progress.epoch, "samples_seen": progress.samples_seen,
                        "val_metrics": val_metrics, "best_by": task.best_by, "score": score,
                        "score_of": list(task.best_by_rules[task.best_by]), "select_on": task.args.select_on}
        try:
            self.save(progress, best)
        except CheckpointError:
            progress.best_score, progress.best_by, progress.validated = previous
            raise
        if best is not None:
            scores = task.describe_score(val_metrics, score)
            kept = "kept, the last epoch (--select-on last)" if last else f"new best model by {task.best_by}"
            log.info(f"E{progress.epoch} {kept}, {scores}: {self.run / BEST}")

    def kept(self) -> str:
        """What a stopped run keeps, for its last message: read from the saved state, which a stop in the middle of
        a save leaves as it was (or under another name, which --resume puts back)."""
        if (newest := newest_state(self.run)) is None:
            return "Nothing was saved"
        return f"The last saved state, {self.run / STATE} (after {_saved_at(newest)}), is kept"

    def go_on(self, where: str = "") -> str:
        """The command that continues a stopped run (`where`: " on every node"): --resume where a state is saved;
        else --overwrite, as the run folder exists."""
        if newest_state(self.run) is not None:
            return f"rerun the same command{where} with --resume --run-name {self.run.name} to continue"
        return f"rerun the same command{where} with --overwrite --run-name {self.run.name} to start again"

    def save(self, progress: Progress, best: dict | None) -> None:
        """The state, swapped in once complete; with `best` (its metadata), best.pt too.

        The main process writes every file, the ranks' random states gathered first. Every
        rank learns whether it succeeded, so a full disk fails them all with one message
        instead of leaving the others waiting; the previous state and best.pt stay in place.
        """
        accelerator = self.accelerator
        partial, best_partial = self.run / PARTIAL, self.run / (BEST + ".partial")
        states = gather_object([random_states(accelerator.device)])
        failure = None
        if accelerator.is_main_process:
            try:
                self._write(partial, progress, states, best, best_partial)
                write_json(partial / COMPLETE, {"epoch": progress.epoch, "step": progress.step})
            except Exception as err:  # whatever the storage layer raises: reported below, on every rank
                failure = err
                shutil.rmtree(partial, ignore_errors=True)
                best_partial.unlink(missing_ok=True)
        if accelerator.gather(torch.tensor([int(failure is not None)], device=accelerator.device)).any():
            raise CheckpointError(self._failure(failure, progress))
        if accelerator.is_main_process:
            recover(self.run)  # the swap (and best.pt's): a kill inside it is finished by the same call on resume
        accelerator.wait_for_everyone()

    def _write(self, folder: Path, progress: Progress, states: list[dict], best: dict | None, best_file: Path) -> None:
        """The files of a state (main process), `states` every rank's random states; with `best`, best.pt's."""
        folder.mkdir(parents=True, exist_ok=True)
        weights = {name: tensor.detach().contiguous()  # channels-last tensors are stored in the standard order
                   for name, tensor in self.accelerator.unwrap_model(self.model).state_dict().items()}
        save_file(weights, folder / MODEL, metadata={"format": "pt"})
        torch.save(self.optimizer.state_dict(), folder / OPTIMIZER)
        if self.accelerator.scaler is not None:
            write_json(folder / SCALER, self.accelerator.scaler.state_dict())
        write_json(folder / RANDOM_STATES, states, indent=None)
        write_json(folder / PROGRESS, progress.state_dict())
        if self.provenance is not None:
            write_json(folder / provenance.STATE_FILE, self.provenance[0].to_json())
        if best is not None:
            made_by = {} if self.provenance is None else {"provenance": self.provenance[1].to_json()}
            torch.save({"model": weights, **best, **made_by}, best_file)

    def load(self, progress: Progress) -> None:
        """The saved state (`RUN/state`) into the model, the optimizer, `progress` and each rank's random states.

        Every rank reads it, and learns whether every rank could: a state one rank cannot
        read stops them all with its message. Ranks beyond those saved (a resume on more
        processes, between epochs) keep the random states they were seeded with.
        """
        problem = None
        try:
            self._read(self.run / STATE, progress)
        except StateError as err:
            problem = str(err)
        if problems := [found for found in gather_object([problem]) if found]:
            raise StateError(problems[0])

    def _read(self, state: Path, progress: Progress) -> None:
        advice = "start the run again with --overwrite"
        if (self.run / BEST).is_file():
            advice += f", or a new run from its best model with --checkpoint {self.run / BEST} and a new --run-name"
        if pickles := sorted(state.glob("*.pkl")):
            raise StateError(f"--resume: {pickles[0]}: a pickle, which could run code when loaded, is not loaded "
                             "(luna_dist saved its states with pickles before): go on from the state's weights with "
                             f"--checkpoint {state} and a new --run-name, or start the run again with --overwrite")
        with _reading(state / PROGRESS, advice):
            progress.load_state_dict(json.loads((state / PROGRESS).read_text()))
        with _reading(state / MODEL, advice):
            self.accelerator.unwrap_model(self.model).load_state_dict(load_file(state / MODEL))
        with _reading(state / OPTIMIZER, advice):
            self.optimizer.load_state_dict(load_tensors(state / OPTIMIZER))
        if self.accelerator.scaler is not None:
            with _reading(state / SCALER, advice):
                self.accelerator.scaler.load_state_dict(json.loads((state / SCALER).read_text()))
        with _reading(state / RANDOM_STATES, advice):
            states = json.loads((state / RANDOM_STATES).read_text())
            if self.accelerator.process_index < len(states):
                set_random_states(states[self.accelerator.process_index], self.accelerator.device)

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
        kept = (f"the previous state {final} ({_saved_at(final)}) is intact; "
                "free space and rerun with --resume" if final.is_dir() else "no earlier state existed")
        return f"could not write the checkpoint of {progress.saved_at()} (under {where}): {reason}; {kept}"


def _saved_at(state: Path) -> str:
    """Where the state in `state` stands (`Progress.saved_at`), read from it."""
    saved = Progress()
    try:
        saved.load_state_dict(json.loads((state / PROGRESS).read_text()))
    except (OSError, ValueError):
        return "an unknown epoch"
    return saved.saved_at()


@contextmanager
def _reading(file: Path, advice: str) -> Iterator[None]:
    """Any failure to read `file` of a state as one StateError naming it, with `advice`."""
    try:
        yield
    except FileNotFoundError:
        raise StateError(f"--resume: {file}: missing; {advice}") from None
    except Exception as err:  # json, safetensors, torch and the optimizer each word a bad file their own way
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        text = reason if reason.startswith(str(file)) else f"{file}: not as luna_dist writes it ({reason})"
        raise StateError(f"--resume: {text}; {advice}") from None
