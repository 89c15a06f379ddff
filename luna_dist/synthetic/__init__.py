"""Synthetic LUNA16-format data: the chest phantom (`phantom`, `placing`), the generator (`generator`), the
full-scale rehearsal of the real tables (`rehearsal`)."""

from luna_dist.common.lazy import exports

__all__, __getattr__, __dir__ = exports(__name__, {
    "make_dataset": "luna_dist.synthetic.generator",
    "make_rehearsal": "luna_dist.synthetic.rehearsal",
})
