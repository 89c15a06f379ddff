"""The protocol's SLURM form: the same stages, as jobs of the cluster's own scheduler.

`--slurm` writes `OUT/slurm/`:

    shards.sbatch   one job: the shard builds (--stages shards)
    folds.sbatch    an array of one task per fold, each on a node of its own: its three trainings and its
                    analysis under the node's launcher (--stages folds --folds $SLURM_ARRAY_TASK_ID)
    merge.sbatch    one job: the merge, the score and the page (--stages merge)
    submit.sh       sbatch of the three, each after the one before it succeeded (--dependency=afterok)

Each job runs this very command with `--stages`, so every stage keeps its identity, its
resume and its checks; a task that fails is rerun by submitting again (finished stages are
skipped). Nothing is submitted here, and no scheduler of our own runs anything.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from luna_dist.analysis.series import AnalysisError, dealt_folds, find_on_disk
from luna_dist.cv.runner import ProtocolError
from luna_dist.cv.stages import Layout

NODE_LAUNCHER = ("accelerate launch --multi_gpu --mixed_precision bf16 --num_machines 1 "
                 "--num_processes ${SLURM_GPUS_ON_NODE:-8}")
"""The launcher of a fold's task when none is given: one process per GPU of its node."""

HEADER = """#!/bin/bash
# {what}: written by python -m luna_dist.protocol --slurm (luna_dist.cv.slurm); submit with submit.sh.
#SBATCH --job-name=luna_dist-protocol-{name}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
{resources}#SBATCH --output={logs}/%x-{log}.out
set -euo pipefail
cd {cwd}
"""


def write(layout: Layout, args: argparse.Namespace, launcher: list[str]) -> str:
    """The scripts under OUT/slurm/; what to run to submit them."""
    folds = args.folds or data_folds(layout.data)
    folder = layout.out / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "luna_dist.protocol", "--data", str(layout.data), "--out", str(layout.out),
            "--recipe", str(Path(args.recipe).absolute())]
    node = NODE_LAUNCHER if args.launcher is None else shlex.join(launcher)
    jobs = {
        "shards": ("the shard builds", "#SBATCH --cpus-per-task=32\n", "%j", [*base, "--stages", "shards"]),
        "folds": ("each fold's trainings and analysis, one task a fold",
                  f"#SBATCH --array={','.join(map(str, folds))}\n#SBATCH --gpus-per-node=8\n"
                  "#SBATCH --cpus-per-task=64\n", "%A_%a",
                  [*base, "--stages", "folds", "--folds", "$SLURM_ARRAY_TASK_ID", "--launcher", node]),
        "merge": ("the merged submission, its score and the page", "#SBATCH --cpus-per-task=4\n", "%j",
                  [*base, "--stages", "merge", *(["--folds", *map(str, args.folds)] if args.folds else [])]),
    }
    for name, (what, resources, log, command) in jobs.items():
        text = HEADER.format(what=what, name=name, resources=resources, logs=folder, log=log,
                             cwd=shlex.quote(os.getcwd()))
        (folder / f"{name}.sbatch").write_text(text + _shell(command) + "\n")
    submit = folder / "submit.sh"
    submit.write_text("#!/bin/bash\n# The protocol on SLURM: the builds, then the folds' array, then the merge.\n"
                      "set -euo pipefail\ncd \"$(dirname \"$0\")\"\n"
                      "shards=$(sbatch --parsable shards.sbatch)\n"
                      "folds=$(sbatch --parsable --dependency=afterok:\"$shards\" folds.sbatch)\n"
                      "sbatch --dependency=afterok:\"$folds\" merge.sbatch\n")
    submit.chmod(0o755)
    return (f"{folder}: shards.sbatch, folds.sbatch (an array of {len(folds)} tasks: folds {folds}), merge.sbatch; "
            f"submit them with: bash {submit}")


def data_folds(data: Path) -> list[int]:
    """The folds that hold series, as the shard build deals them."""
    try:
        folds, _ = dealt_folds(data, find_on_disk(data))
    except AnalysisError as err:
        raise ProtocolError(str(err)) from None
    return sorted(set(folds.values()))


def _shell(command: list[str]) -> str:
    """A command line for bash, quoted, where `$SLURM_ARRAY_TASK_ID` and the launcher's `${...}` are left for
    the shell to expand inside double quotes."""
    return " ".join(f'"{token}"' if "$" in token else shlex.quote(token) for token in command)
