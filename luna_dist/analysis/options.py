"""The analysis command's options (`python -m luna_dist.analyze`, and `parse_args` for the same analysis from
Python: `luna_dist.analysis.analyze(parse_args([...]))`), checked."""

from __future__ import annotations

import argparse
from pathlib import Path

from luna_dist.common import cli
from luna_dist.imaging.ct import MAX_CT_VOXELS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m luna_dist.analyze", description="`python -m luna_dist.analyze`: "
                                     "from CT files to scored nodule findings, over any number of processes.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="LUNA16-format folder (subset*/ with .mhd/.raw)")
    source.add_argument("--ct", type=Path, nargs="+", action="extend", metavar="PATH",
                        help="analyse these CTs instead (no tables, no scoring): a DICOM series folder, or a "
                             "NIfTI, .mha, .nrrd, .mhd or other 3-D file SimpleITK reads; may be given again")
    parser.add_argument("--seg-model", type=Path, help="segmentation model: best.pt or a run's state/ folder")
    parser.add_argument("--cls-model", type=Path, required=True, help="nodule classifier: best.pt or state/")
    parser.add_argument("--mal-model", type=Path, help="malignancy classifier: best.pt or state/ (optional)")
    parser.add_argument("--shards", help="a shard build (folder or URL): analyse the series its manifest holds "
                                         "(in --folds, when given), exactly")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--folds", type=int, nargs="+",
                       help="analyse the series of these folds, dealt as the shard build deals them (default: all)")
    which.add_argument("--series", nargs="+", help="analyse these series")
    parser.add_argument("--candidates", type=Path,
                        help="score these candidate positions instead of the segmentation's groups")
    parser.add_argument("--out", type=Path, required=True, help="results folder")
    parser.add_argument("--batch-size", type=int, default=32, help="slices, and chunks, per forward pass")
    parser.add_argument("--max-ct-voxels", type=int, default=MAX_CT_VOXELS,
                        help="refuse a CT whose header declares more voxels, before they are read (LUNA16's largest "
                             "has 2.0e8)")
    parser.add_argument("--dist-timeout", type=float, default=300, metavar="SECONDS",
                        help="how long a process waits for the others in a collective before it fails (default: 300)")
    parser.add_argument("--skip-device-check", action="store_true",
                        help="analyse on a device the start's check refuses, or without the check (recorded in "
                             "summary.json; docs/doctor.md)")
    parser.add_argument("--no-body-crop", dest="body_crop", action="store_false",
                        help="segment every pixel of each slice, not only the body's box (for a CT of several "
                             "separate objects, a phantom: the box holds the largest only)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.check_at_least(parser, args, {"batch_size": 1, "max_ct_voxels": 1, "dist_timeout": 1})
    if args.candidates is None and args.seg_model is None:
        parser.error("--seg-model is needed (or --candidates CSV to score given positions)")
    if args.shards and args.series:
        parser.error("--shards takes the series of a build's folds: give --folds (or nothing), not --series")
    if args.ct:
        given = [flag for flag, value in (("--folds", args.folds), ("--series", args.series),
                                          ("--shards", args.shards), ("--candidates", args.candidates)) if value]
        if given:
            parser.error(f"--ct analyses the CTs given, with no LUNA16 folder or tables: leave out {given[0]}")
    return args
