"""Parsing the LUNA16 CSVs, joining candidates with annotations, and dealing series into folds."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from luna_dist.tables.candidates import (
    N_FOLDS,
    Annotation,
    BadRow,
    Candidate,
    CsvError,
    assign_folds,
    find_series,
    folds_as_built,
    join_annotations,
    read_annotations,
    read_candidates,
)

UID_A = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100"
UID_B = "1.3.6.1.4.1.14519.5.2.1.6279.6001.200"
CANDIDATES_HEADER = "seriesuid,coordX,coordY,coordZ,class"


def data_lines(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[1:]


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# --- the synthetic tables ------------------------------------------------------------------------------
def test_synthetic_candidates_parse_completely(synth_data):
    path = synth_data / "candidates.csv"
    rows = data_lines(path)
    candidates, bad, _ = read_candidates(path)
    assert bad == []
    assert len(candidates) == len(rows) > 0
    assert sum(c.is_nodule for c in candidates) == sum(r[4] == "1" for r in rows) > 0
    assert [c.row for c in candidates] == list(range(len(rows)))
    for candidate, row in zip(candidates, rows):
        assert candidate.series_uid == row[0]
        assert candidate.center_xyz == (float(row[1]), float(row[2]), float(row[3]))
        assert candidate.is_nodule == (row[4] == "1")
        assert candidate.diameter_mm == 0.0 and candidate.is_malignant is None


def test_synthetic_annotations_parse_completely(synth_data):
    annotations, bad = read_annotations(synth_data / "annotations.csv")
    rows = data_lines(synth_data / "annotations.csv")
    assert bad == [] and len(annotations) == len(rows) > 0
    assert all(a.is_malignant is None for a in annotations)
    assert [a.diameter_mm for a in annotations] == [float(r[4]) for r in rows]

    malignancy, bad = read_annotations(synth_data / "annotations_with_malignancy.csv")
    rows = data_lines(synth_data / "annotations_with_malignancy.csv")
    assert bad == [] and len(malignancy) == len(rows) == len(annotations)
    assert [m.is_malignant for m in malignancy] == [r[5] == "True" for r in rows]
    assert {m.is_malignant for m in malignancy} == {True, False}


def test_synthetic_nodule_candidates_all_find_their_annotation(synth_data):
    candidates = read_candidates(synth_data / "candidates.csv")[0]
    annotations, _ = read_annotations(synth_data / "annotations.csv")
    malignancy, _ = read_annotations(synth_data / "annotations_with_malignancy.csv")
    joined = join_annotations(candidates, annotations, malignancy)
    assert [c.row for c in joined] == [c.row for c in candidates]
    for candidate in joined:
        if candidate.is_nodule:
            assert candidate.diameter_mm in {a.diameter_mm for a in annotations if a.series_uid == candidate.series_uid}
            assert candidate.is_malignant in (True, False)
        else:
            assert candidate.diameter_mm == 0.0 and candidate.is_malignant is None


# --- malformed rows ------------------------------------------------------------------------------------
MIXED_ROWS = [
    # (line text, problem substring or None for a good row)
    (f"{UID_A},1.5,-2.25,-300.0,0", None),
    (f"{UID_A},1.5,-2.25,-300.0", "expected 5 fields, found 4"),
    (f"{UID_A},1.5,-2.25,-300.0,1", None),
    (f"{UID_A},1.5,abc,-300.0,0", "coordY is not a number"),
    (f"{UID_A},1.5,2.0,3.0,2", "class must be 0 or 1"),
    (f"{UID_B},nan,2.0,3.0,0", "coordX is not finite"),
    (f"{UID_B},1.0,2.0,inf,0", "coordZ is not finite"),
    (",1.0,2.0,3.0,0", "empty seriesuid"),
    (f"{UID_B},1.0,2.0,3.0,0,extra", "expected 5 fields, found 6"),
    (f"{UID_B}, 4.0 , 5.0 , 6.0 , 1 ", None),
    (f"{UID_B},1.0,2.0,3.0,", "class must be 0 or 1"),
    (f"{UID_B},7,8,9,0", None),
]


def test_malformed_rows_are_reported_with_their_line(tmp_path):
    path = write(tmp_path / "candidates.csv", [CANDIDATES_HEADER] + [line for line, _ in MIXED_ROWS])
    candidates, bad, _ = read_candidates(path)
    expected_bad = [(n + 2, problem) for n, (_, problem) in enumerate(MIXED_ROWS) if problem]
    assert [(b.line, b.path) for b in bad] == [(line, str(path)) for line, _ in expected_bad]
    for row, (line, problem) in zip(bad, expected_bad):
        assert isinstance(row, BadRow)
        assert problem in row.problem
        assert str(row) == f"{path}:{line}: {row.problem}"
    good = [n for n, (_, problem) in enumerate(MIXED_ROWS) if problem is None]
    assert [c.row for c in candidates] == good  # 0-based data row = line - 2, gaps where rows were dropped
    assert candidates[0] == Candidate(0, UID_A, (1.5, -2.25, -300.0), False)
    assert candidates[1] == Candidate(2, UID_A, (1.5, -2.25, -300.0), True)
    assert candidates[2] == Candidate(9, UID_B, (4.0, 5.0, 6.0), True)  # whitespace around fields is fine
    assert candidates[3] == Candidate(11, UID_B, (7.0, 8.0, 9.0), False)


def test_blank_lines_are_skipped_and_line_numbers_stay_physical(tmp_path):
    path = write(tmp_path / "candidates.csv", [CANDIDATES_HEADER, f"{UID_A},1,2,3,0", "", f"{UID_A},1,2,x,0",
                                               f"{UID_A},4,5,6,1"])
    candidates, bad, _ = read_candidates(path)
    assert [b.line for b in bad] == [4]
    assert [c.row for c in candidates] == [0, 3]


def test_a_byte_order_mark_and_blank_lines_before_the_header_are_not_part_of_it(tmp_path):
    lines = [CANDIDATES_HEADER, f"{UID_A},1,2,3,0", f"{UID_A},4,5,6,1"]
    plain = read_candidates(write(tmp_path / "plain.csv", lines))
    path = tmp_path / "bom.csv"
    path.write_text("\ufeff\n" + "\n".join(lines) + "\n", encoding="utf-8")
    candidates, bad, _ = read_candidates(path)
    assert bad == [] and candidates == plain[0]  # rows count from the header, wherever it is


def test_extra_columns_and_column_order_are_fine(tmp_path):
    path = write(tmp_path / "candidates.csv", ["class,note,coordZ,coordY,coordX,seriesuid", f"1,hello,3,2,1,{UID_A}"])
    candidates, bad, _ = read_candidates(path)
    assert bad == []
    assert candidates == [Candidate(0, UID_A, (1.0, 2.0, 3.0), True)]


def test_duplicate_rows_are_reported_and_kept_once(tmp_path):
    """Same series, same centre as numbers and same class: one candidate, the first row's."""
    path = write(tmp_path / "candidates.csv", [CANDIDATES_HEADER, f"{UID_A},1.5,2,3,1", f"{UID_A},1.50,2.0,3,1",
                                               f"{UID_A},1.5,2,3,0", f"{UID_B},1.5,2,3,1", f"{UID_A},1.5,2,3,1"])
    candidates, bad, repeated = read_candidates(path)
    assert bad == []  # not malformed: they count apart from the rows that cannot be read
    assert [(r.line, r.problem) for r in repeated] == [(3, "duplicate of line 2"), (6, "duplicate of line 2")]
    assert [(c.row, c.series_uid, c.is_nodule) for c in candidates] == [(0, UID_A, True), (2, UID_A, False),
                                                                         (3, UID_B, True)]


