"""A run's logs: metric lines, TensorBoard events, the task's report files, `logged.json`, `--metrics-json`, and
the experiment trackers of `--log-with` (accelerate's: MLflow, W&B, ...).

Only the main process writes. TensorBoard's events are the run folder's own (`RUN/trn`, `RUN/val`), written
whatever `--log-with` says; each other tracker gets a run named as the folder, the command's arguments as
its parameters, the same scalars at the same steps (`trn/NAME`, `val/NAME`), and the best model's
validation metrics (`best/NAME`, with `best/epoch`) whenever a new best model is saved. A resumed
run logs to a new tracker run, its steps going on. The state of an epoch is saved before its logs (see
`luna_dist.training.trainer`), and `RUN/logged.json` names the last epoch whose logs are all
written: when a kill or a full disk comes between the two, the resume writes that
epoch's logs again (its events purged first, so each step appears once).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from luna_dist.common.atomic import write_json

LOGGED = "logged.json"
MODES = ("trn", "val")
HISTOGRAM_BINS = np.linspace(0, 1, 51)
"""Reports' histograms are of probabilities: bins of 1/50."""

log = get_logger("luna_dist.train")



def raised_alike(problem: str | None, error: type[Exception]) -> None:
    """The main process's `problem` (None: there is none), raised as `error` on every rank alike: no rank goes on
    to a collective that the others never reach."""
    verdict = [problem]
    broadcast_object_list(verdict)
    if verdict[0] is not None:
        raise error(verdict[0])

class LoggingError(Exception):
    """An epoch's logs could not be written after its state was saved (a resume writes them again), or a tracker
    of `--log-with` could not start its run."""


def logged_epoch(run: Path) -> int | None:
    """The last epoch whose logs and outputs were all written; None for runs from before logged.json."""
    try:
        return json.loads((run / LOGGED).read_text())["epoch"]
    except (FileNotFoundError, ValueError, KeyError):
        return None


class MetricLines(Protocol):
    """What a run log asks of its task: the lines that show an epoch's metrics."""

    def format_metrics(self, epoch: int, mode: str, metrics: dict) -> list[str]: ...


