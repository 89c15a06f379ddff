"""The rehearsal must be the real download's layout and tables at the real scale, with CTs that hold
every real finding, candidates that the build joins to every nodule, and the same bytes every time."""

from __future__ import annotations

import csv
import gzip
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from luna_dist.imaging.geometry import Geometry, irc_to_xyz, xyz_to_irc, xyz_to_irc_float
from luna_dist.rehearsal import main
from luna_dist.shards.build import build
from luna_dist.shards.options import BuildOptions
from luna_dist.synthetic.generator import CANDIDATES_HEADER, MIN_SHAPE
from luna_dist.synthetic.rehearsal import (
    FINDING_JITTER_MM,
    MARGIN_MM,
    POSITIVE_REACH,
    allot,
    draw_ct,
    make_rehearsal,
    plan_counts,
    positives_per_nodule,
    read_series,
)
from luna_dist.tables.candidates import join_annotations, read_annotations, read_candidates

FIXTURES = Path(__file__).parent / "fixtures" / "luna16"
SERIES = 12
SEED = 5
TABLES_IN_OUT = {
    "annotations.csv": "annotations.csv",
    "annotations_with_malignancy.csv": "annotations_with_malignancy.csv",
    "annotations_excluded.csv": "evaluationScript/annotations/annotations_excluded.csv",
    "seriesuids.csv": "evaluationScript/annotations/seriesuids.csv",
}
"""Each real table and where the download puts it, written out here rather than taken from the module."""


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> Path:
    """The real LUNA16 tables, decompressed from the fixtures."""
    folder = tmp_path_factory.mktemp("tables")
    for packed in FIXTURES.glob("*.csv.gz"):
        (folder / packed.name.removesuffix(".gz")).write_bytes(gzip.decompress(packed.read_bytes()))
    return folder


@pytest.fixture(scope="module")
def rehearsal(tables, tmp_path_factory):
    """The first 12 series at the smallest shape, with the candidate table at its scaled default size."""
    return make_rehearsal(tmp_path_factory.mktemp("rehearsal") / "luna", tables, MIN_SHAPE, SEED, SERIES)


@pytest.fixture(scope="module")
def series(tables):
    return read_series(tables, SERIES)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def xyz(rows: list[dict[str, str]]) -> np.ndarray:
    return np.array([[float(r["coordX"]), float(r["coordY"]), float(r["coordZ"])] for r in rows]).reshape(-1, 3)


def ct_of(out: Path, k: int, uid: str) -> sitk.Image:
    return sitk.ReadImage(str(out / f"subset{k % 10}" / f"{uid}.mhd"))


def all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_is_the_downloads_and_the_tables_are_the_real_rows(rehearsal, tables):
    out = rehearsal.out
    uids = (tables / "seriesuids.csv").read_text().splitlines()[:SERIES]
    assert sorted(p.name for p in out.glob("subset*")) == [f"subset{k}" for k in range(10)]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.mhd")) == sorted(
        f"subset{k % 10}/{uid}.mhd" for k, uid in enumerate(uids))
    assert not out.with_name(out.name + ".partial").exists() and not list(out.rglob("*.partial"))
    for k, uid in enumerate(uids):
        image = ct_of(out, k, uid)
        assert image.GetPixelID() == sitk.sitkInt16 and image.GetSize() == MIN_SHAPE[::-1]
        assert image.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
        assert "CompressedData = False" in (out / f"subset{k % 10}" / f"{uid}.mhd").read_text()
    assert (out / TABLES_IN_OUT["seriesuids.csv"]).read_text() == "".join(uid + "\n" for uid in uids)  # no header
    for name, where in TABLES_IN_OUT.items():
        real = (tables / name).read_text().splitlines(keepends=True)
        header = [] if name == "seriesuids.csv" else real[:1]
        kept = [line for line in real[len(header):] if line.split(",")[0].strip() in uids]
        assert (out / where).read_text() == "".join(header + kept), name
    assert (out / "candidates.csv").read_text().splitlines()[0] == CANDIDATES_HEADER
    assert len(read_rows(out / "annotations.csv")) == rehearsal.nodules == 9
    assert len(read_rows(out / TABLES_IN_OUT["annotations_excluded.csv"])) == rehearsal.excluded == 468


def test_each_ct_holds_its_series_findings_with_the_margin_in_anisotropic_voxels(rehearsal):
    out = rehearsal.out
    findings = defaultdict(list)
    for name in ("annotations.csv", "annotations_excluded.csv"):
        for row in read_rows(out / TABLES_IN_OUT[name]):
            findings[row["seriesuid"]].append(row)
    uids = (out / TABLES_IN_OUT["seriesuids.csv"]).read_text().split()
    for k, uid in enumerate(uids):
        image = ct_of(out, k, uid)
        geometry = Geometry.of_image(image)
        sx, sy, sz = image.GetSpacing()
        assert sx == sy and abs(sz - sx) > 0.5, (uid, image.GetSpacing())
        size = np.array(MIN_SHAPE)
        centres = xyz(findings[uid])
        assert len(centres), uid  # every real series has findings
        for offset in np.vstack([np.eye(3), -np.eye(3)]) * MARGIN_MM:
            irc = xyz_to_irc_float(centres + offset, geometry)
            assert ((irc >= 0) & (irc <= size - 1)).all(), uid
        assert ((xyz_to_irc(centres, geometry) >= 0) & (xyz_to_irc(centres, geometry) < size)).all()


