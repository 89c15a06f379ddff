"""A folder of checked copies of remote shards (`--cache-dir`), kept within a disk budget (`--cache-limit`) and
shared by any number of processes: the ranks, their data workers, other runs.

    DIR/<sha256[:16]>-<name>            a copy, checked against the manifest before it took this name
    DIR/<sha256[:16]>-<name>.partial    a copy being downloaded, its whole size reserved from the start
    DIR/.lock                           taken (flock) for the moment a process looks at or changes the folder

Every process decides under `.lock`, held for a few file operations, never for a transfer or a
hash. A reader holds a shared flock on the copy it reads until it closes it; a download holds an
exclusive one on its `.partial`, so a shard being written is never read (it has another name
until it is whole and checked) and one whose writer died (its lock gone with it) is removed. Each
use stamps the copy's access time; to make room, the copies used longest ago that no process holds
(an exclusive flock taken without waiting) are deleted, until the budget holds the new shard with
every file of the folder counted at its full size (a `.partial` included, from its first byte).
Where that is not possible (every copy held by its readers) or another process is downloading the
shard, the reader streams it from its URL instead, uncached and checked as any read: the budget
is never exceeded and no process waits for another's transfer. A copy is hashed before its first
use in a process (`luna_dist.shards.sources` hashes every read again); a damaged one is deleted
and downloaded again.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from luna_dist.shards.format import ShardSetError, sha256_file

LOCK = ".lock"
PARTIAL = ".partial"
_OWN = re.compile(r"[0-9a-f]{16}-.+\.tar(\.[0-9]+)?(\.partial)?")
"""The names this cache writes (and the `.PID.partial` downloads of earlier versions): only these are ever deleted,
while every file of the folder counts in the budget."""

_CHECKED_COPIES: set[tuple[str, int, int]] = set()  # (path, inode, mtime) of copies this process has hashed


def cache_name(url: str, sha256: str) -> str:
    """A shard's name in the cache: its content's hash first, so two sets never share a stale copy."""
    return f"{sha256[:16]}-{url.rsplit('/', 1)[-1]}"


@dataclass(frozen=True)
class ShardCache:
    """The cache folder `folder`; `limit`: the most bytes its files may hold (None: no bound). `lock_timeout`:
    how long a process waits for `.lock` before it fails, naming it."""

    folder: str
    limit: int | None = None
    lock_timeout: float = 120.0

    def open(self, name: str, size: int, sha256: str, download: Callable[[BinaryIO], None]) -> BinaryIO | None:
        """The checked copy `name` (`size` bytes, `sha256`) open for reading, held against eviction until closed;
        downloaded first where the cache has none: `download(file)` writes the shard's checked bytes into
        `file`. None where it cannot be held now (no room beside the copies being read, another process
        downloading it, a damaged copy another process reads): read it from its URL."""
        copy = Path(self.folder) / name
        for _ in range(2):  # a damaged copy is deleted, then downloaded again
            with self._locked():
                held = _held(copy)
                writer = None if held is not None else self._reserve(copy, size)
            if held is not None:
                if _intact(copy, held, size, sha256):
                    return held
                held.close()
                with self._locked():
                    if not _remove_unused(copy):
                        return None  # another process still reads it
                continue
            if writer is None:
                return None
            return self._fill(copy, writer, download)
        return None

    def usage(self) -> int:
        """The bytes the folder's files hold, each counted at its size (a `.partial` at its reserved size)."""
        return sum(size for _, _, size in _files(Path(self.folder)))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / LOCK, "a+b") as lock:
            waited = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > waited:
                        raise ShardSetError(f"{folder / LOCK}: another process has held the shard cache's lock for "
                                            f"{self.lock_timeout:g} s (every process sharing --cache-dir takes it "
                                            "for a moment): is one stopped? End it, or give this run another "
                                            "--cache-dir") from None
                    time.sleep(0.01)
            yield  # closing the file releases the lock

    def _reserve(self, copy: Path, size: int) -> BinaryIO | None:
        """A new `.partial` of `copy`, locked for writing and `size` bytes long, where the budget can hold it;
        None where another process downloads it or no room can be made. Under the lock."""
        partial = copy.with_name(copy.name + PARTIAL)
        if partial.exists() and not _remove_unused(partial):
            return None  # another process downloads it
        if self.limit is not None and not self._make_room(size):
            return None
        writer = open(partial, "x+b")
        fcntl.flock(writer, fcntl.LOCK_EX | fcntl.LOCK_NB)  # none can hold it: made under the lock
        writer.truncate(size)  # its size is reserved at once
        return writer

    def _make_room(self, size: int) -> bool:
        """Delete the copies used longest ago that no process holds until `size` more bytes fit the budget."""
        files = sorted(_files(Path(self.folder)))
        used = sum(nbytes for _, _, nbytes in files)
        for _, path, nbytes in files:
            if used + size <= self.limit:
                break
            if _OWN.fullmatch(path.name) and _remove_unused(path):
                used -= nbytes
        return used + size <= self.limit

    def _fill(self, copy: Path, writer: BinaryIO, download: Callable[[BinaryIO], None]) -> BinaryIO:
        """Download into the reserved `.partial`, then give it the copy's name and hold it for reading; a
        failed download is deleted."""
        partial = copy.with_name(copy.name + PARTIAL)
        try:
            download(writer)
            writer.flush()
        except BaseException:
            with self._locked():
                partial.unlink(missing_ok=True)
            writer.close()
            raise
        with self._locked():
            os.replace(partial, copy)
            fcntl.flock(writer, fcntl.LOCK_SH)  # from writing to reading: no other process acts meanwhile
            _stamp_use(copy)
        stat = os.stat(writer.fileno())
        _CHECKED_COPIES.add((str(copy), stat.st_ino, stat.st_mtime_ns))  # its download was checked
        writer.seek(0)
        return writer


def _files(folder: Path) -> list[tuple[int, Path, int]]:
    """(last use, path, bytes) of every file of the cache folder but its lock."""
    files = []
    with suppress(FileNotFoundError), os.scandir(folder) as entries:
        for entry in entries:
            with suppress(FileNotFoundError):
                if entry.name != LOCK and entry.is_file(follow_symlinks=False):
                    stat = entry.stat(follow_symlinks=False)
                    files.append((stat.st_atime_ns, Path(entry.path), stat.st_size))
    return files


def _held(copy: Path) -> BinaryIO | None:
    """`copy` open with a shared lock (its readers'), its use stamped; None where there is none. Under the lock."""
    try:
        file = open(copy, "rb")
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # only ever held exclusively under the lock, which this process holds
        file.close()
        return None
    _stamp_use(copy)
    return file


def _stamp_use(copy: Path) -> None:
    """The access time says when a copy was last used (its modification time stays its download's)."""
    stat = copy.stat()
    os.utime(copy, ns=(time.time_ns(), stat.st_mtime_ns))


def _remove_unused(path: Path) -> bool:
    """Delete `path` unless a process holds it (reads or writes it); whether it is gone. Under the lock."""
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        return True
    except OSError:
        return False
    with file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        path.unlink(missing_ok=True)
        return True


def _intact(copy: Path, held: BinaryIO, size: int, sha256: str) -> bool:
    """Whether a held copy matches the manifest: hashed before its first use in this process (and after a
    change)."""
    stat = os.stat(held.fileno())
    stamp = (str(copy), stat.st_ino, stat.st_mtime_ns)
    if stamp not in _CHECKED_COPIES:
        if stat.st_size != size or sha256_file(copy) != sha256:
            return False
        _CHECKED_COPIES.add(stamp)
    return True
