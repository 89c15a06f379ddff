"""The shard format, owned in one place: names, keys, checksums, the manifest, what a task cuts.

A shard set is a folder (or URL) holding `manifest.json` and tar files
`fold{K}-{label}-NNNNNN.tar` (labels `pos`, `neg` and, for segmentation, `val`). Every
sample carries `crc32.json`, the CRC-32 of each of its other members. The writer
(`luna_dist.shard`) and every reader (`luna_dist.stream`, the sample modules) import
their names from here; what each kind of sample holds, and how it is encoded and
decoded, lives in its sample module (`luna_dist.chunk_samples`, `luna_dist.seg_samples`).
docs/shard-format.md is the contract in words.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import zstandard
from isal import isal_zlib

from luna_dist.candidates import Annotation, Candidate

FORMAT = "luna_dist-shards"
FORMAT_VERSION = 4  # 2: every sample carries crc32.json; 3: arrays may be compressed (zstd); 4: or lz4 (CODECS)
READABLE_VERSIONS = (2, 3, 4)
"""The versions readers take: a version 2 build holds plain `.npy` members, 3 plain or zstd ones, 4 any codec's."""
MANIFEST = "manifest.json"
CHECKSUMS = "crc32.json"
LABELS = ("pos", "neg", "val")
REBUILD = "rebuild the shards with `python -m luna_dist.shard ... --overwrite`"


class ShardSetError(Exception):
    """A shard set that training must not use; the message says why and what to do."""


def sample_key(series_uid: str, row: int) -> str:
    """WebDataset splits keys at the first dot, and UIDs are full of dots."""
    return f"{series_uid.replace('.', '_')}_{row}"


def shard_name(fold: int, label: str, number: int) -> str:
    return f"fold{fold}-{label}-{number:06d}.tar"


# -- what a build's task cuts from a CT -----------------------------------------------------------
@dataclass
class SeriesInputs:
    """What a cutter reads of one CT besides its voxels: its candidates and annotations, and its fold."""

    series_uid: str
    fold: int
    candidates: list[Candidate]
    annotations: list[Annotation]


@dataclass
class Cut:
    """What a task cut from one CT, encoded for the tar: positives (packed per fold once every CT
    is done), the negatives the plan counted, and validation samples (one shard per CT)."""

    pos: list[dict]
    neg: list[dict]
    val: list[dict] = field(default_factory=list)
    outside_volume: int = 0  # samples padded because they reach outside the CT
    val_slices: int = 0


class Cutter(Protocol):
    """A task's part of the build: what it cuts from a CT. The machinery around it (`luna_dist.shard`) is shared."""

    task: ClassVar[str]
    sample_bytes: ClassVar[int]  # upper bound of a pos/neg sample in a tar, for --max-mb
    per_ct_validation: ClassVar[bool]  # writes one fold{K}-val-NNNNNN.tar per CT

    def planned_negatives(self, candidates: list[Candidate]) -> int: ...  # known before the CT is read
    def planned_samples(self, series: SeriesInputs, shape: tuple[int, int, int], geometry) -> tuple[int, int]: ...
    # (training samples, validation slices) from the CT's header alone, for `--plan`
    def identity(self) -> dict: ...  # what makes two builds of this task the same, beside the inputs
    def layout(self) -> dict: ...  # the manifest's description of the samples
    def cut(self, series: SeriesInputs, ct) -> Cut: ...  # ct: a luna_dist.ct.Ct


