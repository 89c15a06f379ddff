"""`python -m luna_dist.shard --plan`: the samples, bytes and time of a build from the tables and CT headers
alone, agreeing with the build it plans, and in seconds at the real tables' scale."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import SEG_NEGATIVES, real_table

from luna_dist.imaging.ct import CtError, read_ct
from luna_dist.shard import main
from luna_dist.shards.build import build, plan_tasks, read_build_inputs
from luna_dist.shards.codecs import CODECS
from luna_dist.shards.options import BuildOptions
from luna_dist.shards.plan import Rate, plan, read_header
from luna_dist.shards.writer import shard_series
from luna_dist.tables.candidates import find_series, read_annotations, read_series_list


def test_a_header_says_what_the_ct_holds(tiny_data):
    mhd = next(tiny_data.rglob("*.mhd"))
    header, ct = read_header(mhd), read_ct(mhd)
    assert header.shape == ct.hu.shape and header.voxels == ct.hu.size
    for name in ("origin_xyz", "spacing_xyz", "direction"):
        np.testing.assert_array_equal(getattr(header.geometry, name), getattr(ct.geometry, name))
    (tiny_data.parent / "bad.mhd").write_text("not a header")
    with pytest.raises(CtError, match="bad.mhd: not a MetaImage header"):
        read_header(tiny_data.parent / "bad.mhd")


def test_a_raw_shorter_than_its_header_is_unreadable_in_the_plan_as_in_the_build(tiny_data, tmp_path):
    """A .mhd whose .raw holds 1 MB was planned at its header's size (2,000 GB of voxels for a 1000^3 header);
    the plan checks its data file as the build does, and reports it."""
    data = Path(shutil.copytree(tiny_data, tmp_path / "data"))
    mhd = sorted(data.rglob("*.mhd"))[0]
    mhd.write_text(mhd.read_text().replace(re.search(r"DimSize = .*", mhd.read_text())[0],
                                           "DimSize = 1000 1000 1000"))
    options = BuildOptions(data=data, out=tmp_path / "out", workers=1, progress=False)
    plans, _ = plan(options, read_build_inputs(options), Rate((1, 1, 1), 1e-9, 1e-3, 150_000.0, 0.0))
    unreadable = [line for p in plans.values() for line in p.unreadable]
    assert len(unreadable) == 1 and unreadable[0].startswith(f"{mhd.with_suffix('.raw')}: truncated, ")
    assert sum(p.voxels for p in plans.values()) < 1e9 and sum(p.series for p in plans.values()) == 3


def test_max_ct_voxels_refuses_in_the_plan_and_the_build(tiny_data, tmp_path, capsys):
    assert main(["--data", str(tiny_data), "--out", str(tmp_path / "out"), "--plan", "--max-ct-voxels", "1000"]) == 1
    assert "voxels, more than --max-ct-voxels 1,000 " in capsys.readouterr().err
    options = BuildOptions(data=tiny_data, out=tmp_path / "out", workers=1, progress=False, max_ct_voxels=1000)
    task = plan_tasks(read_build_inputs(options).candidates, find_series(tiny_data), {uid: 0 for uid in
                      find_series(tiny_data)}, options)[0]
    with pytest.raises(CtError, match="more than --max-ct-voxels 1,000 "):
        shard_series(task)


@pytest.mark.slow
def test_the_plan_is_the_build(tiny_data, tiny_shards, tmp_path, capsys):
    """Per fold, the planned samples are the built ones; nothing is written."""
    out = tmp_path / "out"
    assert main(["--data", str(tiny_data), "--out", str(out), "--plan", "--max-samples", "10"]) == 0
    printed = capsys.readouterr().out
    assert not out.exists()
    built = json.loads((tiny_shards / "manifest.json").read_text())
    rows = {line.split()[0]: line.split() for line in printed.splitlines() if line.split()[:1] and
            (line.split()[0].isdigit() or line.split()[0] == "all")}
    for fold, counts in built["folds"].items():
        assert int(rows[fold][5].replace(",", "")) == counts["samples"]
        assert int(rows[fold][1]) == len(counts["series"])
        assert int(rows[fold][4].replace(",", "")) == len(counts["excluded"])
    assert "rate measured here on two synthetic CTs" in printed and "free at" in printed


@pytest.mark.slow
@pytest.mark.parametrize("codec, fold_within, all_within", [("none", 0.005, 0.001), (CODECS[0], 0.12, 0.08)])
def test_the_planned_bytes_are_the_built_ones(tiny_data, tmp_path, codec, fold_within, all_within):
    """Plain samples take a fixed size, and each shard's end half a tar record on average: per fold the plan
    is within 0.5 % (a build of shards of 10 samples, where the ends weigh most). Compressed, a sample's
    bytes follow its CT's noise and how much of its chunk lies outside the CT, and the plan measures them on
    two synthetic CTs: within 12 % per fold and 8 % in all (4.4 % on this test's data)."""
    options = BuildOptions(data=tiny_data, out=tmp_path / "out", workers=1, max_samples=10, progress=False,
                           codec=codec)
    built = build(options)
    plans, _ = plan(options, read_build_inputs(options))
    built_bytes = {fold: sum(s["bytes"] for s in built["shards"] if s["fold"] == fold) for fold in plans}
    for fold, planned in plans.items():
        assert planned.shard_bytes == pytest.approx(built_bytes[fold], rel=fold_within), fold
    assert sum(p.shard_bytes for p in plans.values()) == pytest.approx(sum(built_bytes.values()), rel=all_within)


@pytest.mark.slow
def test_the_segmentation_plan_is_close_to_its_build(tiny_data, tiny_seg_shards):
    options = BuildOptions(data=tiny_data, out=tiny_data.parent / "unused", task="seg", workers=1,
                           seg_negatives=SEG_NEGATIVES, progress=False)
    plans, _ = plan(options, read_build_inputs(options), Rate((1, 1, 1), 0.0, 0.0, 1.0, 1.0))
    built = json.loads((tiny_seg_shards / "manifest.json").read_text())
    planned_samples = sum(p.samples for p in plans.values())
    planned_val = sum(p.val_slices for p in plans.values())
    assert planned_samples == pytest.approx(built["counts"]["samples"], rel=0.15)
    assert planned_val == pytest.approx(built["counts"]["val_slices"], rel=0.15)


HEADER = """ObjectType = Image
NDims = 3
DimSize = 512 512 {slices}
ElementSpacing = 0.703125 0.703125 {spacing}
Offset = -180 -180 {z0}
TransformMatrix = 1 0 0 0 1 0 0 0 1
ElementType = MET_SHORT
ElementDataFile = {uid}.raw
"""


@pytest.mark.slow
def test_the_plan_of_the_real_tables_takes_seconds(tmp_path):
    """888 real series (headers only, of CT size), the real nodules and excluded findings, 20 candidates a
    series: the plan is made in seconds and counts what the tables hold."""
    root = tmp_path / "LUNA16"
    nodules, _ = read_annotations(real_table("annotations.csv", root / "annotations.csv"))
    kit = root / "evaluationScript" / "annotations"
    series = read_series_list(real_table("seriesuids.csv", kit / "seriesuids.csv"))
    real_table("annotations_excluded.csv", kit / "annotations_excluded.csv")
    rows = [f"{n.series_uid},{','.join(map(str, n.center_xyz))},1" for n in nodules]
    rows += [f"{uid},{x},0,-100,0" for uid in series for x in range(20)]
    (root / "candidates_V2.csv").write_text("seriesuid,coordX,coordY,coordZ,class\n" + "\n".join(rows) + "\n")
    for k, uid in enumerate(series):
        (root / f"subset{k % 10}").mkdir(exist_ok=True)
        (root / f"subset{k % 10}" / f"{uid}.mhd").write_text(HEADER.format(slices=100 + k % 400, spacing=1.25,
                                                                         z0=-400, uid=uid))
        with open(root / f"subset{k % 10}" / f"{uid}.raw", "wb") as raw:  # sparse: the size the plan checks
            raw.truncate(512 * 512 * (100 + k % 400) * 2)
    options = BuildOptions(data=root, out=tmp_path / "out", workers=8, progress=False)
    started = time.perf_counter()
    plans, _ = plan(options, read_build_inputs(options), Rate((1, 1, 1), 1e-9, 1e-3, 151_552.0, 0.0))
    assert time.perf_counter() - started < 20
    assert sum(p.series for p in plans.values()) == 888 and sorted(plans) == list(range(10))
    assert sum(p.nodules for p in plans.values()) == 1186
    assert sum(p.excluded for p in plans.values()) == 35192
    assert sum(p.samples for p in plans.values()) == 1186 + 888 * 20
    voxels = sum(512 * 512 * (100 + k % 400) for k in range(888))
    assert sum(p.voxels for p in plans.values()) == voxels
    assert sum(p.seconds for p in plans.values()) == pytest.approx(voxels * 1e-9 + (1186 + 888 * 20) * 1e-3)
    assert not (tmp_path / "out").exists()
