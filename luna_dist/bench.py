"""`python -m luna_dist.bench {shard,loader,train,seg,analyze,evaluate,all}`: the project's speed claims, measured
in one run.

- shard:  build time against the time of only reading the same CTs with SimpleITK.
- loader: samples/s delivered as batched tensors from shards (0, 1, 2 workers) against
          a per-candidate `Dataset` like the book's (a small LRU cache of CTs, read in
          random and in series order, and with a warm per-candidate disk cache), and
          against a plain tarfile + np.load loop.
- train:  end-to-end training samples/s (shards -> loss.backward -> step) against the
          pure-compute ceiling (same model and batch on tensors already on the device),
          layout and precision variants, and 1 against 2 CPU ranks.
- seg:    the segmentation task: its shard build's bytes per training sample and per
          validation slice, and UNet training end to end (shards -> device crop ->
          loss.backward -> step) against the same steps on a batch already on the device.
- analyze: `python -m luna_dist.analyze` on a few CTs: seconds per CT in segmentation,
          grouping and classification (one process), and 2 CPU ranks against 1 (wall
          time of the whole command, start-up included); the UNet's slices/s on whole
          slices in NCHW (analysis versions 2 and 3), in the device's layout, and on the body's
          box only (with bf16 too where it is native), and
          the mask voxels each changes; the peak memory of grouping one CT (bytes per
          voxel), and the seconds of the confusion table over 888 scans x 850 generated marks.
- evaluate: LUNA16 scoring of generated marks at the full data set's size (888 scans,
          ~600 marks each): reading the CSVs, the FROC/CPM, and its bootstrap interval.

Without --data/--shards it makes a synthetic data set first. Figures print as one
table; --json writes them, --plot draws them (needs matplotlib). The measurements are in
`luna_dist.benchmarks`: the build, the loader, training, the analysis and the scoring.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from luna_dist import __version__
from luna_dist.benchmarks.analysis import bench_analyze
from luna_dist.benchmarks.build import bench_shard
from luna_dist.benchmarks.loader import bench_loader
from luna_dist.benchmarks.scoring import bench_evaluate
from luna_dist.benchmarks.training import bench_seg, bench_train
from luna_dist.common import cli
from luna_dist.common.atomic import write_json
from luna_dist.common.hardware import cpu_features, native_bf16
from luna_dist.shards.build import build
from luna_dist.shards.options import BuildOptions
from luna_dist.synthetic.generator import make_dataset


def machine() -> dict:
    """What the figures were measured on: the platform, CPU features, torch, and the GPU if any."""
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "cpu_features": " ".join(cpu_features()),
            "cpu_bf16_native": native_bf16(torch.device("cpu"))[0]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_bf16_native"] = native_bf16(torch.device("cuda"))[0]
    return info


def rows(results: dict) -> list[tuple[str, str]]:
    """Flatten the nested figures into (name, value) rows for the table."""
    flat = []

    def walk(prefix: str, value):
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, float):
            flat.append((prefix, f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"))
        else:
            flat.append((prefix, str(value)))

    walk("", results)
    return flat


def data_path_ratios(results: dict) -> dict[str, tuple[float, float]]:
    """The data path's headline ratios present in `results`, each with its aim: label -> (measured, aim).
    Each is a figure over another figure or over a constant."""
    wanted = {
        "bytes stored plain / as built": (("shard", "bytes_per_sample_uncompressed"), ("shard", "bytes_per_sample"), 2),
        "build / read, CTs from disk": (("shard", "build_over_read"), 1, 1.5),
        "build / read, CTs in page cache": (("shard", "build_over_read_page_cache"), 1, 1.5),
        "1 loader worker / in-process": (("loader", "worker_over_in_process"), 1, 1),
        "decode samples/s a core / 4,000": (("loader", "decode_samples_per_s_per_core"), 4000, 1),
    }
    ratios = {}
    for label, ((stage, figure), denominator, aim) in wanted.items():
        if figure in results.get(stage, {}):
            below = denominator if isinstance(denominator, int) else results[denominator[0]][denominator[1]]
            ratios[label] = (results[stage][figure] / below, aim)
    return ratios


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = data_path_ratios(results)
    panels = [(name, results[name]) for name in ("loader", "train") if name in results]
    panels += [("data path", ratios)] if ratios else []
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(6 * max(1, len(panels)), 4))
    for ax, (name, figures) in zip(np.atleast_1d(axes), panels):
        if name == "data path":
            labels = list(figures)
            ax.barh(np.arange(len(labels)), [figures[k][0] for k in labels], 0.5, label="measured")
            ax.scatter([figures[k][1] for k in labels], np.arange(len(labels)), marker="|", s=400, color="black",
                       label="aim")
            ax.set_yticks(np.arange(len(labels)), labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel("ratio")
        elif name == "loader":
            series = {k: figures[k] for k in ("shards", "per_candidate_random", "per_candidate_series_order",
                                               "per_candidate_disk_cache")}
            labels = sorted(figures["shards"])
            for i, (label, values) in enumerate(series.items()):
                ax.bar(np.arange(len(labels)) + i * 0.2, [values[w] for w in labels], 0.2, label=label)
            ax.set_xticks(np.arange(len(labels)) + 0.3, [f"{w} workers" for w in labels])
            ax.set_yscale("log")
            ax.set_ylabel("samples/s")
        else:
            labels = sorted(figures["end_to_end"], key=int)
            ax.bar(np.arange(len(labels)), [figures["end_to_end"][b] for b in labels], 0.4, label="end to end")
            ax.bar(np.arange(len(labels)) + 0.4, [figures["ceiling"][b] for b in labels], 0.4, label="compute ceiling")
            ax.set_xticks(np.arange(len(labels)) + 0.2, [f"batch {b}" for b in labels])
            ax.set_ylabel("samples/s")
        ax.set_title(name)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    fig.tight_layout()
    fig.savefig(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m luna_dist.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["shard", "loader", "train", "seg", "analyze", "evaluate", "all"],
                        help="the stage to measure, or all of them")
    parser.add_argument("--data", type=Path, help="LUNA16-format folder (default: make a synthetic one)")
    parser.add_argument("--shards", type=Path, help="shard folder for loader/train (default: build from --data)")
    parser.add_argument("--cts", type=int, default=10, help="synthetic CTs to make")
    parser.add_argument("--shape", type=int, nargs=3, default=[200, 512, 512], metavar=("I", "R", "C"),
                        help="synthetic CT size (slices vary around I)")
    parser.add_argument("--workers", type=int, default=2, help="shard-build processes")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[0, 1, 2],
                        help="loader: data worker counts compared")
    parser.add_argument("--loader-samples", type=int, default=3000, help="loader: samples read per measurement")
    parser.add_argument("--baseline-samples", type=int, default=300, help="samples for the slow random-order baseline")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64], help="train: batch sizes compared")
    parser.add_argument("--train-steps", type=int, default=6, help="train: timed steps per variant")
    parser.add_argument("--train-workers", type=int, help="data workers while training (default: train's own)")
    parser.add_argument("--variants", nargs="*", default=["default+no", "cl3d+no", "default+bf16", "cl3d+bf16"],
                        help="compute-ceiling variants LAYOUT+PRECISION (LAYOUT default|cl3d, PRECISION no|bf16)")
    parser.add_argument("--eval-scans", type=int, default=888, help="scans of the generated evaluation set")
    parser.add_argument("--eval-marks", type=int, default=600, help="marks per scan of the generated evaluation set")
    parser.add_argument("--eval-bootstrap", type=int, default=1000, help="bootstrap resamplings timed")
    parser.add_argument("--analyze-cts", type=int, default=2, help="CTs analysed by the analyze benchmark")
    parser.add_argument("--analyze-slices", type=int, default=16,
                        help="analyze: slices of one CT segmented in each layout, batch and crop variant")
    parser.add_argument("--confusion-scans", type=int, default=888,
                        help="analyze: scans of the generated confusion-table input (LUNA16: 888)")
    parser.add_argument("--confusion-marks", type=int, default=850,
                        help="analyze: detections per scan of the generated confusion-table input")
    parser.add_argument("--seg-model", type=Path,
                        help="analyze: segmentation model (default: a UNet of a trained one's cost marking HU > -250)")
    parser.add_argument("--cls-model", type=Path, help="analyze: nodule classifier (default: untrained, same cost)")
    parser.add_argument("--no-ranks", dest="ranks", action="store_false", help="skip the 1 vs 2 CPU ranks run")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--plot", type=Path, help="draw the figures here (PNG, needs matplotlib)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="training device (auto: what accelerate picks)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes for every stage (QUICK): `all` in under 2 minutes on 2 cores; "
                             "flags given still win")
    return parser


QUICK = {"cts": 4, "shape": [120, 256, 256], "loader_samples": 1500, "baseline_samples": 64, "batch_sizes": [32],
         "train_steps": 6, "variants": ["default+no", "cl3d+no"], "ranks": False, "eval_scans": 300,
         "eval_bootstrap": 100, "analyze_cts": 1, "analyze_slices": 8}
"""What --quick changes: every figure is still measured, on less data and with fewer repeats (no bf16
variant: where a CPU emulates bf16 it alone would take minutes). Its CTs are small, so its build/read ratio
is mostly the fixed cost of a build."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # the preset replaces the defaults only: a flag given explicitly keeps its value
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"

    work = args.work or Path(tempfile.mkdtemp(prefix="luna_dist-bench-"))
    results: dict = {"machine": machine(), "luna_dist": __version__,
                     "arguments": cli.arguments_json(vars(args)),
                     "seconds": {}}
    started = time.perf_counter()
    if args.what in ("evaluate", "all"):
        measure(results, args.json, "evaluate", bench_evaluate, work / "evaluate", args.eval_scans, args.eval_marks,
                args.eval_bootstrap)
    if args.what != "evaluate":
        run_data_benchmarks(args, work, results)
    results["seconds"]["total"] = time.perf_counter() - started
    width = max(len(name) for name, _ in rows(results))
    for name, value in rows(results):
        print(f"{name:<{width}}  {value:>14}")
    if args.json:
        write_json(args.json, results)
    if args.plot:
        plot(results, args.plot)
    return 0


