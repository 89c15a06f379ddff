"""What differs per model, for the one training loop of `luna_dist.train`.

A task names the shards it reads, its model and optimizer, its pipelines, what it
records per sample, the metrics and log lines made from those records, its
TensorBoard extras and the rule that picks the best model. `Trainer` calls these
and never asks which task it runs; checkpoints, resume, gathering and logging stay
in the loop because no task needs them different.

Per-sample records are float32 rows whose first column is never negative: the loop
marks padding with -1 there when ranks hold different numbers of rows.
"""

from __future__ import annotations

import argparse
import logging
import math
from functools import partial
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from luna_dist import evaluate
from luna_dist.augment import AugmentConfig, augment, augment_with_mask, random_crop
from luna_dist.ct import HU_MAX, HU_MIN
from luna_dist.metrics import compute_metrics, compute_seg_metrics, format_metrics, format_seg_metrics, roc_auc
from luna_dist.model import LunaModel, SegmentationModel, load_into
from luna_dist.stream import (
    ShardSet,
    ShardSetError,
    TrainStreamConfig,
    batched,
    batched_slices,
    checked_samples,
    collate_located,
    collate_malignancy,
    collate_stacks,
    malignancy_counts,
    malignancy_train_loader,
    open_shard_set,
    train_loader,
    val_loader,
)


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
    """The parts of training that one model does its own way; see the module docstring."""

    name = ""
    record_columns: tuple[str, ...] = ()
    best_by_rules: dict[str, tuple[str, ...]] = {}
    """The --best-by choices, the first the default: the metrics each compares, in order (later ones
    break ties); a leading '-' means lower is better."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.augment = augment_config(args)
        self.best_by = args.best_by or next(iter(self.best_by_rules))  # cls: settled by check_folds

    def setup(self, accelerator: Accelerator) -> None:
        """Called once by the loop before anything is built."""
        self.accelerator = accelerator
        self.device = accelerator.device
        # MPS lacks fast channels-last kernels for these models; elsewhere it is the faster layout.
        self.channels_last = self.args.channels_last == "on" or (
            self.args.channels_last == "auto" and self.device.type != "mps")

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """The task's own flags (all tasks share one parser, so names must not clash)."""

    @staticmethod
    def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        """Reject bad values of the task's own flags with `parser.error`, naming the flag."""

    def open_shards(self, path) -> ShardSet:
        raise NotImplementedError

    def check_folds(self, shards: ShardSet, train_folds: list[int], val_folds: list[int], training: bool) -> None:
        """Raise ShardSetError, before the first step, when the folds cannot serve this run (or its --best-by)."""
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    def epoch_samples(self, shards: ShardSet, train_folds: list[int]) -> int:
        """Training samples per epoch, all ranks together, when `--epoch-samples` is not given."""
        raise NotImplementedError

    def train_loader(self, shards: ShardSet, train_folds: list[int], epoch: int, steps: int, num_workers: int,
                     pin_memory: bool) -> Iterable:
        """Exactly `steps` batches for this rank (resampled, so ranks never wait on each other)."""
        raise NotImplementedError

    def val_loader(self, shards: ShardSet, val_folds: list[int], num_workers: int, pin_memory: bool) -> Iterable:
        """This rank's share of the validation samples: each sample once over all ranks and workers."""
        raise NotImplementedError

    def val_records(self, shards: ShardSet, val_folds: list[int]) -> int | None:
        """How many records validation gathers from all ranks, by the manifest; None where it cannot tell."""
        return None

    def forward(self, model: nn.Module, batch, train: bool) -> tuple[Tensor, Tensor]:
        """(loss per sample (N,), records (N, len(record_columns)) float32) for one host batch."""
        raise NotImplementedError

    def compute_metrics(self, records: Tensor) -> dict[str, float]:
        """Metrics from the records of every rank (already gathered, padding removed)."""
        raise NotImplementedError

    def format_metrics(self, epoch: int, mode: str, metrics: dict) -> list[str]:
        raise NotImplementedError

    def log_extras(self, writer: SummaryWriter, mode: str, records: Tensor, step: int, model: nn.Module) -> None:
        """TensorBoard beyond the scalars; main process only."""

    def save_outputs(self, run_dir: Path, epoch: int, mode: str, records: Tensor) -> None:
        """Files the task writes beside the run's logs each epoch (e.g. predictions); main process only."""

    def score(self, metrics: dict) -> list[float]:
        """The best-model score by `--best-by`: higher is better, compared entry by entry; NaN never wins."""
        return [-metrics[key[1:]] if key.startswith("-") else metrics[key] for key in self.best_by_rules[self.best_by]]


