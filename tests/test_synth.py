"""The synthetic data set must look like LUNA16 to every reader: formats, geometry, labels."""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import luna_dist.synthetic.generator
from luna_dist.imaging.chunks import CHUNK_SHAPE
from luna_dist.synth import main
from luna_dist.synthetic.generator import (
    ANNOTATIONS_HEADER,
    CANDIDATES_HEADER,
    MALIGNANCY_HEADER,
    SERIES_UID_PREFIX,
    make_dataset,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("synth") / "luna", n_cts=10, seed=0)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def xyz(row: dict[str, str]) -> tuple[float, float, float]:
    return float(row["coordX"]), float(row["coordY"]), float(row["coordZ"])


def images(summary) -> dict[str, sitk.Image]:
    return {uid: sitk.ReadImage(str(p)) for uid, p in zip(summary.series_uids, summary.mhd_paths)}


def all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_exact_headers(dataset):
    root = dataset.out
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(f"subset{k}" for k in range(10))
    for k, (uid, mhd) in enumerate(zip(dataset.series_uids, dataset.mhd_paths)):
        assert mhd == root / f"subset{k % 10}" / f"{uid}.mhd"
        assert mhd.with_suffix(".raw").is_file()
        assert "CompressedData = False" in mhd.read_text()
    assert dataset.candidates_csv.read_text().splitlines()[0] == CANDIDATES_HEADER
    assert dataset.annotations_csv.read_text().splitlines()[0] == ANNOTATIONS_HEADER
    assert dataset.malignancy_csv.read_text().splitlines()[0] == MALIGNANCY_HEADER
    assert CANDIDATES_HEADER == "seriesuid,coordX,coordY,coordZ,class"
    assert ANNOTATIONS_HEADER == "seriesuid,coordX,coordY,coordZ,diameter_mm"
    assert MALIGNANCY_HEADER == "seriesuid,coordX,coordY,coordZ,diameter_mm,mal_bool"


def test_series_uids_look_like_luna16(dataset):
    uids = dataset.series_uids
    assert len(set(uids)) == len(uids) == 10
    for uid in uids:
        assert uid.startswith(SERIES_UID_PREFIX)
        tail = uid[len(SERIES_UID_PREFIX):]
        assert tail.isdigit() and len(tail) == 30 and tail[0] != "0"


def test_images_have_real_formats_and_varied_geometry(dataset):
    slice_counts = []
    for img in images(dataset).values():
        assert img.GetPixelID() == sitk.sitkInt16
        assert img.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
        sx, sy, sz = img.GetSpacing()
        assert sx == sy and 0.5 <= sx <= 0.9
        assert 0.6 <= sz <= 2.5
        ox, oy, oz = img.GetOrigin()
        assert -250 <= ox <= -150 and -250 <= oy <= -150 and -400 <= oz <= -100
        assert all(o != round(o) for o in (ox, oy, oz))
        columns, rows, slices = img.GetSize()
        assert (rows, columns) == (160, 160) and 60 <= slices <= 100
        slice_counts.append(slices)
        hu = sitk.GetArrayViewFromImage(img)
        assert hu.min() >= -1024 and hu.max() > 400  # air and bone (the spine)
    assert len(set(slice_counts)) > 5


def test_annotations_one_to_three_nodules_per_ct(dataset):
    annotations = read_rows(dataset.annotations_csv)
    malignancy = read_rows(dataset.malignancy_csv)
    per_ct = Counter(r["seriesuid"] for r in annotations)
    assert set(per_ct) == set(dataset.series_uids)
    assert all(1 <= n <= 3 for n in per_ct.values())
    assert all(4 <= float(r["diameter_mm"]) <= 30 for r in annotations)
    assert len(annotations) == dataset.n_annotations
    # Same nodules in both tables, and both classes present.
    assert [{k: r[k] for k in annotations[0]} for r in malignancy] == annotations
    labels = Counter(r["mal_bool"] for r in malignancy)
    assert set(labels) == {"True", "False"} and labels["True"] == dataset.n_malignant


