"""End-to-end analysis (its stages are tested in test_detect and test_findings): the share of CTs per
process, scoring, 1 vs 2 CPU ranks, kill and rerun, what a rerun reuses, the folds, given coordinates kept,
and every bad input as one line.

The models are built rather than trained: a segmentation model whose weights mark every
voxel above -250 HU of the middle slice (`helpers.threshold_model`: the groups are real
structures of the CT, nodules, vessels, the body), and a randomly initialised classifier;
both are saved as best.pt files, as training writes them. The tests that start analysis
processes, or analyse the synthetic CTs in this one, are marked slow; the others analyse
two tiny CTs (`tiny_data`) in this process.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from helpers import (
    BAD_CTS,
    ctrl_c_inside_a_finalizer,
    on_a_broken_device,
    run_or_show_stacks,
    threshold_model,
    tilted_image,
    write_dicom_series,
)

from luna_dist.analysis import identity as identity_module
from luna_dist.analysis import run as analysis
from luna_dist.analysis.detect import load_model
from luna_dist.analysis.identity import ct_files_stat, ct_identity, produced_by, read_known
from luna_dist.analysis.report import IMAGES_PER_CT
from luna_dist.analysis.run import assign
from luna_dist.analysis.series import AnalysisError, check_names, ct_sources
from luna_dist.analyze import main
from luna_dist.common.out_folder import file_name
from luna_dist.evaluation.files import read_marks
from luna_dist.imaging.ct import MAX_CT_VOXELS, read_ct
from luna_dist.models import provenance
from luna_dist.models.classifier import LunaModel
from luna_dist.models.provenance import UNTRAINED, Provenance
from luna_dist.shards.build import build
from luna_dist.shards.options import BuildOptions
from luna_dist.tables.candidates import assign_folds, find_series, folds_as_built, read_annotations

RUN_TIMEOUT = 300


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    paths = {"seg": folder / "seg.pt", "cls": folder / "cls.pt"}
    # Built, not trained: they saw no CT, and say so (as training's best.pt says what its model saw).
    torch.save({"model": threshold_model().state_dict(), "provenance": UNTRAINED.to_json()}, paths["seg"])
    torch.save({"model": LunaModel().state_dict(), "provenance": UNTRAINED.to_json()}, paths["cls"])
    return paths


def analyze(args: list[str], processes: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    if processes == 1:
        command = [sys.executable, "-m", "luna_dist.analyze", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "-m", "luna_dist.analyze", *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = run_or_show_stacks(command, RUN_TIMEOUT, env, cwd=Path(__file__).resolve().parents[1])
    if check:
        assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-5000:]}"
    return result


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return sorted(csv.reader(f))


# -- the stages ------------------------------------------------------------------------------------
def test_assign_deals_every_series_once_largest_first():
    sizes = {"a": 100, "b": 60, "c": 50, "d": 10, "e": 0}
    shares = assign(sizes, 2)
    assert sorted(sum(shares, [])) == sorted(sizes)
    loads = [sum(sizes[u] for u in share) for share in shares]
    assert loads == [110, 110]
    assert assign(sizes, 1) == [["a", "b", "c", "d", "e"]]
    assert [len(s) for s in assign(sizes, 8)] == [1, 1, 1, 1, 1, 0, 0, 0]


def test_ct_identity_is_the_voxels_and_their_geometry_not_where_the_files_lie(synth_data, tmp_path):
    mhd = next(iter(find_series(synth_data).values()))
    copy = tmp_path / "elsewhere" / mhd.name
    copy.parent.mkdir()
    shutil.copy(mhd, copy)
    shutil.copy(mhd.with_suffix(".raw"), copy.with_suffix(".raw"))
    identity = ct_identity(read_ct(mhd))
    assert ct_identity(read_ct(copy)) == identity
    with copy.with_suffix(".raw").open("r+b") as f:  # one voxel, the file's size as it was
        f.seek(1000)
        f.write(b"\x01\x02")
    assert ct_identity(read_ct(copy)) != identity
    shutil.copy(mhd.with_suffix(".raw"), copy.with_suffix(".raw"))
    copy.write_text(copy.read_text().replace("Offset = ", "Offset = 1", 1))  # the same voxels, placed elsewhere
    assert ct_identity(read_ct(copy)) != identity


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


@pytest.mark.slow
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
    _check_report(one_rank, series)


def _check_report(out: Path, series: list[str]) -> None:
    """report.html links a page per CT, each page lists every detection of its CT, and every image linked
    is there: the top IMAGES_PER_CT detections' and the missed nodules'."""
    page = (out / "report.html").read_text(encoding="utf-8")
    assert sorted(re.findall(r'<a class="path" href="ct/([^"]+)\.html">', page)) == series
    for uid in series:
        result = json.loads((out / "ct" / f"{uid}.json").read_text())
        ct_page = (out / "ct" / f"{uid}.html").read_text(encoding="utf-8")
        assert ct_page.count('<tr class="detection">') == len(result["detections"])
        images = re.findall(r'<img class="slices" src="([^"]+)"', ct_page)
        assert len(images) == min(IMAGES_PER_CT, len(result["detections"])) + len(result.get("missed", []))
        assert all((out / "ct" / image).is_file() for image in images)


@pytest.mark.slow
def test_two_ranks_give_the_same_detections(synth_data, models, one_rank, tmp_path):
    out = tmp_path / "two"
    analyze(["--data", str(synth_data), "--seg-model", str(models["seg"]), "--cls-model", str(models["cls"]),
             "--folds", "7", "8", "9", "--out", str(out), "--batch-size", "16"], processes=2)
    assert _rows(out / "detections.csv") == _rows(one_rank / "detections.csv")
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["processes"], summary["analysed"]) == (2, 3)
    _check_report(out, _three_series(synth_data))  # each process drew its own CTs' images


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# -- reruns: what produced a CT's findings --------------------------------------------------------------
def _detections(out: Path) -> dict[tuple, str]:
    """p_nodule of each detection of detections.csv by (series, coordinates)."""
    with (out / "detections.csv").open(newline="") as f:
        return {(row["seriesuid"], row["coordX"], row["coordY"], row["coordZ"]): row["p_nodule"]
                for row in csv.DictReader(f)}


@pytest.mark.slow
def test_rerun_of_the_same_command_reuses_every_ct(synth_data, models, one_rank, tmp_path):
    out = tmp_path / "rerun"
    shutil.copytree(one_rank, out)
    assert main(["--data", str(synth_data), "--seg-model", str(models["seg"]), "--cls-model", str(models["cls"]),
                 "--folds", "7", "8", "9", "--out", str(out), "--batch-size", "16"]) == 0
    assert _rows(out / "detections.csv") == _rows(one_rank / "detections.csv")
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["resumed"], summary["redone"]) == (3, 0)


@pytest.mark.slow
def test_candidates_rerun_into_a_segmentation_out_redoes_every_ct(synth_data, models, one_rank, tmp_path):
    out = tmp_path / "rerun"
    shutil.copytree(one_rank, out)
    series = set(_three_series(synth_data))
    with (synth_data / "candidates.csv").open(newline="") as f:
        rows = [row for row in csv.reader(f)]
    few = [rows[0]] + [row for row in rows[1:] if row[0] in series][::40]  # a few candidates: quick to classify
    _write_csv(tmp_path / "few.csv", ",".join(few[0]), few[1:])
    assert main(["--data", str(synth_data), "--candidates", str(tmp_path / "few.csv"), "--cls-model",
                 str(models["cls"]), "--folds", "7", "8", "9", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["mode"], summary["analysed"], summary["detections"]) == ("candidates", 3, len(few) - 1)
    assert (summary["resumed"], summary["redone"]) == (0, 3)
    assert summary["produced_by"]["candidates"]["path"] == str(tmp_path / "few.csv")


def test_the_body_crop_is_part_of_what_produced_the_findings():
    models = analysis.Models(None, None, None, {"seg": "a", "nodule": "b", "malignancy": None})
    cropped, whole = (produced_by(models, "no", False, crop) for crop in (True, False))
    assert cropped["body_crop"] == {"body_hu": -500, "margin": 24} and whole["body_crop"] is None
    assert {k: v for k, v in cropped.items() if k != "body_crop"} == {k: v for k, v in whole.items() if k != "body_crop"}
    assert produced_by(models, "no", True, True)["body_crop"] is None  # candidates: nothing segmented


@pytest.mark.slow
def test_a_rerun_without_the_body_crop_redoes_every_ct(tiny_data, models, tmp_path):
    """The crop's rule is part of what produced a CT's findings, so switching it off redoes them all. tiny_data
    is soft tissue wall to wall, so the body's box is the whole slice and the findings agree."""
    out = tmp_path / "out"
    args = ["--data", str(tiny_data), "--seg-model", str(models["seg"]), "--cls-model", str(models["cls"]),
            "--out", str(out)]
    assert main(args) == 0
    cropped = _detections(out)
    assert json.loads((out / "ct" / "tiny.1.json").read_text())["produced_by"]["body_crop"] == {
        "body_hu": -500, "margin": 24}
    assert main([*args, "--no-body-crop"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["analysed"], summary["resumed"], summary["redone"]) == (2, 0, 2)
    assert summary["produced_by"]["body_crop"] is None
    assert json.loads((out / "ct" / "tiny.1.json").read_text())["produced_by"]["body_crop"] is None
    assert _detections(out) == cropped and cropped


def _classifier(seed: int, path: Path) -> Path:
    """A random classifier saved as best.pt whose input batch norm divides HU by 1000: probabilities that are
    not all 0 or 1, so two seeds give two sets of them."""
    torch.manual_seed(seed)
    model = LunaModel()
    model.tail_batchnorm.running_var.fill_(1000.0**2)
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.mark.slow
def test_rerun_with_another_classifier_redoes_the_cts_as_a_fresh_run_would(tiny_data, tmp_path):
    args = ["--data", str(tiny_data), "--candidates", str(tiny_data / "candidates.csv")]
    out = tmp_path / "rerun"
    assert main([*args, "--cls-model", str(_classifier(0, tmp_path / "cls0.pt")), "--out", str(out)]) == 0
    before = _detections(out)
    other = _classifier(1, tmp_path / "cls1.pt")
    assert main([*args, "--cls-model", str(other), "--out", str(out)]) == 0
    assert main([*args, "--cls-model", str(other), "--out", str(tmp_path / "fresh")]) == 0
    rerun = _detections(out)
    assert rerun == _detections(tmp_path / "fresh")
    assert rerun.keys() == before.keys() and all(rerun[key] != before[key] for key in rerun)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["analysed"], summary["resumed"], summary["redone"]) == (2, 0, 2)
    sha256 = load_model(LunaModel(), other, torch.device("cpu"))[1]
    assert summary["produced_by"]["models"]["nodule"] == {"path": str(other), "sha256": sha256, "provenance": None}