def test_real_nodules_are_drawn_at_their_centres(rehearsal, series):
    checked = 0
    for s in series:
        _, phantom = draw_ct(s, SEED, MIN_SHAPE)
        image = ct_of(rehearsal.out, s.k, s.uid)
        hu, geometry = sitk.GetArrayFromImage(image), Geometry.of_image(image)
        assert len(phantom.nodules) == len(s.nodules)
        for nodule, row in zip(phantom.nodules, s.nodules):
            assert np.array_equal(nodule.centre, row[:3]) and nodule.diameter == row[3]
            voxel = xyz_to_irc(nodule.centre, geometry)
            gap = np.linalg.norm(irc_to_xyz(voxel, geometry) - nodule.centre)
            if gap >= nodule.base_radius:  # no voxel centre within the nodule's core: it may cover none
                continue
            expected = nodule.calcified_hu if gap <= nodule.calcified_radius else nodule.hu
            value = hu[tuple(voxel)]
            assert value > -300 and abs(value - expected) <= 5 * phantom.noise_sd + 1, (s.uid, value, expected)
            checked += 1
    assert checked >= 5  # 6 of the 9 nodules have a voxel centre in their core at this shape


def test_class_1_rows_mark_every_nodule_and_class_0_rows_none(rehearsal):
    out = rehearsal.out
    nodules = defaultdict(list)
    for row in read_rows(out / "annotations.csv"):
        nodules[row["seriesuid"]].append(row)
    excluded = defaultdict(list)
    for row in read_rows(out / TABLES_IN_OUT["annotations_excluded.csv"]):
        excluded[row["seriesuid"]].append(row)
    candidates = read_rows(out / "candidates.csv")
    uids = [row["seriesuid"] for row in candidates]
    assert uids == sorted(uids)  # grouped by series in UID order, as the real table
    for k, uid in enumerate((out / TABLES_IN_OUT["seriesuids.csv"]).read_text().split()):
        rows = [row for row in candidates if row["seriesuid"] == uid]
        points, labels = xyz(rows), np.array([row["class"] for row in rows])
        assert len({tuple(p) for p in points}) == len(points)  # no row the build would drop as a duplicate
        geometry = Geometry.of_image(ct_of(out, k, uid))
        irc = xyz_to_irc(points, geometry)
        assert ((irc >= 0) & (irc < np.array(MIN_SHAPE))).all(), uid
        centres = xyz(nodules[uid])
        radii = np.array([float(row["diameter_mm"]) / 2 for row in nodules[uid]])
        gap = np.linalg.norm(points[:, None] - centres[None], axis=2)
        positive = labels == "1"
        assert (gap[~positive] > radii).all(), uid
        assert (gap[positive] <= POSITIVE_REACH * radii + 0.01).any(axis=1).all(), uid
        assert (gap[positive] <= radii).any(axis=0).all(), uid  # every nodule has a class-1 row
        # one class-0 row near each excluded finding, unless that finding lies in a nodule
        findings = xyz(excluded[uid])
        clear = (np.linalg.norm(findings[:, None] - centres[None], axis=2) > radii + FINDING_JITTER_MM).all(axis=1)
        near = np.linalg.norm(findings[clear, None] - points[None, ~positive], axis=2) <= FINDING_JITTER_MM + 0.01
        assert near.any(axis=1).all(), uid


def test_row_counts_scale_with_the_series(rehearsal):
    rows = read_rows(rehearsal.out / "candidates.csv")
    positives = sum(row["class"] == "1" for row in rows)
    assert len(rows) == rehearsal.candidates == round(551_065 * SERIES / 888) == 7447
    assert positives == rehearsal.positives == max(round(1351 * SERIES / 888), rehearsal.nodules) == 18


def test_full_scale_counts_are_luna16s(tables):
    series = read_series(tables)
    assert len(series) == 888 and sum(len(s.nodules) for s in series) == 1186
    assert sum(len(s.excluded) for s in series) == 35_192
    per_nodule, negatives = plan_counts(series, None)
    counts = np.concatenate(per_nodule)
    assert counts.sum() == 1351 and negatives.sum() == 551_065 - 1351
    assert counts.min() == 1 and (counts == 2).sum() == 165
    diameters = np.concatenate([s.nodules[:, 3] for s in series])
    assert diameters[counts == 2].min() >= diameters[counts == 1].max()  # the extra rows go to the largest
    assert (negatives >= [len(s.excluded) for s in series]).all()  # room for a row on every excluded finding
    with_malignancy = [m for s in series for m in s.malignant]
    assert sum(m is not None for m in with_malignancy) >= 1180


