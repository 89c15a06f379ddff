"""The shard format's checks: a manifest without a field, a damaged shard or sample, the sha256 check; every
error names the file, and the shard and sample, and says to rebuild."""

from __future__ import annotations

import json
import re
import tracemalloc
import zlib

import numpy as np
import pytest
import zstandard
from helpers import CLS_BATCHES, POS_NEG, damaged_copy, random_header, random_payload, zero_magic, zero_middle
from helpers import open_cls as open_shard_set

from luna_dist.data.batches import batched_slices
from luna_dist.data.streams import val_pipeline
from luna_dist.shards import codecs
from luna_dist.shards.build import build
from luna_dist.shards.format import MANIFEST, ShardSetError, check_sample, member_checksums, with_checksums
from luna_dist.shards.options import BuildOptions


def test_missing_manifest_names_the_command_to_finish(tmp_path):
    with pytest.raises(ShardSetError) as err:
        open_shard_set(tmp_path)
    assert f"--out {tmp_path}`" in str(err.value)


@pytest.mark.parametrize("damage, problem", [
    (lambda m: m.pop("shards"), "no shards in the manifest"),
    (lambda m: m["shards"][3].pop("bytes"), "shard entry 3 has no bytes"),
])
def test_manifest_without_a_field_is_named(shard_dir, tmp_path, damage, problem):
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    damage(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardSetError) as err:
        open_shard_set(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'manifest.json'}: {problem}")


@pytest.mark.parametrize("damage, problem", [(zero_magic, "chunk.npy.b2 does not match its CRC-32"), (zero_middle, "no crc32.json (cut short? it holds only chunk.npy.b2)")])
def test_damaged_shard_names_the_shard_and_thechunk_sample(shard_dir, tmp_path, damage, problem):
    shards, victim, key = damaged_copy(shard_dir, tmp_path, damage)
    with pytest.raises(ShardSetError) as err:
        list(val_pipeline(shards, [9], 16, POS_NEG, CLS_BATCHES))
    assert str(err.value).startswith(f"{victim}: sample {key}: {problem}")
    assert "rebuild" in str(err.value)


@pytest.mark.parametrize("slab, problem", [
    ({"json": b"{}", "ct.npy": b"\0" * 200, "mask.npy": b"\0" * 200}, "ct.npy unreadable ("),
    ({"json": b"{}", "ct.npy": codecs.stored_array("ct.npy", np.zeros((1, 4, 4), dtype=np.int16), "none")[1]}, "no mask.npy"),
])
def test_damaged_segmentation_slab_names_the_shard_and_the_slab(slab, problem):
    with pytest.raises(ShardSetError) as err:
        list(batched_slices(iter([{"__url__": "fold9-val-000000.tar", "__key__": "uid_3", **slab}]), batch_size=4))
    assert str(err.value).startswith(f"fold9-val-000000.tar: sample uid_3: {problem}")


@pytest.mark.parametrize("damage", [random_header, random_payload])
def test_damage_in_place_keeps_the_size_and_stops_validation(shard_dir, tmp_path, damage):
    shards, victim, key = damaged_copy(shard_dir, tmp_path, damage)
    entry = next(s for s in shards.manifest["shards"] if s["name"] == victim.name)
    assert victim.stat().st_size == entry["bytes"]  # the manifest's size check still passes
    with pytest.raises(ShardSetError) as err:
        list(val_pipeline(shards, [9], 16, POS_NEG, CLS_BATCHES))
    if damage is random_header:
        assert re.match(rf"{re.escape(str(victim))}: unreadable after \d+ samples \(the tar header at byte \d+ "
                        r"(is not a tar header|has a wrong checksum)\); the shard is damaged", str(err.value)), err.value
    else:
        assert str(err.value).startswith(f"{victim}: sample {key}: chunk.npy.b2 does not match its CRC-32")


@pytest.mark.slow
def test_verify_names_the_shard_whose_sha256_differs(shard_dir, tmp_path):
    assert open_shard_set(shard_dir).verify()[0] == []
    shards, victim, _ = damaged_copy(shard_dir, tmp_path, random_payload)
    problems, seconds = shards.verify()
    assert len(problems) == 1 and problems[0].startswith(f"{victim}: {victim.stat().st_size} bytes streamed with sha256 ")
    assert "the manifest says" in problems[0] and seconds > 0


ARRAYS = [
    np.array([[-32768, -1000, -1], [0, 1000, 32767]], dtype=np.int16),  # every byte pattern that matters
    np.random.default_rng(0).integers(-1000, 1001, size=(32, 48, 48)).astype(np.int16),
    np.packbits(np.random.default_rng(1).random((96, 96)) < 0.1, axis=-1),  # a packed mask, uint8
    np.zeros((0, 5), dtype=np.int16),
    np.array([[-32768, -1000, -1], [0, 1000, 32767]], dtype=">i2"),  # as a big-endian machine writes it
]


