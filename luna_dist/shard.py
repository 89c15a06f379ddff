"""`python -m luna_dist.shard`: turn a LUNA16-format folder into WebDataset shards, for any task.

    python -m luna_dist.shard --data DIR --out shards/NAME [--task cls|seg] [--codec lz4|zstd|none] [--workers N]
    python -m luna_dist.shard --data DIR --out shards/NAME --plan     # the samples, disk and time, first

The build is `luna_dist.shards.build`, its plan `luna_dist.shards.plan`; docs/shard-format.md is the
contract of what they write.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from luna_dist.common import cli
from luna_dist.imaging.ct import CtError
from luna_dist.shards import plan, seg_samples
from luna_dist.shards.build import build, read_build_inputs
from luna_dist.shards.codecs import CODECS
from luna_dist.shards.inputs import InputError, left_out_summary
from luna_dist.shards.options import CUTTERS, BuildError, BuildOptions

SEG_FLAGS = ("--seg-negatives", "--seg-val-every")
"""The flags of --task seg: given with --task cls, they are refused."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m luna_dist.shard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="LUNA16-format folder (subset*/ with .mhd/.raw, CSVs)")
    parser.add_argument("--task", choices=sorted(CUTTERS), default="cls",
                        help="cls: a chunk per candidate (default); seg: slice stacks and nodule masks")
    parser.add_argument("--out", type=Path,
                        help="output folder (default: shards/<name of --data>, -seg for --task seg)")
    parser.add_argument("--candidates", type=Path,
                        help="the points to classify (default: candidates_V2.csv, else candidates.csv, found in DATA "
                             "or up to two folders below it)")
    parser.add_argument("--annotations", type=Path, help="the nodules (default: annotations.csv, found likewise)")
    parser.add_argument("--malignancy", type=Path,
                        help="malignancy table with mal_bool (default: annotations_with_malignancy.csv if found)")
    parser.add_argument("--excluded", type=Path,
                        help="findings the evaluation ignores (default: annotations_excluded.csv if found, as in "
                             "the evaluation kit's evaluationScript/annotations/)")
    parser.add_argument("--seriesuids", type=Path,
                        help="the series LUNA16 scores, to check the tables against (default: seriesuids.csv if "
                             "found)")
    parser.add_argument("--workers", type=int, default=BuildOptions.workers,
                        help="parallel CT readers (default: cores)")
    parser.add_argument("--max-samples", type=int, default=BuildOptions.max_samples, help="samples per shard at most")
    parser.add_argument("--max-mb", type=float, default=BuildOptions.max_mb, help="shard size at most, in MB")
    parser.add_argument("--codec", choices=CODECS, default=BuildOptions.codec,
                        help="how the samples' arrays are stored, losslessly: lz4 (default), ~2x smaller and quick to "
                             "decode, for loaders that feed a GPU; zstd, ~10%% smaller still, decoded ~3x slower; "
                             "or none")
    parser.add_argument("--max-ct-voxels", type=int, default=BuildOptions.max_ct_voxels,
                        help="refuse a CT whose header declares more voxels, before they are read (LUNA16's largest "
                             "has 2.0e8)")
    parser.add_argument("--strict", action="store_true",
                        help="fail on malformed or duplicate CSV rows and series without .mhd")
    parser.add_argument("--max-bad-rows", type=float, default=BuildOptions.max_bad_rows, metavar="PERCENT",
                        help="refuse a table with more than this share of its rows malformed "
                             "(default %(default)s %%)")
    parser.add_argument("--overwrite", action="store_true", help="replace a different build found in --out")
    parser.add_argument("--seg-negatives", type=int, default=BuildOptions.seg_negatives,
                        help="seg: negative stacks per CT (default %(default)s)")
    parser.add_argument("--seg-val-every", type=int, default=BuildOptions.seg_val_every,
                        help="seg: validate every slice with mask and 1 block of slices without in N "
                             "(default %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--plan", action="store_true",
                        help="read the tables and CT headers only, and print per fold the samples, bytes, disk and "
                             "time a build would take (measured on two synthetic CTs); write nothing")
    return parser


def parse_options(argv: list[str] | None = None) -> tuple[BuildOptions, bool]:
    """The build's options from its command line, checked (`parser.error` where it is wrong), and whether it asks
    for --plan only."""
    parser = build_parser()
    args = parser.parse_args(argv)
    plan_only = vars(args).pop("plan")
    given = {token.split("=", 1)[0] for token in (sys.argv[1:] if argv is None else argv)}
    if args.task != seg_samples.TASK and (flags := sorted(given & set(SEG_FLAGS))):
        parser.error(f"{flags[0]} is a flag of --task seg; --task {args.task} does not use it")
    default_out = Path("shards") / (args.data.resolve().name + ("-seg" if args.task == "seg" else ""))
    try:
        return BuildOptions(**{**vars(args), "out": args.out or default_out}), plan_only
    except BuildError as err:  # a flag out of range: the command line is wrong
        parser.error(str(err))


def main(argv: list[str] | None = None) -> int:
    options, plan_only = parse_options(argv)
    if plan_only:
        try:
            inputs = read_build_inputs(options)
            for warning in inputs.warnings:
                print(warning, file=sys.stderr)
            plans, rate = plan.plan(options, inputs)
        except (InputError, CtError, ValueError) as err:
            return cli.fail(str(err))
        print(plan.format_plan(plans, rate, options.workers, options.out))
        return 0
    try:
        manifest = build(options)
    except (BuildError, InputError, CtError, ValueError) as err:
        return cli.fail(str(err))
    counts = manifest["counts"]
    validation = f", {counts['val_slices']} validation slices" if "val_slices" in counts else ""
    cts = sum(len(fold["series"]) for fold in manifest["folds"].values())
    print(f"{options.out}: {counts['samples']} samples ({counts['positives']} pos, {counts['negatives']} neg)"
          f"{validation} in {len(manifest['shards'])} shards from {cts} CTs")
    if (left_out := left_out_summary(manifest)) is not None:
        print(left_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
