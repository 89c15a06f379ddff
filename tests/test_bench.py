"""The benchmark sub-commands run on a tiny data set and emit every figure (no timing assertions)."""

from __future__ import annotations

import json
import math

import pytest

import luna_dist.shards.chunk_samples
from luna_dist import bench
from luna_dist.benchmarks.loader import PerCandidateDataset
from luna_dist.shards.codecs import CODECS

TINY = ["--cts", "3", "--shape", "40", "128", "128", "--workers", "2"]

SHARD_FIELDS = {"cts", "workers", "samples", "input_mb", "bytes_per_sample", "bytes_per_sample_uncompressed", "codec",
                "codecs", "cold", "warm", "build_over_read", "build_over_read_page_cache", "bytes_per_sample_by_codec"}
CODEC_FIELDS = {f"{variant}{figure}" for variant in ("", "low_noise_")
                for figure in ("member_bytes", "encode_samples_per_s_per_core", "decode_samples_per_s_per_core",
                               "bytes_ratio")}
SHARD_TIMED_FIELDS = {"read_seconds", "build_seconds", "build_to_read_ratio", "cts_per_s", "samples_per_s",
                      "chunk_mb_per_s", "input_mb_per_s"} | {
    f"{codec}_{figure}" for codec in CODECS for figure in ("build_seconds", "build_over_read", "worker_seconds_per_ct")}
LOADER_FIELDS = {"batch_size", "shards", "per_candidate_random", "per_candidate_series_order",
                 "per_candidate_disk_cache", "plain_tar_loop", "shards_vs_random_baseline", "shards_vs_disk_cache",
                 "worker_over_in_process", "decode_samples_per_s_per_core"}
TRAIN_FIELDS = {"steps", "end_to_end", "ceiling", "ratio", "variants", "ranks"}


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def tiny_work(tmp_path_factory):
    """One scratch folder: the synthetic data and its shards are made once and reused."""
    return tmp_path_factory.mktemp("bench")


def run(tiny_work, what: str, extra: list[str], capsys) -> dict:
    out = tiny_work / f"{what}.json"
    assert bench.main([what, *TINY, "--work", str(tiny_work), "--json", str(out), *extra]) == 0
    table = capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert figures["machine"]["cpus"] >= 1
    return figures, table


@pytest.mark.slow
def test_shard_figures(tiny_work, capsys):
    figures, table = run(tiny_work, "shard", [], capsys)
    shard = figures["shard"]
    assert set(shard) == SHARD_FIELDS
    assert shard["cts"] == 3 and shard["workers"] == 2
    assert all(_positive(shard[key]) for key in SHARD_FIELDS - {"cold", "warm", "codec", "codecs",
                                                                 "bytes_per_sample_by_codec"})
    by_codec = shard["bytes_per_sample_by_codec"]
    assert set(by_codec) == set(CODECS) and shard["bytes_per_sample"] == by_codec["lz4"]
    assert shard["bytes_per_sample_uncompressed"] == by_codec["none"] > by_codec["lz4"] > by_codec["zstd"]
    for cache in ("cold", "warm"):
        assert set(shard[cache]) == SHARD_TIMED_FIELDS
        assert all(_positive(v) for k, v in shard[cache].items() if not k.endswith("_per_ct"))
        for codec in CODECS:
            stages = shard[cache][f"{codec}_worker_seconds_per_ct"]
            assert set(stages) == {"read", "cut", "write"} and all(_positive(v) for v in stages.values())
    # Uncompressed, a sample on disk is the int16 chunk plus tar headers, JSON and checksums; built by default
    # (lz4) it is about half that on the synthetic CTs' noise.
    assert 32 * 48 * 48 * 2 < shard["bytes_per_sample_uncompressed"] < 32 * 48 * 48 * 2 + 5 * 1024
    assert shard["codec"] == "lz4" and shard["bytes_per_sample"] < 0.6 * shard["bytes_per_sample_uncompressed"]
    assert set(shard["codecs"]) == {"lz4", "zstd", "none"}
    for codec, figures in shard["codecs"].items():
        assert set(figures) == CODEC_FIELDS and all(_positive(v) for v in figures.values()), codec
    codecs = shard["codecs"]
    assert codecs["none"]["bytes_ratio"] == 1 and codecs["zstd"]["bytes_ratio"] > codecs["lz4"]["bytes_ratio"] > 1.7
    assert all(codecs[c]["low_noise_bytes_ratio"] > codecs[c]["bytes_ratio"] for c in ("lz4", "zstd"))
    assert shard["build_over_read"] == shard["cold"]["build_to_read_ratio"] == shard["cold"]["lz4_build_over_read"]
    assert shard["build_over_read_page_cache"] == shard["warm"]["build_to_read_ratio"]
    assert "shard.cold.build_to_read_ratio" in table


