"""LUNA16 scoring: each official rule on a hand-made case, the files, the command, a loop-based reference."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from luna_dist.evaluate import main
from luna_dist.evaluation.files import read_marks, write_marks
from luna_dist.evaluation.luna16 import FP_RATES, FROC_GRID, RATE_INDICES, Findings, Marks, froc
from luna_dist.models import provenance
from luna_dist.models.provenance import Provenance
from luna_dist.shards import chunk_samples

# The grid points the official script reads for 1/8 ... 8 FP/scan (10,001 points from 0.125 to 8).
GRID_AT_RATES = [0.125, 0.2502125, 0.49985, 0.9999125, 2.0000375, 4.0002875, 8.0]


def findings(*rows) -> Findings:
    """rows of (series, x, y, z, diameter)."""
    return Findings(np.array([r[0] for r in rows], dtype=str), np.array([r[1:4] for r in rows], dtype=float).reshape(-1, 3),
                    np.array([r[4] for r in rows], dtype=float))


def marks(*rows) -> Marks:
    """rows of (series, x, y, z, probability)."""
    return Marks(np.array([r[0] for r in rows], dtype=str), np.array([r[1:4] for r in rows], dtype=float).reshape(-1, 3),
                 np.array([r[4] for r in rows], dtype=float))


NODULE = findings(("a", 0, 0, 0, 10))


def test_rates_are_read_at_the_official_grid_points():
    assert np.allclose(FROC_GRID[RATE_INDICES], GRID_AT_RATES)
    assert np.all(np.abs(FROC_GRID[RATE_INDICES] - np.array(FP_RATES)) < 3e-4)


@pytest.mark.parametrize("point, hit", [
    ((3, 4, 0), False),        # distance exactly the radius (5 mm): not strictly inside
    ((3, 3.99, 0), True),
    ((0, 0, 4.999), True),
    ((0, 0, -5.001), False),
])
def test_a_mark_hits_strictly_inside_the_radius(point, hit):
    result = froc(["a"], NODULE, marks(("a", *point, 0.9)))
    assert (result.detected, result.false_positives) == ((1, 0) if hit else (0, 1))


def test_several_marks_on_a_nodule_are_one_true_positive_with_the_highest_probability():
    # Hits at 0.9 and 0.5, a false positive at 0.7: the nodule is found before the FP, so every rate sees it.
    result = froc(["a"], NODULE, marks(("a", 1, 0, 0, 0.5), ("a", 0, 1, 0, 0.9), ("a", 0, 0, 1, 0.2),
                                       ("a", 50, 0, 0, 0.7)))
    assert (result.detected, result.ignored_double, result.false_positives) == (1, 2, 1)
    assert result.sensitivities == [1.0] * 7 and result.cpm == 1.0


def test_the_highest_hit_ranks_after_a_more_probable_false_positive():
    # FP 0.95, hits 0.9 and 0.1 on one scan: curve (0,0) (1,0) (1,1); 1 FP/scan is read at 0.99991, still 0.
    result = froc(["a"], NODULE, marks(("a", 50, 0, 0, 0.95), ("a", 1, 0, 0, 0.9), ("a", 0, 1, 0, 0.1)))
    assert result.sensitivities == [0, 0, 0, 0, 1, 1, 1]
    assert result.cpm == pytest.approx(3 / 7)


def test_one_mark_inside_two_nodules_counts_for_both():
    two = findings(("a", 0, 0, 0, 10), ("a", 6, 0, 0, 10))
    result = froc(["a"], two, marks(("a", 3, 0, 0, 0.8)))
    assert (result.nodules, result.detected, result.false_positives, result.ignored_double) == (2, 2, 0, 0)
    assert result.cpm == 1.0


def test_marks_on_excluded_findings_are_ignored_unless_on_a_nodule():
    excluded = findings(("a", 40, 0, 0, -1), ("a", 0, 0, 0, 20))  # -1: 10 mm; the second covers the nodule
    result = froc(["a"], NODULE, marks(
        ("a", 44.9, 0, 0, 0.9),   # inside the 10 mm excluded finding: ignored
        ("a", 45.1, 0, 0, 0.8),   # just outside it: false positive
        ("a", 0, 0, 7, 0.7),      # inside the 20 mm excluded finding, not on the nodule: ignored
        ("a", 0, 0, 1, 0.6),      # on the nodule and inside the excluded finding: a true positive
    ), excluded)
    assert (result.ignored_excluded, result.false_positives, result.detected) == (2, 1, 1)
    without = froc(["a"], NODULE, marks(("a", 44.9, 0, 0, 0.9)))
    assert without.false_positives == 1


def test_only_the_hundred_most_probable_marks_of_a_scan_count():
    far = [("a", 100 + i, 0, 0, 0.9 - i * 0.001) for i in range(100)]
    dropped = froc(["a", "b"], NODULE, marks(*far, ("a", 0, 0, 0, 0.1), ("b", 0, 0, 0, 0.95)))
    assert (dropped.marks, dropped.marks_counted, dropped.detected, dropped.false_positives) == (102, 101, 0, 101)
    kept = froc(["a"], NODULE, marks(*far[:99], ("a", 0, 0, 0, 0.1)))
    assert (kept.marks_counted, kept.detected) == (100, 1)


def test_marks_tied_at_the_cut_all_drop():
    # 99 marks at 0.9 and 2 at 0.5: the 101st probability is 0.5, so only marks above 0.5 stay.
    tied = [("a", 100 + i, 0, 0, 0.9) for i in range(99)] + [("a", 0, 0, 0, 0.5), ("a", 0, 0, 1, 0.5)]
    result = froc(["a"], NODULE, marks(*tied))
    assert (result.marks_counted, result.detected, result.false_positives) == (99, 0, 99)


def test_false_positives_per_scan_count_scans_without_marks_and_sensitivity_counts_missed_nodules():
    # FP 0.95 then the nodule at 0.9 on scan a; scans b-d have no marks: the FP weighs 1/4 FP/scan.
    found = marks(("a", 50, 0, 0, 0.95), ("a", 0, 0, 0, 0.9))
    one_scan = froc(["a"], NODULE, found)
    four_scans = froc(["a", "b", "c", "d"], NODULE, found)
    assert one_scan.sensitivities == [0, 0, 0, 0, 1, 1, 1]
    assert four_scans.sensitivities == [0, 1, 1, 1, 1, 1, 1]  # 0.25 is read at 0.2502: past the last point
    assert four_scans.scans == 4
    missed = froc(["a", "b", "c", "d"], findings(("a", 0, 0, 0, 10), ("c", 0, 0, 0, 10)), found)
    assert (missed.nodules, missed.detected) == (2, 1)
    assert missed.sensitivities == [0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]


def test_the_curve_is_interpolated_linearly_and_ties_make_one_point():
    # A true and a false positive tied at 0.8 on one scan: one step from (0, 0) to (1, 1).
    result = froc(["a"], NODULE, marks(("a", 0, 0, 0, 0.8), ("a", 50, 0, 0, 0.8)))
    assert result.sensitivities == pytest.approx([min(g, 1) for g in GRID_AT_RATES])
    assert result.cpm == pytest.approx(np.mean([min(g, 1) for g in GRID_AT_RATES]))


def test_without_false_positives_the_last_sensitivity_holds():
    result = froc(["a", "b"], findings(("a", 0, 0, 0, 10), ("b", 0, 0, 0, 10)), marks(("a", 0, 0, 0, 0.3)))
    assert result.sensitivities == [0.5] * 7 and result.false_positives == 0


def test_nothing_to_find_is_not_a_number_and_nothing_found_is_zero():
    assert math.isnan(froc(["a"], Findings.empty(), marks(("a", 0, 0, 0, 0.3))).cpm)
    assert froc(["a"], NODULE, marks(("a", 50, 0, 0, 0.3))).cpm == 0
    assert froc(["a"], NODULE, marks()).cpm == 0


def test_findings_of_unlisted_series_are_left_out_and_marks_of_them_refused():
    result = froc(["a"], findings(("a", 0, 0, 0, 10), ("z", 0, 0, 0, 10)), marks(("a", 0, 0, 0, 0.3)))
    assert (result.nodules, result.cpm) == (1, 1.0)
    with pytest.raises(ValueError, match="series z"):
        froc(["a"], NODULE, marks(("z", 0, 0, 0, 0.3)))


def random_case(rng, scans=30, per_scan=40):
    uids = [f"s{i}" for i in range(scans)]
    nod = [(u, *rng.uniform(-30, 30, 3), rng.uniform(4, 20)) for u in uids for _ in range(rng.integers(0, 3))]
    exc = [(u, *rng.uniform(-30, 30, 3), rng.choice([-1, 3, 6])) for u in uids for _ in range(rng.integers(0, 3))]
    mk = [(u, *rng.uniform(-30, 30, 3), round(rng.random(), 2)) for u in uids for _ in range(rng.integers(0, per_scan))]
    for n in nod[::2]:  # marks near half the nodules, some tied probabilities
        mk += [(n[0], *(np.array(n[1:4]) + rng.normal(0, 2, 3)), round(rng.random(), 2)) for _ in range(3)]
    return uids, findings(*nod), findings(*exc), marks(*mk)


def reference(uids, nodules, excluded, mk, max_marks=100):
    """The rules written as plain loops over scans, nodules and marks, for comparison."""
    entries, n_nodules = [], 0
    for uid in uids:
        scan_marks = [i for i in range(len(mk.series)) if mk.series[i] == uid]
        probs = sorted((mk.probability[i] for i in scan_marks), reverse=True)
        if len(probs) > max_marks:
            scan_marks = [i for i in scan_marks if mk.probability[i] > probs[max_marks]]
        remaining = set(scan_marks)
        for k in range(len(nodules.series)):
            if nodules.series[k] != uid:
                continue
            n_nodules += 1
            hits = [i for i in scan_marks
                    if ((mk.xyz[i] - nodules.xyz[k]) ** 2).sum() < (nodules.diameter[k] / 2) ** 2]
            remaining -= set(hits)
            if hits:
                entries.append((max(mk.probability[i] for i in hits), 1))
        for k in range(len(excluded.series)):
            if excluded.series[k] == uid:
                d = excluded.diameter[k] if excluded.diameter[k] >= 0 else 10
                remaining -= {i for i in remaining if ((mk.xyz[i] - excluded.xyz[k]) ** 2).sum() < (d / 2) ** 2}
        entries += [(mk.probability[i], 0) for i in remaining]
    fps, sens, tp, fp = [0.0], [0.0], 0, 0
    for p in sorted({e[0] for e in entries}, reverse=True):
        tp += sum(e[1] for e in entries if e[0] == p)
        fp += sum(1 - e[1] for e in entries if e[0] == p)
        fps.append(fp / len(uids))
        sens.append(tp / n_nodules)
    grid = np.linspace(0.125, 8, 10001)
    curve = np.interp(grid, fps, sens)
    picked = [curve[np.flatnonzero(np.abs(grid - rate) < 3e-4)[0]] for rate in FP_RATES]
    return float(np.mean(picked)), picked


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_loop_reference_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    uids, nodules, excluded, mk = random_case(rng, per_scan=130 if seed == 2 else 40)
    result = froc(uids, nodules, mk, excluded)
    cpm, picked = reference(uids, nodules, excluded, mk)
    assert result.cpm == pytest.approx(cpm, abs=1e-12)
    assert result.sensitivities == pytest.approx(picked, abs=1e-12)


def test_bootstrap_is_seeded_and_brackets_the_score():
    uids, nodules, excluded, mk = random_case(np.random.default_rng(3))
    first = froc(uids, nodules, mk, excluded, bootstrap=200, seed=5)
    again = froc(uids, nodules, mk, excluded, bootstrap=200, seed=5)
    other = froc(uids, nodules, mk, excluded, bootstrap=200, seed=6)
    assert first.cpm_ci == again.cpm_ci and first.cpm_ci != other.cpm_ci
    low, high = first.cpm_ci
    assert low < first.cpm < high
    for (lo, hi), sens in zip(first.sensitivity_ci, first.sensitivities):
        assert lo <= hi and lo - 0.05 <= sens <= hi + 0.05


def test_bootstrap_of_identical_scans_has_no_spread():
    uids = ["a", "b", "c"]
    nodules = findings(*[(u, 0, 0, 0, 10) for u in uids])
    mk = marks(*[m for u in uids for m in ((u, 0, 0, 0, 0.6), (u, 50, 0, 0, 0.7))])
    result = froc(uids, nodules, mk, bootstrap=50)
    assert result.cpm_ci == [result.cpm, result.cpm]


# -- files and command -----------------------------------------------------------------------------
def write(path, text):
    path.write_text(text)
    return path


@pytest.fixture
def files(tmp_path):
    return {
        "annotations": write(tmp_path / "annotations.csv",
                             "seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3,0,0,0,10\n1.2.4,10,10,10,6\n"),
        "excluded": write(tmp_path / "excluded.csv",
                          "seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3,40,0,0,-1\n"),
        "seriesuids": write(tmp_path / "series.csv", "seriesuid\n1.2.3\n1.2.4\n1.2.5\n"),
        "predictions": write(tmp_path / "pred.csv",
                             "probability,seriesuid,coordX,coordY,coordZ\n0.9,1.2.3,1,1,1\n0.8,1.2.3,41,0,0\n"
                             "0.7,1.2.4,30,30,30\n0.6,1.2.4,10,10,11\n"),
    }


def run_main(files, tmp_path, *extra):
    argv = [arg for name, path in files.items() for arg in (f"--{name}", str(path))]
    return main([*argv, "--json", str(tmp_path / "out.json"), *extra])


def test_command_writes_every_json_field(files, tmp_path, capsys):
    assert run_main(files, tmp_path, "--bootstrap", "100") == 0
    out = json.loads((tmp_path / "out.json").read_text())
    assert {"cpm", "fp_rates", "sensitivities", "cpm_ci", "nodules", "detected", "false_positives", "scans",
            "ignored_excluded", "ignored_double"} <= set(out)
    assert out["fp_rates"] == [0.125, 0.25, 0.5, 1, 2, 4, 8]
    # The header line of the series list is not a scan: 3 scans, 1 FP -> 1/3 FP/scan before the second nodule.
    assert (out["scans"], out["nodules"], out["detected"], out["false_positives"]) == (3, 2, 2, 1)
    assert (out["ignored_excluded"], out["ignored_double"]) == (1, 0)
    assert out["sensitivities"] == [0.5, 0.5, 1, 1, 1, 1, 1]
    assert out["cpm"] == pytest.approx(6 / 7)
    assert len(out["cpm_ci"]) == 2 and out["cpm_ci"][0] <= out["cpm_ci"][1]
    assert "CPM 0.8571" in capsys.readouterr().out


def test_plot_is_drawn(files, tmp_path):
    assert run_main(files, tmp_path, "--bootstrap", "20", "--plot", str(tmp_path / "froc.png")) == 0
    assert (tmp_path / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_drawing_a_plot_leaves_the_process_backend_as_it_was(files, tmp_path):
    """The FROC figure is drawn by every classifier validation: switching the process to Agg left a notebook
    that trained with no pictures of its own."""
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("pdf")  # any backend but Agg, as a notebook's inline one is
    try:
        assert run_main(files, tmp_path, "--bootstrap", "20", "--plot", str(tmp_path / "froc.png")) == 0
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)
    assert (tmp_path / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_error(files, tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit):
        run_main(files, tmp_path, "--plot", str(tmp_path / "froc.png"))
    assert "--plot needs matplotlib" in capsys.readouterr().err


@pytest.mark.parametrize("name, text, message", [
    ("predictions", "seriesuid,coordX,coordY,coordZ,probability\n1.2.3,0,0,0,0.5\n1.2.9,0,0,0,0.5\n",
     "pred.csv:3: series 1.2.9 is not in the series list"),
    ("predictions", "seriesuid,coordX,coordY,probability\n1.2.3,0,0,0.5\n", "pred.csv:1: header lacks column(s) coordZ"),
    ("predictions", "seriesuid,coordX,coordY,coordZ,probability\n1.2.3,0,0,0,0.5\n\n1.2.3,nan,0,0,0.5\n",
     "pred.csv:4: coordX is not finite"),
    ("predictions", "seriesuid,coordX,coordY,coordZ,probability\n1.2.3,0,0,0,high\n", "pred.csv:2: probability is not a number"),
    ("predictions", "seriesuid,coordX,coordY,coordZ,probability\n1.2.3,0,0,0,0.5\n1.2.4,1,1,1,nan\n",
     "pred.csv:3: probability is not finite: 'nan'"),
    ("predictions", "seriesuid,coordX,coordY,coordZ,probability\n1.2.3,0,0,0\n", "pred.csv:2: expected 5 fields"),
    ("annotations", "seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3,0,0,0,-1\n", "annotations.csv:2: diameter_mm"),
    ("excluded", "seriesuid,coordX,coordY,coordZ\n", "excluded.csv:1: header lacks column(s) diameter_mm"),
    ("seriesuids", "1.2.3\n1.2.4\n1.2.3\n", "series.csv:3: series 1.2.3 listed twice"),
])
def test_bad_input_names_file_and_line(files, tmp_path, capsys, name, text, message):
    write(files[name], text)
    assert run_main(files, tmp_path) == 1  # one exit code for bad input, as every command (luna_dist.common.cli)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("prefix", ["\ufeff", "\n", "\ufeff\n \n,,\n"], ids=["bom", "blank line", "bom and blanks"])
@pytest.mark.parametrize("name", ["annotations", "excluded", "seriesuids", "predictions"])
def test_a_byte_order_mark_or_blank_lines_before_the_header_change_nothing(files, tmp_path, name, prefix):
    """Spreadsheet programs write a UTF-8 byte-order mark; `\ufeffseriesuid` read as a series was one more scan."""
    assert run_main(files, tmp_path) == 0
    plain = json.loads((tmp_path / "out.json").read_text())
    files[name].write_text(prefix + files[name].read_text(), encoding="utf-8")
    assert run_main(files, tmp_path) == 0
    assert json.loads((tmp_path / "out.json").read_text()) == plain
    assert plain["scans"] == 3


def test_a_header_with_an_invisible_character_is_shown_escaped(files, tmp_path, capsys):
    write(files["predictions"], "seriesuid\u200b,coordX,coordY,coordZ,probability\n1.2.3,0,0,0,0.5\n")
    assert run_main(files, tmp_path) == 1
    assert "header lacks column(s) seriesuid; expected" in capsys.readouterr().err
    from luna_dist.tables.candidates import CsvError, read_candidates

    write(tmp_path / "c.csv", "seriesuid\u200b,coordX,coordY,coordZ,class\n")
    with pytest.raises(CsvError, match=r"found 'seriesuid\\u200b', coordX"):
        read_candidates(tmp_path / "c.csv")


def _split(files, tmp_path) -> tuple:
    """pred.csv's marks of 1.2.3 and of 1.2.4 as two files, each with its sidecar: the first made by a model
    trained on fold 0 (series 1.2.4, 1.2.5), the second by one trained on fold 1 (1.2.3) and chosen on fold 2
    (1.2.5)."""
    rows = files["predictions"].read_text().splitlines()
    first = write(tmp_path / "a.csv", "\n".join([rows[0], *[r for r in rows[1:] if "1.2.3" in r]]) + "\n")
    second = write(tmp_path / "b.csv", "\n".join([rows[0], *[r for r in rows[1:] if "1.2.4" in r]]) + "\n")
    trained_elsewhere = Provenance({0: ("1.2.4", "1.2.5")}, {}, "the last epoch")
    chosen_elsewhere = Provenance({1: ("1.2.3",)}, {2: ("1.2.5",)}, "the best cpm on folds [2]")
    provenance.write_sidecar(first, [provenance.Part(("1.2.3",), {"model A": trained_elsewhere})])
    provenance.write_sidecar(second, [provenance.Part(("1.2.4",), {"model B": chosen_elsewhere})])
    return first, second


def test_several_files_score_as_one_and_merge_with_what_made_them(files, tmp_path, capsys):
    assert run_main(files, tmp_path, "--bootstrap", "50") == 0
    whole = json.loads((tmp_path / "out.json").read_text())
    assert "note: " in capsys.readouterr().err  # pred.csv has no sidecar
    first, second = _split(files, tmp_path)
    merged = tmp_path / "merged.csv"
    assert run_main({**files, "predictions": first}, tmp_path, "--bootstrap", "50", "--predictions", str(first),
                    str(second), "--merged", str(merged)) == 0
    assert json.loads((tmp_path / "out.json").read_text()) == whole
    assert sorted(read_marks(merged).series.tolist()) == ["1.2.3", "1.2.3", "1.2.4", "1.2.4"]
    assert [part.series for part in provenance.read_sidecar(merged)] == [("1.2.3",), ("1.2.4",)]
    assert run_main({**files, "predictions": merged}, tmp_path, "--bootstrap", "50") == 0
    assert json.loads((tmp_path / "out.json").read_text()) == whole
    assert "note:" not in capsys.readouterr().err
    assert run_main({**files, "predictions": first}, tmp_path, "--predictions", str(first), str(merged)) == 1
    assert f"error: {merged}: series 1.2.3 is marked in {first} too" in capsys.readouterr().err


def test_marks_of_a_series_their_model_saw_are_not_scored(files, tmp_path, capsys):
    """Marks made by a model chosen on the scored series were scored as if it had never seen them."""
    first, second = _split(files, tmp_path)
    chosen_here = Provenance({1: ("1.2.3",)}, {2: ("1.2.4",)}, "the best cpm on folds [2]")
    provenance.write_sidecar(second, [provenance.Part(("1.2.4",), {"model B": chosen_here})])
    assert run_main({**files, "predictions": first}, tmp_path, "--predictions", str(first), str(second)) == 1
    assert capsys.readouterr().err == (f"error: model B (the marks of {second}) was selected on fold 2, and 1 of its "
                                       "series is scored here (e.g. 1.2.4): a fold is scored only by models that "
                                       "neither trained nor were selected on it; train them without it (--val-folds "
                                       "2 --select-on last)\n")
    second.write_text(second.read_text() + "0.1,1.2.4,0,0,0\n")  # the sidecar no longer describes it
    assert run_main({**files, "predictions": second}, tmp_path) == 1
    assert "b.provenance.json was written for other contents of" in capsys.readouterr().err
    provenance.sidecar(second).unlink()
    assert run_main({**files, "predictions": second}, tmp_path) == 0
    assert f"note: {second} has no b.provenance.json" in capsys.readouterr().err


def test_marks_round_trip_through_the_csv(tmp_path):
    original = marks(("1.2.3", 1.5, -2.25, 300.125, 0.123456), ("1.2.4", 0, 0, 0, 1.0))
    write_marks(tmp_path / "p.csv", original)
    back = read_marks(tmp_path / "p.csv", ["1.2.3", "1.2.4"])
    assert back.series.tolist() == ["1.2.3", "1.2.4"]
    assert np.allclose(back.xyz, original.xyz) and np.allclose(back.probability, original.probability)


@pytest.mark.parametrize("uid", ["Smith, John", 'the "first" scan', "a\nb,1,2,3,0.99", "tab\there"])
def test_marks_of_any_series_name_round_trip_through_the_csv(tmp_path, uid):
    """A name with a comma gave six-column rows, one with a newline forged a row: every field is quoted
    as the csv module quotes it, and read back as it was."""
    original = marks((uid, 1.5, -2.25, 300.125, 0.5), ("1.2.4", 0, 0, 0, 1.0))
    write_marks(tmp_path / "p.csv", original)
    back = read_marks(tmp_path / "p.csv", [uid, "1.2.4"])
    assert back.series.tolist() == [uid, "1.2.4"]
    assert np.array_equal(back.xyz, original.xyz) and np.array_equal(back.probability, original.probability)


def test_marks_whose_probability_is_not_finite_are_not_written(tmp_path):
    with pytest.raises(ValueError, match=r"p.csv: not written: the probability of the mark of series 1.2.4 at "
                                         r"\[0.0, 0.0, 0.0\] is nan, not a finite number"):
        write_marks(tmp_path / "p.csv", marks(("1.2.3", 1, 2, 3, 0.5), ("1.2.4", 0, 0, 0, float("nan"))))
    assert not list(tmp_path.iterdir())


def test_fold_findings_of_a_manifest_without_them_say_rebuild():
    from luna_dist.evaluation.files import fold_findings

    with pytest.raises(KeyError, match="rebuild the shards"):
        fold_findings({"folds": {"9": {"series": ["a"]}}}, [9])


def test_shards_option_scores_the_folds_listed_in_the_manifest(shard_dir, tmp_path, capsys):
    from luna_dist.data.streams import open_shard_set
    from luna_dist.evaluation.files import fold_findings

    series, nodules, _ = fold_findings(open_shard_set(shard_dir, chunk_samples).manifest, [8, 9])
    on_nodules = [(uid, *xyz, 0.9) for uid, xyz in zip(nodules.series.tolist(), nodules.xyz.tolist())]
    write_marks(tmp_path / "p.csv", marks(*on_nodules, (series[0], 900, 900, 900, 0.95)))
    argv = ["--shards", str(shard_dir), "--predictions", str(tmp_path / "p.csv"), "--bootstrap", "0"]
    assert main([*argv, "--folds", "8", "9", "--json", str(tmp_path / "s.json")]) == 0
    score = json.loads((tmp_path / "s.json").read_text())
    assert (score["scans"], score["nodules"], score["detected"], score["false_positives"]) == \
        (len(series), len(nodules.series), len(nodules.series), 1)
    assert main([*argv, "--folds", "9"]) == 1  # marks of fold 8's series are not in fold 9
    assert "is not in the series list" in capsys.readouterr().err
    assert main([*argv, "--folds", "12"]) == 1
    assert "no fold 12" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--annotations", str(tmp_path / "p.csv")])


def test_shards_option_reads_the_manifest_from_a_url(shard_dir, served, tmp_path):
    from luna_dist.data.streams import open_shard_set
    from luna_dist.evaluation.files import fold_findings

    www, url = served
    shutil.copy(shard_dir / "manifest.json", www / "manifest.json")  # evaluation reads nothing else
    series, nodules, _ = fold_findings(open_shard_set(shard_dir, chunk_samples).manifest, [9])
    write_marks(tmp_path / "p.csv", marks(*[(uid, *xyz, 0.9) for uid, xyz in
                                                     zip(nodules.series.tolist(), nodules.xyz.tolist())]))
    scores = []
    for shards in (str(shard_dir), f"{url}/"):
        assert main(["--shards", shards, "--folds", "9", "--predictions", str(tmp_path / "p.csv"),
                              "--bootstrap", "0", "--json", str(tmp_path / "s.json")]) == 0
        scores.append(json.loads((tmp_path / "s.json").read_text()))
    assert scores[0] == scores[1] and scores[0]["nodules"] == len(nodules.series)


def test_marks_without_a_finite_probability_are_refused():
    with pytest.raises(ValueError, match="1 marks have a probability that is not a finite number"):
        froc(["a"], NODULE, marks(("a", 0, 0, 0, float("nan")), ("a", 9, 9, 9, 0.5)))
