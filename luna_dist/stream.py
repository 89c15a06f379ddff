"""WebDataset pipelines from a shard set to int16 batches on the host.

Training: every (rank, worker) draws shards at random with replacement from all the
training shards of its class, shuffles samples in a buffer, mixes the positive and
negative streams at the requested ratio and stops after a fixed number of batches,
so every rank runs the same number of steps whatever the shard count: no DDP hang.

Validation: the shard list is split by node, then by worker, and read once, so each
validation sample is scored by exactly one process. Ranks may get unequal numbers of
batches; the training loop gathers with padding.

A shard set is a folder or a URL (`--shards https://…/`, `s3://…/`, `gs://…/`, `pipe:…{name}`):
remote shards are streamed through webdataset's gopen, or through its FileCache into a
cache folder, and their size and sha256 are checked on the bytes read.

Every shard is read through `checked_samples`: each sample's members must match their
CRC-32 (`crc32.json`) and each shard must yield the samples its manifest entry counts
(Python's tar reader takes a damaged header in mid-archive for the end of the file and
stops silently). Either fault stops the run with the shard (and sample) named: a model
trained or scored on garbage, or on silently fewer samples, is worse than a stopped run.

Workers do as little per sample as possible: the raw `.npy` bytes are copied into
one preallocated int16 batch (no np.load, no per-sample tensors); conversion to
float and augmentation happen on the training device. Every stage is a module-level
function or a partial of one, so pipelines pickle for `spawn` workers (macOS).

Segmentation shard sets (`--task seg`, see `luna_dist.seg_samples`) go through the
same pipelines with their own batching: training stacks as (int16 (N, 7, 96, 96),
bool masks (N, 1, 96, 96)); validation slabs unrolled into full slices with their
context, batched while the slice size stays the same.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import random
import re
import tarfile
import time
import subprocess
import warnings
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from webdataset.gopen import Pipe, gopen, gopen_schemes

from luna_dist.ct import CHUNK_SHAPE
from luna_dist.seg_samples import CROP, STACK, context_slices, unpack_mask
from luna_dist.shard import CHECKSUMS, FORMAT, FORMAT_VERSION, MANIFEST, member_checksums, sha256_file

_NPY_HEADER_CACHE: dict[tuple, int] = {}


class ShardSetError(Exception):
    """A shard folder that training must not use; the message says why and what to do."""


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


DEFAULT_READ_TIMEOUT = 120.0
"""Seconds a remote shard or manifest may send nothing before its read fails (--read-timeout)."""
_read_timeout = DEFAULT_READ_TIMEOUT  # this process's, set by each ShardSource before it opens anything


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


@dataclass
class ShardSet:
    """A checked shard set, in a folder or behind a URL: its manifest and the shards of each fold and class.

    `cache_dir`: remote shards are copied there and read from the copy. `read_timeout`: a remote
    shard that sends nothing for that many seconds fails.
    """

    root: Path | str
    manifest: dict
    cache_dir: str | None = None
    read_timeout: float = DEFAULT_READ_TIMEOUT

    def _select(self, folds: Iterable[int], label: str) -> list[dict]:
        folds = set(folds)
        return [s for s in self.manifest["shards"] if s["fold"] in folds and s["label"] == label]

    def shards(self, folds: Iterable[int], label: str) -> list[str]:
        return [shard_location(self.root, s["name"]) for s in self._select(folds, label)]

    def count(self, folds: Iterable[int], label: str) -> int:
        return sum(s["samples"] for s in self._select(folds, label))

    @property
    def source(self) -> ShardSource:
        """What the readers need to open and check each shard; pickles for spawn workers."""
        entries = {shard_location(self.root, s["name"]): (s["samples"], s["bytes"], s["sha256"])
                   for s in self.manifest["shards"]}
        return ShardSource(entries, is_remote(self.root), self.cache_dir, self.read_timeout)

    def verify(self) -> tuple[list[str], float]:
        """sha256 of every shard (read or streamed whole) against the manifest: the problems found, and the seconds."""
        started = time.perf_counter()
        problems = []
        source = self.source
        for location in sorted(source.entries):
            try:
                with source.open(location, checked=True) as stream:
                    stream.raw.check()
            except ShardSetError as err:
                problems.append(str(err))
            except OSError as err:
                problems.append(f"{location}: unreadable ({err})")
        return problems, time.perf_counter() - started

    @property
    def folds(self) -> list[int]:
        return sorted(int(k) for k in self.manifest["folds"])


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


def open_shard_set(root: Path | str, task: str = "cls", cache_dir: str | Path | None = None,
                   read_timeout: float = DEFAULT_READ_TIMEOUT) -> ShardSet:
    """Read and check `manifest.json`: format, task, sample layout, and every shard's presence and size.

    `root` is a folder or a URL (`is_remote`); behind a URL, each shard's size and sha256 are
    checked on the bytes streamed instead, as they are read.
    """
    root = root if is_remote(root) else Path(root)
    path = shard_location(root, MANIFEST)
    try:
        manifest = read_manifest(root, read_timeout)
    except FileNotFoundError:
        if is_remote(root):
            raise ShardSetError(f"{path} not found: {root} must be where the files of a finished shard build are "
                                "served (its manifest.json and .tar shards, copied as they are); check the URL") from None
        raise ShardSetError(f"{path} not found: is {root} a finished shard build? "
                            f"Run `python -m luna_dist.shard --data DIR --out {root}` (again) to finish it.") from None
    except json.JSONDecodeError as err:
        raise ShardSetError(f"{path}: not valid JSON ({err}); rebuild the shards") from None
    if not isinstance(manifest, dict):
        raise ShardSetError(f"{path}: not a shard manifest (a JSON {type(manifest).__name__}); rebuild the shards")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ShardSetError(f"{path}: format {manifest.get('format')} v{manifest.get('format_version')}, "
                            f"this version reads {FORMAT} v{FORMAT_VERSION}; rebuild the shards")
    built_for = manifest.get("task", "cls")  # builds before segmentation were all classification
    if built_for != task:
        raise ShardSetError(f"{path}: shards built with --task {built_for}, this run needs --task {task} shards "
                            f"(`python -m luna_dist.shard --task {task} --data DIR --out OUT`)")
    if task == "cls":
        chunk = manifest.get("chunk", {})
        if tuple(chunk.get("shape", ())) != CHUNK_SHAPE or chunk.get("dtype") != "int16":
            raise ShardSetError(f"{path}: chunks are {chunk.get('shape')} {chunk.get('dtype')}, "
                                f"expected {list(CHUNK_SHAPE)} int16; rebuild the shards")
    else:
        sample = manifest.get("sample", {})
        if sample.get("context_slices") != STACK or sample.get("crop") != [CROP, CROP] or sample.get("dtype") != "int16":
            raise ShardSetError(f"{path}: samples are {sample.get('context_slices')} slices of {sample.get('crop')} "
                                f"{sample.get('dtype')}, expected {STACK} of {[CROP, CROP]} int16; rebuild the shards")
    _check_fields(path, manifest)
    problems = []
    for shard in [] if is_remote(root) else manifest["shards"]:
        file = root / shard["name"]
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif file.stat().st_size != shard["bytes"]:
            problems.append(f"{file}: {file.stat().st_size} bytes, the manifest says {shard['bytes']} (truncated?)")
    if problems:
        raise ShardSetError(f"{root} does not match its manifest:\n  " + "\n  ".join(problems[:20])
                            + "\nrebuild with `python -m luna_dist.shard ... --overwrite`")
    if manifest["failed"]:
        warnings.warn(f"{root}: {len(manifest['failed'])} CT(s) failed to shard and are left out "
                      f"(e.g. {manifest['failed'][0]['path']}); fix them and rerun the shard build to add them",
                      stacklevel=2)
    return ShardSet(root, manifest, None if cache_dir is None else str(cache_dir), read_timeout)


_MANIFEST_FIELDS = ("folds", "shards", "failed")
_SHARD_FIELDS = ("name", "fold", "label", "samples", "bytes")


def _check_fields(path: Path, manifest: dict) -> None:
    """Every field the reader uses is there, so a damaged manifest is named rather than a KeyError."""
    missing = [field for field in _MANIFEST_FIELDS if field not in manifest]
    if missing:
        raise ShardSetError(f"{path}: no {', '.join(missing)} in the manifest (damaged?); rebuild the shards")
    for n, shard in enumerate(manifest["shards"]):
        missing = [field for field in _SHARD_FIELDS if not isinstance(shard, dict) or field not in shard]
        if missing:
            raise ShardSetError(f"{path}: shard entry {n} has no {', '.join(missing)} (damaged?); rebuild the shards")


_REBUILD = "rebuild the shards with `python -m luna_dist.shard ... --overwrite`"


def _damaged(sample: dict, problem: str) -> ShardSetError:
    """A reader error names the shard and the sample."""
    return ShardSetError(f"{sample.get('__url__', 'unknown shard')}: sample {sample.get('__key__')}: {problem}; "
                         f"the shard is damaged: {_REBUILD}")


def _require(samples: list[dict], *fields: str) -> None:
    """A sample cut short (zeroed blocks end a tar early) lacks fields: name it rather than a KeyError."""
    for sample in samples:
        missing = [field for field in fields if field not in sample]
        if missing:
            raise _damaged(sample, f"no {' and no '.join(missing)}")


def _payload_offset(sample: dict, name: str, dtype: type = np.int16, shape: tuple = CHUNK_SHAPE) -> int:
    """Byte offset of the payload in a `.npy` blob, checking its header once per distinct header."""
    data = sample[name]
    header_len = 10 + int.from_bytes(data[8:10], "little")
    cache_key = (data[:header_len], np.dtype(dtype).str, shape)
    if cache_key not in _NPY_HEADER_CACHE:
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as err:
            raise _damaged(sample, f"{name} unreadable ({err})") from None
        if array.dtype != dtype or array.shape != shape or not array.flags.c_contiguous:
            raise _damaged(sample, f"{name} is {array.dtype} {array.shape}, expected {np.dtype(dtype).name} {shape}")
        _NPY_HEADER_CACHE[cache_key] = header_len
    return header_len


def _copy_payloads(samples: list[dict], name: str, out: np.ndarray, shape: tuple[int, ...]) -> None:
    """Copy each sample's `.npy` payload of `shape` into row n of `out`, a new contiguous array; check the headers."""
    flat = out.reshape(len(samples), -1)  # a view, as `out` is contiguous
    for n, sample in enumerate(samples):
        offset = _payload_offset(sample, name, out.dtype.type, shape)
        if len(sample[name]) - offset != flat[n].nbytes:
            raise _damaged(sample, f"{name} holds {len(sample[name]) - offset} bytes of data, expected {flat[n].nbytes}")
        flat[n] = np.frombuffer(sample[name], dtype=out.dtype, offset=offset)


