

import math
import warnings

import pytest
import torch

from luna_dist.training.metrics import compute_metrics, compute_seg_metrics, format_metrics, format_seg_metrics

nan = math.nan

KEYS = {
    "loss/all", "loss/neg", "loss/pos",
    "correct/all", "correct/neg", "correct/pos",
    "pr/precision", "pr/recall", "pr/f1_score", "auc",
    "count/all", "count/neg", "count/pos", "correct_count/neg", "correct_count/pos",
}  # fmt: skip
COUNT_KEYS = {key for key in KEYS if key.startswith(("count/", "correct_count/"))}


def _metrics(label, prob, loss, threshold=0.5):
    return compute_metrics(
        torch.tensor(label), torch.tensor(prob, dtype=torch.float32), torch.tensor(loss), threshold=threshold
    )


def _assert_matches(metrics, expected):
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(metrics[key]), key
        else:
            assert metrics[key] == pytest.approx(value, rel=1e-6), key


CASES = {
    # name: (label, prob, loss, threshold, expected)
    "all correct": (
        [0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], [0.1, 0.3, 0.2, 0.4], 0.5,
        {"loss/all": 0.25, "loss/neg": 0.2, "loss/pos": 0.3,
         "correct/all": 100, "correct/neg": 100, "correct/pos": 100,
         "pr/precision": 1, "pr/recall": 1, "pr/f1_score": 1, "auc": 1,
         "count/all": 4, "count/neg": 2, "count/pos": 2, "correct_count/neg": 2, "correct_count/pos": 2},
    ),
    "all wrong": (  # precision and recall are 0, so F1's denominator is 0
        [0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1], [2.0, 1.5, 1.5, 2.0], 0.5,
        {"loss/all": 1.75, "correct/all": 0, "correct/neg": 0, "correct/pos": 0,
         "pr/precision": 0, "pr/recall": 0, "pr/f1_score": nan, "auc": 0,
         "correct_count/neg": 0, "correct_count/pos": 0},
    ),
    "mixed": (  # one false positive (0.6), one false negative (0.4)
        [0, 0, 0, 1, 1], [0.1, 0.6, 0.3, 0.7, 0.4], [1.0, 2.0, 3.0, 4.0, 5.0], 0.5,
        {"loss/all": 3, "loss/neg": 2, "loss/pos": 4.5,
         "correct/all": 60, "correct/neg": 200 / 3, "correct/pos": 50,
         "pr/precision": 0.5, "pr/recall": 0.5, "pr/f1_score": 0.5, "auc": 5 / 6,
         "count/all": 5, "count/neg": 3, "count/pos": 2, "correct_count/neg": 2, "correct_count/pos": 1},
    ),
    "unbalanced precision and recall": (  # TP 1, FP 2, FN 0
        [0, 0, 1], [0.9, 0.8, 0.7], [1.0, 1.0, 1.0], 0.5,
        {"pr/precision": 1 / 3, "pr/recall": 1, "pr/f1_score": 0.5, "correct/all": 100 / 3, "auc": 0},
    ),
    "prob at threshold counts as negative": (  # nothing predicted positive: precision undefined
        [0, 1], [0.5, 0.5], [0.7, 0.7], 0.5,
        {"correct/all": 50, "correct/neg": 100, "correct/pos": 0,
         "pr/precision": nan, "pr/recall": 0, "pr/f1_score": nan, "auc": 0.5,
         "correct_count/neg": 1, "correct_count/pos": 0},
    ),
    "custom threshold": (  # 0.3 sits on the threshold: negative
        [0, 1, 1], [0.4, 0.35, 0.3], [1.0, 1.0, 1.0], 0.3,
        {"correct/all": 100 / 3, "correct/neg": 0, "correct/pos": 50,
         "pr/precision": 0.5, "pr/recall": 0.5, "pr/f1_score": 0.5, "auc": 0},
    ),
    "no positives": (
        [0, 0], [0.2, 0.7], [1.0, 3.0], 0.5,
        {"loss/all": 2, "loss/neg": 2, "loss/pos": nan,
         "correct/all": 50, "correct/neg": 50, "correct/pos": nan,
         "pr/precision": 0, "pr/recall": nan, "pr/f1_score": nan, "auc": nan,
         "count/all": 2, "count/neg": 2, "count/pos": 0, "correct_count/neg": 1, "correct_count/pos": 0},
    ),
    "no negatives": (
        [1, 1], [0.2, 0.7], [3.0, 1.0], 0.5,
        {"loss/all": 2, "loss/neg": nan, "loss/pos": 2,
         "correct/all": 50, "correct/neg": nan, "correct/pos": 50,
         "pr/precision": 1, "pr/recall": 0.5, "pr/f1_score": 2 / 3, "auc": nan,
         "count/all": 2, "count/neg": 0, "count/pos": 2, "correct_count/neg": 0, "correct_count/pos": 1},
    ),
    "empty": (
        [], [], [], 0.5,
        {**{key: nan for key in KEYS - COUNT_KEYS}, **{key: 0 for key in COUNT_KEYS}},
    ),
}  # fmt: skip