class ClsTask(Task):
    """Nodule vs non-nodule on 32x48x48 chunks: LunaModel, SGD, cross-entropy, pos/neg metrics."""

    name = "cls"
    # series/x/y/z: where a validation sample lies (series = its number in the validation
    # series, -1 in training), so validation can be scored as LUNA16 scores candidates.
    record_columns = ("label", "prob", "loss", "series", "x", "y", "z")
    # LUNA16's score where the shards carry the findings (the default then): what papers compare.
    best_by_rules = {"cpm": ("cpm", "auc"), "auc": ("auc",), "f1": ("pr/f1_score",), "loss": ("-loss/all",)}
    evaluation: tuple[list[str], evaluate.Findings, evaluate.Findings] | None = None  # validation series, findings

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("nodule classifier (--task cls)")
        group.add_argument("--balanced", type=float, default=0, metavar="RATIO",
                           help="negatives per positive in training batches; 0 = natural frequencies")

    @staticmethod
    def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        if args.balanced < 0:
            parser.error(f"--balanced must be 0 (natural) or a positive ratio, got {args.balanced}")

    def open_shards(self, path) -> ShardSet:
        return open_shard_set(path)

    def check_folds(self, shards: ShardSet, train_folds: list[int], val_folds: list[int], training: bool) -> None:
        def shard_count(folds: list[int]) -> str:
            return f"{len(shards.shards(folds, 'pos'))} positive and {len(shards.shards(folds, 'neg'))} negative shards"

        if not shards.shards(val_folds, "pos") + shards.shards(val_folds, "neg"):
            raise ShardSetError(f"{shards.root}: validation folds {val_folds} have no shards (the build has folds "
                                f"{shards.folds}); choose others with --val-folds")
        if training and not (shards.shards(train_folds, "pos") and shards.shards(train_folds, "neg")):
            raise ShardSetError(f"{shards.root}: training folds {train_folds} have {shard_count(train_folds)}; "
                                "both classes are needed (change --val-folds?)")
        try:
            self.evaluation = evaluate.fold_findings(shards.manifest, val_folds)
        except KeyError as err:
            self.evaluation = None
            if self.accelerator.is_main_process:
                logging.getLogger(__name__).warning(f"no LUNA16 CPM: {err.args[0]}")
        nodules = 0 if self.evaluation is None else len(self.evaluation[1].series)
        if self.args.best_by == "cpm" and not nodules:
            raise ShardSetError(f"{shards.root}: --best-by cpm needs annotated nodules in validation folds {val_folds}, "
                                "which " + ("have none" if self.evaluation else "the manifest does not list") +
                                "; choose another --best-by or --val-folds")
        if self.args.best_by is None:
            self.best_by = "cpm" if nodules else "auc"

    def build_model(self) -> nn.Module:
        model = LunaModel()
        return model.to(memory_format=torch.channels_last_3d) if self.channels_last else model

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=self.args.lr, momentum=self.args.momentum)

    def epoch_samples(self, shards: ShardSet, train_folds: list[int]) -> int:
        return shards.count(train_folds, "pos") + shards.count(train_folds, "neg")

    def train_loader(self, shards, train_folds, epoch, steps, num_workers, pin_memory):
        args = self.args
        config = TrainStreamConfig(tuple(train_folds), args.batch_size, steps, num_workers, args.balanced,
                                   args.shuffle_buffer, args.seed)
        return train_loader(shards, config, epoch, pin_memory=pin_memory)

    def val_loader(self, shards, val_folds, num_workers, pin_memory):
        if self.evaluation is None:
            return val_loader(shards, val_folds, self.args.batch_size, num_workers, pin_memory)
        series_index = {uid: n for n, uid in enumerate(self.evaluation[0])}
        return val_loader(shards, val_folds, self.args.batch_size, num_workers, pin_memory,
                          batcher=partial(batched, collate=partial(collate_located, series_index=series_index)))

    def val_records(self, shards, val_folds):
        return shards.count(val_folds, "pos") + shards.count(val_folds, "neg")  # one record per sample

    def _to_input(self, chunks: Tensor, train: bool) -> Tensor:
        """int16 chunks on the host -> float32 HU on the device, augmented there when training."""
        x = chunks.to(self.device, non_blocking=True).float()
        if train and self.augment.enabled:
            x = augment(x, self.augment)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return x

    def forward(self, model, batch, train):
        chunks, labels = batch[:2]
        labels = labels.to(self.device, non_blocking=True)
        with self.accelerator.autocast():
            logits, probs = model(self._to_input(chunks, train))
        loss = F.cross_entropy(logits.float(), labels, reduction="none")  # per sample, for the pos/neg split
        if len(batch) == 3:  # a validation batch that says where each sample lies
            where = batch[2].to(self.device, non_blocking=True)
        else:
            where = torch.zeros((len(labels), 4), device=self.device)
            where[:, 0] = -1
        records = torch.cat([labels.float()[:, None], probs[:, 1:2].float().detach(), loss.detach()[:, None], where],
                            dim=1)
        return loss, records

    def compute_metrics(self, records):
        metrics = compute_metrics(records[:, 0], records[:, 1], records[:, 2])
        if self.evaluation is not None and len(records) and bool((records[:, 3] >= 0).all()):
            result = self._froc(records)
            metrics["cpm"] = result.cpm
            metrics["froc/detected"], metrics["froc/false_positives"] = result.detected, result.false_positives
            metrics.update({f"froc/sensitivity_{rate:g}": s for rate, s in zip(evaluate.FP_RATES, result.sensitivities)})
        return metrics

    def _froc(self, records: Tensor) -> evaluate.Froc:
        """The LUNA16 score of the validation records: every candidate a mark with its probability."""
        series, nodules, excluded = self.evaluation
        return evaluate.froc(series, nodules, self._marks(records), excluded)

    def _marks(self, records: Tensor) -> evaluate.Marks:
        rows = records.cpu().double().numpy()
        return evaluate.Marks(np.array(self.evaluation[0], dtype=str)[rows[:, 3].astype(np.int64)], rows[:, 4:7],
                              rows[:, 1])

    def format_metrics(self, epoch, mode, metrics):
        lines = format_metrics(epoch, mode, metrics)
        if "cpm" in metrics:
            sensitivities = [metrics[f"froc/sensitivity_{rate:g}"] for rate in evaluate.FP_RATES]
            lines.append("E{} {:8} {}".format(epoch, f"{mode}_cpm", evaluate.format_score(metrics["cpm"], sensitivities)))
        return lines

    def log_extras(self, writer, mode, records, step, model):
        """Validation only: the PR curve, and histograms of confident negatives and doubtful positives."""
        if mode != "val" or not len(records):
            return
        labels, probs = records[:, 0].cpu().bool(), records[:, 1].cpu()
        writer.add_pr_curve("pr", labels, probs, step)
        bins = np.linspace(0, 1, 51)  # bins of 1/50
        confident_neg = probs[~labels & (probs > 0.01)]
        doubtful_pos = probs[labels & (probs < 0.99)]
        if len(confident_neg):
            writer.add_histogram("is_neg", confident_neg, step, bins=bins)
        if len(doubtful_pos):
            writer.add_histogram("is_pos", doubtful_pos, step, bins=bins)
        if self.evaluation is not None and bool((records[:, 3] >= 0).all()):
            try:
                figure = evaluate.plot_froc(self._froc(records), None, title=f"FROC after {step:,} samples")
            except ImportError:
                return  # matplotlib is optional: no figure, the cpm scalar is logged all the same
            writer.add_figure("froc", figure, step)

    def save_outputs(self, run_dir, epoch, mode, records):
        """`RUN/val-predictions-E{n}.csv`: every validation candidate in the LUNA16 predictions format."""
        if mode == "val" and self.evaluation is not None and len(records) and bool((records[:, 3] >= 0).all()):
            evaluate.write_marks(run_dir / f"val-predictions-E{epoch}.csv", self._marks(records))


