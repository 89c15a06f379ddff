"""Where a shard set's files lie and how their bytes reach a reader, checked: a folder or a URL.

`--shards` is a folder or a URL (`https://…/`, `s3://…/`, `gs://…/`, `pipe:…{name}`):
remote files are streamed through webdataset's gopen, or copied into a cache folder (`luna_dist.shards.cache`).
Every byte of a remote shard is hashed as it passes and compared at its end with the
manifest's size and sha256; reading stops at that size. Every remote read is bounded: a
file of which less than MIN_PROGRESS arrives in the read timeout fails (`RemoteFile`), a
manifest larger than MAX_MANIFEST_BYTES is refused, and a failing server or network, or
a server answering with something else than the file, is reported as such rather than
as a damaged shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import select
import subprocess
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from webdataset.gopen import Pipe, gopen, gopen_schemes

from luna_dist.shards.cache import ShardCache, cache_name
from luna_dist.shards.format import MANIFEST, REBUILD, ShardSetError

DEFAULT_READ_TIMEOUT = 120.0
"""Seconds of waiting for a remote shard or manifest in which MIN_PROGRESS of it must arrive (--read-timeout)."""
MIN_PROGRESS = 1 << 20
"""Bytes a remote file must deliver in every read timeout spent waiting for it, unless it ends: a minimum rate
(~8.7 kB/s at the default 120 s), not a deadline, so a large shard on a slow but honest link goes on, while a
server that stops, or drips a few bytes a second (which never trips a timeout per read), fails. Time a reader
spends away (its consumer busy) does not count."""
MAX_MANIFEST_BYTES = 64 << 20
"""The most bytes a `manifest.json` read from a URL may hold: ~10 times a LUNA16 build's (~6 MB, mostly the
36,378 annotated and excluded findings it carries, 7 MB with 11,000 duplicate rows listed). A server that sends
more (an endless answer) is refused rather than read into memory."""
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
    """http(s):// through curl, as webdataset's gopen does, answering for itself.

    Redirects are followed to http(s):// only (never to a `file://` on this machine); an
    answer sent gzip-encoded is decoded; what arrives is passed on at once (`-N`), so the
    reader's progress is what the server sent; curl writes what the server answered (status,
    content type, final URL, its error) as JSON to a file of its own (`.report`), to tell
    a server that answers wrongly from a damaged file. A stalled transfer is `RemoteFile`'s
    to end.
    """
    seconds = str(max(1, math.ceil(_read_timeout)))
    command = ["curl", "--connect-timeout", seconds, "--retry", "3", "--retry-max-time", seconds, "-f", "-s", "-N",
               "-L", "--proto", "=http,https", "--proto-redir", "=http,https", "--compressed", "-w", "%{stderr}%{json}",
               url]
    report = tempfile.TemporaryFile()
    pipe = Pipe(command, mode=mode, bufsize=bufsize, ignore_status=[141, 23], stderr=report)
    pipe.report = report
    return pipe


def _open_s3(url: str, mode: str = "rb", bufsize: int = 8192) -> Pipe:
    """s3://bucket/key through the AWS command-line tool (as webdataset's gopen does gs:// with gsutil),
    with its read timeout set to `_read_timeout`."""
    seconds = str(max(1, math.ceil(_read_timeout)))
    command = ["aws", "s3", "cp", "--cli-read-timeout", seconds, "--cli-connect-timeout", seconds, url, "-"]
    return Pipe(command, mode=mode, bufsize=bufsize, ignore_status=[141])


for _scheme, _opener in (("http", _open_curl), ("https", _open_curl), ("s3", _open_s3)):
    gopen_schemes[_scheme] = _opener

_EXIT_REASONS = {6: "the server's name cannot be resolved", 7: "the server refuses the connection (is it up?)",
                 18: "the server ended the transfer before the length it announced",
                 28: "no connection within the read timeout (is the server up? --read-timeout sets this bound)",
                 52: "the server sent nothing", 56: "the connection broke"}
"""curl's exit codes, in words; 22 (an HTTP error) is worded with its status."""


def _exit_reason(code: int, report: dict) -> str:
    """Why a remote file's reader failed with exit status `code`; `report`: what curl says of the answer, if known."""
    target = report.get("url_effective") or ""
    if report.get("num_redirects") and not target.startswith(("http://", "https://")):
        return f"it redirects to {target}, which is refused: only http:// and https:// redirects are followed"
    if code == 22:
        status = f" {report['http_code']}" if report.get("http_code") else ""
        return f"the server answers with an HTTP error{status} (no such file there?)"
    if code in _EXIT_REASONS:
        return _EXIT_REASONS[code]
    told = f": {report['errormsg']}" if report.get("errormsg") else ""
    return f"its reader (curl, aws, gsutil or the pipe: command) ended with exit status {code}{told}"


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


def unreachable(location: str, read: int, reason: str) -> str:
    """The message for a remote file whose reading failed after `read` bytes, for `reason`."""
    return (f"{location}: reading it from its server failed after {read:,} bytes: {reason}. A fault of the "
            "server or the network, not of the shard: check it (or the pipe: command), then rerun with --resume")


