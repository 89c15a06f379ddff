"""`--task malignancy`: malignant or benign nodules, the nodule classifier fine-tuned (the book's chapter 14).

The classifier's head is replaced and only its last blocks train (`--finetune-depth`).
Training batches mix malignant, benign and non-nodule samples (non-nodules count as
benign) at `--mix`; validation scores the labelled nodules of the validation folds, next
to the AUC of their annotated diameter alone. Nodules without a malignancy label are left
out of both and counted.
"""

from __future__ import annotations

import argparse
import logging
from functools import partial
from pathlib import Path

import torch
from torch import nn

from luna_dist.data.batches import collate_malignancy, with_malignancy
from luna_dist.data.streams import ClassStream, batched
from luna_dist.evaluation import luna16
from luna_dist.models.classifier import LunaModel
from luna_dist.models.weights import load_into
from luna_dist.shards import chunk_samples
from luna_dist.shards.chunk_samples import malignancy_counts
from luna_dist.shards.format import ShardSetError
from luna_dist.training.metrics import compute_metrics, format_metrics, roc_auc, roc_curve
from luna_dist.training.run_log import Report
from luna_dist.training.tasks.base import Task, classify_chunks

TRAINED = {1: ("head_linear",), 2: ("block4", "head_linear")}
"""The modules each --finetune-depth trains; every other one keeps the nodule classifier's weights."""