# -- encoding ---------------------------------------------------------------------------------------
def npy_header(shape: tuple[int, ...], dtype) -> bytes:
    """The `.npy` header np.save writes for an array of `shape` and `dtype`; a sample module writes
    its fixed-shape header once, so each sample costs a single copy of its data."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": shape})
    return buffer.getvalue()


CODECS = ("lz4", "zstd", "none")
"""How a sample's arrays are stored, losslessly, the first the default (the manifest's `codec`
says which a build wrote; readers take all three). `none`: `NAME.npy` holds what np.save
writes. `lz4`: `NAME.npy.b2` holds the `.npy` header, then the payload as one Blosc2 chunk,
bit-shuffled (the bits of the int16 HU grouped by their place, the high ones hardly
varying) and compressed with LZ4, which decodes at several GB/s. `zstd`: `NAME.npy.zst`
holds the `.npy` bytes with the payload's bytes grouped by their place in an element (all
low bytes, then all high bytes), compressed with Zstandard at level ZSTD_LEVEL: ~10 % fewer
bytes than lz4, decoded ~3x slower. docs/shard-format.md gives the measured sizes and speeds
that chose the default: a loader worker that must keep a GPU fed decodes lz4 in time."""
ZSTD_SUFFIX, BLOSC2_SUFFIX = ".zst", ".b2"
SUFFIXES = {"zstd": ZSTD_SUFFIX, "lz4": BLOSC2_SUFFIX, "none": ""}
"""What each codec adds to a member's name."""
ZSTD_LEVEL = 1
_ZSTD_COMPRESSOR = zstandard.ZstdCompressor(level=ZSTD_LEVEL)  # one per process: the build's workers are processes
LZ4_LEVEL = 5
_ONE_THREAD = {"nthreads": 1}  # a build's and a loader's workers are processes already, one a core


@functools.cache
def _blosc2():
    """Blosc2, imported where an `lz4` member is first met: its import takes a quarter of a second, which
    the processes that never meet one (scoring, the analysis, zstd and plain builds) need not pay."""
    import blosc2

    return blosc2


def stored_array(name: str, array: np.ndarray, codec: str) -> tuple[str, bytes]:
    """`array` as a sample's `.npy` member `name` stores it under `codec`: its member name and bytes."""
    name, (stored,) = stored_arrays(name, np.asarray(array)[None], codec)
    return name, stored


def stored_arrays(name: str, arrays: np.ndarray, codec: str) -> tuple[str, list[bytes]]:
    """Each array along the first axis of `arrays` (N, ...) as member `name` of its own sample stores it.

    The build stores a CT's hundreds of chunks at once: for zstd their bytes are grouped in
    one pass over all of them, straight into the buffers that are compressed (the `.npy`
    header first, then the grouped payload), with no copy per array.
    """
    arrays = np.ascontiguousarray(arrays)
    header = npy_header(arrays.shape[1:], arrays.dtype)
    if codec == "none":
        return name, [b"".join((header, memoryview(array))) for array in arrays]
    count, itemsize = len(arrays), arrays.dtype.itemsize
    if codec == "lz4":
        blosc2 = _blosc2()
        return name + SUFFIXES[codec], [header + blosc2.compress2(
            array, typesize=itemsize, codec=blosc2.Codec.LZ4, clevel=LZ4_LEVEL, filters=[blosc2.Filter.BITSHUFFLE],
            **_ONE_THREAD) for array in arrays]
    stored = np.empty((count, len(header) + arrays[0].nbytes), dtype=np.uint8)
    stored[:, :len(header)] = np.frombuffer(header, dtype=np.uint8)
    payload_bytes = arrays.reshape(count, -1).view(np.uint8).reshape(count, -1, itemsize)
    stored[:, len(header):].reshape(count, itemsize, -1)[:] = payload_bytes.transpose(0, 2, 1)
    return name + SUFFIXES[codec], [_ZSTD_COMPRESSOR.compress(row) for row in stored]


MAX_ARRAY_BYTES = 1 << 30
"""The most bytes of data an array of a shape not known beforehand (a validation slab) may declare: 13 times a
slab of 38 slices of 1024 x 1024 int16 (80 MB), the largest the build writes from such CTs. A header declaring
more is damage, refused before anything is allocated."""
_MAX_NPY_HEADER = 10 + 0xFFFF  # a version 1.0 `.npy` header: magic, version, a 2-byte length, then the header


def load_array(sample: dict, name: str) -> np.ndarray:
    """The array of `.npy` member `name`, stored by any codec; a reader error when it has none or it cannot be read.

    Its header's size is checked against the member before the array is allocated: a plain
    member must hold exactly its payload, a compressed one at most MAX_ARRAY_BYTES.
    """
    if name in sample:
        data = sample[name]
        dtype, shape = _npy_layout(sample, name, data)
        if (held := len(data) - _npy_header_length(data)) != (expected := dtype.itemsize * math.prod(shape)):
            raise damaged(sample, f"{name} holds {held} bytes of data, expected {expected}")
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as err:
            raise damaged(sample, f"{name} unreadable ({err})") from None
    dtype, shape = _npy_layout(sample, name, _header(sample, name))
    if (nbytes := dtype.itemsize * math.prod(shape)) > MAX_ARRAY_BYTES:
        raise damaged(sample, f"{name} declares {dtype} {shape}, {nbytes:,} bytes, more than the "
                              f"{MAX_ARRAY_BYTES:,} of any array the build writes")
    array = np.empty(shape, dtype=dtype)
    _fill(sample, name, array.reshape(-1), shape)
    return array


