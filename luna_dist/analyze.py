"""`python -m luna_dist.analyze`: from CT files to scored nodule findings, over any number of processes.

    accelerate launch -m luna_dist.analyze --data DIR --seg-model S --cls-model C [--mal-model M] \\
        [--shards BUILD] [--folds 9 | --series UID ...] [--candidates candidates.csv] --out RESULTS
    python -m luna_dist.analyze --ct DICOM_FOLDER scan.nii.gz ... --seg-model S --cls-model C --out RESULTS
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m luna_dist.analyze ...   # CPU ranks

The analysis is `luna_dist.analysis`: which CTs (`series`), one CT (`detect`), many over many processes
(`run`), what produced each finding (`identity`), the scores and the report (`findings`, `report`).
"""

from __future__ import annotations

import sys

from accelerate import PartialState

from luna_dist.analysis.options import build_parser, parse_args
from luna_dist.analysis.run import run
from luna_dist.analysis.series import AnalysisError
from luna_dist.common import cli

__all__ = ["build_parser", "main"]  # build_parser: for the flag tables of docs/ (`luna_dist.docs`)


def main(argv: list[str] | None = None) -> int:
    cli.setup_logging()
    args = parse_args(argv)
    try:
        with cli.interrupts():
            run(args)
    except AnalysisError as err:
        return cli.fail(str(err))
    except KeyboardInterrupt:
        stopped, code = cli.interruption()
        if PartialState().is_main_process:  # one line for the run, as training says it (a launcher signals every rank)
            kept = len(list((args.out / "ct").glob("*.json")))
            cli.fail(f"{stopped}: {kept} finished CT(s) are kept in {args.out / 'ct'}; rerunning the same command "
                     "resumes from them")
        return code
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
