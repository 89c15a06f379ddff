"""The one training loop: any task of `luna_dist.tasks` on a shard set, with Accelerate.

One script for an Apple MPS laptop, one CUDA GPU, many GPUs or nodes, or CPU ranks:

    accelerate launch launch/train.py --shards shards/NAME            # per accelerate config
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 launch/train.py --shards ...
    python -m luna_dist.train --shards shards/NAME                    # one process

Data: each rank streams its own shards (luna_dist.stream); the loaders are not
passed through `accelerator.prepare`, which would dispatch batches from rank 0 or
split the stream a second time. Every rank runs the same number of steps, checked.
Metrics: the task's per-sample records (for the classifier: label, probability,
loss) stay on the device during an epoch, are gathered from all ranks, and only then
turned into numbers; validation runs the main process's model on every rank (the one
that is saved); the main process alone prints, writes TensorBoard and saves the best
model. What differs per model lives in the task (`--task`); this loop owns the
Accelerator, the epochs, gathering and logging; the run folder (`luna_dist.run_folder`)
and the checkpoints (`luna_dist.checkpoint`) are components of their own.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import random
import re
import socket
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object, set_seed
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from luna_dist import run_folder
from luna_dist.candidates import N_FOLDS
from luna_dist.checkpoint import STATE, Checkpointer, CheckpointError, Progress, is_better, recover
from luna_dist.hardware import precision_warning
from luna_dist.model import WeightsError, load_into
from luna_dist.run_folder import RunFolderError
from luna_dist.stream import DEFAULT_READ_TIMEOUT, ShardSetError
from luna_dist.tasks import TASKS

log = get_logger("luna_dist.train")

FINITE_CHECK_STEPS = 16
"""Training steps between the checks that the loss is finite: each check syncs the ranks and the host
once, so a diverged run stops within this many steps without a sync in every step."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/train.py", description="Train a LUNA16 model on a shard set.")
    parser.add_argument("--task", choices=sorted(TASKS), default="cls", help="what to train (default: cls, the nodule classifier)")
    parser.add_argument("--shards", required=True,
                        help="shard set built by python -m luna_dist.shard: a folder, or a URL (http(s)://…/, "
                             "s3://…/, gs://…/, or 'pipe:CMD' with {name} for the file name)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="keep a checked copy of each shard streamed from a URL here, and read it from there")
    parser.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT, metavar="SECONDS",
                        help="a shard streamed from a URL that sends nothing for this long fails, naming it "
                             "(default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="data workers per process (default: 4 on CUDA, 2 on MPS, 0 on CPU)")
    parser.add_argument("--lr", type=float, default=0.001, help="learning rate")
    parser.add_argument("--momentum", type=float, default=0.99, help="SGD momentum (tasks trained with SGD)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-folds", type=int, nargs="+", default=[9], help="folds held out for validation")
    parser.add_argument("--best-by", default=None,
                        help="the validation score that picks best.pt: cls cpm (default where the shards carry the "
                             "findings; ties by AUC), auc, f1, loss; malignancy auc (default), f1, loss; seg recall "
                             "(default: at --seg-precision-floor), f1, loss")
    parser.add_argument("--augment", action="store_true", help="all augmentations below")
    parser.add_argument("--augment-flip", action="store_true")
    parser.add_argument("--augment-offset", action="store_true")
    parser.add_argument("--augment-scale", action="store_true")
    parser.add_argument("--augment-rotate", action="store_true")
    parser.add_argument("--augment-noise", action="store_true")
    parser.add_argument("--epoch-samples", type=int, default=None,
                        help="training samples per epoch, all ranks together (default: size of the training folds)")
    parser.add_argument("--shuffle-buffer", type=int, default=1000, help="samples buffered per worker for shuffling")
    parser.add_argument("--run-name", default=None, help="folder under --out (default: a time stamp)")
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--resume", action="store_true", help="continue run --run-name (default: the latest) from its last state")
    parser.add_argument("--overwrite", action="store_true",
                        help="start run --run-name again: delete the state, best model and logs it holds")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="model weights to start from or to evaluate: a best.pt or a run's state/ folder")
    parser.add_argument("--eval-only", action="store_true", help="validate the resumed or given checkpoint; no training")
    parser.add_argument("--metrics-json", type=Path, default=None, help="also write the last validation metrics here")
    parser.add_argument("--verify", action="store_true",
                        help="check every shard's sha256 against the manifest before training (reads all shards once)")
    parser.add_argument("--dist-timeout", type=float, default=300, metavar="SECONDS",
                        help="how long a process waits for the others in a collective before it fails: "
                             "a dead or frozen node stops the run within this (default: 300)")
    parser.add_argument("--save-every", type=int, default=None, metavar="STEPS",
                        help="also save the state every STEPS training steps, mid-epoch; --resume continues there")
    parser.add_argument("--max-steps", type=int, default=None, help="cap training steps per epoch (quick checks)")
    parser.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                        help="channels-last memory layout (auto: on except on MPS)")
    for task in TASKS.values():
        task.add_arguments(parser)
    args = parser.parse_args(argv)

    for flag, least in (("epochs", 1), ("batch_size", 1), ("epoch_samples", 1), ("num_workers", 0), ("max_steps", 1),
                        ("shuffle_buffer", 1), ("save_every", 1)):
        value = getattr(args, flag)
        if value is not None and value < least:
            parser.error(f"--{flag.replace('_', '-')} must be at least {least}, got {value}")
    if not args.read_timeout > 0:
        parser.error(f"--read-timeout must be above 0 seconds, got {args.read_timeout}")
    if any(not 0 <= fold < N_FOLDS for fold in args.val_folds):
        parser.error(f"--val-folds must be in 0..{N_FOLDS - 1}, got {args.val_folds}")
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


