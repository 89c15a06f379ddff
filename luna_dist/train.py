"""Train LunaModel (nodule vs non-nodule) on a shard set with Accelerate.

One script for an Apple MPS laptop, one CUDA GPU, many GPUs or nodes, or CPU ranks:

    accelerate launch launch/train.py --shards shards/NAME            # per accelerate config
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 launch/train.py --shards ...
    python -m luna_dist.train --shards shards/NAME                    # one process

Data: each rank streams its own shards (luna_dist.stream); the loaders are not
passed through `accelerator.prepare`, which would dispatch batches from rank 0 or
split the stream a second time. Every rank runs the same number of steps.
Metrics: per-sample label, probability and loss stay on the device during an epoch,
are gathered from all ranks, and only then turned into numbers; the main process
alone prints, writes TensorBoard and saves the best model.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from luna_dist.augment import AugmentConfig, augment
from luna_dist.candidates import N_FOLDS
from luna_dist.metrics import compute_metrics, format_metrics
from luna_dist.model import LunaModel
from luna_dist.stream import ShardSetError, TrainStreamConfig, open_shard_set, steps_per_epoch, train_loader, val_loader

log = get_logger("luna_dist.train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/train.py", description="Train the LUNA16 nodule classifier.")
    parser.add_argument("--shards", type=Path, required=True, help="shard folder built by python -m luna_dist.shard")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="data workers per process (default: 4 on CUDA, 2 on MPS, 0 on CPU)")
    parser.add_argument("--lr", type=float, default=0.001, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.99, help="SGD momentum")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-folds", type=int, nargs="+", default=[9], help="folds held out for validation")
    parser.add_argument("--balanced", type=float, default=0, metavar="RATIO",
                        help="negatives per positive in training batches; 0 = natural frequencies")
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
    parser.add_argument("--max-steps", type=int, default=None, help="cap training steps per epoch (quick checks)")
    parser.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                        help="channels_last_3d memory layout (auto: on except on MPS)")
    args = parser.parse_args(argv)

    if args.epochs < 1 or args.batch_size < 1:
        parser.error("--epochs and --batch-size must be at least 1")
    if any(not 0 <= fold < N_FOLDS for fold in args.val_folds):
        parser.error(f"--val-folds must be in 0..{N_FOLDS - 1}, got {args.val_folds}")
    if args.balanced < 0:
        parser.error(f"--balanced must be 0 (natural) or a positive ratio, got {args.balanced}")
    if args.eval_only and not (args.resume or args.checkpoint):
        parser.error("--eval-only needs --resume or --checkpoint PATH: there is nothing to evaluate")
    return args


def augment_config(args: argparse.Namespace) -> AugmentConfig:
    full = AugmentConfig.all()
    return AugmentConfig(
        flip=args.augment or args.augment_flip,
        offset=full.offset if args.augment or args.augment_offset else 0.0,
        scale=full.scale if args.augment or args.augment_scale else 0.0,
        rotate=args.augment or args.augment_rotate,
        noise_hu=full.noise_hu if args.augment or args.augment_noise else 0.0,
    )


@dataclass
class Progress:
    """Where training stands; saved with every checkpoint so a resume never guesses from folder names."""

    epoch: int = 0  # epochs completed
    samples_seen: int = 0  # training samples, all ranks together
    best_f1: float = -1.0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "samples_seen": self.samples_seen, "best_f1": self.best_f1}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.samples_seen, self.best_f1 = state["epoch"], state["samples_seen"], state["best_f1"]


def load_weights(path: Path) -> dict:
    """Model weights from a best-model file (best.pt) or a saved training state folder."""
    if path.is_dir():
        from safetensors.torch import load_file

        weights = path / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{path}: no model.safetensors; pass a run's state/ folder or its best.pt")
        return load_file(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def default_workers(device: torch.device, local_processes: int) -> int:
    """Enough workers to feed a GPU (one decodes ~thousands of samples/s); none needed for CPU compute."""
    if device.type == "cuda":
        return max(1, min(4, (os.cpu_count() or 1) // max(1, local_processes) - 1))
    if device.type == "mps":
        return 2
    return 0


class Trainer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.accelerator = accelerator = Accelerator()
        # Each rank its own random streams (augmentation, class mixing); prepare() makes
        # every rank start from rank 0's initial weights.
        set_seed(args.seed, device_specific=True)
        self.device = accelerator.device
        self.shards = open_shard_set(args.shards)
        self.val_folds = sorted(set(args.val_folds))
        self.train_folds = [f for f in self.shards.folds if f not in self.val_folds]
        if not self.train_folds and not args.eval_only:
            raise ShardSetError(f"{args.shards}: every fold is a validation fold ({self.val_folds}); nothing to train on")
        self.augment = augment_config(args)
        self.channels_last = args.channels_last == "on" or (args.channels_last == "auto" and self.device.type != "mps")
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        self.num_workers = args.num_workers if args.num_workers is not None else default_workers(self.device, local_processes)
        self.pin_memory = self.device.type == "cuda"

        model = LunaModel()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        if args.checkpoint:
            model.load_state_dict(load_weights(args.checkpoint))
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.progress = Progress()
        self.train_rate = math.nan  # samples/s of the last training epoch, all ranks
        accelerator.register_for_checkpointing(self.progress)

        self.run_dir = self._run_dir()
        if args.resume:
            state = self.run_dir / "state"
            if not state.is_dir():
                raise FileNotFoundError(f"{state}: no saved state to resume; check --run-name and --out")
            accelerator.load_state(str(state))
            log.info(f"resumed {self.run_dir} after epoch {self.progress.epoch}, {self.progress.samples_seen:,} samples seen")
        self.writers = {}
        if accelerator.is_main_process and not args.eval_only:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.writers = {mode: SummaryWriter(str(self.run_dir / mode)) for mode in ("trn", "val")}
            (self.run_dir / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))

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

    # -- one batch ---------------------------------------------------------------------------
    def _to_input(self, chunks: torch.Tensor, train: bool) -> torch.Tensor:
        """int16 chunks on the host -> float32 HU on the device, augmented there when training."""
        x = chunks.to(self.device, non_blocking=True).float()
        if train and self.augment.enabled:
            x = augment(x, self.augment)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return x

    def _forward(self, model, chunks, labels, train: bool):
        labels = labels.to(self.device, non_blocking=True)
        with self.accelerator.autocast():
            logits, probs = model(self._to_input(chunks, train))
        loss = F.cross_entropy(logits.float(), labels, reduction="none")  # per sample, for the pos/neg split
        return loss, probs[:, 1].float().detach(), labels

    # -- epochs ------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        args, accelerator = self.args, self.accelerator
        world = accelerator.num_processes
        epoch_samples = args.epoch_samples or self.shards.count(self.train_folds, "pos") + self.shards.count(self.train_folds, "neg")
        steps = math.ceil(epoch_samples / (args.batch_size * world))
        if args.max_steps:
            steps = min(steps, args.max_steps)
        steps = steps_per_epoch(steps, self.num_workers)
        config = TrainStreamConfig(tuple(self.train_folds), args.batch_size, steps, self.num_workers, args.balanced,
                                   args.shuffle_buffer, args.seed)
        loader = train_loader(self.shards, config, epoch, pin_memory=self.pin_memory)

        # Per-sample metrics stay on the device: no host sync inside the loop.
        record = torch.zeros(3, steps, args.batch_size, device=self.device)  # label, prob, loss
        self.model.train()
        bar = self._bar(steps * args.batch_size * world, f"E{epoch} training")
        for step, (chunks, labels) in enumerate(loader):
            loss, prob, label = self._forward(self.model, chunks, labels, train=True)
            self.optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss.mean())
            self.optimizer.step()
            record[0, step], record[1, step], record[2, step] = label, prob, loss.detach()
            bar.update(args.batch_size * world)
        bar.close()
        if step + 1 != steps:
            raise RuntimeError(f"training stream gave {step + 1} batches, expected {steps}")
        self.progress.samples_seen += steps * args.batch_size * world
        gathered = accelerator.gather(record.reshape(3, -1).T.contiguous())  # (world * steps * batch, 3)
        return compute_metrics(gathered[:, 0], gathered[:, 1], gathered[:, 2])

    @torch.no_grad()
    def validate(self, epoch: int) -> tuple[dict, torch.Tensor]:
        """Score each validation sample once; gather (label, prob, loss) from every rank before any metric."""
        accelerator = self.accelerator
        loader = val_loader(self.shards, self.val_folds, self.args.batch_size, self.num_workers, self.pin_memory)
        # The bare module: ranks see unequal numbers of batches, and DDP's forward must not sync here.
        model = accelerator.unwrap_model(self.model)
        model.eval()
        rows = []
        bar = self._bar(None, f"E{epoch} validation")
        for chunks, labels in loader:
            loss, prob, label = self._forward(model, chunks, labels, train=False)
            rows.append(torch.stack([label.float(), prob, loss], dim=1))
            bar.update(len(labels) * accelerator.num_processes)
        bar.close()
        local = torch.cat(rows) if rows else torch.empty(0, 3, device=self.device)
        # Ranks hold different counts: pad with label -1 to the longest, gather, drop the padding.
        padded = accelerator.pad_across_processes(local, dim=0, pad_index=-1)
        gathered = accelerator.gather(padded)
        gathered = gathered[gathered[:, 0] >= 0]
        return compute_metrics(gathered[:, 0], gathered[:, 1], gathered[:, 2]), gathered

    def _bar(self, total: int | None, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit="sample", unit_scale=True, dynamic_ncols=True, leave=False,
                    disable=not self.accelerator.is_main_process, file=sys.stderr)

    # -- logging and checkpoints ---------------------------------------------------------------
    def log_metrics(self, epoch: int, mode: str, metrics: dict, per_sample: torch.Tensor | None = None) -> None:
        if not self.accelerator.is_main_process:
            return
        for line in format_metrics(epoch, mode, metrics):
            log.info(line)
        writer = self.writers.get(mode)
        if writer is None:
            return
        step = self.progress.samples_seen
        for key, value in metrics.items():
            if not key.startswith("count") and math.isfinite(value):
                writer.add_scalar(key, value, step)
        if per_sample is not None and len(per_sample):
            labels, probs = per_sample[:, 0].cpu().bool(), per_sample[:, 1].cpu()
            writer.add_pr_curve("pr", labels, probs, step)
            bins = np.linspace(0, 1, 51)  # bins of 1/50
            confident_neg = probs[~labels & (probs > 0.01)]
            doubtful_pos = probs[labels & (probs < 0.99)]
            if len(confident_neg):
                writer.add_histogram("is_neg", confident_neg, step, bins=bins)
            if len(doubtful_pos):
                writer.add_histogram("is_pos", doubtful_pos, step, bins=bins)
        writer.flush()

    def save(self, val_metrics: dict) -> None:
        """Accelerate's state (model, optimizer, RNG, progress) each epoch; the best model by validation F1."""
        accelerator = self.accelerator
        partial, final = self.run_dir / "state.partial", self.run_dir / "state"
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # Swap in the new state only once complete: a crash leaves the previous one intact.
            shutil.rmtree(self.run_dir / "state.old", ignore_errors=True)
            if final.exists():
                final.rename(self.run_dir / "state.old")
            partial.rename(final)
            shutil.rmtree(self.run_dir / "state.old", ignore_errors=True)
            f1 = val_metrics["pr/f1_score"]
            if math.isfinite(f1) and f1 > self.progress.best_f1:
                self.progress.best_f1 = f1
                best = {"model": accelerator.unwrap_model(self.model).state_dict(), "epoch": self.progress.epoch,
                        "samples_seen": self.progress.samples_seen, "val_metrics": val_metrics}
                torch.save(best, self.run_dir / "best.pt.partial")
                os.replace(self.run_dir / "best.pt.partial", self.run_dir / "best.pt")
                log.info(f"E{self.progress.epoch} new best model, F1 {f1:.4f}: {self.run_dir / 'best.pt'}")
        accelerator.wait_for_everyone()

    def run(self) -> dict:
        args, accelerator = self.args, self.accelerator
        log.info(f"{accelerator.num_processes} process(es) on {self.device} ({accelerator.distributed_type}), "
                 f"mixed precision {accelerator.mixed_precision}, {self.num_workers} data worker(s) each; "
                 f"train folds {self.train_folds}, validation folds {self.val_folds}; run {self.run_dir}")
        if args.eval_only:
            metrics, per_sample = self.validate(self.progress.epoch)
            self.log_metrics(self.progress.epoch, "val", metrics)
            self._write_metrics(metrics)
            return metrics
        metrics = {}
        for epoch in range(self.progress.epoch + 1, args.epochs + 1):
            started = time.perf_counter()
            train_metrics = self.train_epoch(epoch)
            seconds = time.perf_counter() - started
            self.log_metrics(epoch, "trn", train_metrics)
            self.train_rate = train_metrics["count/all"] / seconds
            log.info(f"E{epoch} trained {int(train_metrics['count/all']):,} samples in {seconds:.1f} s "
                     f"({self.train_rate:,.1f} samples/s, all ranks)")
            metrics, per_sample = self.validate(epoch)
            self.log_metrics(epoch, "val", metrics, per_sample)
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


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint lines drown the metrics
    args = parse_args(argv)
    trainer = None
    try:
        trainer = Trainer(args)
        trainer.run()
    except (ShardSetError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        if trainer is not None:
            trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