@pytest.mark.parametrize(("label", "prob", "loss", "threshold", "expected"), CASES.values(), ids=CASES.keys())
def test_hand_computed_cases(label, prob, loss, threshold, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division or empty-mean warnings either
        metrics = _metrics(label, prob, loss, threshold)
    assert set(metrics) == KEYS
    _assert_matches(metrics, expected)
    for key in COUNT_KEYS:
        assert type(metrics[key]) is int, key


def test_accepts_mixed_dtypes_and_tensors_needing_grad():
    label = torch.tensor([0, 1, 1], dtype=torch.int64)
    prob = torch.tensor([0.2, 0.9, 0.6], dtype=torch.float16)
    loss = torch.tensor([0.5, 0.1, 0.3], requires_grad=True)
    metrics = compute_metrics(label, prob, loss)
    _assert_matches(metrics, {"loss/all": 0.3, "correct/all": 100, "auc": 1, "count/pos": 2})
    assert all(isinstance(value, (int, float)) for value in metrics.values())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_pairwise_definition(seed):
    generator = torch.Generator().manual_seed(seed)
    label = (torch.rand(300, generator=generator) < 0.3).long()
    # Scores informative about the label, rounded so that ties are common.
    prob = ((torch.rand(300, generator=generator) + 0.3 * label).clamp(max=1) * 20).round() / 20
    metrics = compute_metrics(label, prob, torch.zeros(300))

    pos, neg = prob[label == 1].double(), prob[label == 0].double()
    above = (pos[:, None] > neg[None, :]).double().mean()
    tied = (pos[:, None] == neg[None, :]).double().mean()
    assert tied > 0.01
    assert metrics["auc"] == pytest.approx(float(above + 0.5 * tied), abs=1e-12)


def test_format_matches_log_layout():
    metrics = {
        "loss/all": 0.1234, "loss/neg": 0.05, "loss/pos": 0.5678,
        "correct/all": 97.1, "correct/neg": 98.0, "correct/pos": 88.0,
        "pr/precision": 0.8, "pr/recall": 0.88, "pr/f1_score": 0.838095,
        "count/all": 525, "count/neg": 500, "count/pos": 25,
        "correct_count/neg": 490, "correct_count/pos": 22,
    }  # fmt: skip
    assert format_metrics(1, "val", metrics) == [
        "E1 val      0.1234 loss,  97.1% correct, 0.8000 precision, 0.8800 recall, 0.8381 f1 score",
        "E1 val_neg  0.0500 loss,  98.0% correct (490 of 500)",
        "E1 val_pos  0.5678 loss,  88.0% correct (22 of 25)",
    ]


def test_format_of_computed_metrics():
    label, prob, loss, threshold, _ = CASES["mixed"]
    assert format_metrics(12, "trn", _metrics(label, prob, loss, threshold)) == [
        "E12 trn      3.0000 loss,  60.0% correct, 0.5000 precision, 0.5000 recall, 0.5000 f1 score",
        "E12 trn_neg  2.0000 loss,  66.7% correct (2 of 3)",
        "E12 trn_pos  4.5000 loss,  50.0% correct (1 of 2)",
    ]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no positives", [
            "E3 val      2.0000 loss,  50.0% correct, 0.0000 precision, n/a recall, n/a f1 score",
            "E3 val_neg  2.0000 loss,  50.0% correct (1 of 2)",
            "E3 val_pos  no samples",
        ]),
        ("no negatives", [
            "E3 val      2.0000 loss,  50.0% correct, 1.0000 precision, 0.5000 recall, 0.6667 f1 score",
            "E3 val_neg  no samples",
            "E3 val_pos  2.0000 loss,  50.0% correct (1 of 2)",
        ]),
        ("all correct", [
            "E3 val      0.2500 loss, 100.0% correct, 1.0000 precision, 1.0000 recall, 1.0000 f1 score",
            "E3 val_neg  0.2000 loss, 100.0% correct (2 of 2)",
            "E3 val_pos  0.3000 loss, 100.0% correct (2 of 2)",
        ]),
        ("empty", ["E3 val      no samples", "E3 val_neg  no samples", "E3 val_pos  no samples"]),
    ],
)  # fmt: skip
def test_format_edge_cases(case, expected):
    label, prob, loss, threshold, _ = CASES[case]
    assert format_metrics(3, "val", _metrics(label, prob, loss, threshold)) == expected


