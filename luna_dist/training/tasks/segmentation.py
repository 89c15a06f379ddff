"""`--task seg`: nodule pixels in CT slices, a 2-D UNet on 7-slice stacks (the book's chapter 13).

Training: random 64 x 64 crops of the 96 x 96 stacks (and augmentation) on the device,
positives and negatives mixed at `--seg-neg-ratio`. Loss per sample: soft Dice plus 8 x
the soft Dice of the prediction inside the mask (the book's recall-weighted term).
Validation: full slices. Records per slice: true positive, missed and false positive
pixels (prediction > 0.5) and the loss, summed over all ranks before any ratio. Best
model by default: the highest recall among epochs whose precision reaches
`--seg-precision-floor`; below the floor, the higher precision.
"""

from __future__ import annotations

import argparse
import math
from functools import partial

import torch
import webdataset as wds
from torch import Tensor, nn

from luna_dist.common import cli
from luna_dist.data.augment import augment_with_mask, random_crop
from luna_dist.data.batches import batched_slices, collate_stacks
from luna_dist.data.streams import checked_samples
from luna_dist.imaging.ct import HU_MAX, HU_MIN
from luna_dist.models.unet import SegmentationModel
from luna_dist.shards import seg_samples
from luna_dist.training.metrics import compute_seg_metrics, format_seg_metrics
from luna_dist.training.run_log import Report
from luna_dist.training.tasks.base import Task

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


class Segmentation(Task):
    """Nodule segmentation; see the module docstring."""

    name = "seg"
    samples = seg_samples
    record_columns = ("tp", "fn", "fp", "loss")
    best_by_rules = {"recall": ("pr/recall at --seg-precision-floor",), "f1": ("pr/f1_score",), "loss": ("-loss/all",)}
    val_labels = ("val",)

    def __init__(self, args, accelerator, shards, train_folds, val_folds, training):
        super().__init__(args, accelerator, shards, train_folds, val_folds, training)
        self._fixed_urls = sorted(shards.shards(val_folds, "val"))[:FIXED_SLICES]
        self._fixed = None  # the fixed validation slices, read when first shown

    @staticmethod
    def add_arguments(group: argparse._ArgumentGroup) -> None:
        group.add_argument("--seg-neg-ratio", type=float, default=1.0, metavar="RATIO",
                           help="negative stacks per positive in training batches (default 1); 0 = as stored")
        group.add_argument("--seg-precision-floor", type=float, default=0.3, metavar="P",
                           help="best model: highest validation recall with pixel precision >= P (default 0.3)")

    @staticmethod
    def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        cli.check_at_least(parser, args, {"seg_neg_ratio": 0})
        cli.check_in_range(parser, "--seg-precision-floor", args.seg_precision_floor, 0, 1)

    def build_model(self) -> nn.Module:
        model = SegmentationModel()
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=self.args.lr)

    def negatives_per_positive(self) -> float:
        return self.args.seg_neg_ratio

    def train_collate(self):
        return collate_stacks

    def val_batcher(self):
        return batched_slices

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

    def val_records(self):
        return None  # a slab holds many slices: the readers check each shard's count instead

    def compute_metrics(self, records):
        return compute_seg_metrics(*(self.column(records, name) for name in self.record_columns))

    def format_metrics(self, epoch, mode, metrics):
        return format_seg_metrics(epoch, mode, metrics)

    def report(self, epoch, records, model):
        """The fixed slices with mask and prediction overlaid."""
        if not self._fixed_urls:
            return Report()
        if self._fixed is None:
            self._fixed = self._fixed_slices()
        images, masks = (t.to(self.device) for t in self._fixed)
        training = model.training
        model.eval()
        with torch.no_grad():
            predicted = self._predict(model, images.float()) > 0.5
        model.train(training)
        return Report(images={f"slices/{n}": overlay(images[n, images.shape[1] // 2].cpu(), masks[n, 0].cpu(),
                                                     predicted[n, 0].cpu()) for n in range(len(images))})

    def _fixed_slices(self) -> tuple[Tensor, Tensor]:
        """FIXED_SLICES validation slices, read once by the main process: of each of the first validation
        CTs its slice of most mask, then their next ones (a CT's slices count in the order of their mask)."""
        ranked = []  # (rank within its CT, -mask pixels, CT, stack, mask)
        for ct, url in enumerate(self._fixed_urls):
            best = []
            for stacks, masks in wds.DataPipeline(wds.SimpleShardList([url]),
                                                  partial(checked_samples, source=self.shards.source),
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

    def describe_score(self, metrics: dict, score: list[float]) -> str:
        """Below the floor the score is a rank (precision - 1), not a recall: the line says the precision."""
        if self.best_by == "recall" and score[0] < 0:
            return f"pr/precision {score[0] + 1:.4f}, below --seg-precision-floor {self.args.seg_precision_floor}"
        return super().describe_score(metrics, score)
