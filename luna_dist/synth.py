"""`python -m luna_dist.synth`: write the synthetic LUNA16-format data set.

    python -m luna_dist.synth OUT --cts 10 --seed 0 [--shape 200 512 512]

The generator is `luna_dist.synthetic.generator`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from luna_dist.common import cli
from luna_dist.synthetic.generator import DEFAULT_SHAPE, make_dataset


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m luna_dist.synth", description="Write a synthetic LUNA16-format data set."
    )
    parser.add_argument("out", type=Path, help="folder to write subset0..9 and the CSVs into")
    parser.add_argument("--cts", type=int, default=10, help="number of CTs (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--shape", type=int, nargs=3, metavar=("I", "R", "C"), default=list(DEFAULT_SHAPE),
        help="slices rows columns; slices vary +-25%% per CT (default %(default)s; full size: 300 512 512)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.check_at_least(parser, args, {"cts": 1, "seed": 0})
    try:
        summary = make_dataset(args.out, args.cts, args.seed, tuple(args.shape))
    except ValueError as err:
        parser.error(str(err))
    print(summary)


if __name__ == "__main__":
    sys.exit(main())
