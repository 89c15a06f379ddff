"""`python -m luna_dist.protocol`: LUNA16's whole protocol in one command, no fold scored by a model that saw it.

    python -m luna_dist.protocol --data LUNA16 --out protocol/luna16 [--recipe launch/recipes/luna16.toml] \\
        [--launcher "accelerate launch --config_file launch/multi_gpu.yaml"] [--folds 0 1 ...]
    python -m luna_dist.protocol --data LUNA16 --out protocol/luna16 --plan     # every stage and its time, first
    python -m luna_dist.protocol --data LUNA16 --out protocol/luna16 --slurm    # the same stages as SLURM jobs

The shard builds once; then for each fold K the nodule classifier, the UNet and the malignancy model
trained without fold K, and the analysis of fold K with those three; then every fold's submission
merged and scored as one, and a page (`index.html`) that links each fold's report. Each stage is a
command of its own (`luna_dist.cv.stages`), run under the launcher; a stage finished with the same
inputs is skipped, a killed one resumed (`luna_dist.cv.runner`); the recipe holds each stage's flags
(`luna_dist.cv.recipe`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from luna_dist import analyze, evaluate, shard
from luna_dist.common import cli
from luna_dist.cv import plan, report, slurm
from luna_dist.cv.recipe import Recipe, RecipeError, check, load
from luna_dist.cv.runner import ProtocolError, Runner
from luna_dist.cv.stages import KINDS, Layout, Stage, fold_stages, merge_stage, shard_stages
from luna_dist.imaging.ct import CtError
from luna_dist.shards.inputs import InputError
from luna_dist.training import options

DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "launch" / "recipes" / "luna16.toml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m luna_dist.protocol", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="LUNA16-format folder (subset*/ with .mhd/.raw, the tables)")
    parser.add_argument("--out", type=Path, required=True,
                        help="the protocol's folder: shards, runs, analyses, the merged score and index.html")
    parser.add_argument("--recipe", type=Path,
                        help="TOML file of each stage's flags (default: launch/recipes/luna16.toml, the real data "
                             "set's; launch/recipes/synthetic.toml: the demo's sizes)")
    parser.add_argument("--launcher", default=None,
                        help="the command line training and the analysis run under, e.g. \"accelerate launch "
                             "--config_file launch/multi_gpu.yaml\" (default: this Python, one process)")
    parser.add_argument("--folds", type=int, nargs="+",
                        help="the folds analysed and merged (default: every fold of the build that has series)")
    parser.add_argument("--stages", choices=KINDS, nargs="+", default=list(KINDS),
                        help="the kinds of stage run (default: all): the others must be done; a SLURM array runs "
                             "--stages folds --folds K")
    parser.add_argument("--plan", action="store_true",
                        help="print every stage, what it reads and writes, whether it is done and the time it "
                             "would take here; run nothing")
    parser.add_argument("--slurm", action="store_true",
                        help="write the SLURM form of these stages into --out/slurm/ (builds, an array of one task "
                             "a fold, a dependent merge) and print how to submit it; run nothing")
    return parser


def stage_parsers(layout: Layout) -> dict:
    """Each recipe section's command line, parsed by its command's own parser with the protocol's flags."""
    data, out = str(layout.data), str(layout.out)

    def train(task: str):
        start = ["--finetune", out] if task == "malignancy" else []
        return lambda flags: options.parse_args(["--task", task, "--shards", out, "--val-folds", "0", "--select-on",
                                                 "last", *start, *flags])

    return {
        "shard.cls": lambda flags: shard.parse_options(["--data", data, "--out", str(layout.shards("cls")), *flags])[0],
        "shard.seg": lambda flags: shard.parse_options(["--task", "seg", "--data", data, "--out",
                                                        str(layout.shards("seg")), *flags])[0],
        "train.cls": train("cls"), "train.seg": train("seg"), "train.malignancy": train("malignancy"),
        "analyze": lambda flags: analyze.parse_args(["--data", data, "--shards", out, "--folds", "0", "--seg-model",
                                                     out, "--cls-model", out, "--mal-model", out, "--out", out,
                                                     *flags]),
        "evaluate": lambda flags: evaluate.build_parser().parse_args(["--shards", out, "--predictions", out, *flags]),
    }


