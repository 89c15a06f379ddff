"""A run's logs: TensorBoard scalars and reports, logged.json, and a resume that writes an epoch's logs again
without doubling its events."""

from __future__ import annotations

import errno
import json
import math
import time

import pytest
import torch
from accelerate import Accelerator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from luna_dist.training.run_log import LOGGED, LoggingError, Report, RunLog, logged_epoch


class _Task:
    """The one task hook a run log calls: the metric lines."""

    def format_metrics(self, epoch: int, mode: str, metrics: dict) -> list[str]:
        return [f"E{epoch} {mode} loss {metrics['loss']:.3f}"]


@pytest.fixture(scope="module")
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


def _scalars(folder, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def test_an_epoch_is_written_to_tensorboard_and_its_files_then_logged(tmp_path, accelerator):
    log = RunLog(tmp_path, accelerator, _Task(), metrics_json=tmp_path / "metrics.json")
    log.open(purge_step=None, new=True)
    assert logged_epoch(tmp_path) == 0
    report = Report(histograms={"prob_pos": torch.tensor([0.1, 0.9, 0.95])},
                    pr_curves={"pr": (torch.tensor([0, 1, 1]), torch.tensor([0.1, 0.9, 0.95]))},
                    files={"table.txt": lambda path: path.write_text("a table\n")})
    log.write(1, 64, {"trn": ({"loss": 0.7, "count_pos": 3.0}, None),
                      "val": ({"loss": 0.5, "auc": math.nan}, report)})
    log.write_metrics({"loss": 0.5}, {"epoch": 1})
    log.close()
    assert _scalars(tmp_path / "trn", "loss") == [(64, pytest.approx(0.7))]
    assert _scalars(tmp_path / "trn", "count_pos") == []  # counts are in the lines, not plotted
    assert _scalars(tmp_path / "val", "auc") == []  # an undefined score is left out, not drawn as NaN
    events = EventAccumulator(str(tmp_path / "val"))
    events.Reload()
    assert "prob_pos" in events.Tags()["histograms"] and "pr" in events.Tags()["tensors"]
    assert (tmp_path / "table.txt").read_text() == "a table\n"
    assert logged_epoch(tmp_path) == 1
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"loss": 0.5, "epoch": 1}


def test_logs_written_again_on_resume_hold_each_step_once(tmp_path, accelerator, monkeypatch):
    log = RunLog(tmp_path, accelerator, _Task(), None)
    log.open(purge_step=None, new=True)
    log.write(1, 64, {"trn": ({"loss": 0.7}, None)})
    log.write(2, 128, {"trn": ({"loss": 0.6}, None)})
    log.close()
    resumed = RunLog(tmp_path, accelerator, _Task(), None)  # epoch 2's logs are written again from step 128 on
    real_time = time.time
    with monkeypatch.context() as later:  # a resume starts after the run it continues: its event file sorts last
        later.setattr(time, "time", lambda: real_time() + 60)
        resumed.open(purge_step=128, new=False)
    resumed.write(2, 128, {"trn": ({"loss": 0.55}, None)})
    resumed.close()
    assert _scalars(tmp_path / "trn", "loss") == [(64, pytest.approx(0.7)), (128, pytest.approx(0.55))]


def test_a_failed_write_keeps_the_last_logged_epoch_and_says_how_to_go_on(tmp_path, accelerator):
    def full_disk(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    log = RunLog(tmp_path, accelerator, _Task(), None)
    log.open(purge_step=None, new=True)
    with pytest.raises(LoggingError) as err:
        log.write(3, 192, {"val": ({"loss": 0.4}, Report(files={"table.txt": full_disk}))})
    log.close()
    assert str(err.value) == (f"epoch 3 is saved in {tmp_path / 'state'}, but its logs could not be written "
                              f"({tmp_path / 'table.txt'}: No space left on device); free space and rerun the same "
                              "command with --resume: it writes them again, then goes on")
    assert logged_epoch(tmp_path) == 0


def test_logged_epoch_of_a_folder_without_or_with_a_garbled_record(tmp_path):
    assert logged_epoch(tmp_path) is None
    (tmp_path / LOGGED).write_text("{")
    assert logged_epoch(tmp_path) is None