# -- folds as the shard build deals them ------------------------------------------------------------------
def _loose_copy(synth_data: Path, loose: Path) -> str:
    """Every CT of synth_data in one folder, and one more .mhd that candidates.csv does not list; its UID
    sorts first, so folds dealt over the files on disk would all shift by one."""
    loose.mkdir()
    for csv_file in synth_data.glob("*.csv"):
        shutil.copy(csv_file, loose)
    for mhd in find_series(synth_data).values():
        shutil.copy(mhd, loose)
        shutil.copy(mhd.with_suffix(".raw"), loose)
    extra = "1.0.unlisted"
    header = mhd.read_text().replace(mhd.with_suffix(".raw").name, f"{extra}.raw")
    (loose / f"{extra}.mhd").write_text(header)
    shutil.copy(mhd.with_suffix(".raw"), loose / f"{extra}.raw")
    return extra


def test_folds_as_built_agree_with_the_builds_assign_folds_on_its_series():
    found = {"a": Path("d/subset3/a.mhd"), "b": Path("d/b.mhd"), "c": Path("d/c.mhd"), "0": Path("d/0.mhd"),
             "e": Path("d/subset4/e.mhd")}
    listed = {"a", "b", "c", "gone"}  # "0" is on disk but not listed; "gone" listed but not on disk
    folds = folds_as_built(found, listed)
    as_built = assign_folds({uid: path for uid, path in found.items() if uid in listed})
    assert {uid: folds[uid] for uid in as_built} == as_built
    assert folds == {"a": 3, "b": 0, "c": 1, "e": 4}  # e: in a subset, whether listed or not
    assert folds_as_built(found, ()) == {"a": 3, "e": 4}


def _analysed(out: Path) -> list[str]:
    return sorted(p.stem for p in (out / "ct").glob("*.json"))