def _check_sample(sample: dict) -> None:
    """Every member's CRC-32 against the sample's own `crc32.json`."""
    if CHECKSUMS not in sample:
        members = sorted(name for name in sample if not name.startswith("__"))
        raise _damaged(sample, f"no {CHECKSUMS} (cut short? it holds only {', '.join(members) or 'nothing'})")
    try:
        stored = json.loads(sample[CHECKSUMS])
    except ValueError:
        raise _damaged(sample, f"{CHECKSUMS} unreadable") from None
    if stored != (computed := member_checksums(sample)):
        missing = [name for name in stored if name not in sample]
        if missing:
            raise _damaged(sample, f"no {' and no '.join(missing)}")
        changed = [name for name in stored if stored[name] != computed[name]] or sorted(set(computed) - set(stored))
        raise _damaged(sample, f"{', '.join(changed)} does not match its CRC-32 (changed in place)")


class _CheckedStream(io.RawIOBase):
    """A shard's byte stream that hashes what passes; `close` drains it and compares size and sha256."""

    def __init__(self, location: str, stream, size: int, sha256: str):
        self.location, self._stream, self._size, self._sha256 = location, stream, size, sha256
        self._digest, self._read = hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        self._digest.update(data)
        self._read += len(data)
        return len(data)

    def check(self) -> None:
        """Read to the end (tar readers stop at the end-of-archive blocks) and compare with the manifest.

        A stream cut off by its server is reported as such, not as a shard that differs.
        """
        while self.read(1 << 20):
            pass
        if (self._read, self._digest.hexdigest()) != (self._size, self._sha256):
            if (code := reader_exit(self._stream)) is not None:
                raise ShardSetError(_unreachable(self.location, self._read, code))
            raise ShardSetError(f"{self.location}: {self._read} bytes streamed with sha256 {self._digest.hexdigest()[:12]}…, "
                                f"the manifest says {self._size} bytes, {self._sha256[:12]}…: {_REBUILD}, or fix "
                                "the copy it is served from")

    def close(self) -> None:
        self._stream.close()
        super().close()