def _header(sample: dict, name: str) -> bytes:
    """The `.npy` header of compressed member `name`: an `lz4` member's leads it, a `zstd` member's is
    decompressed alone (at most a `.npy` header's 64 kB, whatever the frame declares)."""
    if (stored := sample.get(name + BLOSC2_SUFFIX)) is not None:
        return stored
    if (stored := sample.get(name + ZSTD_SUFFIX)) is not None:
        try:
            with _ZSTD_DECOMPRESSOR.stream_reader(stored) as reader:
                start = reader.read(10)
                return start + reader.read(_npy_header_length(start) - len(start))
        except zstandard.ZstdError as err:
            raise damaged(sample, f"{name}{ZSTD_SUFFIX} cannot be decompressed ({err})") from None
    raise damaged(sample, f"no {name}")


def _fill(sample: dict, name: str, out: np.ndarray, shape: tuple) -> None:
    """Fill the flat array `out` with the payload of compressed member `name`, once its header says `out`'s
    dtype and `shape` and its size fits: nothing larger than `out` and a header is ever allocated."""
    if (stored := sample.get(name + BLOSC2_SUFFIX)) is not None:
        _check_layout(sample, name, stored, out.dtype, shape)
        _unblosc(sample, name, stored, out)
    elif (stored := sample.get(name + ZSTD_SUFFIX)) is not None:
        try:
            data = _decompressed(sample, name, stored, out.nbytes + _MAX_NPY_HEADER)
        except ShardSetError:
            _check_layout(sample, name, _header(sample, name), out.dtype, shape)  # an array of another shape says so
            raise
        _check_layout(sample, name, data, out.dtype, shape)
        _ungroup(sample, name, data, out)
    else:
        raise damaged(sample, f"no {name}")


def _check_layout(sample: dict, name: str, npy: bytes, dtype: np.dtype, shape: tuple) -> None:
    if (layout := _npy_layout(sample, name, npy)) != (dtype, shape):
        raise damaged(sample, f"{name} is {layout[0]} {layout[1]}, expected {dtype} {shape}")


def _unblosc(sample: dict, name: str, stored: bytes, out: np.ndarray) -> None:
    """Decompress an `lz4` member's Blosc2 chunk straight into `out` (the shuffle is undone block by block,
    in cache), once it is known to hold exactly `out`'s bytes."""
    blosc2, chunk = _blosc2(), memoryview(stored)[_npy_header_length(stored):]
    try:
        size = blosc2.get_cbuffer_sizes(chunk)[0]
        if size != out.nbytes:
            raise damaged(sample, f"{name}{BLOSC2_SUFFIX} holds {size} bytes of data, expected {out.nbytes}")
        if size:  # Blosc2 refuses an empty destination
            blosc2.decompress2(chunk, dst=out, **_ONE_THREAD)
    except (ValueError, RuntimeError) as err:
        raise damaged(sample, f"{name}{BLOSC2_SUFFIX} cannot be decompressed ({err})") from None


def _decompressed(sample: dict, name: str, stored: bytes, limit: int) -> bytes:
    """A `zstd` member decompressed, at most `limit` bytes: the size its frame declares is checked first (a
    frame of a few kB can declare a TiB, or hold gigabytes of zeros), and one that declares none cannot grow
    past `limit` either."""
    member = name + ZSTD_SUFFIX
    try:
        if (declared := zstandard.frame_content_size(stored)) > limit:
            raise damaged(sample, f"{member} declares {declared:,} bytes, expected at most {limit:,}")
        return _ZSTD_DECOMPRESSOR.decompress(stored, max_output_size=limit)
    except zstandard.ZstdError as err:
        raise damaged(sample, f"{member} cannot be decompressed into at most {limit:,} bytes ({err})") from None