@pytest.mark.slow
def test_folds_of_loose_data_are_the_shard_builds(synth_data, models, tmp_path, capsys):
    loose = tmp_path / "loose"
    extra = _loose_copy(synth_data, loose)
    shards = tmp_path / "shards"
    manifest = build(BuildOptions(data=loose, out=shards, workers=2, max_samples=150, progress=False))
    held_out = sorted(manifest["folds"]["9"]["series"])
    assert len(held_out) == 1 and extra not in held_out
    with (loose / "candidates.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    _write_csv(tmp_path / "few.csv", ",".join(rows[0]), rows[1::50])  # few to classify; the folds take them all
    args = ["--data", str(loose), "--candidates", str(tmp_path / "few.csv"), "--cls-model", str(models["cls"]),
            "--folds", "9"]

    assert main([*args, "--out", str(tmp_path / "folds")]) == 0
    assert _analysed(tmp_path / "folds") == held_out
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "--shards" in notes[0] and "1 unlisted left out" in notes[0]

    assert main([*args, "--shards", str(shards), "--out", str(tmp_path / "shards-folds")]) == 0
    assert _analysed(tmp_path / "shards-folds") == held_out
    capsys.readouterr()

    gone = loose / f"{held_out[0]}.mhd"
    gone.unlink()
    assert main([*args, "--shards", str(shards), "--out", str(tmp_path / "gone")]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"have no .mhd under --data {loose}, e.g. {held_out[0]}" in error[0]


# -- candidates keep their coordinates, and bad inputs: tiny CTs analysed in this process --------------
TINY_SPACING = (0.7, 0.7, 2.5)  # x, y, z mm
TINY_ORIGIN = (-20.0, -30.0, -100.0)
NODULE = ("tiny.1", 2.4, -7.6, -80.0, 3.4)  # seriesuid, x, y, z (the centre of voxel (8, 32, 32)), diameter mm
CANDIDATES = [  # none at a voxel centre; the first 1.5 mm from the nodule's centre: inside it, while the
    ("tiny.1", 2.4, -7.6, -78.5, 1),  # nearest voxel centre (index 9, not 8.6) is 2.5 mm away: outside
    ("tiny.1", 5.123, -3.456, -71.789, 0),
    ("tiny.2", 7.777, 1.234, -88.888, 0),
]


def _write_ct(path: Path, hu: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(TINY_SPACING)
    image.SetOrigin(TINY_ORIGIN)
    sitk.WriteImage(image, str(path))


def _write_csv(path: Path, header: str, rows) -> None:
    path.write_text("\n".join([header, *(",".join(map(str, row)) for row in rows)]) + "\n")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """Two 16x64x64 CTs of soft tissue (tiny.1 in subset0 with a 3.4 mm nodule, tiny.2 in subset1), CANDIDATES
    and the nodule as annotations.csv. Soft tissue, not air: a random classifier's probabilities of air chunks
    are all 0. Read-only: a test that changes it copies it first."""
    data = tmp_path_factory.mktemp("tiny") / "data"
    rng = np.random.default_rng(0)
    i, r, c = np.ogrid[:16, :64, :64]
    for k, uid in enumerate(("tiny.1", "tiny.2")):
        hu = rng.integers(-60, 60, (16, 64, 64)).astype(np.int16)
        hu[(i - 8) ** 2 + (r - 32) ** 2 + (c - 32) ** 2 <= 4] = 200
        _write_ct(data / f"subset{k}" / f"{uid}.mhd", hu)
    _write_csv(data / "candidates.csv", "seriesuid,coordX,coordY,coordZ,class", CANDIDATES)
    _write_csv(data / "annotations.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm", [NODULE])
    return data


def _candidates_args(data: Path, models: dict, out: Path) -> list[str]:
    return ["--data", str(data), "--candidates", str(data / "candidates.csv"), "--cls-model", str(models["cls"]),
            "--out", str(out)]


@pytest.fixture(scope="module")
def tiny_candidates(tiny_data, models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-candidates") / "out"
    assert main(_candidates_args(tiny_data, models, out)) == 0
    return out


def test_candidates_come_out_at_exactly_the_given_coordinates(tiny_candidates):
    given = sorted((uid, x, y, z) for uid, x, y, z, _ in CANDIDATES)
    per_ct = sorted((uid, *d["xyz"]) for uid in ("tiny.1", "tiny.2")
                    for d in json.loads((tiny_candidates / "ct" / f"{uid}.json").read_text())["detections"])
    assert per_ct == given
    for table in ("detections.csv", "submission.csv"):
        with (tiny_candidates / table).open(newline="") as f:
            rows = list(csv.DictReader(f))
        assert sorted((row["seriesuid"], *(float(row[k]) for k in ("coordX", "coordY", "coordZ")))
                      for row in rows) == given, table
    irc = json.loads((tiny_candidates / "ct" / "tiny.1.json").read_text())["detections"]
    assert sorted(d["irc"] for d in irc)[0] == [8.6, 32.0, 32.0]  # continuous, not the voxel [9, 32, 32]


def test_a_candidate_off_the_voxel_centre_scores_as_the_hit_it_is(tiny_candidates):
    """1.5 mm from the centre of a 3.4 mm nodule is a LUNA16 hit (inside its sphere) and a match (0.44 < 0.7);
    moved to its voxel's centre (2.5 mm) it would be neither."""
    summary = json.loads((tiny_candidates / "summary.json").read_text())
    assert summary["froc"]["detected"] == 1 and summary["froc"]["nodules"] == 1
    assert summary["nodules_matched"] == 1
    assert summary["device_check"]["status"] == "skipped"  # the CPU is the reference


def test_candidate_rows_of_series_not_on_disk_are_counted_and_named(tiny_data, models, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    _write_csv(data / "candidates.csv", "seriesuid,coordX,coordY,coordZ,class",
               CANDIDATES + [("gone.1", 0, 0, 0, 0), ("gone.1", 1, 0, 0, 0), ("gone.2", 0, 0, 0, 1)])
    assert main(_candidates_args(data, models, tmp_path / "out")) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: 3 row(s) of --candidates {data / 'candidates.csv'} are of 2 series with no .mhd "
                        f"under {data} (gone.1: 2, gone.2: 1); they are not scored"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["candidate_rows_not_on_disk"] == 3 and summary["detections"] == len(CANDIDATES)


# Each bad input: (how to make it from a copy of tiny_data, exit code, part(s) of the one line it prints).
# A maker gets (data, models, tmp_path, monkeypatch) and returns the command's arguments.
def _model_file(content: bytes, name: str = "cls.pt"):
    def make(data, models, tmp_path, monkeypatch):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        return ["--data", str(data), "--candidates", str(data / "candidates.csv"), "--cls-model", str(path),
                "--out", str(tmp_path / "out")]
    return make


def _optimizer_state(data, models, tmp_path, monkeypatch):
    (tmp_path / "state").mkdir()
    torch.save({"state": {}, "param_groups": [{"lr": 0.001, "params": [0]}]}, tmp_path / "state" / "optimizer.bin")
    return ["--data", str(data), "--candidates", str(data / "candidates.csv"), "--cls-model",
            str(tmp_path / "state" / "optimizer.bin"), "--out", str(tmp_path / "out")]


def _truncated_safetensors(data, models, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    path = tmp_path / "state" / "model.safetensors"
    path.parent.mkdir()
    save_file(LunaModel().state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])
    return ["--data", str(data), "--candidates", str(data / "candidates.csv"), "--cls-model", str(path.parent),
            "--out", str(tmp_path / "out")]


def _nan_weights(data, models, tmp_path, monkeypatch):
    weights = LunaModel().state_dict()
    weights["block1.conv1.bias"][3] = float("nan")
    torch.save({"model": weights}, tmp_path / "cls.pt")
    return ["--data", str(data), "--candidates", str(data / "candidates.csv"), "--cls-model", str(tmp_path / "cls.pt"),
            "--out", str(tmp_path / "out")]


def _missing_model(data, models, tmp_path, monkeypatch):
    return ["--data", str(data), "--seg-model", str(tmp_path / "none.pt"), "--cls-model", str(models["cls"]),
            "--out", str(tmp_path / "out")]


def _another_network(data, models, tmp_path, monkeypatch):
    return ["--data", str(data), "--candidates", str(data / "candidates.csv"), "--cls-model", str(models["seg"]),
            "--out", str(tmp_path / "out")]


def _bad_table(name: str, header: str, good: tuple, bad: tuple):
    """The table `name` with a good row on line 2 and a bad one on line 3."""
    def make(data, models, tmp_path, monkeypatch):
        _write_csv(data / name, header, [good, bad])
        return _candidates_args(data, models, tmp_path / "out")
    return make


def _same_uid_twice(data, models, tmp_path, monkeypatch):
    shutil.copytree(data / "subset0", data / "subset5")
    return _candidates_args(data, models, tmp_path / "out")


def _loose_without_candidates(data, models, tmp_path, monkeypatch):
    (data / "subset1" / "tiny.2.mhd").rename(data / "tiny.2.mhd")
    (data / "subset1" / "tiny.2.raw").rename(data / "tiny.2.raw")
    (data / "candidates.csv").rename(tmp_path / "candidates.csv")
    return ["--data", str(data), "--candidates", str(tmp_path / "candidates.csv"), "--cls-model", str(models["cls"]),
            "--folds", "0", "--out", str(tmp_path / "out")]


def _failing(name: str, code: int, where: str):
    """Replace `name` of `luna_dist.analysis.run` by a function that raises OSError(code) when its path lies
    under `where`."""
    def make(data, models, tmp_path, monkeypatch):
        original = getattr(analysis, name)

        def fail(path, *args, **kwargs):
            if where in Path(path).parts:
                raise OSError(code, os.strerror(code), str(path))
            return original(path, *args, **kwargs)
        monkeypatch.setattr(analysis, name, fail)
        return _candidates_args(data, models, tmp_path / "out")
    return make


def _device_computing_wrongly(data, models, tmp_path, monkeypatch):
    on_a_broken_device(monkeypatch, perturbed=(torch.ops.aten.convolution.default,))
    return _candidates_args(data, models, tmp_path / "out")


def _interrupted_after_one_ct(data, models, tmp_path, monkeypatch):
    original, calls = analysis.analyze_ct, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return original(*args, **kwargs)
    monkeypatch.setattr(analysis, "analyze_ct", interrupted)
    return _candidates_args(data, models, tmp_path / "out")


def _ctrl_c_dropped_in_the_first_ct(data, models, tmp_path, monkeypatch):
    original, calls = analysis.analyze_ct, []

    def dropping_a_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            ctrl_c_inside_a_finalizer()  # the first CT is still analysed: Python dropped the Ctrl-C
        return original(*args, **kwargs)
    monkeypatch.setattr(analysis, "analyze_ct", dropping_a_ctrl_c)
    return _candidates_args(data, models, tmp_path / "out")


def _sigterm_in_the_second_ct(data, models, tmp_path, monkeypatch):
    original, calls = analysis.analyze_ct, []

    def terminated(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            signal.raise_signal(signal.SIGTERM)
        return original(*args, **kwargs)
    monkeypatch.setattr(analysis, "analyze_ct", terminated)
    return _candidates_args(data, models, tmp_path / "out")


def _single_slice_ct(data, models, tmp_path, monkeypatch):
    _write_ct(data / "subset2" / "tiny.thin.mhd", np.full((1, 64, 64), 100, dtype=np.int16))
    return ["--data", str(data), "--seg-model", str(models["seg"]), "--cls-model", str(models["cls"]),
            "--series", "tiny.thin", "--out", str(tmp_path / "out")]


ANNOTATIONS = "seriesuid,coordX,coordY,coordZ,diameter_mm"
BAD_INPUTS = [
    ("text file as model", _model_file(b"seriesuid,coordX\n"), 1, "cls.pt: not a readable checkpoint"),
    ("optimizer state as model", _optimizer_state, 1, "optimizer.bin: holds no model weights (it holds param_groups"),
    ("truncated safetensors", _truncated_safetensors, 1, "model.safetensors: not a readable checkpoint"),
    ("missing model", _missing_model, 1, "none.pt: checkpoint not found"),
    ("weights that are not finite", _nan_weights, 1,
     "cls.pt: block1.conv1.bias holds 1 of its 8 values that are not finite numbers (NaN or infinity)"),
    ("another network's weights", _another_network, 1, "seg.pt: not weights of a LunaModel"),
    ("bad annotations row", _bad_table("annotations.csv", ANNOTATIONS, NODULE, ("tiny.1", 0, 0, 0, "big")), 1,
     "annotations.csv:3: diameter_mm is not a number: 'big' (this table scores the findings"),
    ("bad malignancy row", _bad_table("annotations_with_malignancy.csv", ANNOTATIONS + ",mal_bool", (*NODULE, "True"),
                                      ("tiny.1", 0, 0, 0, 3.4, "maybe")), 1,
     "annotations_with_malignancy.csv:3: mal_bool must be True or False, found 'maybe'"),
    ("bad excluded row", _bad_table("annotations_excluded.csv", ANNOTATIONS, NODULE, ("tiny.1", "x", 0, 0, -1)), 1,
     "annotations_excluded.csv:3: coordX is not a number: 'x'"),
    ("same series in two subsets", _same_uid_twice, 1, "series tiny.1 is present twice"),
    ("--folds on loose data without candidates.csv", _loose_without_candidates, 1,
     "lie outside subsetN folders, and their folds are dealt over"),
    ("disk full writing a CT", _failing("write_json", errno.ENOSPC, "ct"), 1,
     ("(No space left on device: ", "nothing finished was lost: 0 CT(s) are kept in", "rerunning the same command")),
    ("read-only --out writing the outputs", _failing("write_marks", errno.EROFS, "out"), 1,
     ("(Read-only file system: ", "nothing finished was lost: 2 CT(s) are kept in")),
    ("a device that computes wrongly", _device_computing_wrongly, 1,
     ("computes differently from the CPU: LunaModel in fp32: the evaluation output of block1.conv1 differs",
      "accept the device with --skip-device-check")),
    ("interrupted", _interrupted_after_one_ct, 130, "interrupted: 1 finished CT(s) are kept in "),
    ("a Ctrl-C that Python drops", _ctrl_c_dropped_in_the_first_ct, 130, "interrupted: 1 finished CT(s) are kept in "),
    ("SIGTERM", _sigterm_in_the_second_ct, 143, "stopped by SIGTERM: 1 finished CT(s) are kept in "),
    ("single-slice CT", _single_slice_ct, 0, "tiny.thin.mhd: 1x64x64 voxels, under 3 along an axis"),
]


@pytest.mark.parametrize("make, code, line", [row[1:] for row in BAD_INPUTS], ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_one_line(make, code, line, tiny_data, models, tmp_path, monkeypatch, capsys, ctrl_c_raises,
                              sigterm_raises):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    assert main(make(data, models, tmp_path, monkeypatch)) == code
    err = capsys.readouterr().err
    said = [text for text in err.splitlines() if text.startswith(("error:", "warning:", "note:", "interrupted:"))]
    assert len(said) == 1 and all(part in said[0] for part in ((line,) if isinstance(line, str) else line)), err
    assert "Traceback" not in err


# -- CTs of one's own (--ct): a DICOM series, NIfTI, .mhd ------------------------------------------------------
OWN_UID = "1.2.826.0.1.3680043.2.1125.7"


@pytest.fixture(scope="module")
def own_ct(tmp_path_factory) -> dict[str, Path]:
    """One 12x48x48 CT of air holding three dense balls (radii 2.5, 3.5 and 4.5 voxels), tilted 20° at an odd
    origin (helpers.tilted_image), written as .mhd, as a DICOM series with SeriesInstanceUID OWN_UID and as
    OWN_UID.nii.gz; and a classifier whose probabilities are not all 0 or 1."""
    folder = tmp_path_factory.mktemp("own")
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, -900, (12, 48, 48)).astype(np.int16)
    i, r, c = np.ogrid[:12, :48, :48]
    for (ci, cr, cc), radius in zip([(5, 12, 12), (6, 30, 16), (6, 24, 34)], (2.5, 3.5, 4.5)):
        hu[(i - ci) ** 2 + (r - cr) ** 2 + (c - cc) ** 2 <= radius ** 2] = rng.integers(0, 200)
    image = tilted_image(hu)
    sitk.WriteImage(image, str(folder / f"{OWN_UID}.mhd"))
    sitk.WriteImage(image, str(folder / f"{OWN_UID}.nii.gz"))
    (folder / "ras").mkdir()
    sitk.WriteImage(sitk.DICOMOrient(image, "RAS"), str(folder / "ras" / f"{OWN_UID}.nii.gz"))
    return {"mhd": folder / f"{OWN_UID}.mhd", "nifti": folder / f"{OWN_UID}.nii.gz",
            "dicom": write_dicom_series(image, folder / "dicom", OWN_UID), "cls": _classifier(0, folder / "cls.pt"),
            "nifti-ras": folder / "ras" / f"{OWN_UID}.nii.gz",
            "dicom-coronal": write_dicom_series(sitk.DICOMOrient(image, "LIP"), folder / "coronal", OWN_UID)}


def _own_args(ct: Path, models: dict, own_ct: dict, out: Path) -> list[str]:
    """Whole slices: three balls in air are no patient, and the body's box would hold the largest only."""
    return ["--ct", str(ct), "--seg-model", str(models["seg"]), "--cls-model", str(own_ct["cls"]), "--out", str(out),
            "--no-body-crop"]


STORED_AXES = {"mhd": "LPS", "dicom": "LPS", "nifti": "LPS", "nifti-ras": "RAS", "dicom-coronal": "LIP"}


@pytest.mark.slow
def test_own_cts_as_dicom_and_nifti_give_the_detections_of_the_mhd(own_ct, models, tmp_path):
    """Also when stored in other axes (RAS, a coronal series), which reached the models mirrored or permuted."""
    found, results, summaries = {}, {}, {}
    for kind in STORED_AXES:
        assert main(_own_args(own_ct[kind], models, own_ct, tmp_path / kind)) == 0
        results[kind] = json.loads((tmp_path / kind / "ct" / f"{OWN_UID}.json").read_text())
        found[kind] = results[kind]["detections"]
        summaries[kind] = summary = json.loads((tmp_path / kind / "summary.json").read_text())
        assert (summary["analysed"], summary["detections"]) == (1, len(found["mhd"])) and "confusion" not in summary
        _check_report(tmp_path / kind, [OWN_UID])
    assert len(found["mhd"]) == 3  # a group per ball
    for kind in ("dicom", "nifti", "nifti-ras", "dicom-coronal"):
        for mine, theirs in zip(found[kind], found["mhd"]):
            assert (mine["irc"], mine["voxels"], mine["p_nodule"]) == (theirs["irc"], theirs["voxels"], theirs["p_nodule"])
            np.testing.assert_allclose(mine["xyz"], theirs["xyz"], atol=2e-3)  # DICOM's decimals, NIfTI's float32
            np.testing.assert_allclose([mine["diameter_mm"], mine["volume_mm3"]],
                                       [theirs["diameter_mm"], theirs["volume_mm3"]], atol=0.011)
    for kind, axes in STORED_AXES.items():  # the outputs say in which space positions are, and how the file was
        assert (results[kind]["coordinates"], results[kind]["stored_axes"]) == ("LPS", axes)
        assert summaries[kind]["coordinates"] == "LPS"
    # The largest ball (radius 4.5 voxels, grown back from its core): 9 columns of 0.7 mm across, 9 rows of 0.8 mm,
    # and about 8 mm from corner to corner of its voxels (as squares).
    largest = max(found["mhd"], key=lambda d: d["voxels"])
    assert 7.0 < largest["diameter_mm"] < 8.5 and largest["volume_mm3"] == pytest.approx(largest["voxels"] * 1.4)
    with (tmp_path / "mhd" / "detections.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(row["diameter_mm"]) for row in rows] == [d["diameter_mm"] for d in
                                                             sorted(found["mhd"], key=lambda d: -d["p_nodule"])]
    # The same series from another file is not the same CT: the DICOM's run does not reuse the .mhd's result.
    assert main(_own_args(own_ct["dicom"], models, own_ct, tmp_path / "mhd")) == 0
    summary = json.loads((tmp_path / "mhd" / "summary.json").read_text())
    assert (summary["resumed"], summary["redone"]) == (0, 1)


def _own_bad(make):
    def made(own_ct, tmp_path):
        return make(tilted_image(np.zeros((6, 20, 24), dtype=np.int16)), tmp_path)
    return made


def _twice(own_ct, tmp_path):
    return own_ct["mhd"], own_ct["nifti"]


OWN_BAD = [(name, _own_bad(make), said) for name, make, said in BAD_CTS] + [
    ("the same series twice", _twice, f"{OWN_UID}.nii.gz: series {OWN_UID} again (also "),
]


@pytest.mark.parametrize("make, said", [row[1:] for row in OWN_BAD], ids=[row[0] for row in OWN_BAD])
def test_bad_own_ct_is_one_line(make, said, own_ct, models, tmp_path, capsys):
    made = make(own_ct, tmp_path)
    paths = made if isinstance(made, tuple) else (made,)
    args = ["--ct", *map(str, paths), "--seg-model", str(models["seg"]), "--cls-model", str(models["cls"]),
            "--out", str(tmp_path / "out")]
    assert main(args) == 1
    err = capsys.readouterr().err
    said_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(said_lines) == 1 and said_lines[0].startswith(f"error: --ct {paths[0].parent}") and said in said_lines[0], err
    assert "Traceback" not in err


def _count_calls(monkeypatch, module, name: str) -> list:
    calls, original = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, counted)
    return calls


def test_a_rerun_knows_a_ct_by_its_voxels(own_ct, models, tmp_path, monkeypatch):
    """A .mhd was known by its header and its .raw's size: new voxels of the same size got the old findings.
    Known by its voxels' sha256, recorded with its files' stat: new voxels are analysed anew (their file's
    mtime and size as they were), unchanged files are reused unread, a copy is read once and reused."""
    monkeypatch.setattr(identity_module, "UNSETTLED_NS", 0)  # the test's files were written a moment ago
    folder = tmp_path / "scans"
    folder.mkdir()
    for suffix in (".mhd", ".raw"):
        shutil.copy(own_ct["mhd"].with_suffix(suffix), folder)
    mhd, raw = folder / own_ct["mhd"].name, folder / own_ct["mhd"].with_suffix(".raw").name
    reads, analyses = _count_calls(monkeypatch, identity_module, "read_ct"), _count_calls(monkeypatch, analysis, "analyze_ct")

    def rerun(path: Path) -> tuple[int, int]:
        assert main(_own_args(path, models, own_ct, tmp_path / "out")) == 0
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        return summary["resumed"], summary["redone"]

    assert rerun(mhd) == (0, 0)
    was = raw.stat()
    with raw.open("r+b") as f:  # a voxel of air made bone
        f.seek(2 * (5 * 48 * 48 + 40 * 48 + 40))
        f.write(np.int16(500).tobytes())
    os.utime(raw, ns=(was.st_atime_ns, was.st_mtime_ns))
    assert (raw.stat().st_size, raw.stat().st_mtime_ns) == (was.st_size, was.st_mtime_ns)
    assert rerun(mhd) == (0, 1) and len(analyses) == 2
    assert rerun(mhd) == (1, 0) and len(reads) == 2  # unchanged: not even read
    moved = Path(shutil.copytree(folder, tmp_path / "moved"))
    assert rerun(moved / mhd.name) == (1, 0) and (len(reads), len(analyses)) == (3, 2)  # read, the same voxels
    assert rerun(moved / mhd.name) == (1, 0) and len(reads) == 3  # and known unread from then on


def test_a_file_changed_as_it_is_read_is_not_known_by_its_stat(own_ct, tmp_path):
    path = tmp_path / "scan.nii.gz"
    shutil.copy(own_ct["nifti"], path)  # written now: its stat may not change at a change within a clock tick
    ct, identity, _ = read_known(path, "scan", MAX_CT_VOXELS)
    assert identity["files"] is None and identity["sha256"] == ct_identity(ct)
    assert ct_files_stat(path, MAX_CT_VOXELS)[0][0] == "scan.nii.gz"


def test_two_scans_of_one_name_in_two_folders_are_two_cts(tmp_path):
    """Both were series `scan`, refused as one series given twice; one series given twice still is."""
    image = tilted_image(np.zeros((6, 20, 24), dtype=np.int16))
    paths = []
    for patient in ("anna", "ben"):
        (tmp_path / patient).mkdir()
        sitk.WriteImage(image, str(tmp_path / patient / "scan.nii.gz"))
        paths.append(tmp_path / patient / "scan.nii.gz")
    assert ct_sources(paths) == {"anna_scan": paths[0], "ben_scan": paths[1]}
    series = write_dicom_series(image, tmp_path / "series", "1.2.3")
    copy = shutil.copytree(series, tmp_path / "copy")
    with pytest.raises(AnalysisError, match=f"--ct {copy}: series 1.2.3 again \\(also {series}\\)"):
        ct_sources([series, copy])


def test_a_dangling_link_among_the_slices_is_one_warning(tmp_path, capsys):
    series = write_dicom_series(tilted_image(np.zeros((6, 20, 24), dtype=np.int16)), tmp_path / "series", "1.2.3")
    os.symlink(tmp_path / "gone.dcm", series / "slice0002b.dcm")
    assert ct_sources([series]) == {"1.2.3": series}
    assert capsys.readouterr().err.splitlines() == [
        f"warning: --ct {series / 'slice0002b.dcm'}: a symbolic link to {tmp_path / 'gone.dcm'}, which does not exist: "
        "skipped; the series is checked without it"]


def test_max_ct_voxels_refuses_a_ct_before_it_is_read(own_ct, models, tmp_path, capsys):
    assert main(_own_args(own_ct["nifti"], models, own_ct, tmp_path / "out") + ["--max-ct-voxels", "27647"]) == 1
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert said == [f"error: --ct {own_ct['nifti']}: its header declares 48x48x12 = 27,648 voxels, more than "
                    "--max-ct-voxels 27,647 (LUNA16's largest CT has 200,278,016): not read; raise --max-ct-voxels if "
                    "the CT is that large"]


# -- a series' uid never chooses where the analysis writes ------------------------------------------------------
def _files_under(folder: Path, leaving_out: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file() and leaving_out not in path.parents}


@pytest.mark.parametrize("kind", ["up the tree", "absolute", "304 characters"])
def test_a_series_uid_never_chooses_where_the_analysis_writes(kind, own_ct, models, tmp_path):
    """The uid of a .mha header (its 0020|000e line) names the CT's outputs: `../../../victim` had the
    analysis write beside --out and delete the *.png of the folder it named; an absolute one too; 304
    characters were too long for a file name. Now each is a safe, recognisable name inside --out."""
    out, victim = tmp_path / "a" / "b" / "out", tmp_path / "a" / "victim"
    victim.mkdir(parents=True)
    (victim / "keep.png").write_bytes(b"an image of someone else's")
    (tmp_path / "a" / "victim.json").write_text("{}")
    uid = {"up the tree": "../../../victim", "absolute": str(victim), "304 characters": "1.2" * 101 + "4"}[kind]
    image = sitk.ReadImage(str(own_ct["mhd"]))
    image.SetMetaData("0020|000e", uid)
    sitk.WriteImage(image, str(tmp_path / "scan.mha"))
    before = _files_under(tmp_path, out)
    assert main(_own_args(tmp_path / "scan.mha", models, own_ct, out)) == 0
    assert _files_under(tmp_path, out) == before  # nothing outside --out written or deleted
    name = file_name(uid)
    assert "/" not in name and len(name) < 100 and re.fullmatch(r"[\w.-]+~[0-9a-f]{16}", name)
    assert name.startswith({"up the tree": "_.._.._victim", "absolute": "_", "304 characters": "1.21.21.2"}[kind])
    result = json.loads((out / "ct" / f"{name}.json").read_text())
    assert result["series_uid"] == uid and len(result["detections"]) == 3
    _check_report(out, [name])
    with (out / "detections.csv").open(newline="") as f:
        assert {row["seriesuid"] for row in csv.DictReader(f)} == {uid}


def test_a_series_name_with_a_comma_is_one_field_of_every_csv(own_ct, models, tmp_path):
    """`Smith, John.nii.gz` gave submission.csv rows of six columns."""
    ct, uid = tmp_path / "Smith, John.nii.gz", f"{tmp_path.name}_Smith, John"  # its folder's name and its own
    shutil.copy(own_ct["nifti"], ct)
    assert main(_own_args(ct, models, own_ct, tmp_path / "out")) == 0
    marks = read_marks(tmp_path / "out" / "submission.csv", [uid])
    with (tmp_path / "out" / "detections.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(marks.series) == len(rows) == 3 and {row["seriesuid"] for row in rows} == {uid}
    assert not (tmp_path / "out" / "ct" / f"{uid}.json").exists()  # its files' name is made safe too


@pytest.mark.parametrize("name", ["1.2.3\n9.9.9,0,0,0,0.99", "1.2.3\t", "1.2.3 "])
def test_a_series_name_with_a_control_character_or_an_outer_space_is_refused(name, own_ct, models, tmp_path, capsys):
    """A newline in a uid (here a NIfTI file's name, the uid its folder's and its own) forged rows of
    submission.csv; a space at either end is lost by every CSV reader."""
    ct, uid = tmp_path / f"{name}.nii.gz", f"{tmp_path.name}_{name}"
    shutil.copy(own_ct["nifti"], ct)
    assert main(_own_args(ct, models, own_ct, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("error:")]
    shown = str(ct) if str(ct).isprintable() else repr(str(ct))
    assert said == [f"error: {shown}: series uid {uid!r} holds a control character or a space at "
                    "an end, which the CSVs of its findings cannot hold as it is: rename the file, or fix its "
                    "SeriesInstanceUID (0020|000e)"], err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_two_series_whose_names_differ_only_in_case_are_refused():
    """One file on a case-insensitive file system (macOS, Windows): each would overwrite the other's results."""
    check_names({"Scan": Path("a/Scan.nii.gz"), "other": Path("b/other.nii.gz")})
    with pytest.raises(AnalysisError, match=r"^b/scan.nii.gz: series scan and Scan \(a/Scan.nii.gz\) differ "
                                                      "only in case"):
        check_names({"Scan": Path("a/Scan.nii.gz"), "scan": Path("b/scan.nii.gz")})


def test_a_full_disk_while_writing_the_report_names_the_file_and_leaves_no_partial(tiny_data, models, tmp_path,
                                                                                    monkeypatch, capsys):
    """It printed `No space left on device: None` and left report.html.partial."""
    from luna_dist.common import atomic

    def full_for_the_report(file, mode="r", **kwargs):
        opened = open(file, mode, **kwargs)
        if Path(file).name == "report.html.partial":
            def write(text):
                opened.buffer.write(text[:100].encode())
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            opened.write = write
        return opened
    monkeypatch.setattr(atomic, "open", full_for_the_report, raising=False)
    out = tmp_path / "out"
    assert main(_candidates_args(tiny_data, models, out)) == 1
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and f"(No space left on device: {out / 'report.html'})" in said[0], said
    assert not list(out.rglob("*.partial")) and (out / "summary.json").is_file()


# -- a CT that fails for any reason is one failed CT, not a stopped analysis ------------------------------------
@pytest.mark.parametrize("error, said", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore lines"),
     "tiny.1.mhd: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (out of memory: a smaller "
     "--batch-size needs less)"),
    (ValueError("operands could not be broadcast together"), "tiny.1.mhd: ValueError: operands could not be broadcast"),
])
def test_a_ct_that_fails_for_any_reason_is_listed_and_the_others_finish(error, said, tiny_data, models, tmp_path,
                                                                        monkeypatch, capsys):
    """An out-of-memory error on one large CT stopped the analysis there (and left the other ranks waiting)."""
    original = analysis.analyze_ct

    def failing_on_tiny_1(ct, *args, **kwargs):
        if ct.series_uid == "tiny.1":
            raise error
        return original(ct, *args, **kwargs)
    monkeypatch.setattr(analysis, "analyze_ct", failing_on_tiny_1)
    out = tmp_path / "out"
    assert main(_candidates_args(tiny_data, models, out)) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors[-1].startswith(f"error: 1 CT(s) could not be analysed, the others are in {out}: ") and \
        said in errors[-1] and errors[-1].endswith("; fix them and rerun to add them"), errors
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["analysed"], [f["series_uid"] for f in summary["failed"]]) == (1, ["tiny.1"])
    assert said in summary["failed"][0]["error"] and _analysed(out) == ["tiny.2"]


def _model_that_saw(path: Path, trained: dict, selected: dict) -> Path:
    record = Provenance(trained, selected, "the best cpm on folds [1]" if selected else "the last epoch")
    torch.save({"model": LunaModel().state_dict(), "provenance": record.to_json()}, path)
    return path


@pytest.mark.parametrize("trained, selected, said", [
    ({0: ("tiny.1",), 1: ("tiny.2",)}, {}, "trained on fold 1"),
    ({0: ("tiny.1",)}, {1: ("tiny.2",)}, "was selected on fold 1"),
])
def test_a_fold_is_not_scored_with_a_model_that_trained_or_was_selected_on_it(trained, selected, said, tiny_data,
                                                                              tmp_path, capsys):
    """The analysis scored fold 1 with a classifier trained on it, or whose epoch was chosen by its score on it,
    and reported that CPM as if the fold were unseen."""
    model = _model_that_saw(tmp_path / "best.pt", trained, selected)
    out = tmp_path / "out"
    assert main(_candidates_args(tiny_data, {"cls": model}, out) + ["--folds", "1"]) == 1
    said_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error:", "warning:"))]
    assert said_lines == [f"error: the nodule classifier --cls-model {model} {said}, and 1 of its series is scored "
                          "here (e.g. tiny.2): a fold is scored only by models that neither trained nor were "
                          "selected on it; train them without it (--val-folds 1 --select-on last)"]
    assert not list(out.glob("ct/*.json")) and not (out / "submission.csv").exists()


def test_a_fold_the_models_did_not_see_is_scored_and_its_submission_says_what_they_saw(tiny_data, tmp_path, capsys):
    model = _model_that_saw(tmp_path / "best.pt", {1: ("tiny.2",)}, {})
    out = tmp_path / "out"
    assert main(_candidates_args(tiny_data, {"cls": model}, out) + ["--folds", "0"]) == 0
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error:", "warning:"))]
    record = provenance.read(model)
    named = f"the nodule classifier --cls-model {model}"
    assert provenance.read_sidecar(out / "submission.csv") == [provenance.Part(("tiny.1",), {named: record})]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["produced_by"]["models"]["nodule"]["provenance"] == record.folds()
    assert record.folds()["trained_on"] == [1]


def test_a_model_that_records_nothing_is_scored_with_a_warning(tiny_data, tmp_path, capsys):
    torch.save({"model": LunaModel().state_dict()}, tmp_path / "old.pt")
    assert main(_candidates_args(tiny_data, {"cls": tmp_path / "old.pt"}, tmp_path / "out")) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: the nodule classifier --cls-model {tmp_path / 'old.pt'} records no folds it "
                        "trained or was selected on (saved before luna_dist recorded them, or by other software): "
                        "whether it saw the scored series is not checked"]


def test_probabilities_that_are_not_finite_fail_the_ct_naming_the_model(tiny_data, models, tmp_path, capsys):
    """Finite weights whose sums overflow (both logits infinite: softmax gives NaN) scored every candidate NaN,
    and the analysis wrote p_nodule = nan with exit 0."""
    model = LunaModel()
    model.head_linear.weight.data.fill_(1e38)
    torch.save({"model": model.state_dict()}, tmp_path / "overflowing.pt")
    args = _candidates_args(tiny_data, models, tmp_path / "out")
    args[args.index("--cls-model") + 1] = str(tmp_path / "overflowing.pt")
    assert main(args) == 1
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")][-1]
    for mhd, marks in (("subset0/tiny.1.mhd", 2), ("subset1/tiny.2.mhd", 1)):
        assert (f"{tiny_data / mhd}: the nodule classifier --cls-model {tmp_path / 'overflowing.pt'} "
                f"gave {marks} of {marks} probabilities that are not finite numbers (NaN or infinity)") in error, error
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["analysed"], summary["detections"], len(summary["failed"])) == (0, 0, 2)
    assert (tmp_path / "out" / "submission.csv").read_text() == "seriesuid,coordX,coordY,coordZ,probability\n"


# -- every CT once over several processes, and a process that stops answering ---------------------------------
def test_check_dealt_names_a_ct_taken_twice_or_by_none():
    series = {"a": Path("a.mhd"), "b": Path("b.mhd"), "c": Path("c.mhd")}
    analysis.check_dealt(series, ["c", "a", "b"])
    with pytest.raises(analysis.AnalysisError, match=r"not the 3 listed, each once: 1 more than once \(e.g. a\); "
                                                     r"1 by none \(e.g. b\); nothing is written beyond each CT's own "
                                                     r"findings: rerun the same command$"):
        analysis.check_dealt(series, ["a", "c", "a"])
    with pytest.raises(analysis.AnalysisError, match=r"1 not listed \(e.g. d\)"):
        analysis.check_dealt(series, ["a", "b", "c", "d"])


def _two_ranks_where_rank_1(change: str, args: list[str], tmp_path: Path, timeout: float = RUN_TIMEOUT
                            ) -> subprocess.CompletedProcess:
    """The analysis on 2 CPU ranks, rank 1 changed by the Python lines `change` (`run` is the module that analyses
    the CTs of a process): as a node whose view of the data differs, or that stops answering."""
    script = tmp_path / "analyze_on_two_ranks.py"
    script.write_text("import os, sys, time\nfrom pathlib import Path\nfrom luna_dist import analyze\n"
                      "from luna_dist.analysis import run\n"
                      f"if os.environ['RANK'] == '1':\n    {change}\nsys.exit(analyze.main())\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    return run_or_show_stacks(command, timeout, env, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.slow
def test_ranks_that_see_other_sizes_still_analyse_every_ct_once(tiny_data, models, tiny_candidates, tmp_path):
    """Each rank dealt the CTs from its own headers: where rank 1 could not read tiny.1's (a node's copy still
    being synced), both ranks analysed tiny.1, none tiny.2, and the run exited 0."""
    out = tmp_path / "out"
    result = _two_ranks_where_rank_1("seen = run.ct_voxels; run.ct_voxels = lambda path, limit: 0 if "
                                     "path.name == 'tiny.1.mhd' else seen(path, limit)",
                                     _candidates_args(tiny_data, models, out), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["processes"], summary["analysed"], summary["failed"]) == (2, 2, [])
    assert _rows(out / "detections.csv") == _rows(tiny_candidates / "detections.csv")


@pytest.mark.slow
def test_a_rank_that_stops_answering_fails_the_others_within_the_timeout(tiny_data, models, tmp_path):
    """Rank 1 hangs in its CT (a hung driver, a lost node): rank 0 waited in the gather for torch's default
    (10 to 30 minutes); now --dist-timeout, naming rank 1."""
    import time

    started = time.monotonic()
    result = _two_ranks_where_rank_1("run.analyze_ct = lambda *args, **kwargs: time.sleep(600)",
                                     [*_candidates_args(tiny_data, models, tmp_path / "out"), "--dist-timeout", "5"],
                                     tmp_path, timeout=120)
    assert result.returncode != 0 and time.monotonic() - started < 90
    errors = [line[line.index("error:"):] for line in result.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert re.match(rf"error: rank 0 of 2 lost the others: rank\(s\) 1 on {os.uname().nodename}, pid \d+ stopped "
                    rf"answering \(.+\)\. Every process stops; the finished CTs are kept in {tmp_path / 'out' / 'ct'}: "
                    "once the nodes are back, the same command on every node resumes$", errors[0]), errors[0]


def test_a_link_in_out_leading_outside_fails_its_ct_and_nothing_outside_is_deleted(own_ct, models, tmp_path, capsys):
    """The images' folder of a CT, a link to a folder outside --out: its *.png were deleted, new ones written."""
    out, victim = tmp_path / "out", tmp_path / "victim"
    victim.mkdir()
    (victim / "detection-001.png").write_bytes(b"someone else's")
    (out / "ct").mkdir(parents=True)
    (out / "ct" / OWN_UID).symlink_to(victim)
    assert main(_own_args(own_ct["mhd"], models, own_ct, out)) == 1
    assert [(p.name, p.read_bytes()) for p in victim.iterdir()] == [("detection-001.png", b"someone else's")]
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")][-1]
    assert f"{out / 'ct' / OWN_UID}: resolves to {victim}, outside --out {out}: not written there" in error