class RunLog:
    """The logs of a run folder (`run`), written by the main process of `accelerator`."""

    def __init__(self, run: Path, accelerator: Accelerator, task: MetricLines, metrics_json: Path | None):
        self.run, self.accelerator, self.task, self.metrics_json = run, accelerator, task, metrics_json
        self.writers: dict[str, SummaryWriter] = {}

    def open(self, purge_step: int | None, new: bool) -> None:
        """Open the TensorBoard writers (main process), purging the events from `purge_step` on; a `new` run
        starts `logged.json` at epoch 0. Raises OSError where the folder cannot be written."""
        if not self.accelerator.is_main_process:
            return
        if new:
            write_json(self.run / LOGGED, {"epoch": 0})
        self.writers = {mode: SummaryWriter(str(self.run / mode), purge_step=purge_step) for mode in MODES}

    def start_trackers(self, experiment: str, params: dict) -> None:
        """Start the run in each tracker of `--log-with` but TensorBoard (accelerate's, main process), with
        `params`; a failure is one message on every rank alike, before the first step."""
        problem = None
        if self.accelerator.is_main_process and self.accelerator.log_with:
            names = " ".join(str(tracker) for tracker in self.accelerator.log_with)
            run_names = {"mlflow": {"run_name": self.run.name}, "wandb": {"name": self.run.name}}
            try:
                self.accelerator.init_trackers(experiment, {k: str(v) for k, v in params.items()}, run_names)
            except Exception as err:  # each tracker raises its own (a server unreachable, a bad setting)
                problem = (f"--log-with {names}: could not start the run ({_said(err)}): check the tracker's settings "
                           "(its environment variables, its server), or leave it out of --log-with")
        raised_alike(problem, LoggingError)

    def print(self, epoch: int, mode: str, metrics: dict) -> None:
        if self.accelerator.is_main_process:
            for line in self.task.format_metrics(epoch, mode, metrics):
                log.info(line)

    def write(self, epoch: int, step: int, logs: dict[str, tuple[dict, Report | None]], best: bool = False) -> None:
        """TensorBoard and the report files of a saved epoch (`logs`: mode -> (metrics, report)) at `step`
        (training samples seen), then `logged.json`; a failure is one message on every rank alike. The
        trackers get the same scalars, and (`best`: the epoch's model is the new best) its validation's
        as the best model's."""
        problem = None
        if self.accelerator.is_main_process:
            scalars = {f"{mode}/{key}": value for mode, (metrics, _) in logs.items()
                       for key, value in plotted(metrics).items()}
            if best:
                scalars |= {f"best/{key}": value for key, value in plotted(logs["val"][0]).items()}
                scalars["best/epoch"] = epoch
            self._track(epoch, step, scalars)
            try:
                for mode, (metrics, report) in logs.items():
                    self._write(self.writers[mode], step, metrics, report)
                write_json(self.run / LOGGED, {"epoch": epoch})
            except OSError as err:
                problem = (f"epoch {epoch} is saved in {self.run / 'state'}, but its logs could not be written "
                           f"({err.filename or self.run}: {err.strerror}); free space and rerun the same command "
                           "with --resume: it writes them again, then goes on")
        raised_alike(problem, LoggingError)

    def _track(self, epoch: int, step: int, scalars: dict) -> None:
        """Log `scalars` to each tracker of `--log-with`; one that fails is warned of and the run goes on: the run
        folder holds every epoch's logs."""
        for tracker in self.accelerator.trackers:
            try:
                tracker.log(scalars, step=step)
            except Exception as err:  # a tracking server gone for a while must not stop the training
                log.warning(f"--log-with {tracker.name}: epoch {epoch}'s scalars could not be logged ({_said(err)}); "
                            "the run folder's TensorBoard events hold them")

    def _write(self, writer: SummaryWriter, step: int, metrics: dict, report: Report | None) -> None:
        for key, value in plotted(metrics).items():
            writer.add_scalar(key, value, step)
        if report is not None:
            for name, (labels, probabilities) in report.pr_curves.items():
                writer.add_pr_curve(name, labels, probabilities, step)
            for name, values in report.histograms.items():
                writer.add_histogram(name, values, step, bins=HISTOGRAM_BINS)
            for name, figure in report.figures.items():
                writer.add_figure(name, figure, step)
            for name, image in report.images.items():
                writer.add_image(name, image, step, dataformats="HWC")
            for name, write in report.files.items():
                write(self.run / name)
        writer.flush()

    def write_metrics(self, metrics: dict, summary: dict) -> None:
        """`--metrics-json`: the last validation's metrics and where training stands."""
        if self.metrics_json and self.accelerator.is_main_process:
            self.metrics_json.write_text(json.dumps({**metrics, **summary}, indent=1))

    def close(self) -> None:
        for writer in self.writers.values():
            try:
                writer.close()
            except OSError:
                pass  # the failure was reported when it happened


def _said(err: Exception) -> str:
    """An exception in a few words: its type and the first line of its message."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:200]}{'…' if len(text) > 200 else ''}" if text else type(err).__name__


def plotted(metrics: dict) -> dict:
    """The metrics drawn as curves: counts are in the lines, and an undefined score (NaN) is left out, not drawn."""
    return {key: value for key, value in metrics.items() if not key.startswith("count") and math.isfinite(value)}


@dataclass
class Report:
    """What a validation shows beyond its scalars, for the run log to write (TensorBoard and files)."""

    histograms: dict[str, Tensor] = field(default_factory=dict)
    pr_curves: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # name -> (labels, probabilities)
    figures: dict = field(default_factory=dict)  # name -> matplotlib figure
    images: dict[str, Tensor] = field(default_factory=dict)  # name -> (H, W, 3) in [0, 1]
    files: dict[str, Callable[[Path], None]] = field(default_factory=dict)  # file name in the run folder -> writer
