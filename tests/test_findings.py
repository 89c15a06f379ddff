"""The book's confusion table of an analysis's detections against the annotated nodules."""

from __future__ import annotations

import numpy as np

from luna_dist.analysis.findings import confusion
from luna_dist.tables.candidates import Annotation


def test_confusion_table_by_the_book_rule():
    nodules = [Annotation("s1", (0.0, 0.0, 0.0), 10.0, True), Annotation("s1", (50.0, 0.0, 0.0), 10.0, False),
               Annotation("s2", (0.0, 0.0, 0.0), 10.0, False)]
    detections = [
        {"series_uid": "s1", "xyz": [3.0, 0.0, 0.0], "p_nodule": 0.9, "p_malignant": 0.8},  # malignant, found
        {"series_uid": "s1", "xyz": [0.0, 6.0, 0.0], "p_nodule": 0.2, "p_malignant": 0.1},  # 0.6 < 0.7: same nodule
        {"series_uid": "s1", "xyz": [50.0, 8.0, 0.0], "p_nodule": 0.9, "p_malignant": 0.9},  # 0.8: no match
        {"series_uid": "s2", "xyz": [100.0, 0.0, 0.0], "p_nodule": 0.1, "p_malignant": None},  # filtered out
        {"series_uid": "s3", "xyz": [0.0, 0.0, 0.0], "p_nodule": 0.7, "p_malignant": None},  # no nodules there
    ]
    table = confusion(detections, nodules)
    expected = np.zeros((3, 4), dtype=int)
    expected[2, 3] = 1  # the malignant nodule, predicted malignant (its best detection)
    expected[1, 0] = 2  # the benign nodules of s1 and s2: missed
    expected[0, 3] = 1  # the unmatched detection of s1, predicted malignant
    expected[0, 1] = 1  # s2's detection, filtered out
    expected[0, 2] = 1  # s3's detection, predicted benign (no malignancy probability)
    np.testing.assert_array_equal(table, expected)


class _Passes(list):
    """A list that counts how often it is iterated."""

    passes = 0

    def __iter__(self):
        self.passes += 1
        return super().__iter__()


def test_confusion_reads_the_detections_once_whatever_the_series():
    detections = _Passes({"series_uid": f"s{k % 7}", "xyz": [float(k), 0.0, 0.0], "p_nodule": 0.9,
                          "p_malignant": None} for k in range(70))
    nodules = [Annotation(f"s{k}", (float(k), 0.0, 0.0), 10.0, False) for k in range(7)]
    table = confusion(detections, nodules)
    assert detections.passes == 1
    assert table[1, 2] == 7 and table[0].sum() == 70 - 7  # each s_k's k-th mark is on its nodule, once
