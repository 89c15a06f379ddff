"""The task definitions: the malignancy task (fine-tuning freezes what it says, labels and metrics, a
short run end to end) and the pieces of the segmentation task that its training tests do not pin down."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from luna_dist.data.streams import open_shard_set
from luna_dist.models.classifier import LunaModel
from luna_dist.shards import chunk_samples, seg_samples
from luna_dist.training.metrics import roc_curve
from luna_dist.training.options import parse_args
from luna_dist.training.tasks.malignancy import Malignancy
from luna_dist.training.tasks.segmentation import FN_WEIGHT, Segmentation, dice_loss, overlay

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def nodule_classifier(tmp_path_factory) -> Path:
    """A nodule classifier's best.pt, as training saves it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cls") / "best.pt"
    torch.save({"model": LunaModel().state_dict(), "task": "cls"}, path)
    return path


def malignancy_task(shards: Path, nodule_classifier: Path, depth: int) -> Malignancy:
    args = parse_args(["--task", "malignancy", "--shards", str(shards), "--finetune", str(nodule_classifier),
                       "--finetune-depth", str(depth), "--channels-last", "off", "--lr", "0.1", "--val-folds", "3"])
    return Malignancy(args, Accelerator(cpu=True), open_shard_set(shards, chunk_samples), [0, 1, 2], [3],
                      training=True)


@pytest.mark.parametrize("depth, trained", [(1, {"head_linear"}), (2, {"block4", "head_linear"})])
def test_finetuning_trains_exactly_the_blocks_of_its_depth(tiny_shards, nodule_classifier, depth, trained):
    task = malignancy_task(tiny_shards, nodule_classifier, depth)
    model = task.build_model()
    source = torch.load(nodule_classifier, weights_only=True)["model"]
    assert {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad} == trained
    for name, value in model.state_dict().items():
        if not name.startswith("head_linear"):
            assert torch.equal(value, source[name]), name  # every block starts as the nodule classifier
    before = {name: value.clone() for name, value in model.state_dict().items()}

    optimizer = task.build_optimizer(model)
    model.train()
    generator = torch.Generator().manual_seed(1)
    chunks = torch.randint(-1000, 1000, (6, 1, 32, 48, 48), dtype=torch.int16, generator=generator)
    batch = (chunks, torch.tensor([1, 0, 1, 0, 0, 1]), torch.tensor([[1.0, 8.0]] * 6))
    for _ in range(2):
        loss, _ = task.forward(model, batch, train=True)
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    for name, value in model.state_dict().items():
        changed = not torch.equal(value, before[name])
        # Frozen blocks keep their weights and their batch-norm statistics; trained ones move.
        assert changed == (name.split(".")[0] in trained and "num_batches" not in name), name


