"""What every task shares: the protocol the training loop calls, and the defaults most tasks keep.

A task is built once the shard set is open, from the command's flags, the folds and the
accelerator; everything it derives from them (the findings of the validation folds, the
counts of each kind of sample, the --best-by rule) is settled in its constructor, so no
method depends on another having run first. The loop never asks which task it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import ClassVar

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn

from luna_dist.data.augment import AugmentConfig
from luna_dist.data.augment import augment as augmented
from luna_dist.data.loaders import train_loader, val_loader
from luna_dist.data.streams import ClassStream, ShardSet, TrainStreamConfig, pos_neg_streams
from luna_dist.models.provenance import Provenance
from luna_dist.shards.format import ShardSetError
from luna_dist.training.run_log import Report


def augment_config(args: argparse.Namespace) -> AugmentConfig:
    """The augmentations the `--augment*` flags ask for, at the strengths of `AugmentConfig.all()`."""
    full = AugmentConfig.all()
    return AugmentConfig(
        flip=args.augment or args.augment_flip,
        offset=full.offset if args.augment or args.augment_offset else 0.0,
        scale=full.scale if args.augment or args.augment_scale else 0.0,
        rotate=args.augment or args.augment_rotate,
        noise_hu=full.noise_hu if args.augment or args.augment_noise else 0.0,
    )


class Task:
    """One model's way of training, on one shard set; see the module docstring.

    Subclasses set the class attributes and implement the builders, `forward`,
    `compute_metrics` and `format_metrics`; the data methods, `report` and `score` have
    defaults that fit a classifier of pos/neg samples.
    """

    name: ClassVar[str]
    samples: ClassVar[ModuleType]  # its sample module, whose TASK and READS the shard set is checked against
    record_columns: ClassVar[tuple[str, ...]]
    """What each per-sample record holds, by column; the first is never negative (the loop pads with -1)."""
    best_by_rules: ClassVar[dict[str, tuple[str, ...]]]
    """The --best-by choices, the first the default: the metrics each compares, in order (later ones
    break ties); a leading '-' means lower is better."""
    val_labels: ClassVar[tuple[str, ...]] = ("pos", "neg")
    provenance: Provenance | None = None
    """What the validated model saw (set by the loop), for the predictions a report writes."""

    def __init__(self, args: argparse.Namespace, accelerator: Accelerator, shards: ShardSet, train_folds: list[int],
                 val_folds: list[int], training: bool):
        self.args, self.accelerator, self.device = args, accelerator, accelerator.device
        self.shards, self.train_folds, self.val_folds = shards, train_folds, val_folds
        self.augment = augment_config(args)
        # MPS lacks fast channels-last kernels for these models; elsewhere it is the faster layout.
        self.channels_last = args.channels_last == "on" or (args.channels_last == "auto" and self.device.type != "mps")
        self.best_by = args.best_by or next(iter(self.best_by_rules))
        if not any(shards.shards(val_folds, label) for label in self.val_labels):
            raise ShardSetError(f"{shards.root}: validation folds {val_folds} have no shards (the build has folds "
                                f"{shards.folds}); choose others with --val-folds")
        if training:
            self._require_training_shards()

    def _require_training_shards(self) -> None:
        """Every kind of sample the training mix asks for has shards in the training folds."""
        for label in sorted({kind.label for kind in self.train_streams() if kind.share != 0}):
            if not self.shards.shards(self.train_folds, label):
                counts = ", ".join(f"{len(self.shards.shards(self.train_folds, name))} {name}"
                                   for name in ("pos", "neg"))
                raise ShardSetError(f"{self.shards.root}: training folds {self.train_folds} have {counts} shards; "
                                    f"both classes are needed (change --val-folds?)")

    # -- flags ------------------------------------------------------------------------------------
    @staticmethod
    def add_arguments(group: argparse._ArgumentGroup) -> None:
        """The task's own flags (given with another --task, they are refused)."""

    @staticmethod
    def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        """Reject bad values of the task's own flags with `parser.error`, naming the flag."""

    # -- builders -----------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    # -- data -------------------------------------------------------------------------------------
    def train_streams(self) -> tuple[ClassStream, ...]:
        """The kinds of training sample and their shares: positives and negatives, at `negatives_per_positive`."""
        return pos_neg_streams(self.negatives_per_positive())

    def negatives_per_positive(self) -> float:
        """The task's ratio flag; 0 means the natural frequencies."""
        return 0.0

    def train_collate(self) -> Callable[[list[dict]], tuple]:
        raise NotImplementedError

    def epoch_samples(self) -> int:
        """Training samples per epoch, all ranks together, when `--epoch-samples` is not given: one pass."""
        return sum(self.shards.count(self.train_folds, label) for label in ("pos", "neg"))

    def train_loader(self, epoch: int, steps: int, num_workers: int, pin_memory: bool) -> Iterable:
        """Exactly `steps` batches for this rank (resampled, so ranks never wait on each other)."""
        args = self.args
        config = TrainStreamConfig(tuple(self.train_folds), args.batch_size, steps, num_workers, self.train_streams(),
                                   args.shuffle_buffer, args.seed)
        return train_loader(self.shards, config, epoch, self.train_collate(), pin_memory, args.worker_timeout)

    def val_batcher(self) -> Callable:
        """The validation pipeline's batching stage (`luna_dist.data.streams.val_pipeline`), e.g. a partial of
        `luna_dist.data.streams.batched`."""
        raise NotImplementedError

    def val_loader(self, num_workers: int, pin_memory: bool) -> Iterable:
        """This rank's share of the validation samples: each sample once over all ranks and workers."""
        return val_loader(self.shards, self.val_folds, self.args.batch_size, num_workers, self.val_labels,
                          self.val_batcher(), pin_memory, self.args.worker_timeout)

    def val_records(self) -> int | None:
        """How many records validation gathers from all ranks, by the manifest; None where it cannot tell."""
        return sum(self.shards.count(self.val_folds, label) for label in self.val_labels)

    # -- steps and scores -----------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch, train: bool) -> tuple[Tensor, Tensor]:
        """(loss per sample (N,), records (N, len(record_columns)) float32) for one host batch."""
        raise NotImplementedError

    def column(self, records: Tensor, name: str) -> Tensor:
        """The column `name` of `record_columns` of gathered records (N, columns)."""
        return records[:, self.record_columns.index(name)]

    def compute_metrics(self, records: Tensor) -> dict[str, float]:
        """Metrics from the records of every rank (already gathered, padding removed)."""
        raise NotImplementedError

    def format_metrics(self, epoch: int, mode: str, metrics: dict) -> list[str]:
        raise NotImplementedError

    def report(self, epoch: int, records: Tensor, model: nn.Module) -> Report:
        """What this epoch's validation shows beyond the scalars (main process only)."""
        return Report()

    def score(self, metrics: dict) -> list[float]:
        """The best-model score by `--best-by`: higher is better, compared entry by entry; NaN never wins."""
        return [-metrics[key[1:]] if key.startswith("-") else metrics[key] for key in self.best_by_rules[self.best_by]]

    def describe_score(self, metrics: dict, score: list[float]) -> str:
        """`score` (of `metrics`) as the best model's line says it: each of its names with its value."""
        return " then ".join(f"{name} {value:.4f}" for name, value in zip(self.best_by_rules[self.best_by], score))


def chunk_input(chunks: Tensor, device: torch.device, augment: AugmentConfig | None, channels_last: bool) -> Tensor:
    """int16 chunks on the host -> float32 HU on the device, augmented there (when `augment` is given)."""
    x = chunks.to(device, non_blocking=True).float()
    if augment is not None and augment.enabled:
        x = augmented(x, augment)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


def classify_chunks(task: Task, model: nn.Module, chunks: Tensor, labels: Tensor, columns: Tensor,
                    train: bool) -> tuple[Tensor, Tensor]:
    """A two-class chunk model (nodule or malignancy) on one batch: the loss per sample, and the records
    (label, probability of class 1, loss, then the task's own `columns` (N, K)) on the device."""
    labels = labels.to(task.device, non_blocking=True)
    with task.accelerator.autocast():
        logits, probs = model(chunk_input(chunks, task.device, task.augment if train else None, task.channels_last))
    loss = F.cross_entropy(logits.float(), labels, reduction="none")  # per sample, for the per-class losses
    records = torch.cat([labels.float()[:, None], probs[:, 1:2].float().detach(), loss.detach()[:, None],
                         columns.to(task.device, non_blocking=True)], dim=1)
    return loss, records