class ServerFault(ShardSetError):
    """A remote file whose server or network failed, not a damaged one; `reason` says how. (It is made again
    from its message alone where a DataLoader worker raised it.)"""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


class RemoteFile(io.RawIOBase):
    """A remote file as its reader process (curl, aws, gsutil, a pipe: command) streams it, never waited on for
    ever: unless it ends, at least MIN_PROGRESS bytes must arrive in every `read_timeout` seconds spent waiting
    for it, or the read fails (ServerFault). Closing it ends the process, if it still runs.

    The wait is on the pipe itself (poll), not in a read of the pipe's buffered reader,
    which blocks until its whole request has arrived, however slowly it comes.
    """

    def __init__(self, location: str, stream, read_timeout: float):
        self.location, self.stream, self.read_timeout = location, stream, read_timeout
        self.process = getattr(stream, "proc", None)  # None: a file:// URL, opened as a local file
        self.read_bytes, self.ended = 0, False
        self._waited, self._arrived = 0.0, 0  # since MIN_PROGRESS last arrived
        if self.process is not None:
            self._pipe = stream.stream.fileno()
            self._poll = select.poll()
            self._poll.register(self._pipe, select.POLLIN)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not len(buffer):
            return 0
        count = self.stream.readinto(buffer) if self.process is None else self._arrival(buffer)
        self.read_bytes += count
        self.ended = count == 0
        return count

    def _arrival(self, buffer) -> int:
        """Wait for what the process sends next (at most the rest of the read timeout) and take it into `buffer`."""
        while True:
            started = time.monotonic()
            ready = self._poll.poll(max(0.0, self.read_timeout - self._waited) * 1000)
            self._waited += time.monotonic() - started
            count = os.readv(self._pipe, [buffer]) if ready else 0
            self._arrived += count
            if (ready and not count) or self._arrived >= MIN_PROGRESS:  # the end, or enough for a while
                self._waited, self._arrived = 0.0, 0
            elif self._waited >= self.read_timeout:
                reason = self._stalled()
                raise ServerFault(unreachable(self.location, self.read_bytes + count, reason), reason)
            if ready:
                return count

    def _stalled(self) -> str:
        bound = "--read-timeout sets this bound"
        if not self._arrived:
            return f"nothing arrived for {self.read_timeout:g} s (a stalled server or network; {bound})"
        return (f"only {self._arrived:,} bytes arrived in {self.read_timeout:g} s, less than the "
                f"{MIN_PROGRESS >> 20} MiB due in that time (a stalled or dripping server or network; {bound})")

    def report(self) -> dict:
        """What curl said of the server's answer (status, content type, final URL, error), once it has ended;
        {} for other readers."""
        report = getattr(self.stream, "report", None)
        if report is None:
            return {}
        try:
            self.process.wait(timeout=5)  # curl writes it as it ends
        except subprocess.TimeoutExpired:
            return {}
        report.seek(0)
        with suppress(ValueError):
            return json.loads(report.read().decode("utf-8", "replace"))
        return {}

    def answer(self) -> str:
        """The server's answer in words, e.g. `HTTP 200, Content-Type text/html, 1,234 bytes`."""
        report, size = self.report(), f"{self.read_bytes:,} bytes"
        if "http_code" not in report:
            return size
        return f"HTTP {report['http_code']}, Content-Type {report.get('content_type') or 'none'}, {size}"

    def fault(self, expected: int | None = None) -> ShardSetError | None:
        """The server's or network's failure that ended this file, if that is what happened: its reader failed,
        or (`expected`: the bytes it should hold) the server ended its answer short of them."""
        if (code := reader_exit(self.stream)) is not None:
            reason = _exit_reason(code, self.report())
            return ServerFault(unreachable(self.location, self.read_bytes, reason), reason)
        if self.ended and expected is not None and self.read_bytes < expected:
            return ShardSetError(f"{self.location}: the server ended its answer ({self.answer()}) short of the "
                                 f"{expected:,} bytes the manifest gives this shard: it answers wrongly (a cut or "
                                 "other file at that URL, a proxy?), not a damaged shard: check what it serves, "
                                 "then rerun with --resume")
        return None

    def close(self) -> None:
        if not self.closed:
            if self.process is not None and self.process.poll() is None:
                self.process.kill()  # a stalled transfer, or a reader that stops early: it would wait for ever
            with suppress(OSError):
                self.stream.close()  # webdataset's Pipe raises the exit status of a killed reader
            if (report := getattr(self.stream, "report", None)) is not None:
                report.close()
        super().close()


