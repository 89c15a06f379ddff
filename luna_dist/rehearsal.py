"""A full-scale stand-in of the real LUNA16 download, built from the real tables: every one of its
888 series, its layout, its real annotations, and a candidate table of LUNA16's size and mix, with
small synthetic CTs. What needs the real scale (a shard build over 551,065 candidates, a 10-fold
run, the evaluation of 888 scans) can be rehearsed and timed before the 120 GB arrive.

    python -m luna_dist.rehearsal OUT --tables DIR [--shape 64 128 128] [--seed 0] [--series 888]
        [--candidates N] [--workers 2]

What is real and what is not: `luna_dist.synthetic.rehearsal`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from luna_dist.common import cli
from luna_dist.synthetic.rehearsal import (
    DEFAULT_SHAPE,
    FULL_CANDIDATES,
    FULL_SERIES,
    TABLES,
    RehearsalError,
    check_shape,
    make_rehearsal,
)
from luna_dist.tables.candidates import CsvError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m luna_dist.rehearsal", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write subset0..9 and the tables into")
    parser.add_argument("--tables", type=Path, required=True,
                        help=f"folder of the real LUNA16 tables ({', '.join(TABLES.values())})")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("S", "R", "C"), default=list(DEFAULT_SHAPE),
                        help="slices rows columns of every CT (default %(default)s; the real scans: about 300 512 512)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--series", type=int, help="only the first N series of seriesuids.csv (default: all)")
    parser.add_argument("--candidates", type=int,
                        help=f"candidate rows in all (default: {FULL_CANDIDATES:,} scaled by series / {FULL_SERIES})")
    parser.add_argument("--workers", type=int, default=1, help="processes writing CTs (default 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.check_at_least(parser, args, {"seed": 0, "series": 1, "candidates": 1, "workers": 1})
    try:
        check_shape(tuple(args.shape))
    except RehearsalError as err:
        parser.error(str(err))
    try:
        summary = make_rehearsal(args.out, args.tables, tuple(args.shape), args.seed, args.series, args.candidates,
                                 args.workers)
    except (RehearsalError, CsvError, OSError) as err:
        return cli.fail(str(err))
    except KeyboardInterrupt:
        cli.fail(f"interrupted: every CT in {args.out} is whole, the tables are not (re)written; rerun the same "
                 "command to finish")
        return cli.EXIT_INTERRUPTED
    print(summary)
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
