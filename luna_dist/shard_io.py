"""Where a shard set's files lie and how their bytes reach a reader, checked: a folder or a URL.

`--shards` is a folder or a URL (`https://…/`, `s3://…/`, `gs://…/`, `pipe:…{name}`):
remote files are streamed through webdataset's gopen, or copied once into a cache folder.
Every byte of a remote shard is hashed as it passes and compared at its end with the
manifest's size and sha256. A server that stops sending fails the read after the read
timeout (curl's `--speed-time`, the AWS CLI's `--cli-read-timeout`), and a failing
server or network is reported as such rather than as a damaged shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from webdataset.gopen import Pipe, gopen, gopen_schemes

from luna_dist.shard_format import MANIFEST, REBUILD, ShardSetError, sha256_file

DEFAULT_READ_TIMEOUT = 120.0
"""Seconds a remote shard or manifest may send nothing before its read fails (--read-timeout)."""
_read_timeout = DEFAULT_READ_TIMEOUT  # this process's, set before anything remote is opened


def is_remote(location: str | Path) -> bool:
    """A URL that webdataset's gopen opens (http(s)://, pipe:, s3://, gs://, ...) rather than a local folder."""
    return isinstance(location, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+:", location) is not None


def shard_location(root: str | Path, name: str) -> str:
    """Where file `name` of a shard set lies: a path, a URL under the set's URL, or its `pipe:` command."""
    if not is_remote(root):
        return str(Path(root) / name)
    if root.startswith("pipe:"):
        if "{name}" not in root:
            raise ShardSetError(f"{root}: a pipe: shard set needs {{name}} where each file's name goes, "
                                "e.g. 'pipe:ssh node0 cat /data/shards/{name}'")
        return root.replace("{name}", name)
    return f"{root.rstrip('/')}/{name}"


def _open_curl(url: str, mode: str = "rb", bufsize: int = 8192) -> Pipe:
    """http(s):// through curl, as webdataset's gopen does, but a transfer that stalls fails.

    webdataset's curl has a connect timeout only: a server that accepts the connection and
    then sends nothing would hang the reader (and, with one process, the run) for ever. Here
    curl gives up after `_read_timeout` seconds below 1 byte/s, retrying within that time.
    """
    seconds = str(max(1, math.ceil(_read_timeout)))
    command = ["curl", "--connect-timeout", seconds, "--speed-limit", "1", "--speed-time", seconds,
               "--retry", "3", "--retry-max-time", seconds, "-f", "-s", "-L", url]
    return Pipe(command, mode=mode, bufsize=bufsize, ignore_status=[141, 23])


def _open_s3(url: str, mode: str = "rb", bufsize: int = 8192) -> Pipe:
    """s3://bucket/key through the AWS command-line tool (as webdataset's gopen does gs:// with gsutil),
    with its read timeout set to `_read_timeout`."""
    seconds = str(max(1, math.ceil(_read_timeout)))
    command = ["aws", "s3", "cp", "--cli-read-timeout", seconds, "--cli-connect-timeout", seconds, url, "-"]
    return Pipe(command, mode=mode, bufsize=bufsize, ignore_status=[141])


for _scheme, _opener in (("http", _open_curl), ("https", _open_curl), ("s3", _open_s3)):
    gopen_schemes[_scheme] = _opener

_EXIT_REASONS = {6: "the server's name cannot be resolved", 7: "the server refuses the connection (is it up?)",
                 22: "the server answers with an HTTP error (no such file there?)", 52: "the server sent nothing",
                 56: "the connection broke"}
"""curl's exit codes, in words; 28 (a stall) is worded with the read timeout."""


def _exit_reason(code: int) -> str:
    if code == 28:
        return f"nothing arrived for {_read_timeout:g} s (a stalled server or network; --read-timeout sets this bound)"
    return _EXIT_REASONS.get(code, f"its reader (curl, aws, gsutil or the pipe: command) ended with exit status {code}")


def reader_exit(stream) -> int | None:
    """The exit status of the process streaming a remote file, when it failed; None while it runs or when it
    ended well.

    Webdataset's `Pipe` raises a bare "exit N" once the stream is closed, and a tar reader
    fed a cut-off stream reports a damaged archive: asking the process tells a fault of the
    server or the network from a fault of the file.
    """
    process = getattr(stream, "proc", None)
    if process is None:
        return None
    try:
        code = process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return None
    return None if code in (0, 141, 23) else code


def unreachable(location: str, read: int, code: int) -> str:
    """The message for a remote file whose reader failed after `read` bytes with exit status `code`."""
    return (f"{location}: reading it from its server failed after {read:,} bytes: {_exit_reason(code)}. A fault of the "
            "server or the network, not of the shard: check it (or the pipe: command), then rerun with --resume")


def read_manifest(root: Path | str, read_timeout: float = DEFAULT_READ_TIMEOUT) -> dict:
    """A shard set's manifest.json, parsed, from a folder or a URL.

    FileNotFoundError where there is none; behind a URL, ShardSetError when the server or
    the network fails (unreachable, stalled for `read_timeout` seconds).
    """
    if not is_remote(root):
        return json.loads((Path(root) / MANIFEST).read_text())
    global _read_timeout
    _read_timeout = read_timeout
    location = shard_location(root, MANIFEST)
    stream = gopen(location)
    try:
        data = stream.read()
        stream.close()
    except OSError as err:
        code = reader_exit(stream)
        reason = str(err) if code is None else _exit_reason(code)
        # An HTTP error (a 404) or a failed command (`cat` of a missing file): no manifest there.
        if code == 22 or not location.startswith(("http:", "https:")):
            raise FileNotFoundError(f"{location}: {reason}") from None
        raise ShardSetError(f"{location}: {reason}") from None
    return json.loads(data)


class CheckedStream(io.RawIOBase):
    """A shard's byte stream that hashes what passes; `check` drains it and compares size and sha256."""

    def __init__(self, location: str, stream, size: int, sha256: str):
        self.location, self.stream, self.size, self.sha256 = location, stream, size, sha256
        self.digest, self.read_bytes = hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        self.digest.update(data)
        self.read_bytes += len(data)
        return len(data)

    def check(self) -> None:
        """Read to the end (tar readers stop at the end-of-archive blocks) and compare with the manifest.

        A stream cut off by its server is reported as such, not as a shard that differs.
        """
        while self.read(1 << 20):
            pass
        if (self.read_bytes, self.digest.hexdigest()) != (self.size, self.sha256):
            if (code := reader_exit(self.stream)) is not None:
                raise ShardSetError(unreachable(self.location, self.read_bytes, code))
            raise ShardSetError(f"{self.location}: {self.read_bytes} bytes streamed with sha256 "
                                f"{self.digest.hexdigest()[:12]}…, the manifest says {self.size} bytes, "
                                f"{self.sha256[:12]}…: {REBUILD}, or fix the copy it is served from")

    def reader_exit(self) -> int | None:
        """The exit status of the process this stream comes from, when it failed (see `reader_exit`)."""
        return reader_exit(self.stream)

    def close(self) -> None:
        self.stream.close()
        super().close()


@dataclass(frozen=True)
class ShardSource:
    """How readers open the shards of a set and what they expect of each: (samples, bytes, sha256) by location.

    Pickles, so every DataLoader worker (started by the fork server or spawned) opens shards the same way.
    """

    entries: dict[str, tuple[int, int, str]]
    remote: bool
    cache_dir: str | None = None
    read_timeout: float = DEFAULT_READ_TIMEOUT

    def open(self, location: str, checked: bool = False) -> io.BufferedReader:
        """A local shard as a file; a remote one streamed (or from the cache) and, as with `checked`,
        hashed on the way: `.raw.check()` at its end compares size and sha256 with the manifest."""
        global _read_timeout
        _read_timeout = self.read_timeout  # for the remote readers of this process
        samples, size, sha256 = self.entries[location]
        if not self.remote and not checked:
            return open(location, "rb")
        if not self.remote:
            stream = open(location, "rb")
        elif self.cache_dir is None:
            stream = gopen(location)
        else:
            stream = open(self._cached(location, size, sha256), "rb")
        return io.BufferedReader(CheckedStream(location, stream, size, sha256), 1 << 20)

    def _cached(self, location: str, size: int, sha256: str) -> Path:
        """The cache's checked copy of a remote shard, downloaded first if it has none or a damaged one.

        The download streams through the same checks as a direct read (size, sha256, the
        reader's exit status) into a temporary name, renamed once it matches the manifest,
        so neither a cut-off download nor one from a changed server enters the cache.
        (webdataset's FileCache downloads through gopen with no read timeout and reports
        a failed download as a bare exception.)
        """
        copy = Path(self.cache_dir) / _cache_name(location, sha256)
        if copy.is_file() and _checked_copy(copy, size, sha256):
            return copy
        copy.parent.mkdir(parents=True, exist_ok=True)
        download = copy.with_name(f"{copy.name}.{os.getpid()}.partial")  # workers may fetch the same shard
        try:
            with io.BufferedReader(CheckedStream(location, gopen(location), size, sha256), 1 << 20) as stream, \
                    open(download, "wb") as out:
                while block := stream.read(1 << 20):
                    out.write(block)
                stream.raw.check()
            os.replace(download, copy)
        finally:
            download.unlink(missing_ok=True)
        return copy


def _cache_name(url: str, sha256: str) -> str:
    """A shard's name in the cache: its content's hash first, so two sets never share a stale copy."""
    return f"{sha256[:16]}-{url.rsplit('/', 1)[-1]}"


_CHECKED_COPIES: set[tuple[str, int]] = set()  # (path, mtime) of cached copies this process has hashed


def _checked_copy(path: Path, size: int, sha256: str) -> bool:
    """A cached copy is hashed before its first use in a process (and after any change); reads hash it again."""
    stamp = (str(path), path.stat().st_mtime_ns)
    if stamp not in _CHECKED_COPIES:
        if path.stat().st_size != size or sha256_file(path) != sha256:
            return False
        _CHECKED_COPIES.add(stamp)
    return True
