"""`--task cls`: nodule or not, on 32x48x48 chunks. LunaModel, SGD, cross-entropy, LUNA16's CPM each validation."""

from __future__ import annotations

import argparse
import logging
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from luna_dist.common import cli
from luna_dist.data.batches import collate, collate_located
from luna_dist.data.streams import batched
from luna_dist.evaluation import files, luna16
from luna_dist.models import provenance
from luna_dist.models.classifier import LunaModel
from luna_dist.shards import chunk_samples
from luna_dist.shards.format import ShardSetError
from luna_dist.training.metrics import compute_metrics, format_metrics
from luna_dist.training.run_log import Report
from luna_dist.training.tasks.base import Task, classify_chunks


class NoduleClassifier(Task):
    """Nodule vs non-nodule candidates: pos/neg metrics, and every validation candidate scored as LUNA16 scores
    the false-positive reduction track (the validation folds' findings come from the shard manifest)."""

    name = "cls"
    samples = chunk_samples
    # series/x/y/z: where a validation sample lies (series = its number in the validation
    # series, -1 in training), so validation can be scored as LUNA16 scores candidates.
    record_columns = ("label", "prob", "loss", "series", "x", "y", "z")
    # LUNA16's score where the shards carry the findings (the default then): what papers compare.
    best_by_rules = {"cpm": ("cpm", "auc"), "auc": ("auc",), "f1": ("pr/f1_score",), "loss": ("-loss/all",)}

    def __init__(self, args, accelerator, shards, train_folds, val_folds, training):
        super().__init__(args, accelerator, shards, train_folds, val_folds, training)
        try:  # the series, nodules and excluded findings of the validation folds
            self.evaluation = files.fold_findings(shards.manifest, val_folds)
        except KeyError as err:
            self.evaluation = None
            if accelerator.is_main_process:
                logging.getLogger(__name__).warning(f"no LUNA16 CPM: {err.args[0]}")
        nodules = 0 if self.evaluation is None else len(self.evaluation[1].series)
        if args.best_by == "cpm" and not nodules:
            raise ShardSetError(f"{shards.root}: --best-by cpm needs annotated nodules in validation folds "
                                f"{val_folds}, "
                                "which " + ("have none" if self.evaluation else "the manifest does not list") +
                                "; choose another --best-by or --val-folds")
        if args.best_by is None:
            self.best_by = "cpm" if nodules else "auc"

    @staticmethod
    def add_arguments(group: argparse._ArgumentGroup) -> None:
        group.add_argument("--balanced", type=float, default=0, metavar="RATIO",
                           help="negatives per positive in training batches; 0 = natural frequencies")

    @staticmethod
    def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        cli.check_at_least(parser, args, {"balanced": 0})

    def build_model(self) -> nn.Module:
        model = LunaModel()
        return model.to(memory_format=torch.channels_last_3d) if self.channels_last else model

    def build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=self.args.lr, momentum=self.args.momentum)

    def negatives_per_positive(self) -> float:
        return self.args.balanced

    def train_collate(self):
        return collate

    def val_batcher(self):
        if self.evaluation is None:
            return partial(batched, collate=collate)
        series_index = {uid: n for n, uid in enumerate(self.evaluation[0])}
        return partial(batched, collate=partial(collate_located, series_index=series_index))

    def forward(self, model, batch, train):
        chunks, labels = batch[:2]
        if len(batch) == 3:  # a validation batch that says where each sample lies
            where = batch[2]
        else:
            where = torch.zeros((len(labels), 4), device=self.device)
            where[:, 0] = -1
        return classify_chunks(self, model, chunks, labels, where, train)

    def _located(self, records: Tensor) -> bool:
        """Whether the records say where their samples lie (validation with the findings), so CPM is defined."""
        return self.evaluation is not None and len(records) > 0 and bool((self.column(records, "series") >= 0).all())

    def compute_metrics(self, records):
        metrics = compute_metrics(*(self.column(records, name) for name in ("label", "prob", "loss")))
        if self._located(records):
            result = self._froc(records)
            metrics["cpm"] = result.cpm
            metrics["froc/detected"], metrics["froc/false_positives"] = result.detected, result.false_positives
            metrics.update({f"froc/sensitivity_{rate:g}": s
                            for rate, s in zip(luna16.FP_RATES, result.sensitivities)})
        return metrics

    def _froc(self, records: Tensor) -> luna16.Froc:
        """The LUNA16 score of the validation records: every candidate a mark with its probability."""
        series, nodules, excluded = self.evaluation
        return luna16.froc(series, nodules, self._marks(records), excluded)

    def _marks(self, records: Tensor) -> luna16.Marks:
        rows = records.cpu().double()
        uids = np.array(self.evaluation[0], dtype=str)[self.column(rows, "series").numpy().astype(np.int64)]
        xyz = torch.stack([self.column(rows, axis) for axis in ("x", "y", "z")], dim=1).numpy()
        return luna16.Marks(uids, xyz, self.column(rows, "prob").numpy())

    def _write_predictions(self, path: Path, marks: luna16.Marks, epoch: int) -> None:
        """The validation marks, and beside them what the model that made them saw (`provenance.write_sidecar`)."""
        files.write_marks(path, marks)
        if self.provenance is not None:
            made_by = {f"the nodule classifier of epoch {epoch}": self.provenance}
            provenance.write_sidecar(path, [provenance.Part(tuple(self.evaluation[0]), made_by)])

    def format_metrics(self, epoch, mode, metrics):
        lines = format_metrics(epoch, mode, metrics)
        if "cpm" in metrics:
            sensitivities = [metrics[f"froc/sensitivity_{rate:g}"] for rate in luna16.FP_RATES]
            score = luna16.format_score(metrics["cpm"], sensitivities)
            lines.append("E{} {:8} {}".format(epoch, f"{mode}_cpm", score))
        return lines

    def report(self, epoch, records, model):
        """The PR curve, histograms of confident negatives and doubtful positives, the FROC curve, and
        `val-predictions-E{n}.csv`: every validation candidate in the LUNA16 predictions format."""
        report = Report()
        if not len(records):
            return report
        labels, probs = self.column(records, "label").cpu().bool(), self.column(records, "prob").cpu()
        report.pr_curves["pr"] = (labels, probs)
        for name, values in (("is_neg", probs[~labels & (probs > 0.01)]), ("is_pos", probs[labels & (probs < 0.99)])):
            if len(values):
                report.histograms[name] = values
        if self._located(records):
            marks = self._marks(records)
            report.files[f"val-predictions-E{epoch}.csv"] = partial(self._write_predictions, marks=marks, epoch=epoch)
            try:
                report.figures["froc"] = files.plot_froc(self._froc(records), None, title=f"FROC, epoch {epoch}")
            except ImportError:
                pass  # matplotlib is optional: no figure, the cpm scalar is logged all the same
        return report