def rng_state() -> dict:
    """The random states a data stream draws from (Python's for the class mixing, torch's for worker seeds)."""
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def default_workers(device: torch.device, local_processes: int) -> int:
    """Enough workers to feed a GPU (one decodes ~thousands of samples/s); none needed for CPU compute."""
    if device.type == "cuda":
        return max(1, min(4, (os.cpu_count() or 1) // max(1, local_processes) - 1))
    if device.type == "mps":
        return 2
    return 0


# How a collective fails when another process died (its sockets closed) or froze (the timeout).
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting", "Broken pipe",
              "Application timeout caused pair closure",
              "NCCL communicator was aborted", "Watchdog caught collective operation timeout")


class Diverged(Exception):
    """The loss or the validation scores are not finite numbers; nothing of them is kept, the message says what to change."""


class LoggingError(Exception):
    """An epoch's logs could not be written after its state was saved; a resume writes them again."""


class Trainer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        # A node that dies or freezes leaves the others waiting in a collective: fail after
        # --dist-timeout rather than torch's default of 30 minutes (gloo).
        timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=args.dist_timeout))
        self.accelerator = accelerator = Accelerator(kwargs_handlers=[timeout])
        # Each rank its own random streams (augmentation, class mixing); prepare() makes
        # every rank start from rank 0's initial weights.
        set_seed(args.seed, device_specific=True)
        self.device = accelerator.device
        self.task = task = TASKS[args.task](args)
        task.setup(accelerator)
        self.channels_last = task.channels_last
        self.shards = task.open_shards(args.shards)
        self.shards.cache_dir = None if args.cache_dir is None else str(args.cache_dir)
        self.shards.read_timeout = args.read_timeout
        self.val_folds = sorted(set(args.val_folds))
        if args.verify:
            self._verify_shards()
        self.train_folds = [f for f in self.shards.folds if f not in self.val_folds]
        if not self.train_folds and not args.eval_only:
            raise ShardSetError(f"{args.shards}: every fold is a validation fold ({self.val_folds}); nothing to train on")
        # Before the first step and before the run folder exists: a fold that cannot serve fails now.
        task.check_folds(self.shards, self.train_folds, self.val_folds, training=not args.eval_only)
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        self.num_workers = args.num_workers if args.num_workers is not None else default_workers(self.device, local_processes)
        self.pin_memory = self.device.type == "cuda"

        model = task.build_model()
        if args.checkpoint:
            load_into(model, args.checkpoint)
        self.model, self.optimizer = accelerator.prepare(model, task.build_optimizer(model))
        self.progress = Progress(rank=accelerator.process_index)
        self.train_rate = math.nan  # samples/s of the last training epoch, all ranks
        accelerator.register_for_checkpointing(self.progress)

        # Who is who, for the message when a process dies: every rank knows every rank's host and pid.
        self.processes = gather_object([f"{socket.gethostname()}, pid {os.getpid()}"])
        self.run_dir = self._run_dir()
        self.checkpoints = Checkpointer(self.run_dir, accelerator)
        # The rule best.pt is chosen by as the task settled it (--best-by's default depends on the shards).
        recorded = argparse.Namespace(**{**vars(args), "best_by": task.best_by})
        self.record = run_folder.record(recorded, accelerator.num_processes, accelerator.mixed_precision,
                                        self.shards.manifest.get("identity", {}))
        self.writers: dict[str, SummaryWriter] = {}
        self._open_run()

    def _agree(self, problem: str | None) -> None:
        """The main process's verdict on the run folder, raised on every rank alike (no rank left waiting)."""
        verdict = [problem]
        broadcast_object_list(verdict)
        if verdict[0] is not None:
            raise RunFolderError(verdict[0])

    def _open_run(self) -> None:
        """Continue, start or refuse the run folder; load a resumed state; open the logs."""
        args, accelerator, main = self.args, self.accelerator, self.accelerator.is_main_process
        if args.resume:
            problem = None
            if main:
                state = recover(self.run_dir)  # a kill in the middle of a checkpoint swap left it elsewhere
                problem = (f"{self.run_dir / STATE}: no saved state to resume; check --run-name and --out"
                           if state is None else None if args.eval_only else
                           run_folder.check_resumed(self.run_dir, self.record))
            self._agree(problem)
            accelerator.load_state(str(self.run_dir / STATE))
            self._check_resumed_progress()
            progress = self.progress
            at_step = f", at step {progress.step} of epoch {progress.epoch + 1}" if progress.step else ""
            log.info(f"resumed {self.run_dir} after epoch {progress.epoch}{at_step}, "
                     f"{progress.samples_seen:,} samples seen")
        elif not args.eval_only:
            self._agree(run_folder.check_new(self.run_dir, args.overwrite) if main else None)
        if args.eval_only:
            return
        problem = None
        if main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                run_folder.write_record(self.run_dir, self.record)
                # A resumed run may have logged events after its saved progress (killed during
                # validation, a failed checkpoint): purge them. When the saved epoch's own logs
                # were not all written (killed or a full disk after its state), they are written
                # again (`run`), so that epoch's events go too.
                purge = None
                if args.resume:
                    purge = self.progress.samples_seen + (0 if self._logs_behind() else 1)
                elif run_folder.logged_epoch(self.run_dir) is None:
                    run_folder.mark_logged(self.run_dir, 0)
                self.writers = {mode: SummaryWriter(str(self.run_dir / mode), purge_step=purge)
                                for mode in ("trn", "val")}
            except OSError as err:
                problem = (f"could not write {err.filename or self.run_dir}: {err.strerror}; nothing of this command "
                           f"was trained yet: free space (or choose another --out) and rerun it")
        self._agree(problem)

    def _logs_behind(self) -> bool:
        """Whether the resumed state's epoch was saved without its logs (only the main process reads the folder)."""
        logged = run_folder.logged_epoch(self.run_dir)
        return logged is not None and logged < self.progress.epoch and not self.progress.step

    def _check_resumed_progress(self) -> None:
        """A mid-epoch state replays its epoch's stream, which only the same ranks and batches reproduce;
        the best score only compares with scores of the same rule."""
        progress, current = self.progress, self._layout()
        if progress.step and progress.layout not in (None, current):
            saved = progress.layout
            raise RunFolderError(
                f"--resume: {self.run_dir / STATE} was saved at step {progress.step} of epoch {progress.epoch + 1} by "
                f"{saved['processes']} process(es) with --batch-size {saved['batch_size']} and {saved['num_workers']} "
                f"data worker(s) each; this command has {current['processes']}, {current['batch_size']} and "
                f"{current['num_workers']}. The rest of the epoch needs the same to see the samples it would have: "
                "rerun with them (the next epoch may use others)")
        if progress.step and progress.epoch_rngs is not None and len(progress.epoch_rngs) != current["processes"]:
            raise RunFolderError(f"--resume: {self.run_dir / STATE} holds the random states of "
                                 f"{len(progress.epoch_rngs)} process(es) mid-epoch, this command has "
                                 f"{current['processes']}: rerun with as many processes")
        if progress.best_score is not None and progress.best_by != self.task.best_by:
            if self.accelerator.is_main_process:
                log.warning(f"{self.run_dir / 'best.pt'} was chosen by {progress.best_by or 'the F1 score'}, this run "
                            f"chooses by {self.task.best_by}: the next validation's model replaces it")
            progress.best_score, progress.best_by = None, None

    def _layout(self) -> dict:
        """What decides the order of a rank's training samples within an epoch."""
        return {"processes": self.accelerator.num_processes, "batch_size": self.args.batch_size,
                "num_workers": self.num_workers}

    def _verify_shards(self) -> None:
        """Hash every shard once per machine (each may hold its own copy); any mismatch stops every rank."""
        accelerator = self.accelerator
        problems, seconds = self.shards.verify() if accelerator.is_local_main_process else ([], 0.0)
        if accelerator.is_local_main_process and not problems:
            total = sum(s["bytes"] for s in self.shards.manifest["shards"])
            log.info(f"--verify: {len(self.shards.manifest['shards'])} shards, {total / 1e9:.2f} GB, match their "
                     f"sha256 ({seconds:.1f} s, {total / 1e6 / max(seconds, 1e-9):,.0f} MB/s)", main_process_only=False)
        if accelerator.gather(torch.tensor([len(problems)], device=self.device)).any():
            raise ShardSetError("--verify: " + ("\n  ".join(problems) if problems else
                                                "another machine found shards that differ from the manifest"))

    def lost_peers(self, error: BaseException) -> str | None:
        """If `error` is a collective that failed because another process died or froze: who, and how to go on."""
        accelerator = self.accelerator
        if accelerator.num_processes == 1 or not any(text in str(error) for text in _LOST_PEER):
            return None
        # "[gloo/.../pair.cc:553] Connection closed by peer [127.0.0.1]:30084. This is typically ..." -> the fact.
        reason = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip().splitlines()[-1]).split(". ")[0]
        if self.progress.epoch and (self.run_dir / STATE).is_dir():
            resume = (f"run the same command on every node with --resume --run-name {self.run_dir.name}: it continues "
                      f"after epoch {self.progress.epoch}, the state in {self.run_dir / STATE}")
        else:
            resume = "no epoch was saved yet: run the same command again on every node"
        return (f"rank {accelerator.process_index} of {accelerator.num_processes} lost the others in epoch "
                f"{self.progress.epoch + 1}: {self._silent_ranks()} ({reason}). Every process stops; when the nodes "
                f"are back, {resume}")

    def _silent_ranks(self) -> str:
        """Ask the launcher's rendezvous store who still answers: each survivor checks in, the silent are named.

        The store lives with the launcher of node 0 (MASTER_ADDR:MASTER_PORT); when it is gone
        too, node 0 is what died.
        """
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 29500))
        wait = min(10.0, self.args.dist_timeout)
        try:
            store = torch.distributed.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=wait))
            store.set(f"luna_dist/alive/{rank}", "1")
            deadline = time.monotonic() + wait
            while (silent := [r for r in range(world) if not store.check([f"luna_dist/alive/{r}"])]) and \
                    time.monotonic() < deadline:
                time.sleep(0.2)
        except (RuntimeError, OSError):
            node0 = range(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
            silent = [r for r in node0 if r != rank]
            return (f"node 0, which holds the rendezvous at {host}:{port}, is unreachable "
                    f"(rank(s) {', '.join(f'{r} on {self.processes[r]}' for r in silent)})")
        if not silent:
            return "every process checked in afterwards (a network fault?)"
        return f"rank(s) {', '.join(f'{r} on {self.processes[r]}' for r in silent)} stopped answering"

    def _run_dir(self) -> Path:
        args = self.args
        if args.run_name:
            return args.out / args.run_name
        if args.resume:
            runs = sorted((p for p in args.out.glob("*") if (p / STATE).is_dir()), key=lambda p: p.stat().st_mtime)
            if not runs:
                raise FileNotFoundError(f"--resume: no run with a saved state under {args.out}; pass --run-name")
            return runs[-1]
        # Every rank must agree on the name: the main process's clock decides.
        stamp = [datetime.now().strftime("%Y-%m-%d_%H.%M.%S")]
        broadcast_object_list(stamp)
        return args.out / stamp[0]

    # -- epochs ------------------------------------------------------------------------------
    def epoch_steps(self) -> int:
        """Training steps of an epoch, the same on every rank (checked: a rank with more steps than the
        others would wait in DDP's all-reduce for ever)."""
        args, accelerator = self.args, self.accelerator
        epoch_samples = args.epoch_samples or self.task.epoch_samples(self.shards, self.train_folds)
        steps = math.ceil(epoch_samples / (args.batch_size * accelerator.num_processes))
        if args.max_steps:
            steps = min(steps, args.max_steps)
        every_rank = accelerator.gather(torch.tensor([steps], device=self.device)).tolist()
        if len(set(every_rank)) > 1:
            raise RunFolderError(f"the ranks disagree on the steps of an epoch ({', '.join(f'rank {r}: {n}' for r, n in enumerate(every_rank))}): "
                                 "every node must run the same command (--batch-size, --epoch-samples, --max-steps) "
                                 "on the same shard build")
        return steps

    def train_epoch(self, epoch: int) -> dict:
        args, accelerator, task, progress = self.args, self.accelerator, self.task, self.progress
        steps = self.epoch_steps()
        per_step = args.batch_size * accelerator.num_processes
        start, epoch_start_seen = progress.step, progress.samples_seen - progress.step * per_step
        if start == 0:
            # Every rank's random states as its stream begins, so a mid-epoch resume replays each
            # rank's own stream; the main process saves them all.
            progress.epoch_rngs = gather_object([rng_state()])
            progress.layout = self._layout()
        loader = task.train_loader(self.shards, self.train_folds, epoch, steps, self.num_workers, self.pin_memory)
        batches = self._resumed_stream(loader, start) if start else iter(loader)

        # Per-sample records stay on the device: no host sync inside the loop. Rows a short
        # batch leaves empty keep -1 in column 0 and are dropped after the gather (with the
        # steps before a mid-epoch resume: their records were not saved).
        record = torch.full((steps, args.batch_size, len(task.record_columns)), -1.0, device=self.device)
        first_nonfinite = torch.full((1,), -1, dtype=torch.int64, device=self.device)  # step, kept on the device
        self.model.train()
        step = start - 1
        with self._bar(steps * per_step, f"E{epoch} training", initial=start * per_step) as bar:
            for step, batch in enumerate(batches, start):
                loss, rows = task.forward(self.model, batch, train=True)
                self.optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss.mean())
                self.optimizer.step()
                record[step, : rows.shape[0]] = rows
                first_nonfinite = torch.where((first_nonfinite < 0) & ~torch.isfinite(loss).all(), step, first_nonfinite)
                bar.update(per_step)
                save_now = args.save_every and (step + 1) % args.save_every == 0 and step + 1 < steps
                if save_now or (step + 1) % FINITE_CHECK_STEPS == 0 or step + 1 == steps:
                    self._check_finite(first_nonfinite, epoch, steps)
                if save_now:
                    progress.step, progress.samples_seen = step + 1, epoch_start_seen + (step + 1) * per_step
                    self.save(None)
                    log.info(f"E{epoch} step {step + 1} of {steps}: state saved")
        if step + 1 != steps:
            raise RuntimeError(f"training stream gave {step + 1} batches, expected {steps}")
        progress.step, progress.epoch_rngs, progress.layout = 0, None, None
        progress.samples_seen = epoch_start_seen + steps * per_step
        gathered = accelerator.gather(record.flatten(0, 1))  # (world * steps * batch, columns)
        return task.compute_metrics(gathered[gathered[:, 0] >= 0])

    def _check_finite(self, first_nonfinite: torch.Tensor, epoch: int, steps: int) -> None:
        """Stop every rank at once when any rank's loss stopped being a number: nothing after it is trained or saved."""
        every_rank = self.accelerator.gather(first_nonfinite).tolist()
        bad = [(step, rank) for rank, step in enumerate(every_rank) if step >= 0]
        if not bad:
            return
        step, rank = min(bad)
        group = self.optimizer.param_groups[0]
        flags = f"--lr (now {group['lr']:g})" + (f" or --momentum (now {group['momentum']:g})"
                                                   if "momentum" in group else "")
        raise Diverged(f"E{epoch} step {step + 1} of {steps}: the training loss is not a finite number (rank {rank}): "
                       f"training diverged. {self._kept()}; lower {flags}, then start again (--overwrite) or go on "
                       f"from the last saved weights with --checkpoint {self.run_dir / STATE} and a new --run-name")

    def _kept(self) -> str:
        """What a stopped run keeps, for its last message."""
        progress = self.progress
        if not (self.run_dir / STATE).is_dir():
            return "Nothing was saved"
        at = f"epoch {progress.epoch}" if not progress.step else f"step {progress.step} of epoch {progress.epoch + 1}"
        return f"The last saved state, {self.run_dir / STATE} (after {at}), is kept"

    def _resumed_stream(self, loader, done: int):
        """The epoch's batches after the first `done`, as an uninterrupted run saw them.

        The stream is rebuilt from the random states this rank saved when the epoch began
        (they decide the class mixing and the workers' seeds) and its first batches are
        read and dropped; then the states of the checkpoint come back, so augmentation goes
        on as it would have.
        """
        at_checkpoint = rng_state()
        set_rng_state(self.progress.epoch_rng)
        batches = iter(loader)
        for _ in range(done):
            next(batches)
        set_rng_state(at_checkpoint)
        return batches

    def _main_model(self) -> torch.nn.Module:
        """The bare model with the main process's parameters and buffers on every rank.

        DDP keeps the parameters equal, but each rank's batch-norm running statistics
        follow its own batches; validating each rank's own copy would score a mix of
        models, none of them the one saved. The bare module also keeps DDP's forward (and
        its syncs) out of validation, where ranks see unequal numbers of batches.
        """
        model = self.accelerator.unwrap_model(self.model)
        if self.accelerator.num_processes > 1:
            for tensor in itertools.chain(model.parameters(), model.buffers()):
                torch.distributed.broadcast(tensor.data, src=0)
        return model

    @torch.no_grad()
    def validate(self, epoch: int) -> tuple[dict, torch.Tensor]:
        """Score each validation sample once; gather the per-sample records of every rank before any metric."""
        accelerator, task = self.accelerator, self.task
        loader = task.val_loader(self.shards, self.val_folds, self.num_workers, self.pin_memory)
        model = self._main_model()
        training = model.training
        model.eval()
        rows = []
        with self._bar(None, f"E{epoch} validation") as bar:  # closed on an error too: its message starts a line
            for batch in loader:
                _, records = task.forward(model, batch, train=False)
                rows.append(records)
                bar.update(records.shape[0] * accelerator.num_processes)
        model.train(training)
        local = torch.cat(rows) if rows else torch.empty(0, len(task.record_columns), device=self.device)
        # Ranks hold different counts: pad with -1 to the longest, gather, drop the padding.
        padded = accelerator.pad_across_processes(local, dim=0, pad_index=-1)
        gathered = accelerator.gather(padded)
        gathered = gathered[gathered[:, 0] >= 0]
        # The readers check each shard's count; this catches a shard no rank read at all.
        expected = task.val_records(self.shards, self.val_folds)
        if expected is not None and gathered.shape[0] != expected:
            raise ShardSetError(f"{self.shards.root}: validation read {gathered.shape[0]:,} samples of folds "
                                f"{self.val_folds}, the manifest counts {expected:,}; the metrics would be wrong")
        nonfinite = int((~torch.isfinite(gathered).all(dim=1)).sum())
        if nonfinite:
            raise Diverged(f"E{epoch} validation: {nonfinite:,} of {gathered.shape[0]:,} samples have a probability or "
                           "loss that is not a finite number: the model diverged, and nothing is scored. "
                           f"{self._kept()}; train again with a lower --lr")
        return task.compute_metrics(gathered), gathered

    def _bar(self, total: int | None, desc: str, initial: int = 0) -> tqdm:
        return tqdm(total=total, desc=desc, initial=initial, unit="sample", unit_scale=True, dynamic_ncols=True, leave=False,
                    disable=not self.accelerator.is_main_process, file=sys.stderr)

    # -- logging and checkpoints ---------------------------------------------------------------
    def print_metrics(self, epoch: int, mode: str, metrics: dict) -> None:
        if self.accelerator.is_main_process:
            for line in self.task.format_metrics(epoch, mode, metrics):
                log.info(line)

    def write_logs(self, epoch: int, logs: dict[str, tuple[dict, torch.Tensor | None]]) -> None:
        """TensorBoard and the task's outputs of a saved epoch (`logs`: mode -> (metrics, records)), then
        `logged.json`; a failure is one message on every rank, the saved state being safe."""
        problem = None
        if self.accelerator.is_main_process:
            try:
                step = self.progress.samples_seen
                for mode, (metrics, records) in logs.items():
                    writer = self.writers[mode]
                    for key, value in metrics.items():
                        if not key.startswith("count") and math.isfinite(value):
                            writer.add_scalar(key, value, step)
                    if records is not None:
                        self.task.log_extras(writer, mode, records, step, self.accelerator.unwrap_model(self.model))
                        self.task.save_outputs(self.run_dir, epoch, mode, records)
                    writer.flush()
                run_folder.mark_logged(self.run_dir, epoch)
            except OSError as err:
                problem = (f"epoch {epoch} is saved in {self.run_dir / STATE}, but its logs could not be written "
                           f"({err.filename or self.run_dir}: {err.strerror}); free space and rerun the same command "
                           "with --resume: it writes them again, then goes on")
        verdict = [problem]
        broadcast_object_list(verdict)
        if verdict[0] is not None:
            raise LoggingError(verdict[0])

    def save(self, val_metrics: dict | None) -> None:
        """The state (model, optimizer, RNG, progress) and, when the task's score improved, best.pt.

        Mid-epoch (`val_metrics` None, --save-every) only the state. The saved progress
        already holds this epoch's best score, so a resumed run never replaces best.pt
        with a worse model.
        """
        progress, task = self.progress, self.task
        best = None
        previous = progress.best_score, progress.best_by
        if val_metrics is not None and is_better(score := task.score(val_metrics), progress.best_score):
            progress.best_score, progress.best_by = score, task.best_by
            best = {"task": task.name, "epoch": progress.epoch, "samples_seen": progress.samples_seen,
                    "val_metrics": val_metrics, "best_by": task.best_by, "score": score,
                    "score_of": list(task.best_by_rules[task.best_by])}
        try:
            self.checkpoints.save(progress, self.model, best)
        except CheckpointError:
            progress.best_score, progress.best_by = previous
            raise
        if best is not None:
            log.info(f"E{progress.epoch} new best model by {task.best_by}, "
                     f"{' then '.join(f'{k} {v:.4f}' for k, v in zip(best['score_of'], score))}: {self.run_dir / 'best.pt'}")

    def run(self) -> dict:
        args, accelerator, progress = self.args, self.accelerator, self.progress
        log.info(f"task {self.task.name}: {accelerator.num_processes} process(es) on {self.device} "
                 f"({accelerator.distributed_type}), mixed precision {accelerator.mixed_precision}, "
                 f"{self.num_workers} data worker(s) each; train folds {self.train_folds}, "
                 f"validation folds {self.val_folds}; best model by {self.task.best_by}; run {self.run_dir}")
        if accelerator.is_main_process and (warning := precision_warning(self.device, accelerator.mixed_precision)):
            log.warning(warning)
        if args.eval_only:
            metrics, _ = self.validate(progress.epoch)
            self.print_metrics(progress.epoch, "val", metrics)
            self._write_metrics(metrics)
            return metrics
        behind = [self._logs_behind()]
        broadcast_object_list(behind)
        if args.resume and behind[0]:
            log.info(f"epoch {progress.epoch} was saved but not all of its logs: validating its model again to write them")
            metrics, records = self.validate(progress.epoch)
            self.print_metrics(progress.epoch, "val", metrics)
            logs = {"val": (metrics, records)}
            if progress.train_metrics is not None:
                logs["trn"] = (progress.train_metrics, None)
            self.write_logs(progress.epoch, logs)
        metrics = {}
        for epoch in range(progress.epoch + 1, args.epochs + 1):
            started, seen = time.perf_counter(), progress.samples_seen
            train_metrics = self.train_epoch(epoch)
            seconds, trained = time.perf_counter() - started, progress.samples_seen - seen
            self.print_metrics(epoch, "trn", train_metrics)
            self.train_rate = trained / seconds
            log.info(f"E{epoch} trained {trained:,} samples in {seconds:.1f} s "
                     f"({self.train_rate:,.1f} samples/s, all ranks)")
            metrics, records = self.validate(epoch)
            self.print_metrics(epoch, "val", metrics)
            progress.epoch, progress.train_metrics = epoch, train_metrics
            self.save(metrics)  # before the logs: a failure writing them loses no training
            self.write_logs(epoch, {"trn": (train_metrics, None), "val": (metrics, records)})
            self._write_metrics(metrics)
        if progress.epoch >= args.epochs and not metrics:
            log.info(f"{self.run_dir} already trained for {progress.epoch} epoch(s); raise --epochs to continue")
        return metrics

    def _write_metrics(self, metrics: dict) -> None:
        if self.args.metrics_json and self.accelerator.is_main_process:
            summary = {"epoch": self.progress.epoch, "samples_seen": self.progress.samples_seen,
                       "train_samples_per_s": self.train_rate, "processes": self.accelerator.num_processes}
            self.args.metrics_json.write_text(json.dumps({**metrics, **summary}, indent=1))

    def interrupted(self) -> str:
        """The one line for Ctrl-C: what is saved and how to go on."""
        resume = f"rerun the same command with --resume --run-name {self.run_dir.name} to continue"
        return f"interrupted in epoch {self.progress.epoch + 1}. {self._kept()}; {resume}" \
            if (self.run_dir / STATE).is_dir() else f"interrupted in epoch {self.progress.epoch + 1}; nothing was saved"

    def close(self) -> None:
        for writer in self.writers.values():
            try:
                writer.close()
            except OSError:
                pass  # the failure was reported when it happened
        self.accelerator.end_training()


def own_line(err: Exception) -> str:
    """The error's own message: one raised in a DataLoader worker arrives with the worker's traceback."""
    message = str(err)
    if "Original Traceback" in message:
        message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return message


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint lines drown the metrics
    args = parse_args(argv)
    trainer = None
    try:
        trainer = Trainer(args)
        trainer.run()
    except (ShardSetError, FileNotFoundError, CheckpointError, WeightsError, RunFolderError, Diverged,
            LoggingError) as err:
        print(f"error: {own_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if trainer is None or trainer.accelerator.is_main_process:
            print(f"error: {trainer.interrupted() if trainer else 'interrupted before training started'}",
                  file=sys.stderr)
        return 130
    except RuntimeError as err:
        if trainer is None or (message := trainer.lost_peers(err)) is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    finally:
        if trainer is not None:
            trainer.close()
        elif torch.distributed.is_initialized():
            # A Trainer that failed to start still joined the process group; left to the
            # interpreter's exit, gloo's threads can abort the process.
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