def test_finetuning_needs_a_nodule_classifier(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--task", "malignancy", "--shards", "x"])
    assert "--finetune" in capsys.readouterr().err


def test_metrics_leave_out_unlabelled_nodules_and_rank_the_diameter(tiny_shards, nodule_classifier):
    task = malignancy_task(tiny_shards, nodule_classifier, 1)
    # label, prob, loss, known, diameter: the model ranks all malignant first; the diameter one pair wrong.
    records = torch.tensor([
        [1, 0.9, 0.1, 1, 20.0],
        [1, 0.8, 0.2, 1, 6.0],
        [0, 0.3, 0.3, 1, 8.0],
        [0, 0.2, 0.2, 1, 4.0],
        [0, 0.99, 5.0, 0, 30.0],  # no malignancy label: left out, counted
    ])
    metrics = task.compute_metrics(records)
    assert metrics["count/all"] == 4 and metrics["count/unlabelled"] == 1
    assert metrics["auc"] == 1.0 and metrics["auc_diameter"] == 0.75
    assert task.score(metrics) == [1.0]
    lines = task.format_metrics(3, "val", metrics)
    assert lines[-1] == "E3 val_auc  1.0000 AUC, diameter alone 0.7500 AUC (4 nodule samples; 1 without a label left out)"
    assert lines[1].startswith("E3 val_ben") and lines[2].startswith("E3 val_mal")


def test_roc_curve_steps_once_per_distinct_score():
    fpr, tpr = roc_curve(np.array([True, False, True, False]), np.array([0.9, 0.5, 0.5, 0.1]))
    assert fpr.tolist() == [0, 0, 0.5, 1] and tpr.tolist() == [0, 0.5, 1, 1]


@pytest.mark.slow
def test_short_malignancy_run_end_to_end(shard_dir, nodule_classifier, tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "luna_dist.train", "--task", "malignancy", "--shards", str(shard_dir),
         "--finetune", str(nodule_classifier), "--finetune-depth", "2", "--mix", "1", "1", "2", "--val-folds", "8", "9", "--epochs", "1",
         "--max-steps", "2", "--batch-size", "8", "--out", str(tmp_path), "--run-name", "m",
         "--metrics-json", str(tmp_path / "m.json")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["count/all"] > 0 and metrics["count/pos"] > 0 and metrics["count/neg"] > 0
    assert 0 <= metrics["auc"] <= 1 and 0 <= metrics["auc_diameter"] <= 1
    assert "val_auc" in result.stderr and "diameter alone" in result.stderr
    best = torch.load(tmp_path / "m" / "best.pt", weights_only=True)
    assert best["task"] == "malignancy" and math.isclose(best["val_metrics"]["auc"], metrics["auc"])
    accumulator = EventAccumulator(str(tmp_path / "m" / "val"))
    accumulator.Reload()
    assert accumulator.Tags()["images"] == ["roc"]
    assert {"auc", "auc_diameter"} <= set(accumulator.Tags()["scalars"])
    assert not list((tmp_path / "m").glob("val-predictions-*"))


# -- the segmentation task ---------------------------------------------------------------------
def test_dice_loss_per_sample():
    mask = torch.zeros(3, 1, 4, 4)
    mask[:, :, :2, :2] = 1  # 4 pixels
    perfect, half, empty = mask[0].clone(), mask[1].clone(), torch.zeros(1, 4, 4)
    half[:, 0, :2] = 0  # 2 of the 4 found
    loss = dice_loss(torch.stack([perfect, half, empty]), mask)
    assert loss.shape == (3,)
    assert loss.tolist() == pytest.approx([0.0, 1 - (2 * 2 + 1) / (2 + 4 + 1), 1 - 1 / 5])
    # A slice without mask costs only what is predicted there; the term inside the mask costs misses only.
    assert dice_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)).item() == 0.0
    everywhere = torch.ones(1, 1, 4, 4)
    assert dice_loss(everywhere * mask[:1], mask[:1]).item() == 0.0  # false alarms do not count inside the mask
    assert FN_WEIGHT == 8


def test_overlay_colours_hits_misses_and_false_alarms():
    hu = torch.full((2, 3), -1000.0)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    predicted = torch.tensor([[True, False, True], [False, False, False]])
    picture = overlay(hu, mask, predicted)
    assert picture.shape == (2, 3, 3) and picture.min() >= 0 and picture.max() <= 1
    assert picture[0, 0].tolist() == pytest.approx([0, 0.6, 0])  # found: green
    assert picture[0, 1].tolist() == pytest.approx([0.6, 0, 0])  # missed: red
    assert picture[0, 2].tolist() == pytest.approx([0.6, 0.6, 0])  # false alarm: yellow
    assert picture[1, 0].tolist() == [0, 0, 0]  # air, nothing to show


@pytest.mark.parametrize(("precision", "recall", "score"), [
    (0.5, 0.9, 0.9), (0.3, 0.8, 0.8), (0.29, 0.99, 0.29 - 1), (float("nan"), float("nan"), -1.0)])
def test_best_model_is_recall_at_the_precision_floor(tiny_seg_shards, precision, recall, score):
    args = parse_args(["--task", "seg", "--shards", str(tiny_seg_shards), "--val-folds", "3"])
    task = Segmentation(args, Accelerator(cpu=True), open_shard_set(tiny_seg_shards, seg_samples), [0, 1, 2], [3],
                        training=False)
    assert task.best_by == "recall"
    assert task.score({"pr/precision": precision, "pr/recall": recall}) == [pytest.approx(score)]


def test_a_best_model_below_the_precision_floor_is_told_by_its_precision_not_its_rank(tiny_seg_shards):
    """Below the floor the score ranks models by precision - 1: the line says the precision and the floor, not a
    negative 'recall'."""
    args = parse_args(["--task", "seg", "--shards", str(tiny_seg_shards), "--val-folds", "3"])
    task = Segmentation(args, Accelerator(cpu=True), open_shard_set(tiny_seg_shards, seg_samples), [0, 1, 2], [3],
                        training=False)
    below = {"pr/precision": 0.0067, "pr/recall": 0.99}
    assert task.describe_score(below, task.score(below)) == "pr/precision 0.0067, below --seg-precision-floor 0.3"
    above = {"pr/precision": 0.5, "pr/recall": 0.9}
    assert task.describe_score(above, task.score(above)) == "pr/recall at --seg-precision-floor 0.9000"