@pytest.mark.slow
def test_loader_figures(tiny_work, capsys):
    figures, table = run(tiny_work, "loader", ["--loader-workers", "0", "1", "--loader-samples", "96",
                                               "--baseline-samples", "16", "--batch-sizes", "8"], capsys)
    loader = figures["loader"]
    assert set(loader) == LOADER_FIELDS
    for key in ("shards", "per_candidate_random", "per_candidate_series_order", "per_candidate_disk_cache",
                "shards_vs_random_baseline", "shards_vs_disk_cache"):
        assert set(loader[key]) == {"0", "1"}, key
        assert all(_positive(v) for v in loader[key].values()), key
    assert _positive(loader["plain_tar_loop"]) and _positive(loader["decode_samples_per_s_per_core"])
    assert loader["worker_over_in_process"] == loader["shards"]["1"] / loader["shards"]["0"]
    assert "loader.shards_vs_random_baseline.1" in table


@pytest.mark.slow
def test_train_figures(tiny_work, capsys):
    import torch

    from luna_dist.common.hardware import native_bf16

    # bf16 where the CPU computes it: emulated, it is ~18 times slower, and would make the suite crawl.
    variants = ["default+no", "cl3d+bf16" if native_bf16(torch.device("cpu"))[0] else "cl3d+no"]
    figures, table = run(tiny_work, "train", ["--batch-sizes", "4", "--train-steps", "2",
                                              "--variants", *variants], capsys)
    train = figures["train"]
    assert set(train) == TRAIN_FIELDS
    for key in ("end_to_end", "ceiling", "ratio"):
        assert set(train[key]) == {"4"}, key
        assert all(_positive(v) for v in train[key].values()), key
    assert set(train["variants"]) == set(variants)
    assert set(train["ranks"]) == {"1", "2", "2_vs_1"} and all(_positive(v) for v in train["ranks"].values())
    assert "train.ratio.4" in table


