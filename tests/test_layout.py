"""The LUNA16 download as it comes: its tables found where it puts them, or named missing with the flag
to pass; the real tables read as they are; bad input at the real scale found before anything is written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import real_table

from luna_dist.shards.build import build
from luna_dist.shards.inputs import InputError, read_inputs
from luna_dist.shards.options import BuildOptions
from luna_dist.tables.candidates import CsvError, read_annotations, read_series_list
from luna_dist.tables.layout import find_tables

CANDIDATES = "seriesuid,coordX,coordY,coordZ,class\n"


def download(root: Path, candidates_v2: str = CANDIDATES + "1.2,0,0,0,0\n") -> Path:
    """A folder laid out as the LUNA16 download unpacks: subsets, the tables at the top and in folders of
    their own, the evaluation kit with its copy of annotations.csv."""
    for n in range(10):
        (root / f"subset{n}").mkdir(parents=True)
    real_table("annotations.csv", root / "annotations.csv")
    (root / "candidates.csv").write_text(CANDIDATES + "1.2,0,0,0,0\n1.2,1,1,1,0\n")
    (root / "candidates_V2").mkdir()
    (root / "candidates_V2" / "candidates_V2.csv").write_text(candidates_v2)
    kit = root / "evaluationScript" / "annotations"
    real_table("annotations_excluded.csv", kit / "annotations_excluded.csv")
    real_table("seriesuids.csv", kit / "seriesuids.csv")
    shutil.copy(root / "annotations.csv", kit / "annotations.csv")
    return root


def test_the_download_layout_is_found_and_v2_preferred(tmp_path):
    root = download(tmp_path / "LUNA16")
    found = find_tables(root, {})
    kit = root / "evaluationScript" / "annotations"
    assert found.paths == {"candidates": root / "candidates_V2" / "candidates_V2.csv",
                           "annotations": root / "annotations.csv",  # the top copy, the kit's is the same file
                           "excluded": kit / "annotations_excluded.csv", "series_list": kit / "seriesuids.csv",
                           "malignancy": None}
    assert len(found.notes) == 1 and "candidates.csv" in found.notes[0] and "should not be used" in found.notes[0]
    report = found.report()
    assert all(str(path) in report for path in found.paths.values() if path)


def test_a_flag_wins_over_the_layout(tmp_path):
    root = download(tmp_path / "LUNA16")
    found = find_tables(root, {"candidates": root / "candidates.csv"})
    assert found.paths["candidates"] == root / "candidates.csv" and not found.notes
    with pytest.raises(CsvError, match=r"--annotations .*nowhere.csv: no such file"):
        find_tables(root, {"annotations": root / "nowhere.csv"})


@pytest.mark.parametrize("missing, flag", [("annotations", "--annotations"), ("candidates", "--candidates")])
def test_a_missing_table_is_named_with_its_flag(tmp_path, missing, flag):
    root = download(tmp_path / "LUNA16")
    for path in root.rglob(f"{missing}*.csv"):
        path.unlink()
    with pytest.raises(CsvError, match=rf"no {missing}.*\.csv .*{root}.*pass {flag} PATH"):
        find_tables(root, {})


def test_two_different_copies_at_one_depth_are_refused(tmp_path):
    root = download(tmp_path / "LUNA16")
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "candidates_V2.csv").write_text(CANDIDATES + "1.3,0,0,0,0\n")
    with pytest.raises(CsvError, match=r"candidates_V2.csv and .*candidates_V2.csv differ; pass --candidates"):
        find_tables(root, {})


@pytest.mark.slow
def test_the_real_tables_read_as_they_are(tmp_path):
    """The 14-column malignancy table with its quoted lists, 35,192 excluded findings with 30,513 of diameter
    -1, and the kit's series list without a header."""
    malignancy, bad = read_annotations(real_table("annotations_with_malignancy.csv", tmp_path / "m.csv"))
    assert (len(malignancy), bad, sum(row.is_malignant for row in malignancy)) == (1182, [], 378)
    assert len({row.series_uid for row in malignancy}) == 600
    excluded, bad = read_annotations(real_table("annotations_excluded.csv", tmp_path / "e.csv"),
                                     allow_unknown_diameter=True)
    assert (len(excluded), bad, sum(row.diameter_mm == -1 for row in excluded)) == (35192, [], 30513)
    assert len({row.series_uid for row in excluded}) == 888
    series = read_series_list(real_table("seriesuids.csv", tmp_path / "s.csv"))
    assert len(series) == len(set(series)) == 888  # the first line is a series, not a header
    nodules, bad = read_annotations(real_table("annotations.csv", tmp_path / "a.csv"))
    assert (len(nodules), bad, len({row.series_uid for row in nodules})) == (1186, [], 601)
    assert {row.series_uid for row in nodules} | {row.series_uid for row in excluded} <= set(series)


