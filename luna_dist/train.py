"""The one training loop: any task of `luna_dist.tasks` on a shard set, with Accelerate.

One script for an Apple MPS laptop, one CUDA GPU, many GPUs or nodes, or CPU ranks:

    accelerate launch launch/train.py --shards shards/NAME            # per accelerate config
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 launch/train.py --shards ...
    python -m luna_dist.train --shards shards/NAME                    # one process

Data: each rank streams its own shards (luna_dist.stream); the loaders are not
passed through `accelerator.prepare`, which would dispatch batches from rank 0 or
split the stream a second time. Every rank runs the same number of steps.
Metrics: the task's per-sample records (for the classifier: label, probability,
loss) stay on the device during an epoch, are gathered from all ranks, and only then
turned into numbers; the main process alone prints, writes TensorBoard and saves the
best model. What differs per model lives in the task (`--task`); this loop owns the
Accelerator, the epochs, gathering, logging, checkpoints and resume.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object, set_seed
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from luna_dist.candidates import N_FOLDS
from luna_dist.hardware import precision_warning
from luna_dist.stream import ShardSetError, steps_per_epoch
from luna_dist.model import WeightsError, load_into
from luna_dist.tasks import TASKS

log = get_logger("luna_dist.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/train.py", description="Train a LUNA16 model on a shard set.")
    parser.add_argument("--task", choices=sorted(TASKS), default="cls", help="what to train (default: cls, the nodule classifier)")
    parser.add_argument("--shards", required=True,
                        help="shard set built by python -m luna_dist.shard: a folder, or a URL (http(s)://…/, "
                             "s3://…/, gs://…/, or 'pipe:CMD' with {name} for the file name)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="keep a checked copy of each shard streamed from a URL here, and read it from there")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="data workers per process (default: 4 on CUDA, 2 on MPS, 0 on CPU)")
    parser.add_argument("--lr", type=float, default=0.001, help="learning rate")
    parser.add_argument("--momentum", type=float, default=0.99, help="SGD momentum (tasks trained with SGD)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-folds", type=int, nargs="+", default=[9], help="folds held out for validation")
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
    if any(not 0 <= fold < N_FOLDS for fold in args.val_folds):
        parser.error(f"--val-folds must be in 0..{N_FOLDS - 1}, got {args.val_folds}")
    TASKS[args.task].check_arguments(parser, args)
    if args.eval_only and not (args.resume or args.checkpoint):
        parser.error("--eval-only needs --resume or --checkpoint PATH: there is nothing to evaluate")
    return args


@dataclass
class Progress:
    """Where training stands; saved with every checkpoint so a resume never guesses from folder names."""

    epoch: int = 0  # epochs completed
    samples_seen: int = 0  # training samples, all ranks together
    best_score: float = -math.inf  # the task's best-model score so far
    step: int = 0  # steps of epoch `epoch + 1` done (mid-epoch checkpoints, --save-every)
    epoch_rng: dict | None = None  # this process's random states when that epoch's stream began

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "samples_seen": self.samples_seen, "best_score": self.best_score,
                "step": self.step, "epoch_rng": self.epoch_rng}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.samples_seen = state["epoch"], state["samples_seen"]
        self.best_score = state["best_score"] if "best_score" in state else state["best_f1"]  # states before tasks
        self.step, self.epoch_rng = state.get("step", 0), state.get("epoch_rng")


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


class CheckpointError(Exception):
    """A checkpoint could not be written; the previous one is intact and the message says so."""


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
        self.progress = Progress()
        self.train_rate = math.nan  # samples/s of the last training epoch, all ranks
        accelerator.register_for_checkpointing(self.progress)

        # Who is who, for the message when a process dies: every rank knows every rank's host and pid.
        self.processes = gather_object([f"{socket.gethostname()}, pid {os.getpid()}"])
        self.run_dir = self._run_dir()
        if args.resume:
            state = self.run_dir / "state"
            if not state.is_dir():
                raise FileNotFoundError(f"{state}: no saved state to resume; check --run-name and --out")
            accelerator.load_state(str(state))
            at_step = f", at step {self.progress.step} of epoch {self.progress.epoch + 1}" if self.progress.step else ""
            log.info(f"resumed {self.run_dir} after epoch {self.progress.epoch}{at_step}, "
                     f"{self.progress.samples_seen:,} samples seen")
        self.writers = {}
        if accelerator.is_main_process and not args.eval_only:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # A resumed run may have logged an epoch whose state was never saved (killed during
            # validation, a failed checkpoint): purge every event after the saved progress.
            purge = self.progress.samples_seen + 1 if args.resume else None
            self.writers = {mode: SummaryWriter(str(self.run_dir / mode), purge_step=purge) for mode in ("trn", "val")}
            (self.run_dir / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))

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
        if self.progress.epoch and (self.run_dir / "state").is_dir():
            resume = (f"run the same command on every node with --resume --run-name {self.run_dir.name}: it continues "
                      f"after epoch {self.progress.epoch}, the state in {self.run_dir / 'state'}")
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
            runs = sorted((p for p in args.out.glob("*") if (p / "state").is_dir()), key=lambda p: p.stat().st_mtime)
            if not runs:
                raise FileNotFoundError(f"--resume: no run with a saved state under {args.out}; pass --run-name")
            return runs[-1]
        # Every rank must agree on the name: the main process's clock decides.
        stamp = [datetime.now().strftime("%Y-%m-%d_%H.%M.%S")]
        broadcast_object_list(stamp)
        return args.out / stamp[0]

    # -- epochs ------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        args, accelerator, task = self.args, self.accelerator, self.task
        world = accelerator.num_processes
        epoch_samples = args.epoch_samples or task.epoch_samples(self.shards, self.train_folds)
        steps = math.ceil(epoch_samples / (args.batch_size * world))
        if args.max_steps:
            steps = min(steps, args.max_steps)
        steps = steps_per_epoch(steps, self.num_workers)
        progress, per_step = self.progress, args.batch_size * world
        start, epoch_start_seen = progress.step, progress.samples_seen - progress.step * per_step
        if start == 0:
            progress.epoch_rng = rng_state()  # a mid-epoch resume replays the stream from here
        loader = task.train_loader(self.shards, self.train_folds, epoch, steps, self.num_workers, self.pin_memory)
        batches = self._resumed_stream(loader, start) if start else iter(loader)

        # Per-sample records stay on the device: no host sync inside the loop. Rows a short
        # batch leaves empty keep -1 in column 0 and are dropped after the gather (with the
        # steps before a mid-epoch resume: their records were not saved).
        record = torch.full((steps, args.batch_size, len(task.record_columns)), -1.0, device=self.device)
        self.model.train()
        step = start - 1
        with self._bar(steps * per_step, f"E{epoch} training", initial=start * per_step) as bar:
            for step, batch in enumerate(batches, start):
                loss, rows = task.forward(self.model, batch, train=True)
                self.optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss.mean())
                self.optimizer.step()
                record[step, : rows.shape[0]] = rows
                bar.update(per_step)
                if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < steps:
                    progress.step, progress.samples_seen = step + 1, epoch_start_seen + (step + 1) * per_step
                    self.save(None)
                    log.info(f"E{epoch} step {step + 1} of {steps}: state saved")
        if step + 1 != steps:
            raise RuntimeError(f"training stream gave {step + 1} batches, expected {steps}")
        progress.step, progress.epoch_rng = 0, None
        progress.samples_seen = epoch_start_seen + steps * per_step
        gathered = accelerator.gather(record.flatten(0, 1))  # (world * steps * batch, columns)
        return task.compute_metrics(gathered[gathered[:, 0] >= 0])

    def _resumed_stream(self, loader, done: int):
        """The epoch's batches after the first `done`, as an uninterrupted run saw them.

        The stream is rebuilt from the random states saved when the epoch began (they
        decide the class mixing and the workers' seeds) and its first batches are read
        and dropped; then the states of the checkpoint come back, so augmentation goes on
        as it would have.
        """
        at_checkpoint = rng_state()
        set_rng_state(self.progress.epoch_rng)
        batches = iter(loader)
        for _ in range(done):
            next(batches)
        set_rng_state(at_checkpoint)
        return batches

    @torch.no_grad()
    def validate(self, epoch: int) -> tuple[dict, torch.Tensor]:
        """Score each validation sample once; gather the per-sample records of every rank before any metric."""
        accelerator, task = self.accelerator, self.task
        loader = task.val_loader(self.shards, self.val_folds, self.num_workers, self.pin_memory)
        # The bare module: ranks see unequal numbers of batches, and DDP's forward must not sync here.
        model = accelerator.unwrap_model(self.model)
        model.eval()
        rows = []
        with self._bar(None, f"E{epoch} validation") as bar:  # closed on an error too: its message starts a line
            for batch in loader:
                _, records = task.forward(model, batch, train=False)
                rows.append(records)
                bar.update(records.shape[0] * accelerator.num_processes)
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
        return task.compute_metrics(gathered), gathered

    def _bar(self, total: int | None, desc: str, initial: int = 0) -> tqdm:
        return tqdm(total=total, desc=desc, initial=initial, unit="sample", unit_scale=True, dynamic_ncols=True, leave=False,
                    disable=not self.accelerator.is_main_process, file=sys.stderr)

    # -- logging and checkpoints ---------------------------------------------------------------
    def log_metrics(self, epoch: int, mode: str, metrics: dict, records: torch.Tensor | None = None) -> None:
        if not self.accelerator.is_main_process:
            return
        for line in self.task.format_metrics(epoch, mode, metrics):
            log.info(line)
        writer = self.writers.get(mode)
        if writer is None:
            return
        step = self.progress.samples_seen
        for key, value in metrics.items():
            if not key.startswith("count") and math.isfinite(value):
                writer.add_scalar(key, value, step)
        if records is not None:
            self.task.log_extras(writer, mode, records, step, self.accelerator.unwrap_model(self.model))
            self.task.save_outputs(self.run_dir, epoch, mode, records)
        writer.flush()

    def save(self, val_metrics: dict | None) -> None:
        """Accelerate's state (model, optimizer, RNG, progress) each epoch; the best model by the task's score.

        Mid-epoch (`val_metrics` None, --save-every) only the state.

        The saved progress already holds this epoch's best score, so a resumed run never
        replaces best.pt with a worse model. Every rank learns whether every rank wrote
        its part, so a full disk on one rank fails them all with one message instead of
        leaving the others waiting; the previous state stays in place.
        """
        accelerator, progress = self.accelerator, self.progress
        partial, final = self.run_dir / "state.partial", self.run_dir / "state"
        best, best_partial = self.run_dir / "best.pt", self.run_dir / "best.pt.partial"
        score, previous_best = self.task.score(val_metrics) if val_metrics else math.nan, progress.best_score
        improved = math.isfinite(score) and score > previous_best
        if improved:
            progress.best_score = score
        failure = None
        try:
            accelerator.save_state(str(partial))
            if improved and accelerator.is_main_process:
                torch.save({"model": accelerator.unwrap_model(self.model).state_dict(), "task": self.task.name,
                            "epoch": progress.epoch, "samples_seen": progress.samples_seen,
                            "val_metrics": val_metrics}, best_partial)
        except Exception as err:  # whatever the storage layer raises: reported below, on every rank
            failure = err
        if accelerator.gather(torch.tensor([int(failure is not None)], device=self.device)).any():
            progress.best_score = previous_best
            if accelerator.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
                best_partial.unlink(missing_ok=True)
            raise CheckpointError(self._checkpoint_failure(failure, final))
        accelerator.wait_for_everyone()  # every rank's files are in state.partial
        if accelerator.is_main_process:
            # Swap in the new state only once complete: a crash leaves the previous one intact.
            shutil.rmtree(self.run_dir / "state.old", ignore_errors=True)
            if final.exists():
                final.rename(self.run_dir / "state.old")
            partial.rename(final)
            shutil.rmtree(self.run_dir / "state.old", ignore_errors=True)
            if improved:
                os.replace(best_partial, best)
                log.info(f"E{progress.epoch} new best model, {self.task.score_name} {score:.4f}: {best}")
        accelerator.wait_for_everyone()

    def _checkpoint_failure(self, error: BaseException | None, final: Path) -> str:
        where = self.run_dir
        try:
            free = shutil.disk_usage(where).free
        except OSError:
            free = None
        if error is None:
            reason = "another process could not write its part of it"
        elif isinstance(error, OSError) and error.errno is not None:
            reason = os.strerror(error.errno)
        elif free is not None and free < 16 * 2**20:
            reason = "No space left on device"  # torch and safetensors report it as a bare write failure
        else:
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        progress = self.progress
        if progress.step:  # mid-epoch (--save-every)
            what, previous = f"epoch {progress.epoch + 1}, step {progress.step}", "the last one saved"
        else:
            what, previous = f"epoch {progress.epoch}", f"epoch {progress.epoch - 1}"
        kept = (f"the previous state {final} ({previous}) is intact; "
                "free space and rerun with --resume" if final.is_dir() else "no earlier state existed")
        return f"could not write the checkpoint of {what} under {where}: {reason}; {kept}"

    def run(self) -> dict:
        args, accelerator = self.args, self.accelerator
        log.info(f"task {self.task.name}: {accelerator.num_processes} process(es) on {self.device} "
                 f"({accelerator.distributed_type}), mixed precision {accelerator.mixed_precision}, "
                 f"{self.num_workers} data worker(s) each; train folds {self.train_folds}, "
                 f"validation folds {self.val_folds}; run {self.run_dir}")
        if accelerator.is_main_process and (warning := precision_warning(self.device, accelerator.mixed_precision)):
            log.warning(warning)
        if args.eval_only:
            metrics, _ = self.validate(self.progress.epoch)
            self.log_metrics(self.progress.epoch, "val", metrics)
            self._write_metrics(metrics)
            return metrics
        metrics = {}
        for epoch in range(self.progress.epoch + 1, args.epochs + 1):
            started, seen = time.perf_counter(), self.progress.samples_seen
            train_metrics = self.train_epoch(epoch)
            seconds, trained = time.perf_counter() - started, self.progress.samples_seen - seen
            self.log_metrics(epoch, "trn", train_metrics)
            self.train_rate = trained / seconds
            log.info(f"E{epoch} trained {trained:,} samples in {seconds:.1f} s "
                     f"({self.train_rate:,.1f} samples/s, all ranks)")
            metrics, records = self.validate(epoch)
            self.log_metrics(epoch, "val", metrics, records)
            self.progress.epoch = epoch
            self.save(metrics)
            self._write_metrics(metrics)
        if self.progress.epoch >= args.epochs and not metrics:
            log.info(f"{self.run_dir} already trained for {self.progress.epoch} epoch(s); raise --epochs to continue")
        return metrics

    def _write_metrics(self, metrics: dict) -> None:
        if self.args.metrics_json and self.accelerator.is_main_process:
            summary = {"epoch": self.progress.epoch, "samples_seen": self.progress.samples_seen,
                       "train_samples_per_s": self.train_rate, "processes": self.accelerator.num_processes}
            self.args.metrics_json.write_text(json.dumps({**metrics, **summary}, indent=1))

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
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
    except (ShardSetError, FileNotFoundError, CheckpointError, WeightsError) as err:
        print(f"error: {own_line(err)}", file=sys.stderr)
        return 1
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