def _unreachable(location: str, read: int, code: int) -> str:
    return (f"{location}: reading it from its server failed after {read:,} bytes: {_exit_reason(code)}. A fault of the "
            "server or the network, not of the shard: check it (or the pipe: command), then rerun with --resume")


@dataclass(frozen=True)
class ShardSource:
    """How readers open the shards of a set and what they expect of each: (samples, bytes, sha256) by location."""

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
        return io.BufferedReader(_CheckedStream(location, stream, size, sha256), 1 << 20)

    def _cached(self, location: str, size: int, sha256: str) -> Path:
        """The cache's checked copy of a remote shard, downloaded first if it has none or a damaged one.

        The download streams through the same checks as a direct read (size, sha256, the
        reader's exit status) into a temporary name, renamed once it matches the manifest,
        so neither a cut-off download nor one from a changed server enters the cache.
        """
        copy = Path(self.cache_dir) / _cache_name(location, sha256)
        if copy.is_file() and _checked_copy(copy, size, sha256):
            return copy
        copy.parent.mkdir(parents=True, exist_ok=True)
        download = copy.with_name(f"{copy.name}.{os.getpid()}.partial")  # workers may fetch the same shard
        try:
            with io.BufferedReader(_CheckedStream(location, gopen(location), size, sha256), 1 << 20) as stream, \
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


