"""A starving device named: each training epoch's share of time waiting for the next batch, printed, logged to
TensorBoard and warned of once with the flag to change; the default --num-workers by the doctor's rule."""

from __future__ import annotations

import json
import logging
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from luna_dist import train as train_command
from luna_dist.devices.speed import STARVED
from luna_dist.training.tasks import TASKS

STEPS = 4


def _run(shards, out, monkeypatch, caplog, *extra: str) -> tuple[list[str], dict]:
    """One epoch of STEPS batches of 4 on `tiny_shards` in this process; its log lines and TensorBoard scalars."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    caplog.set_level(logging.INFO)
    assert train_command.main(["--shards", str(shards), "--out", str(out), "--run-name", "r", "--epochs", "1",
                               "--max-steps", str(STEPS), "--batch-size", "4", "--balanced", "1", "--val-folds", "3",
                               *extra]) == 0
    events = EventAccumulator(str(out / "r" / "trn"))
    events.Reload()
    scalars = {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}
    return [record.getMessage() for record in caplog.records], scalars


def _epoch_share(lines: list[str]) -> float:
    (line,) = [line for line in lines if "E1 trained" in line]
    return float(line.split("waiting for data ")[1].split("%")[0]) / 100


def test_a_loader_slowed_on_purpose_starves_the_device_and_says_which_flag(tiny_shards, tmp_path, monkeypatch,
                                                                           caplog):
    train_loader = TASKS["cls"].train_loader

    def slowed(self, *args, **kwargs):
        for batch in train_loader(self, *args, **kwargs):
            handed = time.perf_counter()
            yield batch
            time.sleep(3 * (time.perf_counter() - handed))  # three times the step the loop just took with it

    monkeypatch.setattr(TASKS["cls"], "train_loader", slowed)
    lines, scalars = _run(tiny_shards, tmp_path, monkeypatch, caplog, "--num-workers", "0")
    share = _epoch_share(lines)
    assert share > 0.5 and scalars["speed/waiting_share"] == pytest.approx(share, abs=0.006)
    assert scalars["speed/samples_per_s"] > 0
    warned = [line for line in lines if "the device waited for data" in line]
    assert len(warned) == 1 and f"E1: the device waited for data {share:.0%} of the epoch: " in warned[0]
    assert "pass --num-workers 1 (now 0)" in warned[0] or "--num-workers 0 is as many as 1 core(s)" in warned[0]


def test_a_loader_that_keeps_up_leaves_a_small_share_and_the_default_workers_follow_the_rule(tiny_shards, tmp_path,
                                                                                           monkeypatch, caplog):
    lines, scalars = _run(tiny_shards, tmp_path, monkeypatch, caplog)
    share = _epoch_share(lines)
    assert share < STARVED / 2 and scalars["speed/waiting_share"] < STARVED / 2
    assert not [line for line in lines if "the device waited for data" in line]
    (chosen,) = [line for line in lines if "(not given): the device trains" in line]
    workers = int(chosen.split("--num-workers ")[1].split()[0])
    record = json.loads((tmp_path / "r" / "args.json").read_text())
    assert f"{workers} data worker(s) each" in next(line for line in lines if "data worker(s) each" in line)
    assert record["device_check"] == {"status": "skipped", "why": "the CPU is the reference every device is "
                                                                  "compared with"}