@pytest.mark.parametrize("codec", codecs.CODECS)
@pytest.mark.parametrize("array", ARRAYS, ids=["extremes", "chunk", "mask", "empty", "big-endian"])
def test_every_codec_gives_back_the_array_it_stored(codec, array):
    name, stored = codecs.stored_array("x.npy", array, codec)
    assert name == {"none": "x.npy", "zstd": "x.npy.zst", "lz4": "x.npy.b2"}[codec]
    loaded = codecs.load_array({name: stored}, "x.npy")
    assert loaded.dtype == array.dtype and np.array_equal(loaded, array)
    batch = np.empty((2, *array.shape), dtype=array.dtype)
    codecs.copy_payloads([{name: stored}, {"x.npy": codecs.stored_array("x.npy", array, "none")[1]}], "x.npy", batch, array.shape)
    assert np.array_equal(batch[0], array) and np.array_equal(batch[1], array)


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_a_member_of_another_byte_order_than_the_batch_is_refused_by_name(codec):
    name, stored = codecs.stored_array("chunk.npy", ARRAYS[1].astype(">i2"), codec)
    batch = np.empty((1, *ARRAYS[1].shape), dtype=np.int16)
    with pytest.raises(ShardSetError, match=r"sample k: chunk.npy is >i2 \(32, 48, 48\), expected int16 \(32, 48, 48\)"):
        codecs.copy_payloads([{"__key__": "k", name: stored}], "chunk.npy", batch, ARRAYS[1].shape)


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_compression_pays_on_a_chunk_and_the_crc_covers_the_stored_bytes(codec):
    chunk = ARRAYS[1]
    name, stored = codecs.stored_array("chunk.npy", chunk, codec)
    assert len(stored) < 0.8 * chunk.nbytes  # uniform noise of 11 bits in 16 (log2 2001): ~0.69 of raw at best
    sample = with_checksums({"__key__": "k", name: stored, "cls": b"0"})
    check_sample(sample)
    flipped = bytearray(stored)
    flipped[len(stored) // 2] ^= 1
    with pytest.raises(ShardSetError, match=rf"sample k: {re.escape(name)} does not match its CRC-32"):
        check_sample({**sample, name: bytes(flipped)})


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_a_compressed_member_that_cannot_be_read_is_named(codec):
    name, stored = codecs.stored_array("chunk.npy", ARRAYS[1], codec)
    with pytest.raises(ShardSetError, match=rf"sample k: {re.escape(name)} cannot be decompressed"):
        codecs.load_array({"__key__": "k", name: stored[:-10]}, "chunk.npy")
    with pytest.raises(ShardSetError, match=r"sample k: no chunk.npy"):
        codecs.load_array({"__key__": "k", "cls": b"0"}, "chunk.npy")
    wrong = np.empty((1, 16, 48, 48), dtype=np.int16)
    with pytest.raises(ShardSetError, match=r"chunk.npy is int16 \(32, 48, 48\), expected int16 \(16, 48, 48\)"):
        codecs.copy_payloads([{"__key__": "k", name: stored}], "chunk.npy", wrong, (16, 48, 48))


def test_an_lz4_member_whose_header_and_data_disagree_is_named():
    """An lz4 member's `.npy` header lies outside its compressed data: the sizes are compared before decoding."""
    _, header_of_half = codecs.stored_array("chunk.npy", ARRAYS[1][:16], "none")
    name, stored = codecs.stored_array("chunk.npy", ARRAYS[1], "lz4")
    header_length = len(header_of_half) - ARRAYS[1][:16].nbytes
    mixed = header_of_half[:header_length] + stored[header_length:]
    with pytest.raises(ShardSetError, match=r"sample k: chunk.npy.b2 holds 147456 bytes of data, expected 73728"):
        codecs.load_array({"__key__": "k", name: mixed}, "chunk.npy")


@pytest.mark.parametrize("codec", codecs.CODECS)
def test_a_header_declaring_python_objects_is_refused(codec):
    """Its payload's bytes would become pointers (a crash, or worse); np.load refuses it without allow_pickle."""
    name, stored = codecs.stored_array("x.npy", np.arange(4, dtype=np.int64), codec)
    if codec != "zstd":
        stored = codecs.npy_header((4,), object) + stored[len(codecs.npy_header((4,), np.int64)):]
    else:
        stored = _zstd_member(codecs.npy_header((4,), object) + np.arange(4, dtype=np.int64).tobytes(), None)
    with pytest.raises(ShardSetError, match=r"sample k: x.npy unreadable \(arrays of object are not written by the build\)"):
        codecs.load_array({"__key__": "k", name: stored}, "x.npy")


def test_checksums_are_zlibs_crc32_so_earlier_builds_still_verify():
    """The CRC-32 is ISA-L's for speed; the format's is zlib's, which every build so far wrote."""
    rng = np.random.default_rng(0)
    sample = {"__key__": "k", "chunk.npy": rng.integers(0, 256, 147_584, dtype=np.uint8).tobytes(), "cls": b"1",
              "json": b"{}"}
    assert member_checksums(sample) == {name: zlib.crc32(sample[name]) for name in ("chunk.npy", "cls", "json")}


@pytest.mark.slow
def test_a_build_of_the_previous_format_version_is_read_and_a_later_one_refused(tiny_data, tiny_shards, tmp_path):
    """Version 3 wrote zstd and plain members, which this version reads as it did; version 5 is not known yet."""
    out = tmp_path / "v3"
    build(BuildOptions(data=tiny_data, out=out, workers=1, max_samples=10, progress=False, codec="zstd"))
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**manifest, "format_version": 3}))

    def batches(root):
        return [tuple(t.tolist() for t in batch) for batch in val_pipeline(open_shard_set(root), range(10), 16,
                                                                            POS_NEG, CLS_BATCHES)]
    read = batches(out)
    assert len(read) > 1 and read == batches(tiny_shards)  # the same chunks and labels, from zstd and lz4 members
    (out / MANIFEST).write_text(json.dumps({**manifest, "format_version": 5}))
    with pytest.raises(ShardSetError, match=r"format luna_dist-shards v5, this version reads luna_dist-shards "
                                            r"v2 and v3 and v4; rebuild"):
        open_shard_set(out)


