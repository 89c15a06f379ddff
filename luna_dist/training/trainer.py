"""The one training loop: any task of `luna_dist.training.tasks` on a shard set, with Accelerate.

The same loop on an Apple MPS laptop, one CUDA GPU, many GPUs or nodes, or CPU ranks, as
accelerate starts it (the command: `luna_dist/train.py`, or `launch/train.py`; its flags:
`luna_dist.training.options`).

Data: each rank streams its own shards (`luna_dist.data`); the loaders are not passed
through `accelerator.prepare`, which would dispatch batches from rank 0 or split the
stream a second time. Every rank runs the same number of steps, checked each epoch.
Metrics: the task's per-sample records stay on the device during an epoch, are gathered
from all ranks, and only then turned into numbers; validation runs the main process's
model on every rank, the model that is saved. The parts live in their own modules: the
task (what differs per model), the run folder (which command may start or continue a
run: `run_folder`), the checkpoints (`checkpoint`), the run log (`run_log`) beside this one
in `luna_dist.training`, and the diagnosis of lost peers (`luna_dist.common.peers`).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import socket
import sys
import time
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object, set_seed
from tqdm.auto import tqdm  # a widget in Jupyter, text elsewhere

from luna_dist.common import cli
from luna_dist.common.hardware import precision_warning
from luna_dist.common.peers import lost_peers_message
from luna_dist.data.batch_memory import held_until_copied
from luna_dist.data.streams import ShardSet, open_shard_set
from luna_dist.devices.machine import usable_cores
from luna_dist.devices.numbers import layout_for
from luna_dist.devices.speed import STARVED
from luna_dist.devices.start import check_every_rank
from luna_dist.models import provenance
from luna_dist.models.provenance import Provenance
from luna_dist.models.weights import load_into
from luna_dist.shards.format import ShardSetError
from luna_dist.training import feeding, run_folder
from luna_dist.training.checkpoint import (
    STATE,
    Checkpointer,
    Progress,
    newest_state,
    set_random_states,
    stream_random_states,
)
from luna_dist.training.run_folder import RunFolder, RunFolderError
from luna_dist.training.run_log import RunLog
from luna_dist.training.tasks import TASKS

log = get_logger("luna_dist.train")

FINITE_CHECK_STEPS = 16
"""Training steps between the checks that the loss is finite: each check syncs the ranks and the host
once, so a diverged run stops within this many steps without a sync in every step."""


class Diverged(Exception):
    """The loss or the validation scores are not finite numbers; nothing of them is kept."""


def verify_shards(shards: ShardSet, accelerator: Accelerator) -> None:
    """Hash every shard once per machine (each may hold its own copy); any mismatch stops every rank."""
    problems, seconds = shards.verify() if accelerator.is_local_main_process else ([], 0.0)
    if accelerator.is_local_main_process and not problems:
        total = sum(s["bytes"] for s in shards.manifest["shards"])
        log.info(f"--verify: {len(shards.manifest['shards'])} shards, {total / 1e9:.2f} GB, match their sha256 "
                 f"({seconds:.1f} s, {total / 1e6 / max(seconds, 1e-9):,.0f} MB/s)", main_process_only=False)
    if accelerator.gather(torch.tensor([len(problems)], device=accelerator.device)).any():
        raise ShardSetError("--verify: " + ("\n  ".join(problems) if problems else
                                            "another machine found shards that differ from the manifest"))


def check_finite(first_nonfinite: torch.Tensor, epoch: int, steps: int, trainer: Trainer) -> None:
    """Stop every rank at once when any rank's loss stopped being a number (`first_nonfinite`: the first such
    step on this rank, -1 for none): nothing after it is trained or saved."""
    bad = [(step, rank) for rank, step in enumerate(trainer.accelerator.gather(first_nonfinite).tolist()) if step >= 0]
    if bad:
        (step, rank), group = min(bad), trainer.optimizer.param_groups[0]
        flags = f"--lr (now {group['lr']:g})" + (f" or --momentum (now {group['momentum']:g})"
                                                   if "momentum" in group else "")
        weights = (f" or go on from the last saved weights with --checkpoint {trainer.run_dir / STATE} and a new "
                   "--run-name" if newest_state(trainer.run_dir) is not None else "")
        raise Diverged(f"E{epoch} step {step + 1} of {steps}: the training loss is not a finite number (rank {rank}): "
                       f"training diverged. {trainer.checkpoints.kept()}; lower {flags}, then start "
                       f"again (--overwrite){weights}")


def resumed_stream(loader, done: int, epoch_rng: dict, device: torch.device):
    """The epoch's batches after the first `done`, as an uninterrupted run saw them.

    The stream is rebuilt from the random states this rank saved when the epoch began
    (`epoch_rng`: they decide the class mixing and the workers' seeds) and its first
    batches are read and dropped; then the checkpoint's states come back, so augmentation
    goes on as it would have.
    """
    at_checkpoint = stream_random_states()
    set_random_states(epoch_rng, device)
    batches = iter(loader)
    for _ in range(done):
        next(batches)
    set_random_states(at_checkpoint, device)
    return batches


def main_model(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The bare model with the main process's parameters and buffers on every rank.

    DDP keeps the parameters equal, but each rank's batch-norm running statistics follow
    its own batches: validating each rank's own copy would score a mix of models, none of
    them the one saved. The bare module also keeps DDP's forward (and its syncs) out of
    validation, where ranks see unequal numbers of batches.
    """
    model = accelerator.unwrap_model(model)
    if accelerator.num_processes > 1:
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            torch.distributed.broadcast(tensor.data, src=0)
    return model


class Trainer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        # A node that dies or freezes leaves the others waiting in a collective: fail after
        # --dist-timeout rather than torch's default of 30 minutes (gloo).
        # --log-with's trackers but TensorBoard, which the run log writes itself (an Aim repository goes in --out).
        self.accelerator = accelerator = Accelerator(kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=args.dist_timeout))],
            log_with=[name for name in args.log_with if name != "tensorboard"] or None, project_dir=args.out)
        set_seed(args.seed, device_specific=True)  # each rank its own streams; prepare() shares rank 0's weights
        self.device, kind = accelerator.device, TASKS[args.task]
        self.shards = open_shard_set(args.shards, kind.samples, args.cache_dir, args.read_timeout, args.cache_limit)
        if args.verify:
            verify_shards(self.shards, accelerator)
        self.val_folds = sorted(set(args.val_folds))
        train_folds = [f for f in self.shards.folds if f not in self.val_folds and f not in args.exclude_folds]
        if not train_folds and not args.eval_only:
            raise ShardSetError(f"{args.shards}: every fold is a validation fold ({self.val_folds}) or excluded "
                                f"({sorted(args.exclude_folds)}); nothing to train on")
        # Before the first step and before the run folder exists: folds that cannot serve fail now.
        self.task = task = kind(args, accelerator, self.shards, train_folds, self.val_folds, not args.eval_only)
        model = task.build_model()
        if args.checkpoint:
            load_into(model, args.checkpoint)
        saved, task.provenance = self._provenance()
        # Before a run folder is made: a device that computes wrongly trains nothing.
        device_check = check_every_rank(accelerator, [(model, layout_for(model, task.channels_last))],
                                        not args.eval_only, args.skip_device_check)
        self.model, self.optimizer = accelerator.prepare(model, task.build_optimizer(model))
        self.progress = Progress(rank=accelerator.process_index)
        self.train_rate = math.nan  # samples/s of the last training epoch, all ranks
        self.num_workers = args.num_workers  # None until the run folder says whether an epoch is to be finished
        self.waited = [0.0, 0.0, 0.0]  # the last epoch's waiting figures (feeding.Waited.figures), of one rank
        self.starving_told = False  # a starved device is warned of once a run
        # Who is who, for the message when a process dies: every rank knows every rank's host and pid.
        self.processes = gather_object([f"{socket.gethostname()}, pid {os.getpid()}"])
        # The rule best.pt is chosen by goes into args.json as the task settled it (its default depends on the shards).
        record = run_folder.record(argparse.Namespace(**{**vars(args), "best_by": task.best_by}),
                                   accelerator.num_processes, accelerator.mixed_precision,
                                   self.shards.manifest.get("identity", {}), device_check, task.provenance.folds())
        self.folder = RunFolder(args, accelerator, record)
        self.run_dir = self.folder.path
        self.checkpoints = Checkpointer(self.run_dir, accelerator, self.model, self.optimizer,
                                        (saved, task.provenance))
        self.run_log = RunLog(self.run_dir, accelerator, task, args.metrics_json)
        self.folder.open(self.progress, self._layout(), self.run_log, self.checkpoints)
        if self.num_workers is None:
            self.num_workers = feeding.default_workers(task, self.progress, accelerator.mixed_precision,
                                                       int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        if not args.eval_only:
            params = {**record["arguments"], **{key: record[key] for key in ("processes", "mixed_precision")}}
            self.run_log.start_trackers(f"luna_dist-{task.name}", params)

    def _provenance(self) -> tuple[Provenance, Provenance]:
        """What the weights of a saved state saw (the folds trained on), and what best.pt's and the validation
        predictions' saw (with the folds `--select-on val` chooses on), each with what the weights it started
        from saw."""
        args, task = self.args, self.task
        fold_series = {int(fold): entry["series"] for fold, entry in self.shards.manifest["folds"].items()}
        starts = [(f"--{flag} {path}", provenance.read(path)) for flag, path in
                  (("finetune", getattr(args, "finetune", None)), ("checkpoint", args.checkpoint)) if path]
        made = []
        for select_on in ("last", args.select_on):
            record = provenance.training(fold_series, task.train_folds, self.val_folds, select_on, task.best_by)
            for start in starts:
                record = record.after(start)
            made.append(record)
        return made[0], made[1]

    def _layout(self) -> dict:
        """What decides the order of a rank's training samples within an epoch (workers None: not given, so those
        of an epoch to be finished)."""
        return {"processes": self.accelerator.num_processes, "batch_size": self.args.batch_size,
                "num_workers": self.num_workers}

    # -- epochs ------------------------------------------------------------------------------
    def epoch_steps(self) -> int:
        """Training steps of an epoch, the same on every rank (checked: a rank with more steps than the
        others would wait in DDP's all-reduce for ever)."""
        args, world = self.args, self.accelerator.num_processes
        steps = math.ceil((args.epoch_samples or self.task.epoch_samples()) / (args.batch_size * world))
        steps = min(steps, args.max_steps or steps)
        every_rank = self.accelerator.gather(torch.tensor([steps], device=self.device)).tolist()
        if len(set(every_rank)) > 1:
            raise RunFolderError(f"the ranks disagree on the steps of an epoch ({', '.join(map(str, every_rank))}): "
                                 "every node must run the same command (--batch-size, --epoch-samples, --max-steps) "
                                 "on the same shard build")
        return steps

    def train_epoch(self, epoch: int) -> dict:
        args, accelerator, task, progress = self.args, self.accelerator, self.task, self.progress
        steps, per_step = self.epoch_steps(), args.batch_size * accelerator.num_processes
        start, epoch_start_seen = progress.step, progress.samples_seen - progress.step * per_step
        if start == 0:  # every rank's random states as its stream begins: a mid-epoch resume replays them
            progress.epoch_rngs, progress.layout = gather_object([stream_random_states()]), self._layout()
        loader = task.train_loader(epoch, steps, self.num_workers, self.device.type == "cuda")
        batches = feeding.Waited(resumed_stream(loader, start, progress.epoch_rng, self.device) if start else loader)
        # Per-sample records stay on the device: no host sync inside the loop. Rows a short batch
        # leaves empty keep -1 in column 0 and are dropped after the gather (with the steps before
        # a mid-epoch resume: their records were not saved).
        record = torch.full((steps, args.batch_size, len(task.record_columns)), -1.0, device=self.device)
        first_nonfinite = torch.full((1,), -1, dtype=torch.int64, device=self.device)  # a step, on the device
        self.model.train()
        step = start - 1
        with self._bar(steps * per_step, f"E{epoch} training", initial=start * per_step) as bar:
            for step, batch in enumerate(held_until_copied(batches, self.device), start):
                cli.raise_if_interrupted()
                loss, rows = task.forward(self.model, batch, train=True)
                self.optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss.mean())
                self.optimizer.step()
                record[step, : rows.shape[0]] = rows
                nonfinite = (first_nonfinite < 0) & ~torch.isfinite(loss).all()
                first_nonfinite = torch.where(nonfinite, step, first_nonfinite)
                bar.update(per_step)
                save_now = args.save_every and (step + 1) % args.save_every == 0 and step + 1 < steps
                if save_now or (step + 1) % FINITE_CHECK_STEPS == 0 or step + 1 == steps:
                    check_finite(first_nonfinite, epoch, steps, self)
                if save_now:
                    progress.step, progress.samples_seen = step + 1, epoch_start_seen + (step + 1) * per_step
                    self.checkpoints.save_epoch(progress, self.task, None)
                    log.info(f"E{epoch} step {step + 1} of {steps}: state saved")
        if step + 1 != steps:
            raise RuntimeError(f"training stream gave {step + 1} batches, expected {steps}")
        self._fed(batches)
        progress.step, progress.epoch_rngs, progress.layout = 0, None, None
        progress.samples_seen = epoch_start_seen + steps * per_step
        gathered = accelerator.gather(record.flatten(0, 1))  # (world * steps * batch, columns)
        return task.compute_metrics(gathered[gathered[:, 0] >= 0])

    @torch.no_grad()
    def validate(self, epoch: int) -> tuple[dict, torch.Tensor]:
        """Score each validation sample once; gather the per-sample records of every rank before any metric."""
        accelerator, task = self.accelerator, self.task
        loader = task.val_loader(self.num_workers, self.device.type == "cuda")
        model = main_model(accelerator, self.model)
        training = model.training
        model.eval()
        rows = []
        with self._bar(None, f"E{epoch} validation") as bar:  # closed on an error too: its message starts a line
            for batch in held_until_copied(loader, self.device):
                cli.raise_if_interrupted()
                rows.append(task.forward(model, batch, train=False)[1])
                bar.update(rows[-1].shape[0] * accelerator.num_processes)
        model.train(training)
        local = torch.cat(rows) if rows else torch.empty(0, len(task.record_columns), device=self.device)
        # Ranks hold different counts: pad with -1 to the longest, gather, drop the padding.
        gathered = accelerator.gather(accelerator.pad_across_processes(local, dim=0, pad_index=-1))
        gathered = gathered[gathered[:, 0] >= 0]
        # The readers check each shard's count; this catches a shard no rank read at all.
        if (expected := task.val_records()) is not None and gathered.shape[0] != expected:
            raise ShardSetError(f"{self.shards.root}: validation read {gathered.shape[0]:,} samples of folds "
                                f"{self.val_folds}, the manifest counts {expected:,}; the metrics would be wrong")
        if nonfinite := int((~torch.isfinite(gathered).all(dim=1)).sum()):
            raise Diverged(f"E{epoch} validation: {nonfinite:,} of {gathered.shape[0]:,} samples have a probability or "
                           "loss that is not a finite number: the model diverged, and nothing is scored. "
                           f"{self.checkpoints.kept()}; train again with a lower --lr")
        return task.compute_metrics(gathered), gathered

    def _bar(self, total: int | None, desc: str, initial: int = 0) -> tqdm:
        return tqdm(total=total, desc=desc, initial=initial, unit="sample", unit_scale=True, dynamic_ncols=True,
                    leave=False, disable=not self.accelerator.is_main_process, file=sys.stderr)

    def _validate_and_log(self, epoch: int) -> tuple[dict, object]:
        metrics, records = self.validate(epoch)
        self.run_log.print(epoch, "val", metrics)
        report = self.task.report(epoch, records, self.accelerator.unwrap_model(self.model)) \
            if self.accelerator.is_main_process else None
        return metrics, report

    def run(self) -> dict:
        args, accelerator, progress = self.args, self.accelerator, self.progress
        log.info(f"task {self.task.name}: {accelerator.num_processes} process(es) on {self.device} "
                 f"({accelerator.distributed_type}), mixed precision {accelerator.mixed_precision}, {self.num_workers} "
                 f"data worker(s) each; train folds {self.task.train_folds}, validation folds {self.val_folds}"
                 + (f", folds {sorted(args.exclude_folds)} left out" if args.exclude_folds else "")
                 + f"; best.pt: {self.task.provenance.selection}; run {self.run_dir}")
        if accelerator.is_main_process and (warning := precision_warning(self.device, accelerator.mixed_precision)):
            log.warning(warning)
        if args.eval_only:
            metrics, _ = self.validate(progress.epoch)
            self.run_log.print(progress.epoch, "val", metrics)
            self._write_metrics(metrics)
            return metrics
        behind = [self.accelerator.is_main_process and self.folder.logs_behind(progress)]
        broadcast_object_list(behind)
        metrics = {}
        if progress.validated < progress.epoch:  # stopped while validating it
            log.info(f"epoch {progress.epoch} was trained and saved, not validated: validating it")
            metrics = self._validate_and_save(progress.epoch)
        elif behind[0]:
            log.info(f"epoch {progress.epoch} was saved but not all of its logs: validating its model again to "
                     "write them")
            val_metrics, report = self._validate_and_log(progress.epoch)
            self.run_log.write(progress.epoch, progress.samples_seen,
                               {"trn": (progress.train_metrics, None), "val": (val_metrics, report)})
        for epoch in range(progress.epoch + 1, args.epochs + 1):
            started, seen = time.perf_counter(), progress.samples_seen
            train_metrics = self.train_epoch(epoch)
            seconds, trained = time.perf_counter() - started, progress.samples_seen - seen
            self.run_log.print(epoch, "trn", train_metrics)
            self.train_rate = trained / seconds
            waiting = feeding.share(*self.waited[:2])
            log.info(f"E{epoch} trained {trained:,} samples in {seconds:.1f} s "
                     f"({self.train_rate:,.1f} samples/s, all ranks), waiting for data {waiting:.0%} of the time"
                     + (" (the rank that waited most)" if accelerator.num_processes > 1 else ""))
            self._starving(epoch, waiting)
            train_metrics = {**train_metrics, "speed/samples_per_s": self.train_rate, "speed/waiting_share": waiting}
            progress.epoch, progress.train_metrics = epoch, train_metrics
            self.checkpoints.save_epoch(progress, self.task, None)  # a failure while validating keeps the training
            metrics = self._validate_and_save(epoch)
        if progress.epoch >= args.epochs and not metrics:
            log.info(f"{self.run_dir} already trained for {progress.epoch} epoch(s); raise --epochs to continue")
        return metrics

    def _fed(self, batches: feeding.Waited) -> None:
        """Keep the epoch's waiting figures of the rank that waited the largest share (one gather an epoch)."""
        figures = self.accelerator.gather(torch.tensor([batches.figures()], device=self.device))
        shares = figures[:, 0] / figures[:, 1].clamp_min(1e-9)
        self.waited = figures[int(shares.argmax())].tolist()

    def _starving(self, epoch: int, waiting: float) -> None:
        """Warn once a run when the device waited for data more than STARVED of an epoch, with what to do."""
        if waiting <= STARVED or self.starving_told or not self.accelerator.is_main_process:
            return
        self.starving_told = True
        cores = usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        log.warning(f"E{epoch}: the device waited for data {waiting:.0%} of the epoch: "
                    f"{feeding.advice(*self.waited, self.num_workers, cores)}")

    def _validate_and_save(self, epoch: int) -> dict:
        """Validate the saved model of `epoch`, save the state again as validated (best.pt if it scored best), then
        write the epoch's logs: a failure in them keeps the state."""
        metrics, report = self._validate_and_log(epoch)
        best_before = self.progress.best_score
        self.checkpoints.save_epoch(self.progress, self.task, metrics)
        self.run_log.write(epoch, self.progress.samples_seen,
                           {"trn": (self.progress.train_metrics, None), "val": (metrics, report)},
                           best=self.progress.best_score is not best_before)  # a new best score: best.pt is this
        self._write_metrics(metrics)
        return metrics

    def _write_metrics(self, metrics: dict) -> None:
        self.run_log.write_metrics(metrics, {"epoch": self.progress.epoch, "samples_seen": self.progress.samples_seen,
                                             "train_samples_per_s": self.train_rate,
                                             "processes": self.accelerator.num_processes})

    def lost_peers(self, error: BaseException) -> str | None:
        """If `error` is a collective that failed because another process died or froze: who, and how to go on."""
        go_on = f"{self.checkpoints.kept()}; when the nodes are back, {self.checkpoints.go_on(' on every node')}"
        return lost_peers_message(error, self.accelerator.process_index, self.processes, self.progress.current, go_on,
                                  min(10.0, self.args.dist_timeout))

    def stopped(self, what: str) -> str:
        """The line of a run that `what` stopped in mid-course: what is kept, and how to go on."""
        return f"{what} in epoch {self.progress.current}. {self.checkpoints.kept()}; {self.checkpoints.go_on()}"

    def close(self) -> None:
        self.run_log.close()
        self.accelerator.end_training()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()  # from Python (a notebook): `with Trainer(args) as trainer: trainer.run()`