def _is_intact(path: str, size: int, sha256: str) -> bool:
    return os.path.getsize(path) == size and sha256_file(Path(path)) == sha256


_CHECKED_COPIES: set[tuple[str, int]] = set()  # (path, mtime) of cached copies this process has hashed


def _checked_copy(path: Path, size: int, sha256: str) -> bool:
    """A cached copy is hashed before its first use in a process (and after any change); reads hash it again."""
    stamp = (str(path), path.stat().st_mtime_ns)
    if stamp not in _CHECKED_COPIES:
        if not _is_intact(str(path), size, sha256):
            return False
        _CHECKED_COPIES.add(stamp)
    return True


def checked_samples(shards: Iterator[dict], source: ShardSource) -> Iterator[dict]:
    """Pipeline stage replacing `wds.tarfile_to_samples`: samples of each shard, checked.

    Raises ShardSetError naming the shard when a sample's bytes differ from its
    checksums, when the tar cannot be read, when the shard ends before (or after) the
    number of samples its manifest entry holds, or when the bytes streamed from a URL
    differ from the manifest's size and sha256. A remote shard whose server or network
    failed (unreachable, stalled for the read timeout, cut off) is reported as that, not as
    a damaged shard.
    """
    for shard in shards:
        url, read = shard["url"], 0
        expected = source.entries[url][0]
        stream = None
        try:
            stream = source.open(url)
            files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
            for sample in wds.tariterators.group_by_keys(files):
                _check_sample(sample)
                read += 1
                yield sample
            if source.remote:
                stream.raw.check()
            stream.close()  # a remote reader's exit status is known from here
        except (tarfile.TarError, OSError, ValueError) as err:
            raise _unreadable(url, read, err, stream) from None
        finally:
            if stream is not None:
                with suppress(OSError):
                    stream.close()  # also when the consumer stops early: the reader's pipe just closes
        if read != expected:
            raise ShardSetError(f"{url}: {read} samples read, its manifest entry says {expected}: the shard is "
                                f"damaged (a broken tar header ends it early): {_REBUILD}")


