"""Classification and segmentation metrics from per-sample values gathered from every process.

Metrics are computed once, after the gather, so every rank's samples count and
none twice. Undefined values (an absent class, a zero denominator) are NaN
rather than errors or warnings: a validation shard without positives is normal.
"""

import math

import numpy as np
import torch
from torch import Tensor


def compute_metrics(label: Tensor, prob: Tensor, loss: Tensor, threshold: float = 0.5) -> dict[str, float]:
    """Loss, accuracy, precision/recall/F1 and ROC AUC for a binary classifier.

    ``label`` is 0/1 per sample, ``prob`` the positive-class probability and
    ``loss`` the per-sample loss, all shape (N,) on any device. A sample is
    predicted positive when ``prob > threshold``. Percentages are 0-100;
    ``count/*`` and ``correct_count/*`` are ints.
    """
    label, prob, loss = (t.detach().cpu().flatten() for t in (label, prob, loss))  # one transfer each
    if not torch.isfinite(prob).all():
        # NaN is never above the threshold: a diverged model would pass for one that calls everything negative.
        raise ValueError(f"{int((~torch.isfinite(prob)).sum()):,} of {prob.numel():,} probabilities are not finite "
                         "numbers: a diverged model is not scored")
    # Compare in prob's own dtype: a float32 0.3 is then not above a threshold of 0.3.
    pos_pred = prob > threshold
    pos_label = label > 0.5  # labels are 0/1: the class never depends on the decision threshold
    neg_label = ~pos_label
    # float64 so sums over a large epoch stay accurate.
    prob, loss = prob.to(torch.float64), loss.to(torch.float64)

    n_pos = int(pos_label.sum())
    n_neg = int(neg_label.sum())
    true_pos = int((pos_label & pos_pred).sum())
    true_neg = int((neg_label & ~pos_pred).sum())
    false_pos = n_neg - true_neg

    precision = _ratio(true_pos, true_pos + false_pos)
    recall = _ratio(true_pos, n_pos)
    f1_score = _f1(precision, recall)

    return {
        "loss/all": _mean(loss),
        "loss/neg": _mean(loss[neg_label]),
        "loss/pos": _mean(loss[pos_label]),
        "correct/all": _ratio(true_pos + true_neg, n_pos + n_neg) * 100,
        "correct/neg": _ratio(true_neg, n_neg) * 100,
        "correct/pos": _ratio(true_pos, n_pos) * 100,
        "pr/precision": precision,
        "pr/recall": recall,
        "pr/f1_score": f1_score,
        "auc": roc_auc(prob[pos_label], prob[neg_label]),
        "count/all": n_pos + n_neg,
        "count/neg": n_neg,
        "count/pos": n_pos,
        "correct_count/neg": true_neg,
        "correct_count/pos": true_pos,
    }


def format_metrics(epoch: int, mode: str, metrics: dict, classes: tuple[str, str] = ("neg", "pos")) -> list[str]:
    """Three log lines (all, negatives, positives) for the metrics of one epoch and mode; `classes` names the
    negative and positive class in the lines' tags (`val_neg`, `val_pos`)."""
    line = _format_line(epoch, mode, metrics, "all")
    if metrics["count/all"]:
        pr = (_or_na(metrics[f"pr/{key}"]) for key in ("precision", "recall", "f1_score"))
        line += ", {} precision, {} recall, {} f1 score".format(*pr)
    return [
        line,
        _format_line(epoch, f"{mode}_{classes[0]}", metrics, "neg"),
        _format_line(epoch, f"{mode}_{classes[1]}", metrics, "pos"),
    ]


def _format_line(epoch: int, mode: str, metrics: dict, group: str) -> str:
    count = metrics[f"count/{group}"]
    if not count:
        return f"E{epoch} {mode:8} no samples"
    line = "E{} {:8} {:.4f} loss, {:-5.1f}% correct".format(
        epoch, mode, metrics[f"loss/{group}"], metrics[f"correct/{group}"]
    )
    if group != "all":
        line += " ({} of {})".format(metrics[f"correct_count/{group}"], count)
    return line