_ZSTD_DECOMPRESSOR = zstandard.ZstdDecompressor()


def _ungroup(sample: dict, name: str, data: bytes, out: np.ndarray) -> None:
    """Undo `stored_array`'s grouping of the payload bytes of `data` (a decompressed member) into the
    flat array `out`: for little-endian int16, the high bytes shifted onto the low ones, which is faster
    than a strided copy; for other types and byte orders, the bytes put back in place."""
    header = _npy_header_length(data)
    grouped = np.frombuffer(data, dtype=np.uint8, offset=header)
    if grouped.size != out.nbytes:
        raise damaged(sample, f"{name} holds {grouped.size} bytes of data, expected {out.nbytes}")
    if out.itemsize == 1:
        out.view(np.uint8)[:] = grouped
    elif out.itemsize == 2 and out.dtype.str[0] == "<":  # the first group holds the low bytes
        low, high = grouped[:out.size], grouped[out.size:]
        np.left_shift(high.astype(out.dtype), 8, out=out)
        out |= low.astype(out.dtype)
    else:
        out.view(np.uint8)[:] = grouped.reshape(out.itemsize, -1).T.ravel()


def _npy_header_length(npy: bytes) -> int:
    return 10 + int.from_bytes(npy[8:10], "little")


def _parse_header(header: bytes) -> tuple[np.dtype, tuple]:
    stream = io.BytesIO(header)
    np.lib.format.read_magic(stream)
    shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    if fortran_order:
        raise ValueError("Fortran-ordered arrays are not written by the build")
    if dtype.hasobject:  # its payload would be taken for pointers
        raise ValueError(f"arrays of {dtype} are not written by the build")
    return dtype, shape


_LAYOUT_CACHE: dict[bytes, tuple[np.dtype, tuple]] = {}


def _npy_layout(sample: dict, name: str, data: bytes) -> tuple[np.dtype, tuple]:
    """dtype and shape of a `.npy` blob's header, parsed once per distinct header; a reader error when damaged."""
    key = bytes(data[:_npy_header_length(data)])
    if key not in _LAYOUT_CACHE:
        try:
            _LAYOUT_CACHE[key] = _parse_header(key)
        except ValueError as err:
            raise damaged(sample, f"{name} unreadable ({err})") from None
    return _LAYOUT_CACHE[key]


def member_checksums(sample: dict) -> dict[str, int]:
    """CRC-32 of every member of a sample but its checksums; any shard kind, any members.

    CRC-32 catches the random damage of disks and transfers; the manifest's sha256 per shard
    covers the rest. ISA-L computes the same CRC-32 as zlib 22× faster (3 µs against 67 µs
    for a 147 kB chunk on the machine of docs/benchmarks.md): zlib's took a fifth of a
    loader worker's time.
    """
    return {name: isal_zlib.crc32(value) for name, value in sorted(sample.items())
            if not name.startswith("__") and name != CHECKSUMS}


def with_checksums(sample: dict) -> dict:
    return {**sample, CHECKSUMS: json.dumps(member_checksums(sample)).encode()}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# -- decoding ---------------------------------------------------------------------------------------
def damaged(sample: dict, problem: str) -> ShardSetError:
    """A reader error names the shard and the sample."""
    return ShardSetError(f"{sample.get('__url__', 'unknown shard')}: sample {sample.get('__key__')}: {problem}; "
                         f"the shard is damaged: {REBUILD}")


def require(samples: list[dict], *fields: str) -> None:
    """A sample cut short (zeroed blocks end a tar early) lacks fields: name it rather than a KeyError."""
    for sample in samples:
        missing = [name for name in fields if name not in sample]
        if missing:
            raise damaged(sample, f"no {' and no '.join(missing)}")


def check_sample(sample: dict) -> None:
    """Every member's CRC-32 against the sample's own `crc32.json`."""
    if CHECKSUMS not in sample:
        members = sorted(name for name in sample if not name.startswith("__"))
        raise damaged(sample, f"no {CHECKSUMS} (cut short? it holds only {', '.join(members) or 'nothing'})")
    try:
        stored = json.loads(sample[CHECKSUMS])
    except ValueError:
        raise damaged(sample, f"{CHECKSUMS} unreadable") from None
    if stored != (computed := member_checksums(sample)):
        missing = [name for name in stored if name not in sample]
        if missing:
            raise damaged(sample, f"no {' and no '.join(missing)}")
        changed = [name for name in stored if stored[name] != computed[name]] or sorted(set(computed) - set(stored))
        raise damaged(sample, f"{', '.join(changed)} does not match its CRC-32 (changed in place)")


