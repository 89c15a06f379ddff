"""Files that appear complete or not at all: written as `NAME.partial`, then renamed.

A process killed mid-write leaves at most a `.partial` file, which no reader opens and
the next run overwrites; a write that fails (a full disk) removes its own; the rename
replaces the old file in one step.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO


@contextmanager
def atomic_open(path: Path, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open `path.partial` for writing; on a clean exit it becomes `path`. On any error it is removed, and an
    OSError without a file name (a write to a full disk raises ENOSPC with none) is given `path`'s."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, mode, **kwargs) as f:
            yield f
        os.replace(partial, path)
    except BaseException as err:
        with suppress(OSError):
            partial.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:
            err.filename = str(path)
        raise


def write_json(path: Path, data, indent: int | None = 1) -> None:
    with atomic_open(path) as f:
        json.dump(data, f, indent=indent)
