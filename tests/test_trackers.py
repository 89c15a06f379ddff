"""Experiment trackers through accelerate (`--log-with`): the same scalars as TensorBoard, the run's arguments
as parameters and the best model's metrics, from the main process only; read back with the tracker's own
client (MLflow's local file store)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from helpers import run_or_show_stacks
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from luna_dist import train as train_command
from luna_dist.training.options import TRACKERS, parse_args
from luna_dist.training.run_log import RunLog, logged_epoch


def _mlflow_env(store: Path) -> dict:
    """A local MLflow file store (MLflow 3 asks to be told that a file store is meant)."""
    return {"MLFLOW_TRACKING_URI": store.as_uri(), "MLFLOW_ALLOW_FILE_STORE": "true"}


@pytest.mark.slow
def test_an_mlflow_run_holds_the_tensorboard_scalars_the_arguments_and_the_best_model(tiny_shards, tmp_path,
                                                                                    monkeypatch):
    """Two epochs on two CPU ranks: one MLflow run, named as the run folder, whose metric histories are the
    TensorBoard scalars step for step, whose parameters are args.json's arguments, and whose best/ metrics are
    those best.pt was saved with."""
    from mlflow.tracking import MlflowClient

    store, out = tmp_path / "mlruns", tmp_path / "runs"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "luna_dist.train",
               "--shards", str(tiny_shards), "--out", str(out), "--run-name", "r", "--epochs", "2", "--max-steps", "2",
               "--batch-size", "8", "--balanced", "1", "--val-folds", "3", "--log-with", "tensorboard", "mlflow"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **_mlflow_env(store)}
    result = run_or_show_stacks(command, 300, env)
    assert result.returncode == 0, result.stderr[-3000:]

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(store.as_uri())
    experiment = client.get_experiment_by_name("luna_dist-cls")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "one tracker run for the two ranks"
    run = runs[0]
    assert run.info.run_name == "r" and run.info.status == "FINISHED"

    record = json.loads((out / "r" / "args.json").read_text())
    assert run.data.params == {**record["arguments"], "processes": "2", "mixed_precision": record["mixed_precision"]}

    tensorboard = {}
    for mode in ("trn", "val"):
        events = EventAccumulator(str(out / "r" / mode))
        events.Reload()
        tensorboard |= {f"{mode}/{tag}": [(e.step, e.value) for e in events.Scalars(tag)]
                        for tag in events.Tags()["scalars"]}
    assert len(tensorboard) > 20 and [step for step, _ in tensorboard["val/loss/all"]] == [32, 64]
    logged = set(run.data.metrics)
    assert {key for key in logged if not key.startswith("best/")} == set(tensorboard)
    for key, points in tensorboard.items():
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        assert [step for step, _ in history] == [step for step, _ in points], key
        assert [value for _, value in history] == pytest.approx([value for _, value in points], rel=1e-6), key

    best = torch.load(out / "r" / "best.pt", weights_only=False)
    best_metrics = {key[len("best/"):]: value for key, value in run.data.metrics.items() if key.startswith("best/")}
    assert best_metrics.pop("epoch") == best["epoch"]
    assert best_metrics == pytest.approx({key: value for key, value in best["val_metrics"].items()
                                          if f"val/{key}" in tensorboard})
    assert client.get_metric_history(run.info.run_id, "best/epoch")[-1].step == best["samples_seen"]


def test_a_tracker_that_is_not_installed_is_refused_with_what_to_install(capsys):
    from accelerate.tracking import get_available_trackers

    available = {str(tracker) for tracker in get_available_trackers()}
    missing = next(name for name in TRACKERS if name not in available | {"tensorboard"})  # this venv lacks some
    with pytest.raises(SystemExit):
        parse_args(["--shards", "x", "--log-with", "mlflow", missing])
    assert f"error: --log-with {missing}: the {TRACKERS[missing]} package is not installed here: pip install " \
           f"{TRACKERS[missing]}" in capsys.readouterr().err


def test_a_tracker_that_cannot_start_its_run_stops_the_command_before_training_in_one_line(tiny_shards, tmp_path,
                                                                                          monkeypatch, capsys):
    for name, value in {**_mlflow_env(tmp_path / "mlruns"), "ACCELERATE_USE_CPU": "true"}.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "mlruns").write_text("a file where the store's folder goes")
    code = train_command.main(["--shards", str(tiny_shards), "--out", str(tmp_path / "runs"), "--run-name", "r",
                               "--val-folds", "3", "--log-with", "mlflow"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: --log-with mlflow: could not start the run (") and lines[0].endswith(
        "check the tracker's settings (its environment variables, its server), or leave it out of --log-with")
    assert not (tmp_path / "runs" / "r" / "state").exists()


class _Unreachable(GeneralTracker):
    """A tracker whose server has gone away: every log raises, as a tracking client does when its network fails."""

    name = "unreachable"
    requires_logging_directory = False
    tracker = None

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        raise ConnectionError("the tracking server went away")


def test_a_tracker_that_fails_after_the_start_is_warned_of_and_the_epoch_is_logged_all_the_same(tmp_path, caplog):
    accelerator = Accelerator(cpu=True, log_with=[_Unreachable()])
    accelerator.init_trackers("luna_dist-cls")
    log = RunLog(tmp_path, accelerator, _Task(), None)
    log.open(purge_step=None, new=True)
    with caplog.at_level(logging.WARNING, logger="luna_dist.train"):
        log.write(1, 64, {"trn": ({"loss": 0.7}, None), "val": ({"loss": 0.5}, None)}, best=True)
    log.close()
    assert "--log-with unreachable: epoch 1's scalars could not be logged (ConnectionError: the tracking server went " \
           "away); the run folder's TensorBoard events hold them" in caplog.text
    assert logged_epoch(tmp_path) == 1
    events = EventAccumulator(str(tmp_path / "val"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(64, 0.5)]


class _Task:
    def format_metrics(self, epoch: int, mode: str, metrics: dict) -> list[str]:
        return []