def copy_payloads(samples: list[dict], name: str, out: np.ndarray, shape: tuple[int, ...]) -> None:
    """Copy each sample's `.npy` payload of `shape` into row n of `out`, a new contiguous array; check the headers.

    No np.load and no array per sample: a batch is one preallocated array and a copy (or,
    for a compressed member, a decompression and a shift) each.
    """
    flat = out.reshape(len(samples), -1)  # a view, as `out` is contiguous
    for n, sample in enumerate(samples):
        if name in sample:
            data = sample[name]
            _check_layout(sample, name, data, out.dtype, shape)
            offset = _npy_header_length(data)
            if len(data) - offset != flat[n].nbytes:
                raise damaged(sample, f"{name} holds {len(data) - offset} bytes of data, expected {flat[n].nbytes}")
            flat[n] = np.frombuffer(data, dtype=out.dtype, offset=offset)
        else:
            _fill(sample, name, flat[n], shape)


# -- the manifest ---------------------------------------------------------------------------------
_MANIFEST_FIELDS = ("folds", "shards", "failed")
_SHARD_FIELDS = ("name", "fold", "label", "samples", "bytes")
_SHARD_TEXT = {"name": (re.compile(r"fold[0-9]+-(pos|neg|val)-[0-9]{6,}\.tar"),
                        "shard's name (foldK-LABEL-NNNNNN.tar)"),
               "sha256": (re.compile(r"[0-9a-f]{64}"), "sha256 (64 hex digits)")}
"""The manifest's text that reaches a file name, a URL or a `pipe:` command's shell line, as the build writes it:
anything else (a `;`, a `/`) would have the manifest's sender choose a command to run or a file to write."""


def check_manifest(manifest, location: str, task: str, reads: dict[str, dict]) -> None:
    """Refuse a manifest this version cannot read for `task`: format, task, the sample layout the
    reader relies on (`reads`: manifest section -> the fields it must have, as a sample module
    declares them), and every field the readers use."""
    if not isinstance(manifest, dict):
        raise ShardSetError(f"{location}: not a shard manifest (a JSON {type(manifest).__name__}); rebuild the shards")
    if manifest.get("format") != FORMAT or manifest.get("format_version") not in READABLE_VERSIONS:
        raise ShardSetError(f"{location}: format {manifest.get('format')} v{manifest.get('format_version')}, "
                            f"this version reads {FORMAT} v{' and v'.join(map(str, READABLE_VERSIONS))}; "
                            "rebuild the shards (or use the luna_dist that built them)")
    if manifest.get("task") != task:
        raise ShardSetError(f"{location}: shards built with --task {manifest.get('task')}, this run needs --task "
                            f"{task} shards (`python -m luna_dist.shard --task {task} --data DIR --out OUT`)")
    for section, wanted in reads.items():
        found = manifest.get(section, {})
        if any(found.get(key) != value for key, value in wanted.items()):
            shown = {key: found.get(key) for key in wanted}
            raise ShardSetError(f"{location}: samples are {shown}, this version reads {wanted}; rebuild the shards")
    missing = [name for name in _MANIFEST_FIELDS if name not in manifest]
    if missing:
        raise ShardSetError(f"{location}: no {', '.join(missing)} in the manifest (damaged?); rebuild the shards")
    for n, shard in enumerate(manifest["shards"]):
        missing = [name for name in _SHARD_FIELDS if not isinstance(shard, dict) or name not in shard]
        if missing:
            raise ShardSetError(f"{location}: shard entry {n} has no {', '.join(missing)} (damaged?); "
                                "rebuild the shards")
        for key, (pattern, meaning) in _SHARD_TEXT.items():
            value = shard.get(key)
            if value is not None and not (isinstance(value, str) and pattern.fullmatch(value)):
                shown = ascii(value)[:80]
                raise ShardSetError(f"{location}: shard entry {n} has a {key} that is no {meaning}: {shown}; "
                                    "it is not used (a damaged manifest, or one not written by a build)")
