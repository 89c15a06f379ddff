"""Having the kernel read the CTs a pool of readers takes next."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from pathlib import Path

from luna_dist.imaging.files import metaimage_data_file

READ_AHEAD_STEP = 1 << 20
"""Bytes a read-ahead asks for at a time: Linux reads at most the device's readahead or largest request
(128 kB to 8 MB) of one `POSIX_FADV_WILLNEED`, so a CT is asked for in steps."""


class ReadAhead:
    """Has the kernel read the CTs a pool of readers takes next (`read_ahead`), in the order they take them:
    two a reader at first, then one more each time a reader takes up another (`more`)."""

    def __init__(self, paths: Iterable[Path | str], readers: int):
        self._upcoming = iter(paths)
        self.more(2 * max(1, readers))

    def more(self, count: int = 1) -> None:
        for path in itertools.islice(self._upcoming, count):
            read_ahead(Path(path))


def read_ahead(path: Path) -> None:
    """Have the kernel read a CT's files (a `.mhd` and its data file, another image file, a DICOM folder)
    into the page cache in the background, where it can (Linux); anything unreadable is left for
    `read_ct` to report.

    A shard build asks this for the CTs its workers take next, so the disk reads them while the
    workers cut and compress the ones before and a worker finds its CT in memory instead of waiting.
    """
    if not hasattr(os, "posix_fadvise"):  # macOS, Windows
        return
    path = Path(path)
    try:
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        if path.suffix.lower() == ".mhd" and (data := metaimage_data_file(path, path.read_bytes())) is not None:
            files.append(data)
        for file in files:
            fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO among a folder's files would block
            try:
                for offset in range(0, os.fstat(fd).st_size, READ_AHEAD_STEP):
                    os.posix_fadvise(fd, offset, READ_AHEAD_STEP, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
    except OSError:
        pass
