"""The training command's options: the shared flags and each task's, checked."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from accelerate.tracking import get_available_trackers

from luna_dist.common import cli
from luna_dist.data.worker_watch import LEAST_TIMEOUT, WORKER_TIMEOUT
from luna_dist.shards.sources import DEFAULT_READ_TIMEOUT
from luna_dist.tables.candidates import N_FOLDS
from luna_dist.training.tasks import SHARED_FLAGS, TASKS

TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb", "comet_ml": "comet-ml",
            "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}
"""The experiment trackers accelerate speaks, as `--log-with` names them, and the package each needs."""

AUGMENT_HELP = {"flip": "mirroring along each axis", "offset": "shifts", "scale": "zoom",
                "rotate": "rotation about the head-foot axis", "noise": "Gaussian noise"}
"""What each --augment-KIND flag does, for its help."""


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, tuple[str, ...]]]:
    """The command's parser, and which tasks own each flag that not every task uses."""
    parser = argparse.ArgumentParser(prog="launch/train.py", description="Train a LUNA16 model on a shard set.")
    add = parser.add_argument
    add("--task", choices=sorted(TASKS), default="cls", help="what to train (default: cls, the nodule classifier)")
    add("--shards", required=True, help="shard set built by python -m luna_dist.shard: a folder, or a URL "
                                        "(http(s)://…/, s3://…/, gs://…/, or 'pipe:CMD' with {name} for the file name)")
    add("--cache-dir", type=Path, help="keep a checked copy of each shard streamed from a URL here; read it from there")
    add("--cache-limit", type=cli.byte_size, metavar="SIZE",
        help="the most the --cache-dir folder may hold, e.g. 40GB: the shards used longest ago that no process reads "
             "are deleted to make room (default: no bound)")
    add("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT, metavar="SECONDS",
        help="a shard or manifest streamed from a URL fails, naming it, when less than 1 MiB of it arrives in this "
             "many seconds of waiting: a minimum rate, not a deadline (default: %(default)s)")
    add("--epochs", type=int, default=1, help="passes over the training folds (or --epoch-samples each)")
    add("--batch-size", type=int, default=32, help="per process")
    add("--num-workers", type=int,
        help="data workers per process (default: enough to feed the device, by its samples/s timed at the start "
             "against a worker's, within the cores: docs/doctor.md; a mid-epoch --resume keeps the epoch's)")
    add("--worker-timeout", type=float, default=WORKER_TIMEOUT, metavar="SECONDS",
        help="a data worker that shows no sign of life for this long (frozen, stopped) stops the run, naming it; "
             "a slow one is not stopped (default: %(default)s)")
    add("--lr", type=float, default=0.001, help="learning rate")
    add("--momentum", type=float, default=0.99, help="SGD momentum (--task cls, malignancy)")
    add("--seed", type=int, default=0, help="seeds the weights, the shuffles and the augmentations")
    add("--val-folds", type=int, nargs="+", default=[9], help="folds held out for validation")
    add("--exclude-folds", type=int, nargs="+", default=[], metavar="FOLD",
        help="folds neither trained nor validated on: kept unseen for a later score (e.g. a fold a model chosen "
             "on --val-folds is then scored on)")
    add("--select-on", choices=["val", "last"], default="val",
        help="the epoch kept as best.pt: val, the best --best-by score on --val-folds (which it then has seen: "
             "they are not scored with it); last, the last epoch, chosen on no fold (validation is shown, not used)")
    add("--best-by", help="the validation score that picks best.pt: cls cpm (default where the shards carry the "
                          "findings; ties by AUC), auc, f1, loss; malignancy auc (default), f1, loss; seg recall "
                          "(default: at --seg-precision-floor), f1, loss")
    add("--augment", action="store_true", help="all augmentations below")
    for kind in ("flip", "offset", "scale", "rotate", "noise"):
        add(f"--augment-{kind}", action="store_true", help=f"random {AUGMENT_HELP[kind]} of the training samples")
    add("--epoch-samples", type=int, help="training samples per epoch, all ranks together (default: one pass)")
    add("--shuffle-buffer", type=int, default=1000, help="samples buffered per worker for shuffling")
    add("--run-name", help="folder under --out (default: a time stamp)")
    add("--out", type=Path, default=Path("runs"), help="folder of the runs")
    add("--resume", action="store_true", help="continue run --run-name (default: the latest) from its last state")
    add("--overwrite", action="store_true", help="start run --run-name again: delete its state, best model and logs")
    add("--checkpoint", type=Path, help="weights to start from or to evaluate: a best.pt or a run's state/ folder")
    add("--eval-only", action="store_true", help="validate the resumed or given checkpoint; no training")
    add("--metrics-json", type=Path, help="also write the last validation metrics here")
    add("--log-with", nargs="+", choices=list(TRACKERS), default=["tensorboard"], metavar="TRACKER",
        help="experiment trackers to log to, through accelerate: tensorboard (the run folder's own, always written), "
             f"{', '.join(list(TRACKERS)[1:])}; each takes its settings from its environment variables "
             "(MLFLOW_TRACKING_URI, WANDB_PROJECT, ...)")
    add("--verify", action="store_true", help="check every shard's sha256 against the manifest first (reads them all)")
    add("--dist-timeout", type=float, default=300, metavar="SECONDS",
        help="how long a process waits for the others in a collective before it fails (default: 300)")
    add("--save-every", type=int, metavar="STEPS",
        help="also save the state every STEPS training steps, mid-epoch; --resume continues there")
    add("--max-steps", type=int, help="cap training steps per epoch (quick checks)")
    add("--channels-last", choices=["auto", "on", "off"], default="auto",
        help="channels-last memory layout (auto: on except on MPS)")
    add("--skip-device-check", action="store_true",
        help="train on a device the start's check refuses, or without the check (recorded in args.json; "
             "docs/doctor.md)")
    owners = dict(SHARED_FLAGS)
    for task in TASKS.values():
        group = parser.add_argument_group(f"--task {task.name}")
        task.add_arguments(group)
        owners.update({flag: (task.name,) for action in group._group_actions for flag in action.option_strings})
    return parser, owners


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser, owners = build_parser()
    args = parser.parse_args(argv)

    given = {token.split("=", 1)[0] for token in (sys.argv[1:] if argv is None else argv) if token.startswith("--")}
    for flag in sorted(given & owners.keys()):
        if args.task not in owners[flag]:
            parser.error(f"{flag} is a flag of --task {' and '.join(owners[flag])}; --task {args.task} does not use it")
    cli.check_at_least(parser, args, {"epochs": 1, "batch_size": 1, "epoch_samples": 1, "num_workers": 0,
                                      "max_steps": 1, "shuffle_buffer": 1, "save_every": 1})
    available = {str(tracker) for tracker in get_available_trackers()} | {"tensorboard"}
    for tracker in args.log_with:
        if tracker not in available:
            parser.error(f"--log-with {tracker}: the {TRACKERS[tracker]} package is not installed here: pip install "
                         f"{TRACKERS[tracker]}")
    if args.cache_limit is not None and args.cache_dir is None:
        parser.error("--cache-limit bounds the cache folder: give --cache-dir too")
    if not args.read_timeout > 0:
        parser.error(f"--read-timeout must be above 0 seconds, got {args.read_timeout}")
    cli.check_at_least(parser, args, {"worker_timeout": LEAST_TIMEOUT})
    for flag, folds in (("--val-folds", args.val_folds), ("--exclude-folds", args.exclude_folds)):
        if any(not 0 <= fold < N_FOLDS for fold in folds):
            parser.error(f"{flag} must be in 0..{N_FOLDS - 1}, got {folds}")
    if both := sorted(set(args.val_folds) & set(args.exclude_folds)):
        parser.error(f"fold {both[0]} is in --val-folds and --exclude-folds: a fold is validated on or left out")
    task = TASKS[args.task]
    if args.best_by is not None and args.best_by not in task.best_by_rules:
        parser.error(f"--best-by {args.best_by} is not a score of --task {args.task}: choose "
                     f"{', '.join(task.best_by_rules)}")
    task.check_arguments(parser, args)
    if args.eval_only and not (args.resume or args.checkpoint):
        parser.error("--eval-only needs --resume or --checkpoint PATH: there is nothing to evaluate")
    if args.resume and args.overwrite:
        parser.error("--resume continues a run and --overwrite starts it again: choose one")
    return args