# -- segmentation: pixel counts per slice ------------------------------------------------------
def test_seg_metrics_sum_pixels_before_any_ratio():
    tp = torch.tensor([90.0, 10.0, 0.0, 0.0])
    fn = torch.tensor([10.0, 90.0, 0.0, 0.0])
    fp = torch.tensor([0.0, 10.0, 5.0, 0.0])
    loss = torch.tensor([0.1, 0.9, 0.5, 0.0])
    metrics = compute_seg_metrics(tp, fn, fp, loss)
    assert metrics["pr/recall"] == pytest.approx(100 / 200)
    assert metrics["pr/precision"] == pytest.approx(100 / 115)
    assert metrics["pr/f1_score"] == pytest.approx(2 * 100 / (2 * 100 + 100 + 15))  # pixel F1 = Dice of all pixels
    assert metrics["dice/per_slice"] == pytest.approx((180 / 190 + 20 / 120) / 2)  # slices with mask only
    assert metrics["loss/all"] == pytest.approx(0.375)
    assert (metrics["count/all"], metrics["count/mask_slices"]) == (4, 2)
    assert (metrics["count/tp"], metrics["count/fn"], metrics["count/fp"]) == (100, 100, 15)


def test_seg_metrics_weigh_slices_by_pixels():
    metrics = compute_seg_metrics(torch.tensor([1.0, 99.0]), torch.tensor([1.0, 0.0]), torch.zeros(2), torch.zeros(2))
    assert metrics["pr/recall"] == pytest.approx(100 / 101)  # a per-slice mean would say 0.75


def test_seg_metrics_without_predictions_or_masks_are_nan_not_errors():
    zeros = torch.zeros(3)
    metrics = compute_seg_metrics(zeros, zeros, zeros, zeros)
    assert all(math.isnan(metrics[k]) for k in ("pr/precision", "pr/recall", "pr/f1_score", "dice/per_slice"))
    assert format_seg_metrics(2, "val", metrics) == [
        "E2 val      0.0000 loss, n/a precision, n/a recall, n/a f1 score", "E2 val_px   0 tp, 0 fn, 0 fp"]
    assert format_seg_metrics(2, "trn", compute_seg_metrics(*(torch.zeros(0),) * 4)) == ["E2 trn      no samples"]


def test_seg_metric_lines():
    metrics = compute_seg_metrics(torch.tensor([30.0]), torch.tensor([10.0]), torch.tensor([50.0]), torch.tensor([1.25]))
    assert format_seg_metrics(1, "val", metrics) == [
        "E1 val      1.2500 loss, 0.3750 precision, 0.7500 recall, 0.5000 f1 score",
        "E1 val_px   30 tp, 10 fn, 50 fp",
    ]


def test_probabilities_that_are_not_numbers_are_never_scored():
    """NaN > 0.5 is false: NaN probabilities read as 'all negative', 99 % correct and an AUC of the NaN ranks."""
    prob = torch.tensor([0.2, float("nan"), 0.9, float("inf")])
    with pytest.raises(ValueError, match="2 of 4 probabilities are not finite numbers: a diverged model is not scored"):
        compute_metrics(torch.tensor([0, 1, 1, 0]), prob, torch.zeros(4))