class MalignancyTask(ClsTask):
    """Malignant vs benign nodules: the nodule classifier fine-tuned, its head replaced, its last blocks trained.

    Training batches mix malignant, benign and non-nodule samples (non-nodules count as
    benign) at `--mix`; validation scores the labelled nodules of the validation folds,
    next to the AUC of their annotated diameter alone. Nodules without a malignancy
    label are left out of both and counted.
    """

    name = "malignancy"
    record_columns = ("label", "prob", "loss", "known", "diameter")
    best_by_rules = {"auc": ("auc",), "f1": ("pr/f1_score",), "loss": ("-loss/all",)}
    TRAINED = {1: ("head_linear",), 2: ("block4", "head_linear")}
    """The modules each --finetune-depth trains; every other one keeps the nodule classifier's weights."""

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("malignancy classifier (--task malignancy)")
        group.add_argument("--finetune", type=Path, default=None,
                           help="the nodule classifier to start from: its best.pt or a run's state/ folder")
        group.add_argument("--finetune-depth", type=int, choices=sorted(MalignancyTask.TRAINED), default=1,
                           help="blocks trained: 1 = the new head, 2 = the last conv block and the head (default 1)")
        group.add_argument("--mix", type=float, nargs=3, default=[1.0, 1.0, 1.0],
                           metavar=("MALIGNANT", "BENIGN", "NON_NODULE"),
                           help="ratios of malignant, benign and non-nodule samples in training batches (default 1 1 1)")

    @staticmethod
    def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        if args.finetune is None and not (args.resume or args.checkpoint):
            parser.error("--task malignancy needs --finetune PATH: the nodule classifier's best.pt or state/ folder")
        if any(ratio < 0 for ratio in args.mix) or not sum(args.mix[:2]):
            parser.error(f"--mix needs ratios >= 0 with malignant or benign above 0, got {args.mix}")

    def check_folds(self, shards, train_folds, val_folds, training):
        self.train_counts = malignancy_counts(shards, train_folds) if training else None
        val_counts = malignancy_counts(shards, val_folds)
        if not val_counts["malignant"] + val_counts["benign"]:
            raise ShardSetError(f"{shards.root}: validation folds {val_folds} have no nodule with a malignancy label "
                                "(was the build given annotations_with_malignancy.csv?); choose others with --val-folds")
        if training:
            kinds = {"malignant": self.args.mix[0], "benign": self.args.mix[1]}
            missing = [kind for kind, ratio in kinds.items() if ratio > 0 and not self.train_counts[kind]]
            if missing or (self.args.mix[2] > 0 and not shards.shards(train_folds, "neg")):
                raise ShardSetError(f"{shards.root}: training folds {train_folds} have no "
                                    f"{' or '.join(missing) or 'non-nodule'} samples that --mix {self.args.mix} asks for")
        if self.accelerator.is_main_process:
            left_out = (self.train_counts or {}).get("unknown", 0) + val_counts["unknown"]
            logging.getLogger(__name__).info(
                f"malignancy: validation {val_counts['malignant']} malignant, {val_counts['benign']} benign nodule "
                f"samples; {left_out} nodule samples without a malignancy label left out")

    def build_model(self) -> nn.Module:
        model = LunaModel()
        if self.args.finetune is not None:
            load_into(model, self.args.finetune)
        model.head_linear = nn.Linear(model.head_linear.in_features, 2)  # a new head for the new question
        trained = self.TRAINED[self.args.finetune_depth]
        for name, module in model.named_children():
            module.requires_grad_(name in trained)
        # Frozen modules stay in eval mode while training, so their batch-norm statistics stay too.
        self.frozen = [module for name, module in model.named_children() if name not in trained]
        return model.to(memory_format=torch.channels_last_3d) if self.channels_last else model

    def build_optimizer(self, model):
        trainable = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.SGD(trainable, lr=self.args.lr, momentum=self.args.momentum)

    def epoch_samples(self, shards, train_folds):
        """About one pass over the labelled nodules, with the non-nodules the mix adds."""
        mix = self.args.mix
        labelled = self.train_counts["malignant"] + self.train_counts["benign"]
        return max(1, round(labelled * sum(mix) / sum(mix[:2])))

    def train_loader(self, shards, train_folds, epoch, steps, num_workers, pin_memory):
        args = self.args
        config = TrainStreamConfig(tuple(train_folds), args.batch_size, steps, num_workers, 0,
                                   args.shuffle_buffer, args.seed)
        return malignancy_train_loader(shards, config, tuple(args.mix), epoch, pin_memory=pin_memory)

    def val_loader(self, shards, val_folds, num_workers, pin_memory):
        return val_loader(shards, val_folds, self.args.batch_size, num_workers, pin_memory, labels=("pos",),
                          batcher=partial(batched, collate=collate_malignancy))

    def val_records(self, shards, val_folds):
        return shards.count(val_folds, "pos")  # one record per nodule sample, labelled or not

    def forward(self, model, batch, train):
        chunks, labels, info = batch
        if train:
            for module in self.frozen:
                module.eval()
        labels = labels.to(self.device, non_blocking=True)
        info = info.to(self.device, non_blocking=True)
        with self.accelerator.autocast():
            logits, probs = model(self._to_input(chunks, train))
        loss = F.cross_entropy(logits.float(), labels, reduction="none")
        records = torch.cat([labels.float()[:, None], probs[:, 1:2].float().detach(), loss.detach()[:, None], info],
                            dim=1)
        return loss, records

    def compute_metrics(self, records):
        known = records[:, 3] > 0.5
        labelled = records[known]
        metrics = compute_metrics(labelled[:, 0], labelled[:, 1], labelled[:, 2])
        malignant = labelled[:, 0] > 0.5
        metrics["auc_diameter"] = roc_auc(labelled[malignant, 4].cpu().double(), labelled[~malignant, 4].cpu().double())
        metrics["count/unlabelled"] = int((~known).sum())
        return metrics

    def format_metrics(self, epoch, mode, metrics):
        lines = format_metrics(epoch, mode, metrics)
        # The generic lines call the classes neg and pos: here benign and malignant.
        lines[1:] = [line.replace(f"{mode}_neg", f"{mode}_ben").replace(f"{mode}_pos", f"{mode}_mal") for line in lines[1:]]
        if mode == "val":
            lines.append("E{} {:8} {} AUC, diameter alone {} AUC ({} nodule samples; {} without a label left out)".format(
                epoch, f"{mode}_auc", evaluate.format_value(metrics["auc"]), evaluate.format_value(metrics["auc_diameter"]),
                metrics["count/all"], metrics["count/unlabelled"]))
        return lines

    def log_extras(self, writer, mode, records, step, model):
        """Validation only: ROC curves of the model and of the diameter alone, as a figure."""
        labelled = records[records[:, 3] > 0.5].cpu().double().numpy()
        if mode != "val" or not len(labelled):
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return  # matplotlib is optional: the AUC scalars are logged all the same
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        for column, name in ((1, "model"), (4, "diameter alone")):
            fpr, tpr = roc_curve(labelled[:, 0] > 0.5, labelled[:, column])
            ax.plot(fpr, tpr, label=name)
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_xlabel("false positive rate (benign called malignant)")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"ROC after {step:,} samples")
        ax.legend(loc="lower right")
        fig.tight_layout()
        writer.add_figure("roc", fig, step)

    def save_outputs(self, run_dir, epoch, mode, records):
        """No LUNA16 predictions: these are nodules, not candidates."""


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) from (0, 0) to (1, 1), one point per distinct score."""
    order = np.argsort(-scores, kind="stable")
    labels, scores = labels[order], scores[order]
    ends = np.r_[np.flatnonzero(scores[1:] != scores[:-1]), len(scores) - 1]
    tp, fp = np.cumsum(labels)[ends], np.cumsum(~labels)[ends]
    return np.r_[0, fp / max(fp[-1], 1)], np.r_[0, tp / max(tp[-1], 1)]


TRAIN_CROP = 64
"""The UNet trains on a random 64 x 64 window of each 96 x 96 stack, cut on the device."""
FN_WEIGHT = 8
"""Weight of the Dice of the prediction inside the mask: misses cost 8 times more than false alarms."""
FIXED_SLICES = 4
"""Validation slices shown in TensorBoard every epoch, from the first validation CTs."""


def dice_loss(prediction: Tensor, mask: Tensor, epsilon: float = 1.0) -> Tensor:
    """1 - soft Dice per sample, (N,), of probabilities and a 0/1 mask (N, 1, H, W); 0 when both are empty."""
    overlap = (prediction * mask).sum(dim=(1, 2, 3))
    return 1 - (2 * overlap + epsilon) / (prediction.sum(dim=(1, 2, 3)) + mask.sum(dim=(1, 2, 3)) + epsilon)


def overlay(hu: Tensor, mask: Tensor, predicted: Tensor) -> Tensor:
    """An RGB picture (H, W, 3) in [0, 1] of a slice (H, W) in HU, its mask and the prediction (bool):
    found nodule pixels green, missed ones red, false alarms yellow."""
    gray = ((hu.float() - HU_MIN) / (HU_MAX - HU_MIN)).clamp(0, 1)
    image = gray.unsqueeze(-1).repeat(1, 1, 3)
    for where, colour in ((mask & predicted, (0.0, 1.0, 0.0)), (mask & ~predicted, (1.0, 0.0, 0.0)),
                          (~mask & predicted, (1.0, 1.0, 0.0))):
        image[where] = 0.4 * image[where] + 0.6 * torch.tensor(colour)
    return image


class SegTask(Task):
    """Nodule pixels in CT slices: a 2-D UNet on 7-slice stacks, Adam, Dice losses, pixel metrics.

    Training: random 64 x 64 crops of the 96 x 96 stacks (and augmentation) on the
    device, positives and negatives mixed at `--seg-neg-ratio`. Loss per sample: soft
    Dice plus 8 x the soft Dice of the prediction inside the mask (the book's
    recall-weighted term). Validation: full slices. Records per slice: true positive,
    missed and false positive pixels (prediction > 0.5) and the loss, summed over all
    ranks before any ratio. Best model: the highest recall among epochs whose precision
    reaches `--seg-precision-floor`; below the floor, the higher precision.
    """

    name = "seg"
    record_columns = ("tp", "fn", "fp", "loss")
    best_by_rules = {"recall": ("pr/recall at --seg-precision-floor",), "f1": ("pr/f1_score",), "loss": ("-loss/all",)}

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("nodule segmentation (--task seg)")
        group.add_argument("--seg-neg-ratio", type=float, default=1.0, metavar="RATIO",
                           help="negative stacks per positive in training batches (default 1); 0 = as stored")
        group.add_argument("--seg-precision-floor", type=float, default=0.3, metavar="P",
                           help="best model: highest validation recall with pixel precision >= P (default 0.3)")

    @staticmethod
    def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        if args.seg_neg_ratio < 0:
            parser.error(f"--seg-neg-ratio must be 0 (as stored) or a positive ratio, got {args.seg_neg_ratio}")
        if not 0 <= args.seg_precision_floor <= 1:
            parser.error(f"--seg-precision-floor must be in [0, 1], got {args.seg_precision_floor}")

    def open_shards(self, path) -> ShardSet:
        return open_shard_set(path, task="seg")

    def check_folds(self, shards: ShardSet, train_folds: list[int], val_folds: list[int], training: bool) -> None:
        if not shards.shards(val_folds, "val"):
            raise ShardSetError(f"{shards.root}: validation folds {val_folds} have no validation slices (the build "
                                f"has folds {shards.folds}); choose others with --val-folds")
        if training and not (shards.shards(train_folds, "pos") and shards.shards(train_folds, "neg")):
            raise ShardSetError(f"{shards.root}: training folds {train_folds} have {len(shards.shards(train_folds, 'pos'))} "
                                f"positive and {len(shards.shards(train_folds, 'neg'))} negative shards; both are needed")
        self._fixed_urls = sorted(shards.shards(val_folds, "val"))[:FIXED_SLICES]
        self._fixed_source = shards.source
        self._fixed = None

    def build_model(self) -> nn.Module:
        model = SegmentationModel()
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.args.lr)

    def epoch_samples(self, shards: ShardSet, train_folds: list[int]) -> int:
        return shards.count(train_folds, "pos") + shards.count(train_folds, "neg")

    def train_loader(self, shards, train_folds, epoch, steps, num_workers, pin_memory):
        args = self.args
        config = TrainStreamConfig(tuple(train_folds), args.batch_size, steps, num_workers, args.seg_neg_ratio,
                                   args.shuffle_buffer, args.seed)
        return train_loader(shards, config, epoch, pin_memory=pin_memory, collate=collate_stacks)

    def val_loader(self, shards, val_folds, num_workers, pin_memory):
        return val_loader(shards, val_folds, self.args.batch_size, num_workers, pin_memory, labels=("val",),
                          batcher=batched_slices)

    def _predict(self, model: nn.Module, images: Tensor) -> Tensor:
        x = images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
        with self.accelerator.autocast():
            return model(x).float()

    def forward(self, model, batch, train):
        images, masks = (t.to(self.device, non_blocking=True) for t in batch)
        images = images.float()  # int16 travelled; HU as float32 from here
        if train:
            images, masks = random_crop(images, masks, TRAIN_CROP)
            images, masks = augment_with_mask(images, masks, self.augment)
        prediction = self._predict(model, images)  # (N, 1, H, W) probabilities
        label = masks.float()
        loss = dice_loss(prediction, label) + FN_WEIGHT * dice_loss(prediction * label, label)
        predicted = prediction.detach() > 0.5
        counts = [(predicted & masks), (~predicted & masks), (predicted & ~masks)]
        records = torch.stack([c.sum(dim=(1, 2, 3)).float() for c in counts] + [loss.detach()], dim=1)
        return loss, records

    def compute_metrics(self, records):
        return compute_seg_metrics(records[:, 0], records[:, 1], records[:, 2], records[:, 3])

    def format_metrics(self, epoch, mode, metrics):
        return format_seg_metrics(epoch, mode, metrics)

    def log_extras(self, writer, mode, records, step, model):
        """Validation only: the fixed slices with mask and prediction overlaid."""
        if mode != "val" or not self._fixed_urls:
            return
        if self._fixed is None:
            self._fixed = self._fixed_slices()
        images, masks = (t.to(self.device) for t in self._fixed)
        training = model.training
        model.eval()
        with torch.no_grad():
            predicted = self._predict(model, images.float()) > 0.5
        model.train(training)
        for n in range(len(images)):
            picture = overlay(images[n, images.shape[1] // 2].cpu(), masks[n, 0].cpu(), predicted[n, 0].cpu())
            writer.add_image(f"slices/{n}", picture, step, dataformats="HWC")

    def _fixed_slices(self) -> tuple[Tensor, Tensor]:
        """FIXED_SLICES validation slices, read once by the main process: of each of the first validation
        CTs its slice of most mask, then their next ones (a CT's slices count in the order of their mask)."""
        ranked = []  # (rank within its CT, -mask pixels, CT, stack, mask)
        for ct, url in enumerate(self._fixed_urls):
            best = []
            for stacks, masks in wds.DataPipeline(wds.SimpleShardList([url]),
                                                  partial(checked_samples, source=self._fixed_source),
                                                  partial(batched_slices, batch_size=64)):
                pixels = masks.sum(dim=(1, 2, 3)).tolist()
                best = sorted(best + [(-pixels[n], stacks[n], masks[n]) for n in range(len(pixels))],
                              key=lambda item: item[0])[:FIXED_SLICES]
            ranked += [(rank, pixels, ct, stack, mask) for rank, (pixels, stack, mask) in enumerate(best)]
        chosen = sorted(ranked, key=lambda item: item[:3])[:FIXED_SLICES]
        chosen = [item for item in chosen if item[3].shape == chosen[0][3].shape]  # one batch: one slice size
        return torch.stack([item[3] for item in chosen]), torch.stack([item[4] for item in chosen])

    def score(self, metrics):
        """`recall`: the highest pixel recall among models whose precision reaches the floor; below it, the
        higher precision (as precision - 1, below every model that reaches it)."""
        if self.best_by != "recall":
            return super().score(metrics)
        precision = metrics["pr/precision"]
        precision = 0.0 if math.isnan(precision) else precision
        return [metrics["pr/recall"] if precision >= self.args.seg_precision_floor else precision - 1]


TASKS: dict[str, type[Task]] = {task.name: task for task in (ClsTask, MalignancyTask, SegTask)}