@pytest.mark.parametrize("column", ["seriesuid", "coordX", "coordY", "coordZ", "class"])
def test_missing_column_raises_csv_error_naming_it(tmp_path, column):
    header = [name for name in CANDIDATES_HEADER.split(",") if name != column]
    path = write(tmp_path / "candidates.csv", [",".join(header), ",".join(["1"] * len(header))])
    with pytest.raises(CsvError) as err:
        read_candidates(path)
    assert column in str(err.value)
    assert str(path) in str(err.value)


def test_missing_and_empty_csv(tmp_path):
    with pytest.raises(CsvError, match="not found"):
        read_candidates(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(CsvError, match="empty"):
        read_candidates(tmp_path / "empty.csv")
    with pytest.raises(CsvError, match="diameter_mm"):
        read_annotations(write(tmp_path / "a.csv", [CANDIDATES_HEADER]))


@pytest.mark.parametrize(
    "text, expected",
    [("True", True), ("False", False), ("true", True), ("FALSE", False), ("1", True), ("0", False),
     (" yes ", True), ("no", False)],
)
def test_mal_bool_parsing(tmp_path, text, expected):
    path = write(tmp_path / "mal.csv", ["seriesuid,coordX,coordY,coordZ,diameter_mm,mal_bool",
                                        f"{UID_A},1,2,3,5.5,{text}"])
    annotations, bad = read_annotations(path)
    assert bad == []
    assert annotations == [Annotation(UID_A, (1.0, 2.0, 3.0), 5.5, expected)]


def test_bad_annotation_rows(tmp_path):
    path = write(tmp_path / "mal.csv", [
        "seriesuid,coordX,coordY,coordZ,diameter_mm,mal_bool",
        f"{UID_A},1,2,3,5.5,maybe",
        f"{UID_A},1,2,3,0,True",
        f"{UID_A},1,2,3,-4,True",
        f"{UID_A},1,2,3,big,True",
        f"{UID_A},1,2,3,nan,False",
        f"{UID_A},1,2,3,6,",
        f"{UID_A},1,2,3,7,False",
    ])
    annotations, bad = read_annotations(path)
    assert [b.line for b in bad] == [2, 3, 4, 5, 6, 7]
    assert "mal_bool" in bad[0].problem and "maybe" in bad[0].problem
    assert all("diameter_mm" in b.problem for b in bad[1:5])
    assert "mal_bool" in bad[5].problem
    assert annotations == [Annotation(UID_A, (1.0, 2.0, 3.0), 7.0, False)]


# --- join ---------------------------------------------------------------------------------------------
ANNOTATIONS = [
    Annotation(UID_A, (0.0, 0.0, 0.0), 10.0),  # radius 5
    Annotation(UID_A, (6.0, 0.0, 0.0), 8.0),  # radius 4, overlaps the first between x = 2 and 5
    Annotation(UID_A, (100.0, 0.0, 0.0), 20.0),  # radius 10, far away
    Annotation(UID_B, (50.0, 50.0, 50.0), 6.0),
]
MALIGNANCY = [
    Annotation(UID_A, (0.0, 0.0, 0.0), 10.0, True),
    Annotation(UID_A, (6.0, 0.0, 0.0), 8.0, False),
    Annotation(UID_A, (100.0, 0.0, 0.0), 20.0, False),
    Annotation(UID_B, (50.0, 50.0, 50.0), 6.0, True),
]


@pytest.mark.parametrize(
    "uid, xyz, is_nodule, diameter, malignant",
    [
        (UID_A, (0.0, 1.0, -1.0), True, 10.0, True),  # inside the first only
        (UID_A, (1.9, 0.0, 0.0), True, 10.0, True),  # inside the first only, near the second
        (UID_A, (2.5, 0.0, 0.0), True, 10.0, True),  # inside both, nearer the first
        (UID_A, (3.5, 0.0, 0.0), True, 8.0, False),  # inside both, nearer the second
        (UID_A, (9.5, 0.0, 0.0), True, 8.0, False),  # inside the second only
        (UID_A, (0.0, 0.0, 5.01), True, 0.0, None),  # just outside the first
        (UID_A, (50.0, 0.0, 0.0), True, 0.0, None),  # outside all
        (UID_A, (105.0, 3.0, 0.0), True, 20.0, False),  # the far annotation
        (UID_A, (0.0, 0.0, 0.0), False, 0.0, None),  # a non-nodule is never matched
        (UID_B, (0.0, 0.0, 0.0), True, 0.0, None),  # A's annotations do not count for B
        (UID_B, (51.0, 50.0, 50.0), True, 6.0, True),
        ("1.2.3", (0.0, 0.0, 0.0), True, 0.0, None),  # a series without annotations
    ],
)
def test_join_rule(uid, xyz, is_nodule, diameter, malignant):
    candidate = Candidate(7, uid, xyz, is_nodule)
    [joined] = join_annotations([candidate], ANNOTATIONS, MALIGNANCY)
    assert joined.diameter_mm == diameter
    assert joined.is_malignant is malignant
    assert (joined.row, joined.series_uid, joined.center_xyz, joined.is_nodule) == (7, uid, xyz, is_nodule)


def test_join_without_malignancy_table_leaves_malignancy_unknown():
    candidates = [Candidate(0, UID_A, (0.0, 0.0, 0.0), True), Candidate(1, UID_A, (3.5, 0.0, 0.0), True)]
    joined = join_annotations(candidates, ANNOTATIONS)
    assert [(c.diameter_mm, c.is_malignant) for c in joined] == [(10.0, None), (8.0, None)]


def test_join_keeps_order_and_count():
    candidates = [Candidate(n, UID_A if n % 2 else UID_B, (float(n), 0.0, 0.0), n % 3 == 0) for n in range(30)]
    joined = join_annotations(candidates, ANNOTATIONS, MALIGNANCY)
    assert [c.row for c in joined] == list(range(30))
    assert all(j.is_nodule == c.is_nodule for j, c in zip(joined, candidates))


# --- folds --------------------------------------------------------------------------------------------
def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    return path


def test_subset_folder_gives_the_fold(tmp_path):
    series = {f"uid{k}": touch(tmp_path / f"subset{k}" / f"uid{k}.mhd") for k in (0, 3, 9)}
    series["extra"] = touch(tmp_path / "subset3" / "extra.mhd")
    assert assign_folds(series) == {"uid0": 0, "uid3": 3, "uid9": 9, "extra": 3}


def test_synthetic_data_folds_are_its_subsets(synth_data):
    series = find_series(synth_data)
    assert len(series) == len(list(synth_data.glob("subset*/*.raw"))) == 10
    folds = assign_folds(series)
    for uid, path in series.items():
        assert path.parent.name == f"subset{folds[uid]}"
    assert set(folds.values()) == set(range(10))


def test_no_subset_folders_round_robin_in_sorted_uid_order(tmp_path):
    uids = [f"1.2.{n}" for n in (17, 3, 250, 4, 99, 8, 1000, 21, 5, 6, 7, 11, 12)]
    series = {uid: tmp_path / "flat" / f"{uid}.mhd" for uid in reversed(uids)}  # listing order must not matter
    folds = assign_folds(series)
    assert folds == {uid: n % N_FOLDS for n, uid in enumerate(sorted(uids))}
    assert set(folds) == set(uids)


def test_mixed_subset_and_loose_series(tmp_path):
    series = {
        "b": tmp_path / "subset5" / "b.mhd",
        "a": tmp_path / "loose" / "a.mhd",
        "c": tmp_path / "subset10" / "c.mhd",  # LUNA16 has subsets 0-9 only: treated as loose
        "d": tmp_path / "subset" / "d.mhd",
        "e": tmp_path / "mysubset2x" / "e.mhd",
    }
    assert assign_folds(series) == {"b": 5, "a": 0, "c": 1, "d": 2, "e": 3}


def test_find_series_and_no_series_in_two_folds(tmp_path):
    for k in range(4):
        touch(tmp_path / f"subset{k}" / f"1.2.{k}.mhd")
        touch(tmp_path / f"subset{k}" / f"1.2.{k}.raw")
    touch(tmp_path / "other" / "1.2.99.mhd")
    series = find_series(tmp_path)
    assert set(series) == {"1.2.0", "1.2.1", "1.2.2", "1.2.3", "1.2.99"}
    folds = assign_folds(series)
    assert len(folds) == len(series)  # one fold per series, so none sits in two
    assert [folds[f"1.2.{k}"] for k in range(4)] == [0, 1, 2, 3]

    touch(tmp_path / "subset7" / "1.2.2.mhd")  # the same series twice
    with pytest.raises(CsvError, match="1.2.2"):
        find_series(tmp_path)


def test_symlinked_folders_are_followed_and_a_link_to_a_folder_above_is_not_walked_again(tmp_path):
    """Subsets kept on another disk and linked in are folds like the others; a link back up (a loop) is walked
    once, not for ever; the same folder linked in twice holds its series twice, which is refused."""
    data, disk = tmp_path / "data", tmp_path / "disk2"
    touch(data / "subset0" / "1.2.0.mhd")
    touch(disk / "subset1" / "1.2.1.mhd")
    touch(disk / "more" / "subset2" / "1.2.2.mhd")
    (data / "subset1").symlink_to(disk / "subset1", target_is_directory=True)
    (data / "more").symlink_to(disk / "more", target_is_directory=True)
    (data / "subset0" / "up").symlink_to(data, target_is_directory=True)
    series = find_series(data)
    assert series == {"1.2.0": data / "subset0" / "1.2.0.mhd", "1.2.1": data / "subset1" / "1.2.1.mhd",
                      "1.2.2": data / "more" / "subset2" / "1.2.2.mhd"}
    assert folds_as_built(series, ()) == {"1.2.0": 0, "1.2.1": 1, "1.2.2": 2}
    (data / "again").symlink_to(disk / "subset1", target_is_directory=True)
    with pytest.raises(CsvError, match=rf"series 1.2.1 is present twice: {data / 'again' / '1.2.1.mhd'} and "
                                       rf"{data / 'subset1' / '1.2.1.mhd'}; remove one"):
        find_series(data)
