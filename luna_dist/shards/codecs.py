"""A sample's arrays as stored: `.npy`, plain or compressed (zstd, lz4), and decoded straight into a batch."""

from __future__ import annotations

import functools
import io
import math

import numpy as np
import zstandard

from luna_dist.shards.format import ShardSetError, damaged


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