def read_manifest(root: Path | str, read_timeout: float = DEFAULT_READ_TIMEOUT) -> dict:
    """A shard set's manifest.json, parsed, from a folder or a URL.

    FileNotFoundError where there is none; behind a URL, ShardSetError when the server or
    the network fails (unreachable, stalled, more than MAX_MANIFEST_BYTES), or when what it
    answers is not a shard manifest (an HTML page, a cut answer): the server's fault, named
    with its status and content type, not the shards'.
    """
    if not is_remote(root):
        return json.loads((Path(root) / MANIFEST).read_text())
    global _read_timeout
    _read_timeout = read_timeout
    location = shard_location(root, MANIFEST)
    with RemoteFile(location, gopen(location), read_timeout) as remote:
        blocks, size = [], 0
        try:
            while size <= MAX_MANIFEST_BYTES and (block := remote.read(1 << 20)):
                blocks.append(block)
                size += len(block)
        except ServerFault as fault:
            raise ShardSetError(f"{location}: {fault.reason}") from None
        if size > MAX_MANIFEST_BYTES:
            raise ShardSetError(f"{location}: the server sends more than {MAX_MANIFEST_BYTES:,} bytes, ~10 times a "
                                "LUNA16 build's manifest: not a shard manifest (an endless answer?); check the URL "
                                "and the server")
        if (fault := remote.fault()) is not None:
            # An HTTP error (a 404) or a failed command (`cat` of a missing file): no manifest there.
            if reader_exit(remote.stream) == 22 or not location.startswith(("http:", "https:")):
                raise FileNotFoundError(f"{location}: {fault.reason}")
            raise ShardSetError(f"{location}: {fault.reason}")
        try:
            manifest = json.loads(b"".join(blocks))
            if not (isinstance(manifest, dict) and "format" in manifest):
                raise ValueError(f"a JSON {type(manifest).__name__} without a format")
        except ValueError as err:
            raise ShardSetError(f"{location}: what the server answered ({remote.answer()}) is not a shard manifest "
                                f"({err}): check the URL and what the server sends there (a network's login "
                                "page? a cut answer?)") from None
    return manifest


class CheckedStream(io.RawIOBase):
    """A shard's byte stream, cut at its manifest size, that hashes what passes; `check` drains it and compares
    size and sha256, and that nothing follows."""

    def __init__(self, location: str, stream, size: int, sha256: str):
        self.location, self.stream, self.size, self.sha256 = location, stream, size, sha256
        self.digest, self.read_bytes = hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        wanted = memoryview(buffer)[: max(0, self.size - self.read_bytes)]
        count = self.stream.readinto(wanted) if len(wanted) else 0
        self.digest.update(wanted[:count])
        self.read_bytes += count
        return count

    def check(self) -> None:
        """Read to the manifest's size (tar readers stop at the end-of-archive blocks) and compare with the
        manifest; a byte beyond it fails too.

        A stream cut off by its server is reported as such, not as a shard that differs.
        """
        while self.read(1 << 20):
            pass
        if self.read_bytes == self.size and self.stream.read(1):
            where = "the server sends" if isinstance(self.stream, RemoteFile) else "the file holds"
            raise ShardSetError(f"{self.location}: {where} more than the {self.size:,} bytes the manifest gives "
                                "this shard: another file is there (or one that never ends); check what it serves, "
                                "then rerun with --resume")
        if (self.read_bytes, self.digest.hexdigest()) != (self.size, self.sha256):
            if (fault := self.fault()) is not None:
                raise fault
            raise ShardSetError(f"{self.location}: {self.read_bytes} bytes streamed with sha256 "
                                f"{self.digest.hexdigest()[:12]}…, the manifest says {self.size} bytes, "
                                f"{self.sha256[:12]}…: {REBUILD}, or fix the copy it is served from")

    def fault(self) -> ShardSetError | None:
        """The server's or network's failure that cut this stream short, if that is what happened (see
        `RemoteFile.fault`); None for a local file."""
        return self.stream.fault(self.size) if isinstance(self.stream, RemoteFile) else None

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
    cache_limit: int | None = None  # bytes the cache folder may hold (luna_dist.shards.cache); None: no bound

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
        else:
            stream = self._cached(location, size, sha256) if self.cache_dir is not None else None
            if stream is None:  # no cache, or no copy it can hold now
                stream = RemoteFile(location, gopen(location), self.read_timeout)
        return io.BufferedReader(CheckedStream(location, stream, size, sha256), 1 << 20)

    def _cached(self, location: str, size: int, sha256: str) -> BinaryIO | None:
        """The cache's checked copy of a remote shard, downloaded first where it has none; None where the cache
        cannot hold it now (see `ShardCache.open`).

        The download streams through the same checks as a direct read (size, sha256, the
        reader's exit status), so neither a cut-off download nor one from a changed server
        enters the cache. (webdataset's FileCache downloads through gopen with no read
        timeout and reports a failed download as a bare exception.)
        """
        def download(file: BinaryIO) -> None:
            remote = RemoteFile(location, gopen(location), self.read_timeout)
            with io.BufferedReader(CheckedStream(location, remote, size, sha256), 1 << 20) as stream:
                while block := stream.read(1 << 20):
                    file.write(block)
                stream.raw.check()

        cache = ShardCache(self.cache_dir, self.cache_limit, self.read_timeout)
        return cache.open(cache_name(location, sha256), size, sha256, download)