def measure(results: dict, json_path: Path | None, stage: str, benchmark, *arguments) -> None:
    """Run one stage's benchmark into results[stage], and how long the stage took into results["seconds"];
    the figures so far are written to `json_path` after each stage, so a stage that fails loses no other."""
    started = time.perf_counter()
    results[stage] = benchmark(*arguments)
    results["seconds"][stage] = time.perf_counter() - started
    if json_path:
        write_json(json_path, results)


def run_data_benchmarks(args: argparse.Namespace, work: Path, results: dict) -> None:
    """The benchmarks that need CTs and shards: made synthetic unless --data/--shards are given."""
    data = args.data
    if data is None:
        data = work / "data"
        if not (data / "candidates.csv").is_file():
            started = time.perf_counter()
            make_dataset(data, n_cts=args.cts, seed=0, shape=tuple(args.shape))
            results["seconds"]["synthetic_data"] = time.perf_counter() - started
    shards = args.shards
    if args.what in ("shard", "all") or (shards is None and args.what not in ("seg", "analyze")):
        shard_out = work / "shards"
        if args.what in ("shard", "all"):
            measure(results, args.json, "shard", bench_shard, data, shard_out, args.workers)
        else:
            build(BuildOptions(data=data, out=shard_out, workers=args.workers, progress=False))
        shards = shards or shard_out
    extra = ["--num-workers", str(args.train_workers)] if args.train_workers is not None else []
    if args.what in ("loader", "all"):
        measure(results, args.json, "loader", bench_loader, data, shards, args.loader_workers, args.batch_sizes[0],
                args.loader_samples, args.baseline_samples, work / "diskcache")
    if args.what in ("train", "all"):
        measure(results, args.json, "train", bench_train, shards, work / "runs", args.batch_sizes, args.train_steps,
                args.ranks, args.variants, extra)
    if args.what in ("seg", "all"):
        measure(results, args.json, "seg", bench_seg, data, work / "seg", args.workers, args.batch_sizes[0],
                args.train_steps, extra)
    if args.what in ("analyze", "all"):
        measure(results, args.json, "analyze", bench_analyze, data, work / "analyze", args.analyze_cts, args.seg_model,
                args.cls_model, args.ranks, args.confusion_scans, args.confusion_marks, args.analyze_slices)


if __name__ == "__main__":
    sys.exit(main())