def test_candidates_per_ct_and_near_their_nodule(dataset):
    candidates = read_rows(dataset.candidates_csv)
    annotations = read_rows(dataset.annotations_csv)
    assert len(candidates) == dataset.n_candidates
    assert sum(r["class"] == "1" for r in candidates) == dataset.n_positive_candidates
    uids_in_order = [r["seriesuid"] for r in candidates]
    assert uids_in_order == sorted(uids_in_order)  # grouped by series, as in LUNA16
    assert set(uids_in_order) == set(dataset.series_uids)
    nodules = defaultdict(list)
    for r in annotations:
        nodules[r["seriesuid"]].append((np.array(xyz(r)), float(r["diameter_mm"])))
    for uid in dataset.series_uids:
        rows = [r for r in candidates if r["seriesuid"] == uid]
        negatives = [np.array(xyz(r)) for r in rows if r["class"] == "0"]
        positives = [np.array(xyz(r)) for r in rows if r["class"] == "1"]
        assert 200 <= len(negatives) <= 500
        assert len(positives) >= len(nodules[uid])
        for p in positives:  # jittered by at most a quarter diameter, plus rounding
            assert min(np.linalg.norm(p - c) - d / 4 for c, d in nodules[uid]) < 0.01
        for n in negatives:
            assert all(np.linalg.norm(n - c) > d - 0.01 for c, d in nodules[uid])
    assert all(len(r["coordX"].split(".")[1]) == 2 for r in candidates)


def test_nodule_centres_are_dense_in_dark_lung(dataset):
    imgs = images(dataset)
    ring_medians = []
    for r in read_rows(dataset.annotations_csv):
        img = imgs[r["seriesuid"]]
        hu = sitk.GetArrayViewFromImage(img)
        col, row, sl = img.TransformPhysicalPointToIndex(xyz(r))
        assert hu[sl, row, col] > -300
        # Around the nodule, in its axial slice, lies lung parenchyma (about -850 HU);
        # lobes, spicules and vessels may cover part of that ring.
        radius = float(r["diameter_mm"]) / 2
        sx, sy, _ = img.GetSpacing()
        rows, cols = np.ogrid[: hu.shape[1], : hu.shape[2]]
        dist = np.hypot((rows - row) * sy, (cols - col) * sx)
        ring = hu[sl][(dist >= 1.25 * radius) & (dist <= 1.25 * radius + 2)]
        assert np.percentile(ring, 25) < -500
        assert -900 < np.median(ring[ring < -500]) < -800
        ring_medians.append(np.median(ring))
    assert np.median(ring_medians) < -500


def test_malignancy_is_visible_as_density(dataset):
    imgs = images(dataset)
    malignant, benign = [], []
    for r in read_rows(dataset.malignancy_csv):
        img = imgs[r["seriesuid"]]
        hu = sitk.GetArrayViewFromImage(img)
        col, row, sl = img.TransformPhysicalPointToIndex(xyz(r))
        core = hu[sl, row - 1 : row + 2, col - 1 : col + 2]
        (malignant if r["mal_bool"] == "True" else benign).append(float(np.median(core)))
    soft_benign = [v for v in benign if v < 300]  # calcified cores are brighter still
    assert np.mean(malignant) > np.mean(soft_benign) + 30


def test_candidates_lie_inside_and_some_near_the_border(dataset):
    imgs = images(dataset)
    half = np.array(CHUNK_SHAPE) // 2
    near_border = 0
    for r in read_rows(dataset.candidates_csv):
        img = imgs[r["seriesuid"]]
        irc = np.array(img.TransformPhysicalPointToIndex(xyz(r))[::-1])
        size = np.array(img.GetSize()[::-1])
        assert (irc >= 0).all() and (irc < size).all()
        if r["class"] == "0" and (np.minimum(irc, size - 1 - irc) < half).any():
            near_border += 1
    assert near_border >= 10