def compute_seg_metrics(tp: Tensor, fn: Tensor, fp: Tensor, loss: Tensor) -> dict[str, float]:
    """Pixel precision, recall, F1 and Dice of a segmentation model from per-slice counts.

    ``tp``, ``fn`` and ``fp`` are the true positive, missed and false positive pixels of
    each slice, ``loss`` its loss, all (N,) on any device. The counts are summed over
    every slice before any ratio, so a slice weighs by its pixels. ``dice/per_slice`` is
    the mean Dice of the slices that have mask (pixel F1 is the Dice of all pixels).
    """
    tp, fn, fp, loss = (t.detach().cpu().flatten().to(torch.float64) for t in (tp, fn, fp, loss))
    true_pos, missed, false_pos = int(tp.sum()), int(fn.sum()), int(fp.sum())
    precision = _ratio(true_pos, true_pos + false_pos)
    recall = _ratio(true_pos, true_pos + missed)
    with_mask = (tp + fn) > 0
    dice = 2 * tp[with_mask] / (2 * tp[with_mask] + fn[with_mask] + fp[with_mask])
    return {
        "loss/all": _mean(loss),
        "pr/precision": precision,
        "pr/recall": recall,
        "pr/f1_score": _f1(precision, recall),
        "dice/per_slice": _mean(dice),
        "count/all": loss.numel(),
        "count/mask_slices": int(with_mask.sum()),
        "count/tp": true_pos,
        "count/fn": missed,
        "count/fp": false_pos,
    }


def format_seg_metrics(epoch: int, mode: str, metrics: dict) -> list[str]:
    """Two log lines: loss with pixel precision, recall and F1; the pixel counts they come from."""
    if not metrics["count/all"]:
        return [f"E{epoch} {mode:8} no samples"]
    pr = (_or_na(metrics[f"pr/{key}"]) for key in ("precision", "recall", "f1_score"))
    return [
        "E{} {:8} {:.4f} loss, {} precision, {} recall, {} f1 score".format(epoch, mode, metrics["loss/all"], *pr),
        "E{} {:8} {} tp, {} fn, {} fp".format(epoch, f"{mode}_px",
                                               *(metrics[f"count/{k}"] for k in ("tp", "fn", "fp"))),
    ]


def _f1(precision: float, recall: float) -> float:
    if math.isnan(precision) or math.isnan(recall) or precision + recall == 0:
        return math.nan
    return 2 * precision * recall / (precision + recall)


def _or_na(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def _mean(values: Tensor) -> float:
    # Explicit rather than relying on what mean() of an empty tensor does.
    return float(values.mean()) if values.numel() else math.nan


def roc_auc(pos_scores: Tensor, neg_scores: Tensor) -> float:
    """ROC AUC as P(positive scores above negative), ties counting one half.

    Computed from ranks (the Mann-Whitney U statistic), with tied scores sharing
    their average rank: O(N log N) and no sklearn.
    """
    n_pos, n_neg = pos_scores.numel(), neg_scores.numel()
    if not n_pos or not n_neg:
        return math.nan
    scores = torch.cat([pos_scores, neg_scores])  # (N,)
    unique, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    # Ranks start at 1; a group of tied scores spans ranks (end - count, end].
    ends = counts.cumsum(0).to(torch.float64)
    average_rank = ends - (counts.to(torch.float64) - 1) / 2  # (U,)
    pos_rank_sum = float(average_rank[inverse[:n_pos]].sum())
    return (pos_rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) from (0, 0) to (1, 1), one point per distinct score."""
    order = np.argsort(-scores, kind="stable")
    labels, scores = labels[order], scores[order]
    ends = np.r_[np.flatnonzero(scores[1:] != scores[:-1]), len(scores) - 1]
    tp, fp = np.cumsum(labels)[ends], np.cumsum(~labels)[ends]
    return np.r_[0, fp / max(fp[-1], 1)], np.r_[0, tp / max(tp[-1], 1)]