class Malignancy(Task):
    """Malignant vs benign nodule samples; see the module docstring."""

    name = "malignancy"
    samples = chunk_samples
    record_columns = ("label", "prob", "loss", "known", "diameter")
    best_by_rules = {"auc": ("auc",), "f1": ("pr/f1_score",), "loss": ("-loss/all",)}
    val_labels = ("pos",)

    def __init__(self, args, accelerator, shards, train_folds, val_folds, training):
        self.counts = {"train": malignancy_counts(shards, train_folds) if training else None,
                       "val": malignancy_counts(shards, val_folds)}
        super().__init__(args, accelerator, shards, train_folds, val_folds, training)
        val = self.counts["val"]
        if not val["malignant"] + val["benign"]:
            raise ShardSetError(f"{shards.root}: validation folds {val_folds} have no nodule with a malignancy "
                                "label (was the build given annotations_with_malignancy.csv?); choose others with "
                                "--val-folds")
        if training:
            wanted = {"malignant": args.mix[0], "benign": args.mix[1]}
            missing = [kind for kind, ratio in wanted.items() if ratio > 0 and not self.counts["train"][kind]]
            if missing:
                raise ShardSetError(f"{shards.root}: training folds {train_folds} have no {' or '.join(missing)} "
                                    f"samples that --mix {args.mix} asks for")
        if accelerator.is_main_process:
            left_out = (self.counts["train"] or {}).get("unknown", 0) + val["unknown"]
            logging.getLogger(__name__).info(
                f"malignancy: validation {val['malignant']} malignant, {val['benign']} benign nodule "
                f"samples; {left_out} nodule samples without a malignancy label left out")

    @staticmethod
    def add_arguments(group: argparse._ArgumentGroup) -> None:
        group.add_argument("--finetune", type=Path, default=None,
                           help="the nodule classifier to start from: its best.pt or a run's state/ folder")
        group.add_argument("--finetune-depth", type=int, choices=sorted(TRAINED), default=1,
                           help="blocks trained: 1 = the new head, 2 = the last conv block and the head (default 1)")
        group.add_argument("--mix", type=float, nargs=3, default=[1.0, 1.0, 1.0],
                           metavar=("MALIGNANT", "BENIGN", "NON_NODULE"),
                           help="ratios of malignant, benign and non-nodule samples in training batches "
                                "(default 1 1 1)")

    @staticmethod
    def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        if args.finetune is None and not (args.resume or args.checkpoint):
            parser.error("--task malignancy needs --finetune PATH: the nodule classifier's best.pt or state/ folder")
        if any(ratio < 0 for ratio in args.mix) or not sum(args.mix[:2]):
            parser.error(f"--mix needs ratios >= 0 with malignant or benign above 0, got {args.mix}")

    def build_model(self) -> nn.Module:
        model = LunaModel()
        if self.args.finetune is not None:
            load_into(model, self.args.finetune)
        model.head_linear = nn.Linear(model.head_linear.in_features, 2)  # a new head for the new question
        trained = TRAINED[self.args.finetune_depth]
        for name, module in model.named_children():
            module.requires_grad_(name in trained)
        # Frozen modules stay in eval mode while training, so their batch-norm statistics stay too.
        self.frozen = [module for name, module in model.named_children() if name not in trained]
        return model.to(memory_format=torch.channels_last_3d) if self.channels_last else model

    def build_optimizer(self, model):
        trainable = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.SGD(trainable, lr=self.args.lr, momentum=self.args.momentum)

    def train_streams(self):
        malignant, benign, non_nodule = self.args.mix
        return (ClassStream("pos", malignant, salt=2, select=(partial(with_malignancy, malignant=True),), buffer=0.1),
                ClassStream("pos", benign, salt=3, select=(partial(with_malignancy, malignant=False),), buffer=0.1),
                ClassStream("neg", non_nodule, salt=0))

    def train_collate(self):
        return collate_malignancy

    def epoch_samples(self) -> int:
        """About one pass over the labelled nodules, with the non-nodules the mix adds."""
        mix = self.args.mix
        labelled = self.counts["train"]["malignant"] + self.counts["train"]["benign"]
        return max(1, round(labelled * sum(mix) / sum(mix[:2])))

    def val_batcher(self):
        return partial(batched, collate=collate_malignancy)

    def forward(self, model, batch, train):
        chunks, labels, info = batch
        if train:
            for module in self.frozen:
                module.eval()
        return classify_chunks(self, model, chunks, labels, info, train)

    def compute_metrics(self, records):
        known = self.column(records, "known") > 0.5
        labelled = records[known]
        metrics = compute_metrics(*(self.column(labelled, name) for name in ("label", "prob", "loss")))
        malignant = self.column(labelled, "label") > 0.5
        diameter = self.column(labelled, "diameter").cpu().double()
        metrics["auc_diameter"] = roc_auc(diameter[malignant.cpu()], diameter[~malignant.cpu()])
        metrics["count/unlabelled"] = int((~known).sum())
        return metrics

    def format_metrics(self, epoch, mode, metrics):
        lines = format_metrics(epoch, mode, metrics, classes=("ben", "mal"))
        if mode == "val":
            auc, diameter = (luna16.format_value(metrics[key]) for key in ("auc", "auc_diameter"))
            lines.append(f"E{epoch} {mode + '_auc':8} {auc} AUC, diameter alone {diameter} AUC "
                         f"({metrics['count/all']} nodule samples; {metrics['count/unlabelled']} without a label "
                         "left out)")
        return lines

    def report(self, epoch, records, model):
        """ROC curves of the model and of the diameter alone, as a figure."""
        labelled = records[self.column(records, "known") > 0.5].cpu().double()
        if not len(labelled):
            return Report()
        try:
            from matplotlib.figure import Figure  # not pyplot's, which would take the process's backend
        except ImportError:
            return Report()  # matplotlib is optional: the AUC scalars are logged all the same
        malignant = self.column(labelled, "label").numpy() > 0.5
        fig = Figure(figsize=(4.5, 4.5))
        ax = fig.subplots()
        for column, name in (("prob", "model"), ("diameter", "diameter alone")):
            fpr, tpr = roc_curve(malignant, self.column(labelled, column).numpy())
            ax.plot(fpr, tpr, label=name)
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set_xlabel("false positive rate (benign called malignant)")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"ROC, epoch {epoch}")
        ax.legend(loc="lower right")
        fig.tight_layout()
        return Report(figures={"roc": fig})
