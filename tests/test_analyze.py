"""End-to-end analysis: grouping, the share of CTs per process, scoring, 1 vs 2 CPU ranks, kill and rerun, a bad CT.

The models are built here rather than trained: a segmentation model whose weights
mark every voxel above -250 HU of the middle slice (so the groups are real
structures of the CT: nodules, vessels, the body), and a randomly initialised
classifier; both are saved as best.pt files, as training writes them.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from luna_dist.analyze import assign, confusion, group, segment
from luna_dist.candidates import Annotation, assign_folds, find_series, read_annotations
from luna_dist.model import LunaModel, SegmentationModel
from luna_dist.seg_samples import CONTEXT

RUN_TIMEOUT = 300
THRESHOLD_HU = -250.0


def threshold_model() -> SegmentationModel:
    """A UNet that outputs probability > 0.5 exactly where the middle slice is above THRESHOLD_HU.

    Path: the input batch norm maps HU to (HU + 300) / 100; the first block passes the
    middle channel through (ReLU keeps the positive part); the skip connection carries
    it to the last block, which passes it on; the last 1x1 convolution subtracts 0.5.
    Every other weight is zero, so the deeper path adds nothing.
    """
    model = SegmentationModel()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.fill_(1.0)
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
        model.input_batchnorm.running_mean.fill_(-300.0)
        model.input_batchnorm.running_var.fill_(100.0**2)
        first, last_block = model.unet.down[0], model.unet.up[-1]
        first[0].weight[0, CONTEXT, 1, 1] = 1.0  # conv1: middle slice -> channel 0
        first[3].weight[0, 0, 1, 1] = 1.0  # conv2: channel 0 -> channel 0
        skip_channel = last_block[0].weight.shape[1] // 2  # the concat puts the up-sampled part first
        last_block[0].weight[0, skip_channel, 1, 1] = 1.0
        last_block[3].weight[0, 0, 1, 1] = 1.0
        model.unet.last.weight[0, 0, 0, 0] = 1.0
        model.unet.last.bias.fill_(-0.5)
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    paths = {"seg": folder / "seg.pt", "cls": folder / "cls.pt"}
    torch.save({"model": threshold_model().state_dict()}, paths["seg"])
    torch.save({"model": LunaModel().state_dict()}, paths["cls"])
    return paths


def analyze(args: list[str], processes: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    if processes == 1:
        command = [sys.executable, "-m", "luna_dist.analyze", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "-m", "luna_dist.analyze", *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                            cwd=Path(__file__).resolve().parents[1])
    if check:
        assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-5000:]}"
    return result


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return sorted(csv.reader(f))


# -- the stages ------------------------------------------------------------------------------------
def _no_autocast():
    return torch.autocast("cpu", enabled=False)


def test_threshold_model_segments_by_hu():
    hu = torch.full((9, 16, 16), -800.0)
    hu[4, 3:7, 5:9] = 40.0  # soft tissue on slice 4 only
    hu[0, 0, 0] = -200.0  # an edge slice and corner: the context is clamped, not wrapped
    mask = segment(hu, threshold_model(), batch_size=4, autocast=_no_autocast)
    assert torch.equal(mask, hu > THRESHOLD_HU)


def test_group_finds_a_planted_blob_at_its_exact_centre():
    hu = np.full((40, 50, 60), -900, dtype=np.int16)
    i, r, c = np.ogrid[:40, :50, :60]
    ball = (i - 12) ** 2 + (r - 20) ** 2 + (c - 33) ** 2 <= 4**2
    hu[ball] = 50
    # A second blob whose left half is denser: its centre moves towards the dense half
    # by the weights HU + 1001, as computed here by hand.
    box = (slice(28, 33), slice(30, 35), slice(10, 16))
    hu[box] = 0
    hu[28:33, 30:35, 10:13] = 1000
    mask = hu > -500
    mask[2, 2, 2] = True  # a speck: one erosion removes it
    centres, voxels = group(mask, hu)
    assert len(centres) == 2
    order = np.argsort(centres[:, 0])
    np.testing.assert_allclose(centres[order[0]], [12, 20, 33], atol=1e-9)
    # After one erosion the box keeps its inner 3x3x4 voxels: columns 11..14, two dense (2001), two not (1001).
    expected_c = (11 * 2001 + 12 * 2001 + 13 * 1001 + 14 * 1001) / (2 * 2001 + 2 * 1001)
    np.testing.assert_allclose(centres[order[1]], [30, 32, expected_c], atol=1e-9)
    assert voxels[order[1]] == 3 * 3 * 4


def test_assign_deals_every_series_once_largest_first():
    sizes = {"a": 100, "b": 60, "c": 50, "d": 10, "e": 0}
    shares = assign(sizes, 2)
    assert sorted(sum(shares, [])) == sorted(sizes)
    loads = [sum(sizes[u] for u in share) for share in shares]
    assert loads == [110, 110]
    assert assign(sizes, 1) == [["a", "b", "c", "d", "e"]]
    assert [len(s) for s in assign(sizes, 8)] == [1, 1, 1, 1, 1, 0, 0, 0]


def test_confusion_table_by_the_book_rule():
    nodules = [Annotation("s1", (0.0, 0.0, 0.0), 10.0, True), Annotation("s1", (50.0, 0.0, 0.0), 10.0, False),
               Annotation("s2", (0.0, 0.0, 0.0), 10.0, False)]
    detections = [
        {"series_uid": "s1", "xyz": [3.0, 0.0, 0.0], "p_nodule": 0.9, "p_malignant": 0.8},  # malignant, found
        {"series_uid": "s1", "xyz": [0.0, 6.0, 0.0], "p_nodule": 0.2, "p_malignant": 0.1},  # 0.6 < 0.7: same nodule
        {"series_uid": "s1", "xyz": [50.0, 8.0, 0.0], "p_nodule": 0.9, "p_malignant": 0.9},  # 0.8: no match
        {"series_uid": "s2", "xyz": [100.0, 0.0, 0.0], "p_nodule": 0.1, "p_malignant": None},  # filtered out
        {"series_uid": "s3", "xyz": [0.0, 0.0, 0.0], "p_nodule": 0.7, "p_malignant": None},  # no nodules there
    ]
    table = confusion(detections, nodules)
    expected = np.zeros((3, 4), dtype=int)
    expected[2, 3] = 1  # the malignant nodule, predicted malignant (its best detection)
    expected[1, 0] = 2  # the benign nodules of s1 and s2: missed
    expected[0, 3] = 1  # the unmatched detection of s1, predicted malignant
    expected[0, 1] = 1  # s2's detection, filtered out
    expected[0, 2] = 1  # s3's detection, predicted benign (no malignancy probability)
    np.testing.assert_array_equal(table, expected)


# -- the command -----------------------------------------------------------------------------------
def _three_series(synth_data: Path) -> list[str]:
    folds = assign_folds(find_series(synth_data))
    return sorted(uid for uid, fold in folds.items() if fold in (7, 8, 9))


@pytest.fixture(scope="module")
def one_rank(synth_data, models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("analysis") / "one"
    analyze(["--data", str(synth_data), "--seg-model", str(models["seg"]), "--cls-model", str(models["cls"]),
             "--folds", "7", "8", "9", "--out", str(out), "--batch-size", "16"])
    return out


def test_one_rank_analysis_writes_findings_and_scores_them(synth_data, one_rank):
    series = _three_series(synth_data)
    summary = json.loads((one_rank / "summary.json").read_text())
    assert (summary["series"], summary["analysed"], summary["failed"]) == (3, 3, [])
    assert sorted(p.stem for p in (one_rank / "ct").glob("*.json")) == series
    rows = _rows(one_rank / "detections.csv")
    header, body = rows[-1], rows[:-1]  # sorted: the header (letters) comes last
    assert header[:4] == ["seriesuid", "coordX", "coordY", "coordZ"]
    assert {row[0] for row in body} == set(series)
    assert summary["detections"] == len(body) == len(_rows(one_rank / "submission.csv")) - 1
    # Every nodule is dense tissue in air: the threshold model puts a group on each one.
    nodules, _ = read_annotations(synth_data / "annotations.csv")
    nodules = [n for n in nodules if n.series_uid in set(series)]
    table = np.array(summary["confusion"]["table"])
    assert summary["nodules"] == len(nodules) == table[1:].sum()
    assert table[1:, 0].sum() == 0, table  # no nodule missed by the segmentation
    assert summary["nodules_matched"] == len(nodules)
    assert summary["nodules_predicted"] == table[1:, 2:].sum()
    assert summary["froc"]["scans"] == 3 and summary["froc"]["nodules"] == len(nodules)
    assert 0 <= summary["froc"]["cpm"] <= 1
    assert (one_rank / "froc.png").is_file()


def test_two_ranks_give_the_same_detections(synth_data, models, one_rank, tmp_path):
    out = tmp_path / "two"
    analyze(["--data", str(synth_data), "--seg-model", str(models["seg"]), "--cls-model", str(models["cls"]),
             "--folds", "7", "8", "9", "--out", str(out), "--batch-size", "16"], processes=2)
    assert _rows(out / "detections.csv") == _rows(one_rank / "detections.csv")
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["processes"], summary["analysed"]) == (2, 3)


def test_killed_analysis_resumes_with_finished_cts_skipped(synth_data, models, one_rank, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "luna_dist.analyze", "--data", str(synth_data), "--seg-model",
               str(models["seg"]), "--cls-model", str(models["cls"]), "--folds", "7", "8", "9", "--out", str(out)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in process.stderr:
            if "groups in" in line:  # the first CT is written
                process.send_signal(signal.SIGKILL)
                break
    finally:
        process.kill()
        process.wait(timeout=60)
    assert len(list((out / "ct").glob("*.json"))) in (1, 2)
    assert not (out / "detections.csv").exists()
    analyze(command[3:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["analysed"] == 3 and summary["resumed"] >= 1
    assert _rows(out / "detections.csv") == _rows(one_rank / "detections.csv")


def test_unreadable_ct_is_reported_and_the_others_finish(synth_data, models, one_rank, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    series = _three_series(data)
    broken = find_series(data)[series[1]]
    raw = broken.with_suffix(".raw")
    raw.write_bytes(raw.read_bytes()[:1000])
    out = tmp_path / "out"
    result = analyze(["--data", str(data), "--seg-model", str(models["seg"]), "--cls-model", str(models["cls"]),
                      "--folds", "7", "8", "9", "--out", str(out)], check=False)
    assert result.returncode == 1
    assert str(raw.name) in result.stderr and "Traceback" not in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["analysed"] == 2 and [f["series_uid"] for f in summary["failed"]] == [series[1]]
    expected = [row for row in _rows(one_rank / "detections.csv") if row[0] != series[1]]
    assert _rows(out / "detections.csv") == expected


def test_candidates_mode_scores_the_given_positions(synth_data, models, tmp_path):
    out = tmp_path / "candidates"
    analyze(["--data", str(synth_data), "--candidates", str(synth_data / "candidates.csv"), "--cls-model",
             str(models["cls"]), "--folds", "9", "--out", str(out)])
    series = set(_three_series(synth_data)) & {uid for uid, f in assign_folds(find_series(synth_data)).items()
                                               if f == 9}
    with (synth_data / "candidates.csv").open() as f:
        expected = sum(1 for row in csv.DictReader(f) if row["seriesuid"] in series)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "candidates" and summary["detections"] == expected


def test_missing_model_is_a_clear_error(synth_data, tmp_path):
    result = analyze(["--data", str(synth_data), "--seg-model", str(tmp_path / "none.pt"), "--cls-model",
                      str(tmp_path / "none.pt"), "--out", str(tmp_path / "out")], check=False)
    assert result.returncode == 1
    assert "none.pt: checkpoint not found" in result.stderr and "Traceback" not in result.stderr
