"""From CTs to findings: one CT segmented (`segment`), grouped and measured (`groups`) and classified
(`detect`); which CTs (`series`), many over many processes (`run`, as `analyze`, with the command's
`options`), what produced each finding (`identity`); the scores (`findings`) and the report (`report`)."""

from luna_dist.common.lazy import exports

__all__, __getattr__, __dir__ = exports(__name__, {
    "Models": "luna_dist.analysis.detect",
    "load_model": "luna_dist.analysis.detect",
    "analyze_ct": "luna_dist.analysis.detect",
    "Analysed": "luna_dist.analysis.detect",
    "parse_args": "luna_dist.analysis.options",
    "analyze": "luna_dist.analysis.run:run",
    "AnalysisError": "luna_dist.analysis.series",
})