def test_excluded_findings_are_tiny_nodules_and_lookalikes_away_from_the_nodules(dataset):
    rows = read_rows(dataset.excluded_csv)
    assert dataset.excluded_csv.read_text().splitlines()[0] == ANNOTATIONS_HEADER
    assert len(rows) == dataset.n_excluded
    assert {r["seriesuid"] for r in rows} == set(dataset.series_uids)  # every CT has a look-alike at least
    diameters = np.array([float(r["diameter_mm"]) for r in rows])
    assert ((diameters == -1) | ((diameters > 0) & (diameters < 3))).all()
    assert (diameters == -1).sum() >= 10 and (diameters > 0).sum() >= 3
    nodules = defaultdict(list)
    for r in read_rows(dataset.annotations_csv):
        nodules[r["seriesuid"]].append((np.array(xyz(r)), float(r["diameter_mm"])))
    for r in rows:
        if float(r["diameter_mm"]) > 0:
            assert all(np.linalg.norm(np.array(xyz(r)) - c) > d + 5 for c, d in nodules[r["seriesuid"]])


def test_excluded_findings_leave_every_other_file_as_it_was(tmp_path, monkeypatch):
    """They draw from their own stream: without them, the CTs and the other tables are the same bytes."""

    with_excluded = all_bytes(make_dataset(tmp_path / "with", n_cts=2, seed=4).out)
    monkeypatch.setattr(luna_dist.synthetic.generator, "draw_excluded", lambda seed, k, ph: (np.zeros((0, 3)), np.zeros(0)))
    without = all_bytes(make_dataset(tmp_path / "without", n_cts=2, seed=4).out)
    assert without.pop("annotations_excluded.csv") == (ANNOTATIONS_HEADER + "\n").encode()
    assert with_excluded.pop("annotations_excluded.csv").count(b"\n") > 2
    assert with_excluded == without


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = make_dataset(tmp_path / "a", n_cts=2, seed=7)
    b = make_dataset(tmp_path / "b", n_cts=2, seed=7)
    c = make_dataset(tmp_path / "c", n_cts=2, seed=8)
    assert all_bytes(a.out) == all_bytes(b.out)
    assert not set(a.series_uids) & set(c.series_uids)
    assert a.candidates_csv.read_text() != c.candidates_csv.read_text()


def test_ct_k_does_not_depend_on_the_number_of_cts(tmp_path, capsys):
    main([str(tmp_path / "two"), "--cts", "2", "--seed", "3"])
    main([str(tmp_path / "three"), "--cts", "3", "--seed", "3"])
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and printed[0].startswith("wrote 2 CTs") and printed[1].startswith("wrote 3 CTs")
    two, three = all_bytes(tmp_path / "two"), all_bytes(tmp_path / "three")
    assert len([p for p in three if p.endswith(".raw")]) == 3
    for path, data in two.items():
        if not path.endswith(".csv"):
            assert three[path] == data
    two_uids = {r["seriesuid"] for r in read_rows(tmp_path / "two" / "candidates.csv")}
    for name in ("candidates.csv", "annotations.csv", "annotations_with_malignancy.csv", "annotations_excluded.csv"):
        lines = (tmp_path / "three" / name).read_text().splitlines()
        kept = [lines[0]] + [line for line in lines[1:] if line.split(",")[0] in two_uids]
        assert kept == (tmp_path / "two" / name).read_text().splitlines()


def test_shape_sets_rows_columns_and_slice_count(tmp_path):
    summary = make_dataset(tmp_path, n_cts=3, seed=1, shape=(40, 136, 144))
    for img in images(summary).values():
        columns, rows, slices = img.GetSize()
        assert (rows, columns) == (136, 144)
        assert 30 <= slices <= 50


def test_too_small_shape_is_refused(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        make_dataset(tmp_path, n_cts=1, shape=(8, 32, 32))
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--shape", "8", "32", "32"])