def _unreadable(url: str, read: int, error: Exception, stream: io.BufferedReader | None) -> ShardSetError:
    """The message for a shard whose reading failed: the server's or network's fault, the disk's, or the shard's."""
    checked = getattr(stream, "raw", None)
    code = reader_exit(getattr(checked, "_stream", None))
    if code is not None:
        return ShardSetError(_unreachable(url, checked._read, code))
    if isinstance(error, OSError) and not isinstance(error, tarfile.TarError) and error.errno is not None:
        return ShardSetError(f"{url}: cannot be read after {read} samples ({error.strerror}); check the disk or copy, "
                             "then rerun with --resume")
    return ShardSetError(f"{url}: unreadable after {read} samples ({error}); the shard is damaged: {_REBUILD}")


def collate(samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw samples -> (chunks (N, 1, I, R, C) int16, labels (N,) int64), one copy per chunk."""
    chunks = torch.empty((len(samples), 1, *CHUNK_SHAPE), dtype=torch.int16)
    _require(samples, "chunk.npy", "cls")
    _copy_payloads(samples, "chunk.npy", chunks.numpy(), CHUNK_SHAPE)
    labels = torch.tensor([sample["cls"] == b"1" for sample in samples], dtype=torch.int64)
    return chunks, labels


def collate_stacks(samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Segmentation training samples -> (stacks (N, 7, 96, 96) int16, masks (N, 1, 96, 96) bool)."""
    stacks = torch.empty((len(samples), STACK, CROP, CROP), dtype=torch.int16)
    _require(samples, "ct.npy", "mask.npy")
    _copy_payloads(samples, "ct.npy", stacks.numpy(), (STACK, CROP, CROP))
    packed = np.empty((len(samples), CROP, -(-CROP // 8)), dtype=np.uint8)
    _copy_payloads(samples, "mask.npy", packed, packed.shape[1:])
    return stacks, torch.from_numpy(unpack_mask(packed, CROP)).unsqueeze(1)


def locate(samples: list[dict], series_index: dict[str, int]) -> torch.Tensor:
    """(N, 4) float32: each sample's series (its number in `series_index`) and centre X/Y/Z (mm), from its JSON.

    Validation only, for the LUNA16 score; ~300 bytes of JSON per sample is little
    beside the 147 kB chunk copied for it.
    """
    rows = []
    for sample in samples:
        meta = json.loads(sample["json"])
        rows.append((series_index[meta["series_uid"]], *meta["center_xyz"]))
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def collate_located(samples: list[dict], series_index: dict[str, int]) -> tuple[torch.Tensor, ...]:
    """`collate` plus where each sample lies (`locate`): (chunks, labels, where)."""
    return (*collate(samples), locate(samples, series_index))


def batched(samples: Iterator[dict], batch_size: int, partial_last: bool = True, collate=collate) -> Iterator[tuple]:
    """Pipeline stage: group raw samples and collate each group once."""
    group = []
    for sample in samples:
        group.append(sample)
        if len(group) == batch_size:
            yield collate(group)
            group = []
    if group and partial_last:
        yield collate(group)


def batched_slices(slabs: Iterator[dict], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Pipeline stage: segmentation validation slabs -> batches of full slices with their context,
    (int16 (N, 7, R, C), bool masks (N, 1, R, C)); a batch ends early where the slice size changes."""
    images, masks = [], []
    for slab in slabs:
        meta, ct, mask = _decode_slab(slab)
        if images and images[0].shape != ct.shape[1:]:
            yield _stack_slices(images, masks)
            images, masks = [], []
        slices = meta["first_slice"] + np.arange(meta["slices"])
        for j, context in enumerate(context_slices(slices, meta["volume_slices"]) - meta["ct_first"]):
            images.append(ct[context])
            masks.append(mask[j])
            if len(images) == batch_size:
                yield _stack_slices(images, masks)
                images, masks = [], []
    if images:
        yield _stack_slices(images, masks)


def _decode_slab(slab: dict) -> tuple[dict, np.ndarray, np.ndarray]:
    """A validation slab's JSON, CT slices (stored slices, R, C) and unpacked masks; errors name the shard and slab."""
    _require([slab], "json", "ct.npy", "mask.npy")
    try:
        ct = np.load(io.BytesIO(slab["ct.npy"]), allow_pickle=False)
        return json.loads(slab["json"]), ct, unpack_mask(np.load(io.BytesIO(slab["mask.npy"]), allow_pickle=False),
                                                         ct.shape[-1])
    except ValueError as err:  # a damaged .npy header or JSON
        raise _damaged(slab, f"unreadable ({err})") from None


def _stack_slices(images: list[np.ndarray], masks: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks)).unsqueeze(1)


def shuffled(samples: Iterator[dict], buffer: int, seed: int) -> Iterator[dict]:
    """Pipeline stage: buffer shuffle seeded per (seed, rank, worker), decided when iteration starts."""
    rng = random.Random(wds.utils.make_seed(seed, wds.utils.pytorch_worker_seed()))
    yield from wds.shuffle(buffer, initial=buffer, rng=rng)(samples)


def _class_stream(urls: list[str], source: ShardSource, seed: int, buffer: int, *select) -> wds.DataPipeline:
    """Endless shuffled samples of some shards; `select` stages (filters) run before the shuffle."""
    return wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, deterministic=True),
        partial(checked_samples, source=source),
        *select,
        partial(shuffled, buffer=buffer, seed=seed),
    )


@dataclass(frozen=True)
class TrainStreamConfig:
    folds: tuple[int, ...]
    batch_size: int  # per process
    steps: int  # per process per epoch, exactly, whatever the number of workers (see `worker_share`)
    num_workers: int
    neg_per_pos: float  # 0 = natural class frequencies
    shuffle_buffer: int = 1000
    seed: int = 0


def worker_share(batches: Iterator, steps: int) -> Iterator:
    """Pipeline stage: this DataLoader worker's part of an epoch of `steps` batches.

    The workers split the steps as evenly as whole batches allow (the first `steps % workers`
    take one more), so a rank yields exactly `steps` batches whatever its number of workers:
    ranks on nodes with more or fewer cores run the same steps, and DDP never waits in an
    all-reduce for a rank that has already stopped.
    """
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    yield from itertools.islice(batches, steps // workers + (worker < steps % workers))


def train_pipeline(shards: ShardSet, config: TrainStreamConfig, epoch: int, collate=collate) -> wds.DataPipeline:
    """What each worker runs: class-mixed, shuffled batches, its `worker_share` of `config.steps`.

    `collate` turns a list of raw samples into a batch: `collate` for chunks, `collate_stacks` for segmentation.
    """
    pos, neg = shards.shards(config.folds, "pos"), shards.shards(config.folds, "neg")
    if not pos or not neg:
        raise ShardSetError(f"{shards.root}: training folds {list(config.folds)} have {len(pos)} positive and "
                            f"{len(neg)} negative shards; both classes are needed (change --val-folds?)")
    if config.neg_per_pos > 0:
        probs = [1.0, float(config.neg_per_pos)]
    else:
        probs = [shards.count(config.folds, "pos"), shards.count(config.folds, "neg")]
    seed = wds.utils.make_seed(config.seed, epoch)
    mixed = wds.RandomMix(
        [_class_stream(pos, shards.source, wds.utils.make_seed(seed, 1), max(1, config.shuffle_buffer // 10)),
         _class_stream(neg, shards.source, wds.utils.make_seed(seed, 0), config.shuffle_buffer)],
        probs=probs,
    )
    return wds.DataPipeline(mixed, partial(batched, batch_size=config.batch_size, collate=collate),
                            partial(worker_share, steps=config.steps))


def train_loader(shards: ShardSet, config: TrainStreamConfig, epoch: int, pin_memory: bool = False,
                 collate=collate) -> wds.WebLoader:
    """Batches of (int16 chunks, labels) for one epoch: exactly `config.steps` of them."""
    return wds.WebLoader(train_pipeline(shards, config, epoch, collate), batch_size=None,
                         num_workers=config.num_workers, pin_memory=pin_memory)


# -- malignancy ------------------------------------------------------------------------------------
def malignancy_counts(shards: ShardSet, folds: Iterable[int]) -> dict[str, int]:
    """Nodule samples of `folds` by label: {"malignant", "benign", "unknown"}; reads only the JSON members."""
    counts = {"malignant": 0, "benign": 0, "unknown": 0}
    for url in shards.shards(folds, "pos"):
        with shards.source.open(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if member.name.split(".", 1)[-1] == "json":  # not crc32.json
                    malignant = json.load(tar.extractfile(member))["is_malignant"]
                    counts[{True: "malignant", False: "benign", None: "unknown"}[malignant]] += 1
    return counts


def with_malignancy(samples: Iterator[dict], malignant: bool) -> Iterator[dict]:
    """Pipeline stage: the nodule samples whose `is_malignant` is `malignant` (unlabelled ones never pass)."""
    for sample in samples:
        if json.loads(sample["json"])["is_malignant"] is malignant:
            yield sample


def collate_malignancy(samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw samples -> (chunks, labels (N,) int64: 1 malignant, 0 benign or not a nodule,
    info (N, 2) float32: 1 where the label is known (non-nodules: benign) else 0, diameter_mm)."""
    chunks, _ = collate(samples)
    metas = [json.loads(sample["json"]) for sample in samples]
    labels = torch.tensor([meta["is_malignant"] is True for meta in metas], dtype=torch.int64)
    info = torch.tensor([(meta["is_malignant"] is not None or not meta["is_nodule"], meta["diameter_mm"])
                         for meta in metas], dtype=torch.float32).reshape(-1, 2)
    return chunks, labels, info


def malignancy_train_loader(shards: ShardSet, config: TrainStreamConfig, mix: tuple[float, float, float],
                            epoch: int, pin_memory: bool = False) -> wds.WebLoader:
    """Batches mixing malignant, benign and non-nodule samples at the ratios `mix`; `config.steps` of them.

    Each kind with a ratio of 0 is left out; the caller checks that each wanted kind exists
    in the training folds (a resampled stream of a kind with no sample would never yield).
    """
    pos, neg = shards.shards(config.folds, "pos"), shards.shards(config.folds, "neg")
    seed = wds.utils.make_seed(config.seed, epoch)
    streams, probs = [], []
    for ratio, urls, salt, select, buffer in (
        (mix[0], pos, 2, [partial(with_malignancy, malignant=True)], max(1, config.shuffle_buffer // 10)),
        (mix[1], pos, 3, [partial(with_malignancy, malignant=False)], max(1, config.shuffle_buffer // 10)),
        (mix[2], neg, 0, [], config.shuffle_buffer),
    ):
        if ratio > 0:
            streams.append(_class_stream(urls, shards.source, wds.utils.make_seed(seed, salt), buffer, *select))
            probs.append(ratio)
    mixed = wds.RandomMix(streams, probs=probs)
    pipeline = wds.DataPipeline(mixed, partial(batched, batch_size=config.batch_size, collate=collate_malignancy),
                                partial(worker_share, steps=config.steps))
    return wds.WebLoader(pipeline, batch_size=None, num_workers=config.num_workers, pin_memory=pin_memory)


def val_pipeline(shards: ShardSet, folds: Iterable[int], batch_size: int, labels: tuple[str, ...] = ("pos", "neg"),
                 batcher=batched) -> wds.DataPipeline:
    """Every validation sample once across all ranks and workers: split by node, then by worker, no resampling.

    Classification validates its pos and neg shards with `batched`; segmentation its
    val shards with `batched_slices`.
    """
    folds = list(folds)
    urls = sorted(url for label in labels for url in shards.shards(folds, label))
    if not urls:
        raise ShardSetError(f"{shards.root}: no shards in validation folds {sorted(folds)}")
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_node,
        wds.split_by_worker,
        partial(checked_samples, source=shards.source),
        partial(batcher, batch_size=batch_size),
    )


def val_loader(shards: ShardSet, folds: Iterable[int], batch_size: int, num_workers: int,
               pin_memory: bool = False, labels: tuple[str, ...] = ("pos", "neg"), batcher=batched) -> wds.WebLoader:
    return wds.WebLoader(val_pipeline(shards, folds, batch_size, labels, batcher), batch_size=None,
                         num_workers=num_workers, pin_memory=pin_memory)