def build_folds(layout: Layout, wanted: list[int] | None) -> tuple[list[int], list[int]]:
    """(the folds to analyse, every fold of the classification build that has series); ProtocolError for a fold
    asked for that has none."""
    manifest = json.loads((layout.shards("cls") / "manifest.json").read_text())
    with_series = sorted(int(fold) for fold, entry in manifest["folds"].items() if entry["series"])
    if wanted is None:
        return with_series, with_series
    if unknown := sorted(set(wanted) - set(with_series)):
        raise ProtocolError(f"--folds {unknown[0]}: the build {layout.shards('cls')} has no series in it (its folds "
                            f"with series: {with_series})")
    return sorted(set(wanted)), with_series


def run(args: argparse.Namespace, recipe: Recipe, layout: Layout, runner: Runner) -> dict:
    """Every stage in order, each skipped when done; then the page and protocol.json, written again from what the
    stages left (a view of them, not a stage); the merged score."""
    for stage in shard_stages(recipe, layout):
        runner.run(stage)
    folds, with_series = build_folds(layout, args.folds)
    if "folds" in args.stages or "merge" in args.stages:
        for fold in folds:
            for stage in fold_stages(recipe, layout, fold, with_series):
                runner.run(stage)
    if "merge" not in args.stages:
        return {}
    stages = [stage.name for stage in all_stages(recipe, layout, folds, with_series)]
    runner.run(merge_stage(recipe, layout, folds, plot=plottable()))
    made = report.produced(layout, recipe, folds, shlex.join(runner.launcher), stages)
    print(f"page: {report.write(layout, made)}")
    return made["score"]


def all_stages(recipe: Recipe, layout: Layout, folds: list[int], with_series: list[int]) -> list[Stage]:
    return [*shard_stages(recipe, layout), *(stage for fold in folds
                                             for stage in fold_stages(recipe, layout, fold, with_series)),
            merge_stage(recipe, layout, folds, plot=plottable())]


def plottable() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.recipe = args.recipe or DEFAULT_RECIPE  # not the parser's default: the docs show none of this checkout's paths
    if args.plan and args.slurm:
        parser.error("--plan prints the stages and --slurm writes them as jobs: choose one")
    if not args.data.is_dir():
        return cli.fail(f"--data {args.data}: not a folder (the LUNA16-format folder: subset*/, the tables)")
    layout = Layout(args.data.absolute(), args.out.absolute())
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    try:
        recipe = load(args.recipe)
        parsed = check(recipe, stage_parsers(layout))
    except RecipeError as err:
        return cli.fail(str(err))
    try:
        if args.slurm:
            print(slurm.write(layout, args, launcher))
            return cli.EXIT_OK
        if args.plan:
            print(plan.plan(recipe, parsed, layout, launcher, args.folds))
            return cli.EXIT_OK
    except (ProtocolError, InputError, CtError, ValueError) as err:
        return cli.fail(str(err))
    except OSError as err:
        return cli.fail(f"{err.filename}: {err.strerror}")
    runner = Runner(layout, launcher, set(args.stages))
    try:
        with cli.interrupts():
            score = run(args, recipe, layout, runner)
    except (ProtocolError, OSError) as err:
        return cli.fail(str(err) if isinstance(err, ProtocolError) else f"{err.filename}: {err.strerror}")
    except KeyboardInterrupt:
        stopped, code = cli.interruption()
        where = f" in stage {runner.current.name}" if runner.current else ""
        cli.fail(f"{stopped}{where}: the stages finished are kept ({layout.out / 'stages'}); rerun the same command "
                 "to go on from there")
        return code
    if score:
        interval = f" [{score['cpm_ci'][0]:.4f}, {score['cpm_ci'][1]:.4f}]" if score.get("cpm_ci") else ""
        print(f"CPM {score['cpm']:.4f}{interval} over {score['scans']} scans and {score['nodules']} nodules: "
              f"{layout.out / report.PAGE}")
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