@pytest.fixture(scope="module")
def full_download(tmp_path_factory) -> Path:
    """The real tables and 888 series in subset{k % 10}, each a (never read) .mhd; a candidate table of one
    row per nodule and one per series. Enough for every check made before a CT is read."""
    root = tmp_path_factory.mktemp("luna16") / "LUNA16"
    nodules, _ = read_annotations(real_table("annotations.csv", root / "annotations.csv"))
    kit = root / "evaluationScript" / "annotations"
    series = read_series_list(real_table("seriesuids.csv", kit / "seriesuids.csv"))
    real_table("annotations_excluded.csv", kit / "annotations_excluded.csv")
    rows = [f"{n.series_uid},{','.join(map(str, n.center_xyz))},1" for n in nodules]
    rows += [f"{uid},0,0,0,0" for uid in series]
    (root / "candidates_V2.csv").write_text(CANDIDATES + "\n".join(rows) + "\n")
    for k, uid in enumerate(series):
        (root / f"subset{k % 10}").mkdir(exist_ok=True)
        (root / f"subset{k % 10}" / f"{uid}.mhd").touch()
    return root


def inputs_of(root: Path, **given):
    return read_inputs(root, {"candidates": None, "annotations": None, "malignancy": None, "excluded": None,
                              "series_list": None, **given}, strict=False, max_bad_rows=1.0)


@pytest.mark.slow
def test_the_full_download_reads_clean(full_download):
    inputs = inputs_of(full_download)
    assert (len(inputs.series), len(inputs.candidates), inputs.warnings, inputs.skipped, inputs.unlisted) == \
        (888, 1186 + 888, [], [], [])
    assert len(inputs.findings["excluded"]) == 35192
    assert inputs.tables["series_list"]["rows"] == 888


@pytest.mark.slow
def test_a_missing_subset_folder_is_named(full_download, tmp_path):
    subset = full_download / "subset4"
    hidden = tmp_path / "subset4"
    shutil.move(subset, hidden)
    try:
        inputs = inputs_of(full_download)
        assert len(inputs.skipped) == 89 and len(inputs.series) == 888 - 89
        (warning,) = inputs.warnings
        assert "89 series of" in warning and "no subset4/ folder" in warning and "\n" not in warning
        with pytest.raises(InputError, match="no subset4/ folder"):
            read_inputs(full_download, {name: None for name in ("candidates", "annotations", "malignancy",
                                                                "excluded", "series_list")}, True, 1.0)
    finally:
        shutil.move(hidden, subset)


@pytest.mark.slow
def test_a_table_of_other_series_is_refused(full_download, tmp_path):
    """Annotations of another data set: not one of its series is in the candidate table."""
    other = tmp_path / "annotations.csv"
    other.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3,0,0,0,5\n1.2.4,0,0,0,6\n")
    with pytest.raises(InputError, match=rf"{other}: none of its 2 series is in .*candidates_V2.csv .*888 series.*"
                                         "another data set.*--annotations"):
        inputs_of(full_download, annotations=other)


