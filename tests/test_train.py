"""Training end to end on CPU ranks: equal steps, exact-once validation, TensorBoard, resume.

Multi-process runs go through torchrun with gloo (what works on a machine with no
accelerator); each has a timeout so that a hang fails the test instead of blocking.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from helpers import damaged_copy, open_cls, random_payload, run_or_show_stacks
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from luna_dist import evaluate
from luna_dist import train as train_command
from luna_dist.evaluation.files import fold_findings, read_marks
from luna_dist.training.checkpoint import stream_random_states

RUN_TIMEOUT = 300
SCALARS = ["loss/all", "loss/neg", "loss/pos", "correct/all", "correct/neg", "correct/pos",
           "pr/precision", "pr/recall", "pr/f1_score"]


def train(args: list[str], processes: int = 1, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the training script in `processes` CPU ranks; fail on a non-zero exit or a hang."""
    if processes == 1:
        command = [sys.executable, "-m", "luna_dist.train", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "launch/train.py", *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    result = run_or_show_stacks(command, RUN_TIMEOUT, env, cwd=cwd or root)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def two_rank_run(tiny_shards, tmp_path_factory) -> Path:
    """One epoch on 2 CPU ranks with a data worker each, 3 steps, balanced and augmented, validated on fold 3."""
    out = tmp_path_factory.mktemp("runs")
    train(["--shards", str(tiny_shards), "--out", str(out), "--run-name", "r", "--epochs", "1", "--max-steps", "3",
           "--batch-size", "8", "--num-workers", "1", "--balanced", "1", "--augment", "--val-folds", "3",
           "--metrics-json", str(out / "metrics.json")], processes=2)
    return out / "r"


def test_train_shards_are_odd_and_uneven(tiny_shards):
    """The set the 2-rank run trains on cannot be split evenly over ranks and workers."""
    shards = open_cls(tiny_shards)
    train_shards = [s for s in shards.manifest["shards"] if s["fold"] != 3]
    assert len(train_shards) % 2 == 1
    assert len({s["samples"] for s in train_shards}) > 1


def test_two_rank_epoch_finishes_with_equal_steps(two_rank_run):
    metrics = json.loads((two_rank_run.parent / "metrics.json").read_text())
    assert metrics["processes"] == 2
    # 3 steps x 8 samples x 2 ranks, counted after the gather.
    assert metrics["samples_seen"] == 48
    assert (two_rank_run / "state" / "model.safetensors").is_file()


def _close(run: dict, evaluated: dict, keys) -> None:
    """Metrics of one model on the same samples: equal up to float32 sums in another order."""
    for key in keys:
        assert evaluated[key] == pytest.approx(run[key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_validation_scores_the_saved_model_on_one_and_two_ranks(tiny_shards, two_rank_run, tmp_path):
    """--eval-only of best.pt on 1 and on 2 ranks gives the very metrics the 2-rank run logged: validation
    runs the main process's model (its batch-norm statistics) on every rank, the model that is saved."""
    run = json.loads((two_rank_run.parent / "metrics.json").read_text())
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"m{processes}.json"
        train(["--shards", str(tiny_shards), "--eval-only", "--checkpoint", str(two_rank_run / "best.pt"),
               "--out", str(tmp_path), "--run-name", f"eval{processes}", "--batch-size", "4",
               "--val-folds", "3", "--metrics-json", str(out)], processes=processes)
        results[processes] = json.loads(out.read_text())
    one, two = results[1], results[2]
    shards = open_cls(tiny_shards)
    assert one["count/all"] == shards.count([3], "pos") + shards.count([3], "neg")
    sensitivities = [key for key in one if key.startswith("froc/sensitivity_")]
    assert len(sensitivities) == 7 and 0 <= one["cpm"] <= 1
    counts = ("count/all", "count/pos", "count/neg", "correct_count/pos", "correct_count/neg", "froc/detected",
              "froc/false_positives")
    for evaluated in (one, two):
        # Which nodules the 100 most probable marks of each scan find, and how many marks are false positives.
        assert [evaluated[key] for key in counts] == [run[key] for key in counts]
        _close(run, evaluated, ["loss/all", "loss/neg", "loss/pos", "auc", "cpm", *sensitivities])
    assert run["froc/detected"] > 0 and run["froc/false_positives"] > 0
    import torch

    assert torch.load(two_rank_run / "best.pt", weights_only=False)["val_metrics"]["cpm"] == run["cpm"]


def test_tensorboard_holds_scalars_pr_curve_and_histograms(two_rank_run):
    logs = {}
    for mode in ("trn", "val"):
        accumulator = EventAccumulator(str(two_rank_run / mode), size_guidance={"tensors": 0, "histograms": 0})
        accumulator.Reload()
        logs[mode] = accumulator
    for mode in ("trn", "val"):
        tags = logs[mode].Tags()
        present = set(tags["scalars"])
        expected = set(SCALARS)
        # Precision is undefined when no sample is predicted positive: then it is left out, not logged as NaN.
        assert expected - {"pr/precision", "pr/f1_score"} <= present, (mode, present)
        for tag in present:
            events = logs[mode].Scalars(tag)
            assert [e.step for e in events] == [48], (mode, tag)  # x axis: training samples, all ranks
    val_tags = logs["val"].Tags()
    assert val_tags["tensors"] == ["pr"], val_tags
    assert {"cpm", "froc/sensitivity_0.125", "froc/sensitivity_8"} <= set(val_tags["scalars"])
    assert "cpm" not in logs["trn"].Tags()["scalars"]  # training samples say nothing of where they lie
    assert val_tags["images"] == ["froc"]
    curve = logs["val"].Tensors("pr")[0]
    assert curve.step == 48
    assert len(curve.tensor_proto.tensor_shape.dim) == 2  # the PR curve's table: 6 rows x thresholds
    assert set(val_tags["histograms"]) == {"is_neg", "is_pos"}, val_tags
    for tag in ("is_neg", "is_pos"):
        histogram = logs["val"].Histograms(tag)[0].histogram_value
        assert 0 <= histogram.min <= histogram.max <= 1
        assert histogram.num > 0


def test_validation_writes_luna16_predictions_scored_as_the_evaluation_scores_them(tiny_shards, two_rank_run, tmp_path,
                                                                                capsys):
    metrics = json.loads((two_rank_run.parent / "metrics.json").read_text())
    marks = read_marks(two_rank_run / "val-predictions-E1.csv")
    shards = open_cls(tiny_shards)
    assert len(marks.probability) == metrics["count/all"] == shards.count([3], "pos") + shards.count([3], "neg")
    assert ((marks.probability >= 0) & (marks.probability <= 1)).all()
    # The file scored by the command, with the fold's tables from the manifest, gives the logged CPM.
    series, nodules, excluded = fold_findings(shards.manifest, [3])
    (tmp_path / "series.csv").write_text("\n".join(series) + "\n")
    for name, found in (("annotations", nodules), ("excluded", excluded)):
        rows = [f"{u},{x!r},{y!r},{z!r},{d!r}" for u, (x, y, z), d in zip(found.series, found.xyz.tolist(), found.diameter.tolist())]
        (tmp_path / f"{name}.csv").write_text("\n".join(["seriesuid,coordX,coordY,coordZ,diameter_mm", *rows]) + "\n")
    tables = ["--annotations", str(tmp_path / "annotations.csv"), "--excluded", str(tmp_path / "excluded.csv"),
              "--seriesuids", str(tmp_path / "series.csv"), "--bootstrap", "0", "--json", str(tmp_path / "score.json")]
    # The run chose its best epoch on fold 3 (--select-on val): its predictions' sidecar says so, and fold 3 is not
    # scored with them; the CSV alone, compared here as numbers, is.
    assert evaluate.main([*tables, "--predictions", str(two_rank_run / "val-predictions-E1.csv")]) == 1
    assert "was selected on fold 3" in capsys.readouterr().err
    shutil.copy(two_rank_run / "val-predictions-E1.csv", tmp_path / "predictions.csv")
    assert evaluate.main([*tables, "--predictions", str(tmp_path / "predictions.csv")]) == 0
    score = json.loads((tmp_path / "score.json").read_text())
    assert score["cpm"] == pytest.approx(metrics["cpm"], abs=1e-9)
    assert score["nodules"] == len(nodules.series) > 0 and score["scans"] == len(series)


@pytest.mark.slow
def test_resume_continues_step_and_sample_counters(tiny_shards, two_rank_run, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(two_rank_run, run)
    # The run's flags; one process instead of two is fine between epochs.
    train(["--shards", str(tiny_shards), "--out", str(tmp_path), "--run-name", "r", "--resume", "--epochs", "2",
           "--max-steps", "3", "--batch-size", "8", "--balanced", "1", "--augment", "--val-folds", "3",
           "--metrics-json", str(tmp_path / "m.json")])
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["epoch"] == 2
    assert metrics["samples_seen"] == 48 + 3 * 8  # the second epoch ran on one rank
    accumulator = EventAccumulator(str(run / "val"))
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("loss/all")] == [48, 72]  # same run, counter continued
    # Asking again for 2 epochs does nothing more.
    result = train(["--shards", str(tiny_shards), "--out", str(tmp_path), "--run-name", "r", "--resume",
                    "--epochs", "2", "--max-steps", "3", "--batch-size", "8", "--balanced", "1", "--augment",
                    "--val-folds", "3"])
    assert "already trained for 2 epoch" in result.stderr + result.stdout


@pytest.mark.slow
def test_resumed_training_equals_uninterrupted_training(tiny_shards, tmp_path):
    """Stop after epoch 1 and resume: epoch 2 sees the same batches and augmentations, so the weights match."""
    _assert_resume_equals_straight(["--shards", str(tiny_shards), "--out", str(tmp_path), "--max-steps", "2",
                                    "--batch-size", "4", "--balanced", "1", "--augment", "--val-folds", "3"],
                                   tmp_path, "head_linear.weight")


def _assert_resume_equals_straight(common: list[str], out: Path, trained: str) -> None:
    """Two epochs straight, and one epoch then a resume: the same weights; `trained` changed in epoch 2."""
    import torch
    from safetensors.torch import load_file

    train([*common, "--run-name", "straight", "--epochs", "2"])
    train([*common, "--run-name", "stopped", "--epochs", "1"])
    after_one = load_file(out / "stopped" / "state" / "model.safetensors")
    train([*common, "--run-name", "stopped", "--epochs", "2", "--resume"])
    straight = load_file(out / "straight" / "state" / "model.safetensors")
    resumed = load_file(out / "stopped" / "state" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert not torch.equal(after_one[trained], resumed[trained])  # epoch 2 trained
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_bad_shard_folder_is_a_clear_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "luna_dist.train", "--shards", str(tmp_path / "nowhere"),
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert result.returncode == 1
    assert "manifest.json not found" in result.stderr


@pytest.mark.slow
def test_validation_fold_without_shards_fails_before_training(tiny_shards, tmp_path):
    """The default --val-folds 9 on a build of fewer than 10 CTs (as the tiny build of 4)."""
    result = subprocess.run([sys.executable, "-m", "luna_dist.train", "--shards", str(tiny_shards), "--out",
                             str(tmp_path / "runs"), "--run-name", "r", "--max-steps", "2", "--batch-size", "4"],
                            capture_output=True, text=True, timeout=RUN_TIMEOUT,
                            env={**os.environ, "ACCELERATE_USE_CPU": "true"})
    assert result.returncode == 1, result.stderr[-3000:]
    assert "validation folds [9] have no shards" in result.stderr
    assert "Traceback" not in result.stderr
    assert "E1 trained" not in result.stderr  # not a single training step ran
    assert not (tmp_path / "runs" / "r").exists()  # and no run folder without a state was left


@pytest.mark.slow
def test_run_killed_during_validation_resumes_without_duplicate_steps(tiny_shards, tmp_path):
    """Epoch 2 is saved trained before its validation: killed there, the resume validates its model without
    training it again, and TensorBoard holds each step once (stale events purged)."""
    import signal

    common = ["--shards", str(tiny_shards), "--out", str(tmp_path), "--run-name", "r", "--epochs", "3",
              "--max-steps", "2", "--batch-size", "4", "--balanced", "1", "--val-folds", "2", "3"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "luna_dist.train", *common], stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        for line in process.stderr:  # tqdm's \r-ended updates are lines here
            if "E2 validation" in line:
                process.send_signal(signal.SIGKILL)
                break
    finally:
        process.kill()
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    saved = json.loads(_custom_state(tmp_path / "r"))
    assert (saved["epoch"], saved["validated"], saved["samples_seen"]) == (2, 1, 16)

    result = train([*common, "--resume"])
    assert "epoch 2 was trained and saved, not validated: validating it" in result.stderr
    assert "E2 trained" not in result.stderr and "E3 trained" in result.stderr
    for mode in ("trn", "val"):
        accumulator = EventAccumulator(str(tmp_path / "r" / mode))
        accumulator.Reload()
        assert [e.step for e in accumulator.Scalars("loss/all")] == [8, 16, 24], mode


def _custom_state(run: Path) -> str:
    """The saved progress counters of a run, as JSON."""
    state = json.loads((run / "state" / "progress.json").read_text())
    for key in ("epoch_rngs", "layout", "train_metrics"):  # random states and figures, not counters
        state.pop(key, None)
    return json.dumps(state)


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MB tmpfs of its own, which a test can fill."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root; the full-disk case is not testable here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_full_disk_during_checkpoint_is_one_line_and_keeps_the_previous_state(tiny_shards, small_disk):
    common = ["--shards", str(tiny_shards), "--out", str(small_disk), "--run-name", "r", "--max-steps", "1",
              "--batch-size", "4", "--balanced", "1", "--val-folds", "3"]
    train([*common, "--epochs", "1"])
    state_before = {p.name: p.read_bytes() for p in (small_disk / "r" / "state").iterdir()}
    # Leave 1 MB: less than a state (model and optimizer, 1.8 MB) needs.
    (small_disk / "filler").write_bytes(bytes(shutil.disk_usage(small_disk).free - 2**20))
    result = subprocess.run([sys.executable, "-m", "luna_dist.train", *common, "--epochs", "3", "--resume"],
                            capture_output=True, text=True, timeout=RUN_TIMEOUT,
                            env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "could not write the checkpoint of epoch 2" in error[0]
    assert "No space left on device" in error[0]
    assert f"{small_disk / 'r' / 'state'} (epoch 1) is intact" in error[0]
    assert {p.name: p.read_bytes() for p in (small_disk / "r" / "state").iterdir()} == state_before
    assert not (small_disk / "r" / "state.partial").exists() and not (small_disk / "r" / "best.pt.partial").exists()


def _save(trainer, val_metrics: dict | None) -> None:
    """What the loop saves after an epoch's validation (or mid-epoch, without metrics)."""
    trainer.checkpoints.save_epoch(trainer.progress, trainer.task, val_metrics)


def _in_process(args: list[str]):
    """A Trainer in this process (CPU), for tests of its parts; close it after use."""
    from luna_dist.training.options import parse_args
    from luna_dist.training.trainer import Trainer

    return Trainer(parse_args(args))


def test_best_model_is_the_best_cpm_ties_broken_by_auc_and_says_so(tiny_shards, tmp_path, monkeypatch):
    """F1 at 0.5 follows the balancing ratio; LUNA16's CPM is what the field compares. The best score is
    saved with the state, so a resume never replaces best.pt by a worse model."""
    import torch

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    common = ["--shards", str(tiny_shards), "--out", str(tmp_path), "--run-name", "r", "--val-folds", "3"]
    trainer = _in_process(common)
    assert trainer.task.best_by == "cpm"  # the shards carry fold 3's nodules
    for epoch, metrics in enumerate([{"cpm": 0.5, "auc": 0.9, "pr/f1_score": 0.9},
                                     {"cpm": 0.6, "auc": 0.2, "pr/f1_score": 0.1},   # best CPM, worst F1
                                     {"cpm": 0.6, "auc": 0.3, "pr/f1_score": 0.0},   # CPM tied, better AUC
                                     {"cpm": 0.6, "auc": 0.3, "pr/f1_score": 1.0}], 1):  # a tie: the earlier stays
        trainer.progress.epoch = epoch
        _save(trainer, metrics)
    trainer.close()
    best = torch.load(tmp_path / "r" / "best.pt", weights_only=False)
    assert (best["epoch"], best["best_by"], best["score"], best["score_of"]) == (3, "cpm", [0.6, 0.3], ["cpm", "auc"])

    resumed = _in_process([*common, "--resume"])
    assert (resumed.progress.epoch, resumed.progress.best_score) == (4, [0.6, 0.3])
    resumed.progress.epoch = 5
    _save(resumed, {"cpm": 0.55, "auc": 1.0, "pr/f1_score": 1.0})  # worse than the best
    resumed.close()
    assert torch.load(tmp_path / "r" / "best.pt", weights_only=False)["epoch"] == 3

    by_f1 = _in_process(["--shards", str(tiny_shards), "--out", str(tmp_path), "--run-name", "f1", "--best-by", "f1",
                         "--val-folds", "3"])
    _save(by_f1, {"cpm": 0.9, "auc": 0.9, "pr/f1_score": 0.2})
    by_f1.close()
    assert torch.load(tmp_path / "f1" / "best.pt", weights_only=False)["score"] == [0.2]


def test_best_by_must_be_a_score_the_task_and_shards_have(tiny_shards, tmp_path, monkeypatch, capsys):
    from luna_dist.shards.format import ShardSetError
    from luna_dist.training.options import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--task", "seg", "--shards", str(tiny_shards), "--best-by", "cpm"])
    assert "--best-by cpm is not a score of --task seg: choose recall, f1, loss" in capsys.readouterr().err
    shards = Path(shutil.copytree(tiny_shards, tmp_path / "shards"))
    manifest = json.loads((shards / "manifest.json").read_text())
    for entry in manifest["folds"].values():
        del entry["annotations"], entry["excluded"]  # a build from before the manifest listed the findings
    (shards / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    trainer = _in_process(["--shards", str(shards), "--out", str(tmp_path), "--run-name", "r", "--val-folds", "3"])
    assert trainer.task.best_by == "auc"  # no CPM without the findings: the threshold-free score instead
    trainer.close()
    with pytest.raises(ShardSetError, match="--best-by cpm needs annotated nodules in validation folds"):
        _in_process(["--shards", str(shards), "--out", str(tmp_path), "--run-name", "s", "--best-by", "cpm",
                     "--val-folds", "3"])


@pytest.mark.parametrize("flag, value, least", [("--epoch-samples", "0", 1), ("--epoch-samples", "-5", 1),
                                                ("--num-workers", "-3", 0), ("--max-steps", "0", 1),
                                                ("--shuffle-buffer", "0", 1), ("--batch-size", "0", 1),
                                                ("--worker-timeout", "1.0", 2.0)])
def test_out_of_range_numbers_are_refused_naming_the_flag(flag, value, least, capsys):
    from luna_dist.training.options import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(["--shards", "unused", flag, value])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {flag} must be at least {least}, got {value}")


def test_a_fold_left_out_cannot_also_be_validated_on(capsys):
    from luna_dist.training.options import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--shards", "unused", "--val-folds", "2", "3", "--exclude-folds", "3"])
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: fold 3 is in --val-folds and --exclude-folds: a fold is validated on or left out")


def test_best_pt_and_the_predictions_record_the_folds_trained_and_chosen_on(two_rank_run, tiny_shards):
    """--select-on val (the default): best.pt was chosen by fold 3's score, so it and every epoch's predictions
    of fold 3 count as having seen fold 3; the saved state's weights were chosen on nothing."""
    from luna_dist.models import provenance

    series = {int(fold): tuple(entry["series"]) for fold, entry in open_cls(tiny_shards).manifest["folds"].items()}
    best = provenance.read(two_rank_run / "best.pt")
    assert best.trained_on == {fold: series[fold] for fold in (0, 1, 2)} and best.selected_on == {3: series[3]}
    assert best.selection == "the best cpm on folds [3]"
    state = provenance.read(two_rank_run / "state")
    assert state.trained_on == best.trained_on and state.selected_on == {}
    assert json.loads((two_rank_run / "args.json").read_text())["provenance"] == best.folds()
    parts = provenance.read_sidecar(two_rank_run / "val-predictions-E1.csv")
    assert parts == [provenance.Part(series[3], {"the nodule classifier of epoch 1": best})]


@pytest.mark.slow
def test_select_on_last_keeps_the_last_epoch_and_a_left_out_fold_is_never_read(tiny_shards, tmp_path):
    import torch

    from luna_dist.models import provenance

    result = train(["--shards", str(tiny_shards), "--out", str(tmp_path), "--run-name", "r", "--epochs", "2",
                    "--max-steps", "1", "--batch-size", "4", "--balanced", "1", "--val-folds", "0",
                    "--exclude-folds", "3", "--select-on", "last"])
    assert "train folds [1, 2], validation folds [0], folds [3] left out; best.pt: the last epoch" in result.stderr
    assert result.stderr.count("kept, the last epoch (--select-on last)") == 2
    best = torch.load(tmp_path / "r" / "best.pt", weights_only=True)
    assert (best["epoch"], best["select_on"]) == (2, "last")
    record = provenance.read(tmp_path / "r" / "best.pt")
    assert sorted(record.trained_on) == [1, 2] and record.selected_on == {} and record.selection == "the last epoch"


@pytest.mark.slow
def test_damaged_shard_read_by_a_data_worker_is_one_line(tiny_shards, tmp_path):
    """The worker's traceback stays out of the message; the shard and the sample are named."""
    shards = Path(shutil.copytree(tiny_shards, tmp_path / "shards"))
    victim = sorted(shards.glob("fold3-neg-*.tar"))[0]
    with tarfile.open(victim) as tar:
        cls = [member for member in tar.getmembers() if member.name.endswith(".cls")][5]
    with open(victim, "r+b") as f:
        f.seek(cls.offset)
        f.write(b"\0" * 2048)  # a tar reader stops at zero blocks: the sample ends without its cls
    result = subprocess.run([sys.executable, "-m", "luna_dist.train", "--shards", str(shards), "--out",
                             str(tmp_path / "runs"), "--max-steps", "1", "--batch-size", "4", "--num-workers", "1",
                             "--val-folds", "3"],
                            capture_output=True, text=True, timeout=RUN_TIMEOUT,
                            env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].split("error: ", 1)[1].startswith(f"{victim}: sample "), errors
    assert "the shard is damaged" in errors[0]


# -- the segmentation task through the same loop -----------------------------------------------
@pytest.fixture(scope="module")
def seg_two_rank_run(tiny_seg_shards, tmp_path_factory) -> Path:
    """One segmentation epoch on 2 CPU ranks with a data worker each: a few steps, augmented."""
    out = tmp_path_factory.mktemp("seg_runs")
    train(["--task", "seg", "--shards", str(tiny_seg_shards), "--out", str(out), "--run-name", "r", "--epochs", "1",
           "--max-steps", "2", "--batch-size", "8", "--num-workers", "1", "--augment", "--val-folds", "2", "3",
           "--metrics-json", str(out / "metrics.json")], processes=2)
    return out / "r"


@pytest.mark.slow
def test_seg_validation_scores_the_saved_model_on_one_and_two_ranks(tiny_seg_shards, seg_two_rank_run, tmp_path):
    """As for the classifier, and the UNet has batch norm in every block: --eval-only of best.pt on 1 and on
    2 ranks gives the pixel counts and the printed lines of the 2-rank run's validation."""
    run = json.loads((seg_two_rank_run.parent / "metrics.json").read_text())
    results, output = {}, {}
    for processes in (1, 2):
        out = tmp_path / f"m{processes}.json"
        result = train(["--task", "seg", "--shards", str(tiny_seg_shards), "--eval-only", "--checkpoint",
                        str(seg_two_rank_run / "best.pt"), "--out", str(tmp_path), "--run-name", f"eval{processes}",
                        "--batch-size", "16", "--val-folds", "2", "3", "--metrics-json", str(out)],
                       processes=processes)
        results[processes], output[processes] = json.loads(out.read_text()), result.stderr
    folds = json.loads((tiny_seg_shards / "manifest.json").read_text())["folds"]
    assert run["count/all"] == folds["2"]["val_slices"] + folds["3"]["val_slices"]  # every slice once
    assert run["count/tp"] + run["count/fn"] > 0
    counts = ("count/all", "count/mask_slices", "count/tp", "count/fn", "count/fp")
    for processes, evaluated in results.items():
        assert [evaluated[key] for key in counts] == [run[key] for key in counts]
        _close(run, evaluated, ["loss/all"])
        # The printed lines of the main process only (a checkpoint given alone counts as epoch 0).
        lines = [line.split("] ", 1)[1] for line in output[processes].splitlines() if "] E0 val" in line]
        assert lines == [
            f"E0 val      {run['loss/all']:.4f} loss, {run['pr/precision']:.4f} precision, "
            f"{run['pr/recall']:.4f} recall, {run['pr/f1_score']:.4f} f1 score",
            f"E0 val_px   {run['count/tp']} tp, {run['count/fn']} fn, {run['count/fp']} fp",
        ], output[processes][-3000:]


def test_seg_tensorboard_holds_pixel_scalars_and_fixed_slice_images(seg_two_rank_run):
    metrics = json.loads((seg_two_rank_run.parent / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["samples_seen"] == 2 * 8 * 2
    logs = {}
    for mode in ("trn", "val"):
        accumulator = EventAccumulator(str(seg_two_rank_run / mode), size_guidance={"images": 0})
        accumulator.Reload()
        logs[mode] = accumulator
        assert {"loss/all", "pr/recall", "dice/per_slice"} <= set(accumulator.Tags()["scalars"]), mode
    assert logs["trn"].Tags()["images"] == []
    images = logs["val"].Tags()["images"]
    assert sorted(images) == [f"slices/{n}" for n in range(4)]  # the slice of most mask of 4 validation CTs
    image = logs["val"].Images("slices/0")[0]
    assert image.step == 32 and (image.width, image.height) == (160, 160)


@pytest.mark.slow
def test_seg_resumed_training_equals_uninterrupted_training(tiny_seg_shards, tmp_path):
    _assert_resume_equals_straight(["--task", "seg", "--shards", str(tiny_seg_shards), "--out", str(tmp_path),
                                    "--max-steps", "2", "--batch-size", "4", "--augment", "--val-folds", "3"],
                                   tmp_path, "unet.last.weight")


@pytest.mark.slow
def test_cls_run_refuses_seg_shards(tiny_seg_shards, tmp_path):
    result = subprocess.run([sys.executable, "-m", "luna_dist.train", "--shards", str(tiny_seg_shards),
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=RUN_TIMEOUT,
                            env={**os.environ, "ACCELERATE_USE_CPU": "true"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "shards built with --task seg, this run needs --task cls shards" in result.stderr


@pytest.mark.slow
def test_damaged_shard_is_one_error_naming_it(tiny_shards, tmp_path):
    """--verify finds it before training; without it, validation (in a data worker) stops on it."""
    _, path, _ = damaged_copy(tiny_shards, tmp_path, random_payload, fold=3)
    common = [sys.executable, "-m", "luna_dist.train", "--shards", str(tmp_path / "shards"), "--out",
              str(tmp_path / "runs"), "--max-steps", "1", "--batch-size", "4", "--val-folds", "3", "--num-workers", "1"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    for extra, expected in ((["--verify"], f"{path}: {path.stat().st_size} bytes streamed with sha256 "),
                            ([], f"{path}: sample ")):
        result = subprocess.run([*common, *extra], capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env)
        assert result.returncode == 1, result.stderr[-3000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        assert ("E1 trained" in result.stderr) is not bool(extra)  # --verify stops before the first step


def test_validation_that_misses_samples_fails_after_the_gather(tiny_shards, tmp_path, monkeypatch):
    """Behind the per-shard counts: the gathered total must equal the manifest's (e.g. a shard no rank read)."""
    from luna_dist.shards.format import ShardSetError
    from luna_dist.training.options import parse_args
    from luna_dist.training.trainer import Trainer

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    trainer = Trainer(parse_args(["--shards", str(tiny_shards), "--out", str(tmp_path), "--run-name", "r",
                                  "--val-folds", "3", "--batch-size", "8"]))
    full_loader = trainer.task.val_loader

    def loses_first_batch(*args, **kwargs):
        batches = iter(full_loader(*args, **kwargs))
        next(batches)
        return batches

    try:
        shards = open_cls(tiny_shards)
        expected = shards.count([3], "pos") + shards.count([3], "neg")
        monkeypatch.setattr(trainer.task, "val_loader", loses_first_batch)
        with pytest.raises(ShardSetError, match=f"validation read {expected - 8:,} samples of folds .3., "
                                                f"the manifest counts {expected:,}"):
            trainer.validate(1)
    finally:
        trainer.close()


# -- faults of one process: divergence, logs, kills, reruns --------------------------------------------
def _quick(shards: Path, out: Path, *extra: str) -> list[str]:
    """Flags of a one-process run on `tiny_shards` of 2 steps a batch of 4, validated on fold 3 (a second or two)."""
    return ["--shards", str(shards), "--out", str(out), "--run-name", "r", "--max-steps", "2", "--batch-size", "4",
            "--balanced", "1", "--val-folds", "3", *extra]


def _nan_from_call(task, first_bad: int) -> None:
    """Make the task's training loss NaN from its `first_bad`-th call (0-based) on, as a diverging run's."""
    import torch

    forward, calls = task.forward, [0]

    def diverging(model, batch, train):
        loss, records = forward(model, batch, train)
        if train:
            calls[0] += 1
            if calls[0] > first_bad:
                loss = loss * torch.tensor(float("nan"))
        return loss, records

    task.forward = diverging


@pytest.mark.slow
def test_a_diverged_run_stops_at_the_first_nonfinite_loss_and_keeps_the_last_state(tiny_shards, tmp_path, monkeypatch):
    """--lr 0.1 --momentum 0.5: every probability NaN, yet 99.4 % correct, AUC 0.83 and exit 0. Now training
    stops naming the epoch, the step and the flags, and nothing after the last saved state is saved."""
    import torch

    from luna_dist.training.trainer import Diverged

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    first = _in_process(_quick(tiny_shards, tmp_path, "--epochs", "1", "--max-steps", "20"))
    first.run()
    first.close()
    state_before = {p.name: p.read_bytes() for p in (tmp_path / "r" / "state").iterdir()}
    best_before = (tmp_path / "r" / "best.pt").read_bytes()

    resumed = _in_process(_quick(tiny_shards, tmp_path, "--epochs", "2", "--resume", "--max-steps", "20"))
    _nan_from_call(resumed.task, first_bad=4)  # the 5th step of epoch 2
    with pytest.raises(Diverged) as err:
        resumed.run()
    message = str(err.value)
    steps = resumed.epoch_steps()  # the training folds' samples in batches of 4
    assert message.startswith(f"E2 step 5 of {steps}: the training loss is not a finite number (rank 0): training "
                              f"diverged. The last saved state, {tmp_path / 'r' / 'state'} (after epoch 1), is kept; "
                              "lower --lr (now 0.001) or --momentum (now 0.99)"), message
    assert {p.name: p.read_bytes() for p in (tmp_path / "r" / "state").iterdir()} == state_before
    assert (tmp_path / "r" / "best.pt").read_bytes() == best_before
    assert torch.load(tmp_path / "r" / "best.pt", weights_only=False)["epoch"] == 1
    resumed.close()


def test_a_run_diverged_before_any_save_is_not_told_to_go_on_from_saved_weights(tiny_shards, tmp_path, monkeypatch):
    """The line offered --checkpoint RUN/state, which fails when nothing was saved yet."""
    from luna_dist.training.trainer import Diverged

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    trainer = _in_process(_quick(tiny_shards, tmp_path, "--epochs", "1"))
    _nan_from_call(trainer.task, first_bad=0)
    with pytest.raises(Diverged) as err:
        trainer.run()
    trainer.close()
    assert str(err.value).endswith("training diverged. Nothing was saved; lower --lr (now 0.001) or --momentum (now "
                                   "0.99), then start again (--overwrite)"), str(err.value)


def test_a_diverged_model_is_never_scored(tiny_shards, tmp_path, monkeypatch, capsys):
    """A model whose probabilities are NaN (finite weights whose sums overflow: both logits infinite): no accuracy,
    AUC or CPM is computed over them. (Weights that are not finite are refused when loaded.)"""
    import torch

    from luna_dist.models.classifier import LunaModel

    model = LunaModel()
    with torch.no_grad():
        model.head_linear.weight.fill_(1e38)
    torch.save({"model": model.state_dict()}, tmp_path / "nan.pt")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    code = train_command.main(["--shards", str(tiny_shards), "--eval-only", "--checkpoint", str(tmp_path / "nan.pt"),
                       "--val-folds", "3", "--metrics-json", str(tmp_path / "m.json")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    shards = open_cls(tiny_shards)
    total = shards.count([3], "pos") + shards.count([3], "neg")
    assert code == 1 and len(errors) == 1
    assert errors[0].startswith(f"error: E0 validation: {total:,} of {total:,} samples have a probability or loss that "
                                "is not a finite number: the model diverged, and nothing is scored"), errors
    assert not (tmp_path / "m.json").exists()


@pytest.mark.slow
def test_logs_that_fail_after_the_state_is_saved_are_written_again_by_the_resume(tiny_shards, tmp_path, monkeypatch):
    """A full disk while logging: the epoch's training is saved first, and the resume writes its logs."""
    import errno

    from torch.utils.tensorboard import SummaryWriter

    from luna_dist.training.run_log import LoggingError

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    trainer = _in_process(_quick(tiny_shards, tmp_path, "--epochs", "1"))
    real_add_scalar = SummaryWriter.add_scalar

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "r" / "val"))

    monkeypatch.setattr(SummaryWriter, "add_scalar", disk_full)
    with pytest.raises(LoggingError) as err:
        trainer.run()
    trainer.close()
    assert str(err.value).startswith(f"epoch 1 is saved in {tmp_path / 'r' / 'state'}, but its logs could not be "
                                     f"written ({tmp_path / 'r' / 'val'}: No space left on device); free space and "
                                     "rerun the same command with --resume")
    assert json.loads(_custom_state(tmp_path / "r"))["epoch"] == 1
    assert not (tmp_path / "r" / "val-predictions-E1.csv").exists()

    monkeypatch.setattr(SummaryWriter, "add_scalar", real_add_scalar)
    resumed = _in_process(_quick(tiny_shards, tmp_path, "--epochs", "1", "--resume"))
    assert resumed.run() == {}  # nothing more to train: only the logs of epoch 1
    resumed.close()
    assert (tmp_path / "r" / "val-predictions-E1.csv").is_file()
    for mode in ("trn", "val"):
        accumulator = EventAccumulator(str(tmp_path / "r" / mode))
        accumulator.Reload()
        assert [e.step for e in accumulator.Scalars("loss/all")] == [8], mode
    assert json.loads((tmp_path / "r" / "logged.json").read_text()) == {"epoch": 1}


@pytest.mark.slow
def test_a_kill_between_the_renames_of_a_checkpoint_resumes_from_the_newest_state(tiny_shards, tmp_path, monkeypatch):
    """The swap renames state/ to state.old/, then state.partial/ to state/: killed in between, no state/ is
    left, and --resume once refused. The newest complete state is found whatever its name."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    for epochs in ("1", "2"):
        trainer = _in_process(_quick(tiny_shards, tmp_path, "--epochs", epochs, *(["--resume"] if epochs == "2" else [])))
        trainer.run()
        trainer.close()
        if epochs == "1":
            shutil.copytree(tmp_path / "r" / "state", tmp_path / "epoch1")
    run = tmp_path / "r"
    (run / "state").rename(run / "state.partial")  # epoch 2's state, complete, not yet renamed back
    shutil.copytree(tmp_path / "epoch1", run / "state.old")
    resumed = _in_process(_quick(tiny_shards, tmp_path, "--epochs", "2", "--resume"))
    assert (resumed.progress.epoch, resumed.progress.samples_seen) == (2, 16)
    resumed.close()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("state")) == ["state"]


@pytest.mark.slow
def test_an_existing_run_is_never_overwritten_by_a_command_without_resume(tiny_shards, tmp_path, monkeypatch):
    """Rerunning --run-name without --resume replaced its state and its best model by a worse one."""
    import torch

    from luna_dist.training.run_folder import RunFolderError

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    trainer = _in_process(_quick(tiny_shards, tmp_path, "--epochs", "1"))
    trainer.run()
    trainer.close()
    before = {p.name for p in (tmp_path / "r").iterdir()}
    with pytest.raises(RunFolderError, match="holds a run already: pass --resume to continue it, --overwrite to start"):
        _in_process(_quick(tiny_shards, tmp_path, "--epochs", "1"))
    assert {p.name for p in (tmp_path / "r").iterdir()} == before
    again = _in_process(_quick(tiny_shards, tmp_path, "--epochs", "1", "--overwrite", "--seed", "1"))
    assert again.progress.epoch == 0 and not (tmp_path / "r" / "best.pt").exists()
    again.run()
    again.close()
    assert json.loads((tmp_path / "r" / "args.json").read_text())["arguments"]["seed"] == "1"
    assert torch.load(tmp_path / "r" / "best.pt", weights_only=False)["epoch"] == 1


@pytest.fixture(scope="module")
def saved_run(tiny_shards, tmp_path_factory) -> Path:
    """A run folder after one epoch of `_quick`, and one with a state saved mid-epoch (at step 2 of 4)."""
    out = tmp_path_factory.mktemp("saved")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_USE_CPU", "true")
        trainer = _in_process(_quick(tiny_shards, out, "--epochs", "1"))
        trainer.run()
        trainer.close()
        mid = _in_process([*_quick(tiny_shards, out, "--max-steps", "4"), "--run-name", "mid", "--num-workers", "0"])
        mid.progress.epoch_rngs, mid.progress.layout = [stream_random_states()], mid._layout()
        mid.progress.step, mid.progress.samples_seen = 2, 8
        _save(mid, None)
        mid.close()
    return out


def _weights_files(folder: Path) -> None:
    import torch

    from luna_dist.models.classifier import LunaModel
    from luna_dist.models.unet import SegmentationModel

    torch.save({"model": SegmentationModel().state_dict()}, folder / "seg.pt")
    (folder / "notes.txt").write_text("not a model\n")
    diverged = LunaModel().state_dict()
    diverged["head_linear.weight"][1, 7] = float("nan")
    torch.save({"model": diverged}, folder / "nan.pt")


@pytest.mark.parametrize("flags, message", [
    (["--checkpoint", "{tmp}/notes.txt"], "{tmp}/notes.txt: not a readable checkpoint ("),
    (["--checkpoint", "{tmp}/seg.pt"], "{tmp}/seg.pt: not weights of a LunaModel (23 of its tensors missing"),
    (["--task", "malignancy", "--finetune", "{tmp}/seg.pt"], "{tmp}/seg.pt: not weights of a LunaModel"),
    (["--checkpoint", "{tmp}/none.pt"], "{tmp}/none.pt: checkpoint not found"),
    (["--checkpoint", "{tmp}/nan.pt"], "{tmp}/nan.pt: head_linear.weight holds 1 of its 2,304 values that are not "
                                       "finite numbers (NaN or infinity): the weights of a diverged model"),
    (["--task", "malignancy", "--finetune", "{tmp}/nan.pt"], "{tmp}/nan.pt: head_linear.weight holds 1 of its"),
    (["--out", "{saved}", "--run-name", "r"], "{saved}/r holds a run already: pass --resume to continue it"),
    (["--out", "{saved}", "--run-name", "r", "--resume", "--lr", "0.01"],
     "--resume: {saved}/r was trained with other settings: --lr 0.001 (now 0.01). Rerun with the run's flags, or "
     "start a new run from its weights with --checkpoint {saved}/r/state"),
    (["--out", "{saved}", "--run-name", "r", "--resume", "--batch-size", "8"], "--batch-size 4 (now 8)"),
    (["--out", "{saved}", "--run-name", "mid", "--resume", "--num-workers", "1", "--max-steps", "4"],
     "--resume: {saved}/mid/state was saved at step 2 of epoch 1 by 1 process(es) with --batch-size 4 and 0 data "
     "worker(s) each; this command has 1, 4 and 1."),
    (["--out", "{saved}", "--run-name", "nothing", "--resume"], "{saved}/nothing/state: no saved state to resume"),
], ids=["text file", "another network", "finetune another network", "missing", "weights not finite",
        "finetune weights not finite", "existing run", "other lr",
        "other batch size", "mid-epoch other workers", "nothing to resume"])
def test_bad_models_and_run_folders_are_one_line(tiny_shards, saved_run, tmp_path, monkeypatch, capsys, flags, message):

    _weights_files(tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    fill = {"tmp": tmp_path, "saved": saved_run}
    base = _quick(tiny_shards, tmp_path / "runs")
    if "--task" in flags:  # --balanced is the classifier's
        del base[base.index("--balanced"):base.index("--balanced") + 2]
    code = train_command.main([*base, *(flag.format(**fill) for flag in flags)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert message.format(**fill) in errors[0], errors[0]


def test_a_resume_never_runs_code_planted_in_the_state(tiny_shards, saved_run, tmp_path, monkeypatch, capsys):
    """accelerate's load_state unpickled the progress (custom_checkpoint_0.pkl) whole: a state handed on or shared
    between nodes could run code planted in it. Each file a resume reads, and each pickle accelerate's states held,
    replaced by a pickle that runs code: the resume is refused naming the file, and the code never runs."""
    import torch
    from helpers import OpensAFile


    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    ran = tmp_path / "ran"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "progress.json", "model.safetensors",
                 "optimizer.bin", "random_states.json"):
        out = tmp_path / name
        shutil.copytree(saved_run / "r", out / "r")
        torch.save({"state": OpensAFile(ran)}, out / "r" / "state" / name)
        try:
            code = train_command.main([*_quick(tiny_shards, out, "--epochs", "2"), "--resume"])
        finally:  # whatever the loading of the code's result raised
            assert not ran.exists(), f"{name}: the planted code ran"
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert code == 1 and len(errors) == 1, (name, errors)
        assert errors[0].startswith(f"error: --resume: {out / 'r' / 'state' / name}: "), errors[0]
        assert "weights_only" not in errors[0]


@pytest.mark.parametrize(("entry", "said"), [
    ({"python": [3, [1, 2], None], "torch": [1, 2, 3]}, "epoch_rngs[0] holds random states that do not load"),
    ("seeds", "epoch_rngs[0] holds 'seeds', not a data stream's random states")])
def test_a_mid_epoch_state_whose_stream_states_are_damaged_is_refused_when_read(tiny_shards, saved_run, tmp_path,
                                                                              monkeypatch, capsys, entry, said):
    """The random states a mid-epoch resume restarts its stream from are checked as the state is read: a damaged
    entry is one line naming progress.json, not a traceback once training has begun."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    shutil.copytree(saved_run / "mid", tmp_path / "mid")
    progress = tmp_path / "mid" / "state" / "progress.json"
    saved = json.loads(progress.read_text())
    progress.write_text(json.dumps({**saved, "epoch_rngs": [entry]}))
    flags = [*_quick(tiny_shards, tmp_path, "--max-steps", "4"), "--run-name", "mid", "--num-workers", "0", "--resume"]
    assert train_command.main(flags) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: --resume: {progress}: not as luna_dist writes it ({said}")


def test_a_state_of_pickles_is_refused_with_a_way_on_that_works(tiny_shards, saved_run, tmp_path, monkeypatch,
                                                                 capsys):
    """A state as earlier versions saved it (accelerate's pickles for the progress and random states) is not
    unpickled; the advice it prints runs."""
    import torch


    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    run = tmp_path / "r"
    shutil.copytree(saved_run / "r", run)
    progress = json.loads((run / "state" / "progress.json").read_text())
    torch.save(progress, run / "state" / "custom_checkpoint_0.pkl")
    torch.save({"random_state": (3, tuple(range(625)), None)}, run / "state" / "random_states_0.pkl")
    for name in ("progress.json", "random_states.json"):
        (run / "state" / name).unlink()
    assert train_command.main([*_quick(tiny_shards, tmp_path, "--epochs", "2"), "--resume"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    state = run / "state"
    assert error == (f"error: --resume: {state / 'custom_checkpoint_0.pkl'}: a pickle, which could run code when "
                     "loaded, is not loaded (luna_dist saved its states with pickles before): go on from the state's "
                     f"weights with --checkpoint {state} and a new --run-name, or start the run again with --overwrite")
    assert train_command.main([*_quick(tiny_shards, tmp_path, "--epochs", "1"), "--checkpoint", str(state),
                       "--run-name", "from-weights"]) == 0
    assert train_command.main([*_quick(tiny_shards, tmp_path, "--epochs", "1"), "--overwrite"]) == 0
    assert json.loads(_custom_state(run))["epoch"] == 1 and not list(state.glob("*.pkl"))


@pytest.mark.slow
def test_ctrl_c_says_what_is_saved_and_how_to_go_on(tiny_shards, tmp_path):
    import signal

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "luna_dist.train", *_quick(tiny_shards, tmp_path, "--max-steps", "400")]
    assert subprocess.run([*command, "--epochs", "1"], env=env, capture_output=True, timeout=RUN_TIMEOUT).returncode == 0
    process = subprocess.Popen([*command, "--epochs", "3", "--resume"], env=env, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # also under nohup
    log = []
    try:
        for line in process.stderr:
            log.append(line)
            if "task cls: 1 process(es)" in line:  # the loop has started
                process.send_signal(signal.SIGINT)
                break
        log += process.stderr.readlines()
        assert process.wait(timeout=60) == 130
    finally:
        process.kill()
    errors = [line for line in log if line.startswith("error:")]
    assert errors == [f"error: interrupted in epoch 2. The last saved state, {tmp_path / 'r' / 'state'} (after epoch 1), "
                      "is kept; rerun the same command with --resume --run-name r to continue\n"], "".join(log)[-3000:]
    assert "Traceback" not in "".join(log)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["training", "validation"])
def test_a_ctrl_c_in_epoch_1_gives_a_command_that_ends_as_an_uninterrupted_run(tiny_shards, tmp_path, monkeypatch,
                                                                              capsys, stage):
    """Ctrl-C in epoch 1's validation lost the trained epoch, and the line said "rerun the same command to start
    again", which is refused (the run folder exists), as --resume was. An epoch is saved trained before its
    validation: the command the line gives runs, trains no epoch twice, and the run ends with the weights,
    validation scores and best.pt of an uninterrupted one."""
    import re

    import torch
    from safetensors.torch import load_file

    from luna_dist.training.tasks import TASKS

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    command = _quick(tiny_shards, tmp_path, "--epochs", "2")
    assert train_command.main([*command, "--run-name", "straight"]) == 0
    forward, steps, ctrl_c = TASKS["cls"].forward, [], [True]

    def ctrl_c_once(self, model, batch, train):
        if train == (stage == "training") and ctrl_c:
            raise KeyboardInterrupt(ctrl_c.pop())
        steps.append(train)
        return forward(self, model, batch, train)

    monkeypatch.setattr(TASKS["cls"], "forward", ctrl_c_once)
    capsys.readouterr()
    assert train_command.main(command) == 130
    error = capsys.readouterr().err.strip().splitlines()[-1]
    run = tmp_path / "r"
    if stage == "training":
        assert error == "error: interrupted in epoch 1. Nothing was saved; rerun the same command with --overwrite " \
                        "--run-name r to start again"
    else:
        assert error == f"error: interrupted in epoch 1. The last saved state, {run / 'state'} (after epoch 1, not yet " \
                        "validated), is kept; rerun the same command with --resume --run-name r to continue"
    steps.clear()
    assert train_command.main([*command, *re.search(r"rerun the same command with (.*) to ", error)[1].split()]) == 0
    assert steps.count(True) == (2 if stage == "validation" else 4)  # epoch 1 was not trained again
    straight = load_file(tmp_path / "straight" / "state" / "model.safetensors")
    resumed = load_file(run / "state" / "model.safetensors")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-6, msg=name)
    for mode in ("trn", "val"):
        events = []
        for folder in (tmp_path / "straight", run):
            accumulator = EventAccumulator(str(folder / mode))
            accumulator.Reload()
            events.append([(e.step, round(e.value, 5)) for e in accumulator.Scalars("loss/all")])
        assert events[0] == events[1] and len(events[0]) == 2, mode
    best = [torch.load(folder / "best.pt", weights_only=True) for folder in (tmp_path / "straight", run)]
    assert (best[1]["epoch"], best[1]["score"]) == (best[0]["epoch"], pytest.approx(best[0]["score"], abs=1e-6))


@pytest.mark.slow
def test_training_on_a_frozen_shard_server_stops_within_read_timeout(tiny_shards, stalling_server, tmp_path):
    """One process has no collective timeout: a stalled read hung the run for ever."""
    import time

    www, url, stall = stalling_server
    shutil.copytree(tiny_shards, www / "shards")
    stall.add(".tar")
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "luna_dist.train",
                             *_quick(f"{url}/shards/", tmp_path, "--read-timeout", "2")], capture_output=True, text=True,
                            timeout=RUN_TIMEOUT, env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and time.monotonic() - started < 60
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert errors[0].startswith(f"error: {url}/shards/fold") and "nothing arrived for 2 s" in errors[0], errors[0]


# -- two nodes on one machine -----------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_nodes(args: list[str], tmp_path: Path, per_node: tuple[list[str], list[str]] = ([], [])
                  ) -> list[tuple[subprocess.Popen, Path]]:
    """Two `torchrun --nnodes 2` launches on 127.0.0.1, one CPU rank each, each in a working folder of its own;
    `per_node`: flags of node 0 and node 1 beyond `args`."""
    port, root = _free_port(), Path(__file__).resolve().parents[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    nodes = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                   "--nproc_per_node", "1", "--rdzv-endpoint", f"127.0.0.1:{port}", str(root / "launch" / "train.py"),
                   *args, *per_node[node]]
        log = tmp_path / f"node{node}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        nodes.append((process, log))
    return nodes


def _stop_nodes(nodes) -> None:
    import signal

    for process, _ in nodes:
        # The launcher starts its ranks in sessions of their own: kill them by pid (a frozen
        # one too, which would otherwise stay stopped for ever), then the launcher's group.
        ranks = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        for pid in map(int, ranks):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)


@pytest.mark.slow
def test_two_nodes_run_one_epoch_like_one_machine(tiny_shards, tmp_path):
    """Node-level splitting: each validation sample once, equal steps, and only global rank 0 writes.

    The nodes have other numbers of data workers (as machines with other core counts get by
    default): 3 steps over 2 workers once became 4, the other node ran 3, and DDP hung."""
    out = tmp_path / "runs"
    nodes = _launch_nodes(["--shards", str(tiny_shards), "--out", str(out), "--run-name", "r", "--epoch-samples", "48",
                           "--batch-size", "8", "--balanced", "1", "--val-folds", "2", "3",
                           "--metrics-json", str(tmp_path / "m.json"), "--dist-timeout", "60"], tmp_path,
                          per_node=(["--num-workers", "0"], ["--num-workers", "2"]))
    try:
        for process, log in nodes:
            assert process.wait(timeout=RUN_TIMEOUT) == 0, log.read_text()[-4000:]
    finally:
        _stop_nodes(nodes)
    metrics = json.loads((tmp_path / "m.json").read_text())
    shards = open_cls(tiny_shards)
    assert metrics["processes"] == 2
    assert metrics["count/all"] == sum(shards.count([2, 3], label) for label in ("pos", "neg"))
    assert metrics["samples_seen"] == 3 * 8 * 2  # both nodes ran 3 steps (a rank short of steps would hang DDP)
    assert "E1 val " in nodes[0][1].read_text() and "E1 val " not in nodes[1][1].read_text()
    assert [p.name for p in (tmp_path / "node0").iterdir()] == [] == [p.name for p in (tmp_path / "node1").iterdir()]
    written = {p.name for p in (out / "r").iterdir()}
    assert {"args.json", "logged.json", "state", "trn", "val", "val-predictions-E1.csv"} <= written
    assert written <= {"args.json", "logged.json", "best.pt", "state", "trn", "val", "val-predictions-E1.csv",
                       "val-predictions-E1.provenance.json"}
    for mode in ("trn", "val"):
        assert len(list((out / "r" / mode).iterdir())) == 1  # one event file: one writer
    # The state: the model and optimizer once, every rank's random states in one file, all written by rank 0.
    assert len(json.loads((out / "r" / "state" / "random_states.json").read_text())) == 2


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_other_node_stops_within_the_timeout_naming_the_lost_rank(tiny_shards, tmp_path, fault):
    """A rank killed (its sockets close) or frozen (SIGSTOP: nothing closes, as a node that vanished):
    the other node fails within --dist-timeout, naming rank 1 and how to go on."""
    import signal
    import time

    nodes = _launch_nodes(["--shards", str(tiny_shards), "--out", str(tmp_path / "runs"), "--run-name", "r",
                           "--epoch-samples", "100000", "--max-steps", "400", "--batch-size", "8", "--val-folds", "3",
                           "--dist-timeout", "5"],
                          tmp_path)
    rank1 = None
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while "E1 training" not in nodes[0][1].read_text():
            assert nodes[0][0].poll() is None and time.monotonic() < deadline, nodes[0][1].read_text()[-3000:]
            time.sleep(0.2)
        rank1 = int(subprocess.run(["pgrep", "-P", str(nodes[1][0].pid)], capture_output=True, text=True).stdout.split()[0])
        os.kill(rank1, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        stopped = time.monotonic()
        assert nodes[0][0].wait(timeout=60) != 0
        # The timeout (5 s), then up to 5 s waiting for rank 1 to check in, and the launcher's own exit.
        assert time.monotonic() - stopped < 30
    finally:
        if rank1 is not None:  # its launcher may be gone already
            with contextlib.suppress(ProcessLookupError):
                os.kill(rank1, signal.SIGKILL)
        _stop_nodes(nodes)
    log = nodes[0][1].read_text()
    errors = [line[line.index("error:"):] for line in log.splitlines() if "error: " in line]
    assert len(errors) == 1, log[-4000:]
    assert f"rank 0 of 2 lost the others in epoch 1: rank(s) 1 on {os.uname().nodename}, pid {rank1} stopped answering" \
        in errors[0], errors[0]
    if fault == "freeze":  # gloo words it by the operation that waited
        assert "Timed out waiting 5000ms" in errors[0] or "Application timeout caused pair closure" in errors[0]
    else:
        assert "Connection closed by peer" in errors[0] or "Connection reset by peer" in errors[0]  # by timing
    assert errors[0].endswith("Nothing was saved; when the nodes are back, rerun the same command on every node with "
                              "--overwrite --run-name r to start again"), errors[0]
    assert "[rank0]: Traceback" not in log


@pytest.mark.slow
def test_two_ranks_streaming_over_http_train_and_validate_as_from_the_folder(tiny_shards, two_rank_run, served,
                                                                             tmp_path):
    """The run of `two_rank_run`, its shards served by a loopback web server: same samples, same numbers."""
    www, url = served
    shutil.copytree(tiny_shards, www / "shards")
    train(["--shards", f"{url}/shards/", "--out", str(tmp_path), "--run-name", "r", "--epochs", "1", "--max-steps", "3",
           "--batch-size", "8", "--num-workers", "1", "--balanced", "1", "--augment", "--val-folds", "3",
           "--metrics-json", str(tmp_path / "metrics.json")], processes=2)
    local = json.loads((two_rank_run.parent / "metrics.json").read_text())
    remote = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("count/all", "count/pos", "count/neg", "correct_count/pos", "correct_count/neg", "samples_seen"):
        assert remote[key] == local[key], key
    assert abs(remote["loss/all"] - local["loss/all"]) <= 1e-5 * max(1.0, abs(local["loss/all"]))


@pytest.mark.slow
def test_mid_epoch_checkpoint_on_two_ranks_resumes_exactly_there(tiny_shards, tmp_path):
    """--save-every 2 on 2 ranks: killed after step 4's state, resumed, the epoch ends with the weights of an
    uninterrupted run. Each rank replays its own stream: with rank 0's random states for both, it did not."""
    import torch
    from safetensors.torch import load_file

    common = ["--shards", str(tiny_shards), "--out", str(tmp_path), "--epoch-samples", "64", "--batch-size", "4",
              "--balanced", "1", "--augment", "--val-folds", "3", "--save-every", "2", "--num-workers", "1"]
    train([*common, "--run-name", "straight"], processes=2)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "launch/train.py", *common,
               "--run-name", "killed"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                               cwd=Path(__file__).resolve().parents[1], start_new_session=True)
    try:
        for line in process.stderr:
            if "E1 step 4 of 8: state saved" in line:
                break
    finally:
        _stop_nodes([(process, None)])  # the ranks first (sessions of their own), then the launcher
    saved = json.loads(_custom_state(tmp_path / "killed"))
    # The ranks may reach step 6's state in the moment before they are killed.
    assert saved["epoch"] == 0 and saved["step"] in (4, 6) and saved["samples_seen"] == saved["step"] * 8
    result = train([*common, "--run-name", "killed", "--resume"], processes=2)
    assert f"after step {saved['step']} of epoch 1, {saved['samples_seen']} samples seen" in result.stderr
    straight = load_file(tmp_path / "straight" / "state" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "state" / "model.safetensors")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-6, msg=name)
    assert json.loads(_custom_state(tmp_path / "killed"))["samples_seen"] == 64


@pytest.mark.slow
def test_a_ctrl_c_that_python_drops_in_a_finalizer_still_stops_training(tiny_shards, tmp_path, monkeypatch, capsys,
                                                                        ctrl_c_raises):
    """Python drops an exception raised inside a finalizer (a `__del__`, a generator the garbage collector
    closes), a Ctrl-C's KeyboardInterrupt too: the run went on to its end and exited 0."""
    import signal

    from helpers import ctrl_c_inside_a_finalizer

    from luna_dist.training.tasks import TASKS

    forward, calls = TASKS["cls"].forward, []

    def forward_then_ctrl_c(self, model, batch, train):
        calls.append(train)
        if len(calls) == 2:
            ctrl_c_inside_a_finalizer()
        return forward(self, model, batch, train)

    monkeypatch.setattr(TASKS["cls"], "forward", forward_then_ctrl_c)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert train_command.main(_quick(tiny_shards, tmp_path, "--epochs", "1", "--max-steps", "6")) == 130
    assert calls.count(True) == 2  # stopped at the step after the Ctrl-C
    assert "error: interrupted in epoch 1" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # as it was before the run


@pytest.mark.slow
def test_a_device_that_reads_batches_late_trains_on_the_batches_the_loop_was_given(tiny_shards, tmp_path,
                                                                                  monkeypatch):
    """On Apple's MPS a `non_blocking` copy reads the host batch when the GPU reaches it, steps later: the
    loop had let go of the batch, its worker had decoded another into the same shared memory, and the model
    trained on chunks it was never given. The stand-in device reads each batch three copies late."""
    from helpers import LaggingDevice

    from luna_dist.data import batch_memory
    from luna_dist.training.tasks import TASKS

    steps, device, given = 24, LaggingDevice(lag=3), []
    forward = TASKS["cls"].forward

    def forward_on_a_lagging_device(self, model, batch, train):
        if train:
            given.append(batch[0].numpy().tobytes())  # the chunks the loop was given
            device.copy(batch[0])
            if len(given) == steps:
                device.finish()  # the epoch's end, while the loop holds the memory of its last batches
        return forward(self, model, batch, train)

    monkeypatch.setattr(TASKS["cls"], "forward", forward_on_a_lagging_device)
    monkeypatch.setattr(batch_memory, "copied_event", lambda _: device.event(), raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert train_command.main(_quick(tiny_shards, tmp_path, "--epochs", "1", "--epoch-samples", str(4 * steps),
                             "--max-steps", str(steps), "--num-workers", "1")) == 0
    wrong = [step for step, (chunks, read) in enumerate(zip(given, device.read)) if chunks != read]
    assert len(device.read) == steps and not wrong, f"steps trained on other chunks: {wrong}"


def _signal_when_saved(command: list[str], env: dict, log: Path, signum: int
                       ) -> tuple[subprocess.CompletedProcess, list[int], set[str]]:
    """Run `command` (its output to `log`), send it `signum` once it has saved a mid-epoch state; return how it
    ended, the processes it had started by then and the files in /dev/shm they mapped."""
    import signal
    import time

    from helpers import _descendants, shared_memory_files

    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while "state saved" not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        started = _descendants(process.pid)
        files = shared_memory_files([process.pid, *started])
        process.send_signal(signum)
        process.wait(timeout=60)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(command, process.returncode, "", log.read_text()), started, files


def _left_behind(started: list[int], files: set[str]) -> tuple[list[int], list[str]]:
    """`helpers.left_behind` after 20 s at most; what is left is then removed (before the test fails)."""
    import signal

    from helpers import left_behind

    running, existing = left_behind(started, files, wait=20)
    for pid in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for file in existing:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(file)
    return running, existing


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads processes and mappings from Linux's /proc")
def test_a_killed_or_terminated_run_leaves_nothing_running_and_resumes(tiny_shards, tmp_path):
    """SIGKILL left the data workers' fork server, the workers and the resource tracker running for ever (about
    1 GB) with the loader queues' semaphores in /dev/shm; SIGTERM ended the run at once, saying nothing.
    Every worker start printed runpy's RuntimeWarning about the main module (`python -m luna_dist.train`)."""
    import re
    import signal

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "luna_dist.train",
               *_quick(tiny_shards, tmp_path, "--epoch-samples", "64", "--max-steps", "16", "--num-workers", "2",
                       "--save-every", "3")]
    killed, started, files = _signal_when_saved(command, env, tmp_path / "killed.log", signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL and len(started) >= 4, killed.stderr[-3000:]  # tracker, server, workers
    assert files, "the loader queues' semaphores are not in /dev/shm: nothing is tested"
    assert _left_behind(started, files) == ([], []), "processes or /dev/shm files outlived the killed run"

    stopped, started, files = _signal_when_saved([*command, "--resume"], env, tmp_path / "stopped.log", signal.SIGTERM)
    saved = re.findall(r"E1 step (\d+) of 16: state saved", stopped.stderr)[-1]
    errors = [line for line in stopped.stderr.splitlines() if line.startswith("error:")]
    assert stopped.returncode == 143 and errors == [
        f"error: stopped by SIGTERM in epoch 1. The last saved state, {tmp_path / 'r' / 'state'} (after step {saved} "
        "of epoch 1), is kept; rerun the same command with --resume --run-name r to continue"], stopped.stderr[-3000:]
    assert _left_behind(started, files) == ([], [])
    for log in (killed, stopped):
        assert "Traceback" not in log.stderr and "RuntimeWarning" not in log.stderr, log.stderr[-3000:]

    finished = run_or_show_stacks([*command, "--resume"], RUN_TIMEOUT, env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert f"after step {saved} of epoch 1, {4 * int(saved)} samples seen" in finished.stderr
    assert "E1 val " in finished.stderr and (tmp_path / "r" / "best.pt").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the data workers in Linux's /proc")
@pytest.mark.parametrize("signum, flags, said", [
    ("SIGKILL", [], "died (killed? out of memory?)"),
    ("SIGSTOP", ["--worker-timeout", "2"],
     "showed no sign of life for {} s (frozen or stopped; --worker-timeout 2) and was killed"),
])
def test_a_data_worker_that_dies_or_freezes_stops_the_run_naming_it(tiny_shards, tmp_path, signum, flags, said):
    """A killed worker gave torch's 85-line traceback and no word of how to go on; a stopped one hung the run
    with no message at all."""
    import re
    import signal
    import time

    from helpers import _descendants

    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "luna_dist.train",
               *_quick(tiny_shards, tmp_path, "--epoch-samples", "400", "--max-steps", "100", "--num-workers", "2",
                       *flags)]
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while "8.00/400" not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # two steps trained: the workers are at work
        children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout
        victim = sorted(set(_descendants(process.pid)) - set(map(int, children.split())))[0]  # the server's child
        os.kill(victim, getattr(signal, signum))
        assert process.wait(timeout=60) == 1
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        raise
    stderr = log.read_text()
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    pattern = re.escape(f"error: data worker {{}} of 2 (pid {victim}) {said} in epoch 1. Nothing was saved; "
                        "rerun the same command with --overwrite --run-name r to start again").replace(re.escape("{}"),
                                                                                                        r"\d+")
    assert re.fullmatch(pattern, errors[0]), errors[0]