@pytest.mark.parametrize("total, weights, expected", [
    (10, [1, 1, 1], [4, 3, 3]),
    (5, [0, 2, 3], [0, 2, 3]),
    (3, [5, 0, 5], [2, 0, 1]),
    (0, [1, 2], [0, 0]),
])
def test_allot(total, weights, expected):
    assert allot(total, np.array(weights, dtype=float)).tolist() == expected


@pytest.mark.parametrize("diameters, total, expected", [
    ([5.0, 10.0, 3.0], 3, [1, 1, 1]),
    ([5.0, 10.0, 3.0], 5, [2, 2, 1]),
    ([5.0, 10.0, 3.0], 7, [2, 3, 2]),
    ([4.0, 4.0], 3, [2, 1]),
])
def test_positives_per_nodule(diameters, total, expected):
    assert positives_per_nodule(np.array(diameters), total).tolist() == expected


@pytest.mark.slow
def test_same_arguments_same_bytes_and_ct_k_whatever_the_series(rehearsal, tables, tmp_path, capsys):
    again = tmp_path / "again"
    stale = tmp_path / "again.partial"
    stale.mkdir()
    (stale / "half.raw").write_bytes(b"\0" * 10)  # what a killed run leaves
    assert main([str(again), "--tables", str(tables), "--shape", *map(str, MIN_SHAPE), "--seed", str(SEED),
                 "--series", str(SERIES), "--workers", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {SERIES} CTs to {again}: 7,447 candidates (18 class 1)")
    assert all_bytes(again) == all_bytes(rehearsal.out) and not stale.exists()
    fewer = make_rehearsal(tmp_path / "fewer", tables, MIN_SHAPE, SEED, n_series=3, n_candidates=40)
    cts = {path: data for path, data in all_bytes(fewer.out).items() if path.startswith("subset")}
    assert len(cts) == 6 and all(data == all_bytes(rehearsal.out)[path] for path, data in cts.items())
    other_seed = make_rehearsal(tmp_path / "other", tables, MIN_SHAPE, SEED + 1, n_series=1, n_candidates=40)
    ct = next(p for p in cts if p.endswith(".raw") and p.startswith("subset0"))
    assert all_bytes(other_seed.out)[ct] != cts[ct]


def test_bad_arguments(tables, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "out"), "--tables", str(tables), "--shape", "16", "128", "128"])
    assert exit_info.value.code == 2 and "--shape must be" in capsys.readouterr().err
    assert main([str(tmp_path / "out"), "--tables", str(tmp_path)]) == 1
    assert "lacks annotations.csv" in capsys.readouterr().err
    assert main([str(tmp_path / "out"), "--tables", str(tables), "--series", "889"]) == 1
    assert "--series 889 is more than the 888 series" in capsys.readouterr().err
    assert main([str(tmp_path / "out"), "--tables", str(tables), "--series", "12", "--candidates", "8"]) == 1
    assert "--candidates 8 is fewer than the 9 nodules" in capsys.readouterr().err


@pytest.mark.parametrize("uid", ["../../../victim", "/tmp/victim", "1.2,3", "1.2\n3"])
def test_a_series_that_cannot_name_its_files_is_refused_before_anything_is_written(tables, tmp_path, capsys, uid):
    """The uids of seriesuids.csv name the CTs' files: one holding a path, a comma or a line break is refused."""
    hostile = tmp_path / "tables"
    shutil.copytree(tables, hostile)
    listed = hostile / "seriesuids.csv"
    with open(listed, "w", newline="") as f:
        csv.writer(f).writerows([[uid], *csv.reader(open(tables / "seriesuids.csv", newline=""))])
    assert main([str(tmp_path / "out" / "luna"), "--tables", str(hostile), "--series", "2"]) == 1
    assert capsys.readouterr().err.startswith(f"error: {listed}: the series {uid!r} is not a uid that can name its "
                                              "files (LUNA16's are digits and dots)")
    assert not (tmp_path / "out").exists() and not (tmp_path / "victim.mhd").exists()


@pytest.mark.slow
def test_the_shard_build_joins_every_class_1_row_to_a_nodule(tables, tmp_path):
    data = make_rehearsal(tmp_path / "luna", tables, MIN_SHAPE, SEED, SERIES, n_candidates=120).out
    manifest = build(BuildOptions(
        data=data, out=tmp_path / "shards", candidates=data / "candidates.csv", annotations=data / "annotations.csv",
        excluded=data / TABLES_IN_OUT["annotations_excluded.csv"], malignancy=data / "annotations_with_malignancy.csv",
        workers=1, progress=False))
    rows = read_rows(data / "candidates.csv")
    assert manifest["counts"]["positives"] == sum(row["class"] == "1" for row in rows) == 9
    assert manifest["counts"]["samples"] == len(rows) == 120
    assert not manifest["bad_rows"] and not manifest["skipped"] and not manifest["failed"]
    candidates, bad, repeated = read_candidates(data / "candidates.csv")
    malignancy, _ = read_annotations(data / "annotations_with_malignancy.csv")
    joined = [c for c in join_annotations(candidates, read_annotations(data / "annotations.csv")[0], malignancy)
              if c.is_nodule]
    assert not bad and not repeated and len(joined) == 9 and all(c.diameter_mm > 0 and c.is_malignant is not None for c in joined)
