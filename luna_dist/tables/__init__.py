"""The LUNA16 tables: the CSVs read and checked (`candidates`), and where a download keeps them (`layout`)."""

from luna_dist.common.lazy import exports

__all__, __getattr__, __dir__ = exports(__name__, {
    "Candidate": "luna_dist.tables.candidates",
    "Annotation": "luna_dist.tables.candidates",
    "CsvError": "luna_dist.tables.candidates",
    "read_candidates": "luna_dist.tables.candidates",
    "read_annotations": "luna_dist.tables.candidates",
    "find_series": "luna_dist.tables.candidates",
    "assign_folds": "luna_dist.tables.candidates",
    "N_FOLDS": "luna_dist.tables.candidates",
    "find_tables": "luna_dist.tables.layout",
})
