"""Cross-validation: LUNA16's whole protocol, each fold scored by models trained without it, composed of the
commands' stages: the recipe of their flags (`recipe`), the stages, what each reads and writes and its identity
(`stages`), the local runner (`runner`), the SLURM form (`slurm`), the plan (`plan`) and the page of the merged
result (`report`). The command: `luna_dist/protocol.py`."""

from luna_dist.common.lazy import exports

__all__, __getattr__, __dir__ = exports(__name__, {
    "Recipe": "luna_dist.cv.recipe",
    "load": "luna_dist.cv.recipe",
    "Layout": "luna_dist.cv.stages",
    "Stage": "luna_dist.cv.stages",
    "Runner": "luna_dist.cv.runner",
})
