"""The tar files of a shard set, written and read here: the bytes webdataset's TarWriter writes, faster.

A shard is a tar of samples, each sample's members `KEY.NAME` in name order, exactly as
webdataset's TarWriter writes them (Python's tarfile in PAX format: ustar headers, mode
0o444, owner bigdata, mtime 0; a pax header before a name ustar cannot hold), so any tar
reader, webdataset included, reads a shard. Both directions are done here rather than by
tarfile, which builds and parses each 512-byte header field by field in Python: it took a
third of a CT's build, and more than half of a loader worker's time before its batches
were decoded. Writing puts each sample in one system call and hashes it as it passes;
reading takes a member in two reads and checks every header's checksum.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# -- writing ---------------------------------------------------------------------------------------
_BLOCK, _RECORD = 512, 20 * 512  # tarfile ends an archive with two zero blocks, padded to a whole record
_ZEROS = bytes(2 * _BLOCK + _RECORD)  # the most padding an archive's end takes
MEAN_END_BYTES = 2 * _BLOCK + _RECORD // 2
"""What closing a shard adds, on average: two zero blocks, then zeros up to a whole record. Small shards
(a few samples each) carry it as much as their samples' bytes."""
_MODE_IDS = b"0000444\0" b"0000000\0" b"0000000\0"  # mode 0o444, uid 0, gid 0
_MTIME = b"00000000000\0"
_AFTER_CHECKSUM = (b"0" + bytes(100) + b"ustar\x0000" + b"bigdata".ljust(32, b"\0") * 2
                   + bytes(8 + 8 + 155 + 12))  # regular file, no link, magic, owner names, devices, prefix
_HEADER_SUM = sum(_MODE_IDS) + sum(_MTIME) + 8 * ord(" ") + sum(_AFTER_CHECKSUM)


def _member_header(name: str, size: int) -> bytes:
    """The tar header of a regular file `name` of `size` bytes, as tarfile writes it for TarWriter."""
    if not (name.isascii() and len(name) <= 100 and size < 8 ** 11):  # ustar cannot hold it: tarfile adds pax
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o444, "bigdata", "bigdata"
        return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    name_field, size_field = name.encode().ljust(100, b"\0"), b"%011o\0" % size
    checksum = _HEADER_SUM + sum(name_field) + sum(size_field)  # of the header with its checksum field blank
    return b"".join((name_field, _MODE_IDS, size_field, _MTIME, b"%06o\0 " % checksum, _AFTER_CHECKSUM))


class TarShard:
    """A tar file that exists under its name only once complete: written as `NAME.partial`, each sample's
    members in one system call, hashed as they pass (never read back), renamed when closed without error.

    No fsync: the rename is what protects against a killed build, and a resumed build
    checks every journaled shard's size before trusting it.
    """

    def __init__(self, path: Path):
        self.path, self.samples, self.size, self.sha256 = path, 0, 0, hashlib.sha256()
        self._partial = path.with_name(path.name + ".partial")
        self._fd = os.open(self._partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def write(self, sample: dict) -> None:
        """A sample's members `KEY.NAME` in name order, as TarWriter writes them; fields starting with `_`
        (`__key__`, and a reader's `__url__`) are not members."""
        key, pieces = sample["__key__"], []
        for name in sorted(sample):
            if not name.startswith("_"):
                data = sample[name]
                pieces += (_member_header(f"{key}.{name}", len(data)), data, _ZEROS[:-len(data) % _BLOCK])
        self._write(pieces)
        self.samples += 1

    def _write(self, pieces: list) -> None:
        for piece in pieces:
            self.sha256.update(piece)
        total = sum(map(len, pieces))
        written = os.writev(self._fd, pieces)
        if written < total:  # a regular file takes it all, unless e.g. the disk fills: then os.write raises
            rest = memoryview(b"".join(pieces))[written:]
            while rest:
                rest = rest[os.write(self._fd, rest):]
        self.size += total

    def __enter__(self) -> TarShard:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        try:
            if error_type is None:
                end = self.size + 2 * _BLOCK
                self._write([_ZEROS[:2 * _BLOCK + (-end % _RECORD)]])
        finally:
            os.close(self._fd)
        if error_type is None:
            os.replace(self._partial, self.path)
        else:
            self._partial.unlink(missing_ok=True)


# -- reading ---------------------------------------------------------------------------------------
class TarReadError(ValueError):
    """A tar that is not as a shard's writer writes it: the message says where and what."""


def read_samples(stream: BinaryIO, url: str, shard_bytes: int | None = None) -> Iterator[dict]:
    """The samples of a tar written by `TarShard`, as webdataset's readers give them: `__key__` (a member
    name up to its first dot), `__url__`, and each member's bytes under the rest of its name.

    An all-zero header block ends the archive, as it ends tarfile's (the manifest's
    sample count then tells a shard cut short); a header whose checksum is wrong, a
    member cut short, a type other than a file (or a pax header naming one) or a member
    twice in one sample is a TarReadError naming its offset. With `shard_bytes` (the
    shard's size in its manifest), so is a member that claims more than is left of it,
    before anything is read for it: a size field declares up to 8 GiB.
    """
    sample, offset, pax_name = None, 0, None
    while len(header := stream.read(_BLOCK)) == _BLOCK and header != _ZEROS[:_BLOCK]:
        checksum, size = _octal_field(header[148:156], offset), _octal_field(header[124:136], offset)
        if checksum != sum(header) - sum(header[148:156]) + 8 * ord(" "):
            raise TarReadError(f"the tar header at byte {offset} has a wrong checksum")
        if shard_bytes is not None and size > (left := shard_bytes - offset - _BLOCK):
            raise TarReadError(f"the member at byte {offset} claims {size:,} bytes, more than the {left:,} left in "
                               "the shard")
        data = stream.read(size)
        stream.read(-size % _BLOCK)
        if len(data) < size:
            raise TarReadError(f"the member at byte {offset} ends after {len(data)} of its {size} bytes")
        name, pax_name = pax_name or header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape"), None
        kind = header[156:157]
        if kind == b"x":
            pax_name = _pax_path(data, offset)
        elif kind not in (b"0", b"\0"):
            raise TarReadError(f"the member {name} at byte {offset} is of tar type {kind!r}, not a file")
        else:
            key, _, member = name.partition(".")
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            if member in sample:
                raise TarReadError(f"sample {key} holds {member} twice (at byte {offset})")
            sample[member] = data
        offset += _BLOCK + size + -size % _BLOCK
    if len(header) not in (0, _BLOCK):
        raise TarReadError(f"the tar ends inside the header at byte {offset}")
    if sample is not None:
        yield sample


def _octal_field(field: bytes, offset: int) -> int:
    try:
        return int(field.rstrip(b"\0 ") or b"0", 8)
    except ValueError:
        raise TarReadError(f"the tar header at byte {offset} is not a tar header") from None


def _pax_path(data: bytes, offset: int) -> str | None:
    """The `path` of a pax header's records (`LENGTH KEY=VALUE\\n`, the only record `TarShard` writes)."""
    for record in data.split(b"\n"):
        _, _, field = record.partition(b" ")
        if field.startswith(b"path="):
            return field[5:].decode("utf-8", "surrogateescape")
    raise TarReadError(f"the pax header before byte {offset} names no path")