def _zstd_member(npy: bytes, declared: int | None) -> bytes:
    """`npy` as one Zstandard frame whose header declares `declared` bytes of content (None: no size), whatever
    it holds: its blocks as the compressor wrote them, its header rewritten (magic, descriptor, window, size)."""
    frame = zstandard.ZstdCompressor(level=codecs.ZSTD_LEVEL, write_content_size=False).compress(npy)
    assert frame[4] == 0  # no content size, not single-segment: a window descriptor follows
    if declared is None:
        return frame
    return frame[:4] + bytes([0xC0]) + frame[5:6] + declared.to_bytes(8, "little") + frame[6:]


def _grouped(array: np.ndarray) -> bytes:
    """What a `zstd` member holds once decompressed: the `.npy` header, then the payload's bytes grouped by place."""
    return codecs.npy_header(array.shape, array.dtype) + array.reshape(-1).view(np.uint8).reshape(-1, array.itemsize).T.tobytes()


@pytest.mark.parametrize("declared", [1 << 40, "true", None], ids=["claims-1-TiB", "64-MB-declared", "no-size"])
def test_a_zstd_member_larger_than_its_sample_is_refused_before_it_is_decompressed(declared):
    """A 64 MB frame of zeros fits in a few kB: its size is checked before memory is allocated, and one without a
    declared size is decompressed into a bounded buffer. Each is one line naming the shard and the sample."""
    npy = _grouped(ARRAYS[1]) + bytes(64 << 20)
    member = _zstd_member(npy, len(npy) if declared == "true" else declared)
    assert len(member) < 200_000
    sample = {"__url__": "fold3-neg-000001.tar", "__key__": "uid_7", "chunk.npy.zst": member}
    batch = np.empty((1, *ARRAYS[1].shape), dtype=np.int16)
    for decode in (lambda: codecs.copy_payloads([sample], "chunk.npy", batch, ARRAYS[1].shape),
                   lambda: codecs.load_array(sample, "chunk.npy")):
        tracemalloc.start()
        try:
            with pytest.raises(ShardSetError) as err:
                decode()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert str(err.value).startswith("fold3-neg-000001.tar: sample uid_7: chunk.npy.zst ")
        assert "the shard is damaged" in str(err.value) and "\n" not in str(err.value)
        assert peak < 1 << 20, peak  # the chunk's own 147 kB, not the frame's 64 MB


def test_a_zstd_member_of_an_honest_frame_without_its_size_is_read():
    npy = _grouped(ARRAYS[1])
    assert np.array_equal(codecs.load_array({"x.npy.zst": _zstd_member(npy, None)}, "x.npy"), ARRAYS[1])


def test_a_zstd_member_whose_frame_declares_another_size_is_named():
    member = _zstd_member(_grouped(ARRAYS[1]), 1 << 40)
    with pytest.raises(ShardSetError, match=r"sample k: chunk.npy.zst declares 1,099,511,627,776 bytes, expected at "
                                            r"most [\d,]+; the shard is damaged"):
        codecs.copy_payloads([{"__key__": "k", "chunk.npy.zst": member}], "chunk.npy", np.empty((1, 32, 48, 48), np.int16),
                      (32, 48, 48))
