"""A run's logs: metric lines, TensorBoard events, the task's report files, `logged.json`, `--metrics-json`.

Only the main process writes. The state of an epoch is saved before its logs (see
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


class LoggingError(Exception):
    """An epoch's logs could not be written after its state was saved; a resume writes them again."""


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

    def print(self, epoch: int, mode: str, metrics: dict) -> None:
        if self.accelerator.is_main_process:
            for line in self.task.format_metrics(epoch, mode, metrics):
                log.info(line)

    def write(self, epoch: int, step: int, logs: dict[str, tuple[dict, Report | None]]) -> None:
        """TensorBoard and the report files of a saved epoch (`logs`: mode -> (metrics, report)) at `step`
        (training samples seen), then `logged.json`; a failure is one message on every rank alike."""
        problem = None
        if self.accelerator.is_main_process:
            try:
                for mode, (metrics, report) in logs.items():
                    self._write(self.writers[mode], step, metrics, report)
                write_json(self.run / LOGGED, {"epoch": epoch})
            except OSError as err:
                problem = (f"epoch {epoch} is saved in {self.run / 'state'}, but its logs could not be written "
                           f"({err.filename or self.run}: {err.strerror}); free space and rerun the same command "
                           "with --resume: it writes them again, then goes on")
        verdict = [problem]
        broadcast_object_list(verdict)
        if verdict[0] is not None:
            raise LoggingError(verdict[0])

    def _write(self, writer: SummaryWriter, step: int, metrics: dict, report: Report | None) -> None:
        for key, value in metrics.items():
            if not key.startswith("count") and math.isfinite(value):
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


@dataclass
class Report:
    """What a validation shows beyond its scalars, for the run log to write (TensorBoard and files)."""

    histograms: dict[str, Tensor] = field(default_factory=dict)
    pr_curves: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # name -> (labels, probabilities)
    figures: dict = field(default_factory=dict)  # name -> matplotlib figure
    images: dict[str, Tensor] = field(default_factory=dict)  # name -> (H, W, 3) in [0, 1]
    files: dict[str, Callable[[Path], None]] = field(default_factory=dict)  # file name in the run folder -> writer
