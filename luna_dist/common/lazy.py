"""A package's public names, imported from their modules when first used.

A package's `__init__` names what a user may import (its `__all__`) without importing it: `import
luna_dist` costs nothing, a command imports only the modules it runs, and a data worker's fork server
imports `luna_dist.data.fork_server` before anything else. Every other name of a module is private.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def exports(package: str, names: dict[str, str]) -> tuple[list[str], Callable[[str], object], Callable[[], list[str]]]:
    """`__all__`, `__getattr__` and `__dir__` for `package`, whose public `names` map to `module` (the name
    is the module's own) or `module:attribute`."""

    def __getattr__(name: str) -> object:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attribute = names[name].partition(":")
        return getattr(importlib.import_module(module), attribute or name)

    def __dir__() -> list[str]:
        return sorted(names)

    return sorted(names), __getattr__, __dir__