@pytest.mark.slow
def test_cts_in_no_table_are_reported_and_left_out(full_download):
    extra = full_download / "subset0" / "1.2.840.99.mhd"
    extra.touch()
    try:
        inputs = inputs_of(full_download)
        assert inputs.unlisted == ["1.2.840.99"] and "1.2.840.99" not in inputs.series
        (warning,) = inputs.warnings
        assert "1 CT(s) under" in warning and str(extra) in warning and "\n" not in warning
    finally:
        extra.unlink()


def test_a_build_from_the_download_layout(tiny_data, tmp_path, capsys):
    """The synthetic set laid out as the download: the build finds each table, says which, and builds from V2."""
    root = tmp_path / "LUNA16"
    shutil.copytree(tiny_data, root)
    kit = root / "evaluationScript" / "annotations"
    kit.mkdir(parents=True)
    shutil.move(root / "annotations_excluded.csv", kit / "annotations_excluded.csv")
    lines = (root / "candidates.csv").read_text().splitlines(keepends=True)
    (root / "candidates_V2").mkdir()
    v2 = [lines[0]] + [line for line in lines[1:] if line.rstrip().endswith(",1")] + lines[1:4]
    (root / "candidates_V2" / "candidates_V2.csv").write_text("".join(dict.fromkeys(v2)))
    manifest = build(BuildOptions(data=root, out=tmp_path / "out", workers=1, progress=False))
    printed = capsys.readouterr().out
    assert str(root / "candidates_V2" / "candidates_V2.csv") in printed and "should not be used" in printed
    assert str(kit / "annotations_excluded.csv") in printed
    assert manifest["tables"]["candidates"]["path"] == str(root / "candidates_V2" / "candidates_V2.csv")
    assert manifest["counts"]["samples"] == len(dict.fromkeys(v2)) - 1
    assert sum(len(fold["excluded"]) for fold in manifest["folds"].values()) > 0


@pytest.mark.slow
def test_the_analysis_scores_with_the_tables_where_the_download_puts_them(tmp_path):
    """analyze reads its answer tables as the build finds them: the kit's excluded findings included."""
    from luna_dist.analysis.findings import read_truth

    root = download(tmp_path / "LUNA16")
    truth = read_truth(root)
    assert len(truth.findings.series) == len(truth.nodules) == 1186
    assert truth.excluded is not None and len(truth.excluded.series) == 35192
    real_table("annotations_with_malignancy.csv", root / "annotations_with_malignancy.csv")
    assert sum(bool(n.is_malignant) for n in read_truth(root).nodules) == 378


@pytest.mark.slow
def test_a_candidate_table_of_the_real_excluded_findings_is_kept_once_not_refused(full_download, tmp_path):
    """LUNA16's excluded findings repeat 11,106 of their 35,192 positions (11,105 rows exactly). As the class-0
    candidates of a table derived from them, the repeats are kept once and listed apart: 31.6 % of whole rows
    counted as malformed refused the table (--max-bad-rows 1 %)."""
    lines = (full_download / "evaluationScript" / "annotations" / "annotations_excluded.csv").read_text().splitlines()
    table = tmp_path / "candidates.csv"
    table.write_text(CANDIDATES + "".join(",".join(line.split(",")[:4]) + ",0\n" for line in lines[1:]))
    inputs = inputs_of(full_download, candidates=table)
    assert inputs.tables["candidates"] == {"path": str(table), "rows": 35192, "left_out": 0, "duplicates": 11106}
    assert (len(inputs.candidates), inputs.bad_rows, len(inputs.duplicates)) == (35192 - 11106, [], 11106)
    assert len({(c.series_uid, c.center_xyz) for c in inputs.candidates}) == 35192 - 11106
    assert inputs.duplicates[0].problem.startswith("duplicate of line ")
    assert any(warning.startswith(f"warning: 11106 duplicate row(s) of {table}:") for warning in inputs.warnings)