def test_plot_is_drawn(tmp_path):
    per_workers = {"0": 100.0, "1": 200.0}
    figures = {
        "loader": {key: per_workers for key in ("shards", "per_candidate_random", "per_candidate_series_order",
                                                "per_candidate_disk_cache")},
        "train": {"end_to_end": {"32": 30.0, "128": 31.0}, "ceiling": {"32": 33.0, "128": 34.0}},
        "shard": {"bytes_per_sample": 70e3, "bytes_per_sample_uncompressed": 150e3, "build_over_read": 2.0},
    }
    figures["loader"] |= {"worker_over_in_process": 0.9, "decode_samples_per_s_per_core": 5000.0}
    assert bench.data_path_ratios(figures) == {
        "bytes stored plain / as built": (150 / 70, 2), "build / read, CTs from disk": (2.0, 1.5),
        "1 loader worker / in-process": (0.9, 1), "decode samples/s a core / 4,000": (1.25, 1)}
    bench.plot(figures, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_takes_smaller_sizes_but_a_flag_given_wins():
    quick = bench.parse_args(["all", "--quick", "--cts", "7"])
    assert quick.cts == 7 and quick.shape == bench.QUICK["shape"] and quick.ranks is False
    assert all(getattr(quick, name) == value for name, value in bench.QUICK.items() if name != "cts")
    full = bench.parse_args(["all"])
    assert full.cts == 10 and full.shape == [200, 512, 512] and full.ranks is True


def test_per_candidate_baseline_cuts_the_shard_chunks_and_pickles_for_spawn(synth_data, shard_dir):
    """The baseline reads the same chunks as the shards, and a used one still pickles (macOS workers)."""
    import pickle

    import numpy as np
    import webdataset as wds

    from luna_dist.data.streams import open_shard_set
    from luna_dist.shards.codecs import load_array
    from luna_dist.shards.format import sample_key
    from luna_dist.tables.candidates import read_candidates

    candidates = read_candidates(synth_data / "candidates.csv")[0]
    dataset = PerCandidateDataset(synth_data, candidates)
    path = open_shard_set(shard_dir, luna_dist.shards.chunk_samples).shards([9], "pos")[0]
    for sample in wds.DataPipeline(wds.SimpleShardList([path]), wds.tarfile_to_samples()):
        index = next(i for i, c in enumerate(dataset.candidates) if sample_key(c.series_uid, c.row) == sample["__key__"])
        chunk, label = dataset[index]
        stored = load_array(sample, "chunk.npy")
        assert np.array_equal(chunk[0].numpy(), stored) and label == 1
    clone = pickle.loads(pickle.dumps(dataset))
    assert len(clone) == len(dataset)


def test_evaluate_figures(tmp_path, capsys):
    out = tmp_path / "evaluate.json"
    assert bench.main(["evaluate", "--eval-scans", "20", "--eval-marks", "150", "--eval-bootstrap", "10",
                       "--work", str(tmp_path), "--json", str(out)]) == 0
    figures = json.loads(out.read_text())["evaluate"]
    assert (figures["scans"], figures["marks"], figures["bootstrap"]) == (20, 3000, 10)
    assert 0 < figures["cpm"] <= 1
    assert all(_positive(figures[key]) for key in ("read_seconds", "score_seconds", "score_with_bootstrap_seconds"))
    assert "evaluate.score_seconds" in capsys.readouterr().out
    assert not (tmp_path / "data").exists()  # scoring needs no CTs


@pytest.mark.slow
def test_analyze_figures(tiny_work, capsys):
    figures, table = run(tiny_work, "analyze", ["--analyze-cts", "2", "--analyze-slices", "8", "--confusion-scans",
                                                "20", "--confusion-marks", "50"], capsys)
    analyze = figures["analyze"]
    assert analyze["cts"] == 2 and analyze["voxels_per_ct"] > 40 * 128 * 128 // 2
    assert set(analyze["seconds_per_ct"]) == {"read", "segment", "group", "classify", "images"}
    assert all(_positive(v) for v in analyze["seconds_per_ct"].values())
    assert set(analyze["cts_per_s"]) == {"1", "2"} and all(_positive(v) for v in analyze["cts_per_s"].values())
    assert _positive(analyze["2_vs_1"])
    assert "analyze.seconds_per_ct.segment" in table
    variants = analyze["segment_variants"]
    assert variants["slices"] == 8 and 0 < variants["box_share_of_slice"] <= 1
    assert {"whole_nchw", "whole", "body"} <= set(variants["slices_per_s"])
    assert all(_positive(v) for v in variants["slices_per_s"].values())
    assert set(variants["differing_voxels"]) == set(variants["slices_per_s"]) - {"whole_nchw"}
    # Grouping keeps the eroded mask and the labels (5 bytes a voxel) and little besides.
    assert 4 <= analyze["group_peak_bytes_per_voxel"] <= 6
    assert set(analyze["confusion"]) == {"scans", "marks", "seconds"}
    assert (analyze["confusion"]["scans"], analyze["confusion"]["marks"]) == (20, 20 * 50)
    assert _positive(analyze["confusion"]["seconds"])
    assert "analyze.confusion.seconds" in table


@pytest.mark.slow
def test_seg_figures(tiny_work, capsys):
    figures, table = run(tiny_work, "seg", ["--batch-sizes", "4", "--train-steps", "2"], capsys)
    seg = figures["seg"]
    assert set(seg) == {"batch_size", "steps", "bytes_per_training_sample", "bytes_per_validation_slice",
                        "validation_slice_in_int16_slices", "end_to_end", "ceiling", "ratio"}
    assert all(_positive(seg[key]) for key in seg)
    # A training sample is its int16 stack and mask bits, compressed (lz4, the default), tar headers and JSON.
    assert 7 * 96 * 96 * 2 / 4 < seg["bytes_per_training_sample"] < 7 * 96 * 96 * 2 * 0.7
    # A validation slice shares its context with the slab's other slices: far from 7 slices.
    assert 0.2 < seg["validation_slice_in_int16_slices"] < 3  # compressed, it may be below one slice
    assert "seg.ratio" in table
