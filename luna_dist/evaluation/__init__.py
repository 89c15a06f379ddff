"""LUNA16's FROC and CPM by the official rules (`luna16`), and the files they are read from and written to
(`files`)."""

from luna_dist.common.lazy import exports

__all__, __getattr__, __dir__ = exports(__name__, {
    "Findings": "luna_dist.evaluation.luna16",
    "Marks": "luna_dist.evaluation.luna16",
    "Froc": "luna_dist.evaluation.luna16",
    "froc": "luna_dist.evaluation.luna16",
    "EvaluationError": "luna_dist.evaluation.luna16",
    "read_findings": "luna_dist.evaluation.files",
    "read_marks": "luna_dist.evaluation.files",
    "write_marks": "luna_dist.evaluation.files",
})
