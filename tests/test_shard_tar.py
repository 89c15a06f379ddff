"""Shards' tar files: the bytes webdataset's TarWriter writes, never half-written, read back as webdataset reads them."""

from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pytest
import webdataset as wds

from luna_dist.shards.tar import TarReadError, TarShard, read_samples

SAMPLES = [
    {"__key__": "1_3_6_1_4_1_14519_5_2_1_6279_6001_105756658031515062000744821260_1234",
     "chunk.npy.zst": bytes(range(256)) * 300, "cls": b"1", "json": b'{"a": 1}', "crc32.json": b"{}"},
    {"__key__": "short", "empty": b"", "exact": b"x" * 512, "__url__": "not a member"},
    {"__key__": "k" * 120, "long.npy": b"name over ustar's 100 bytes: a pax header"},
    {"__key__": "caf\u00e9", "json": b"non-ASCII names take a pax header too"},
]


def tar_writer_bytes(samples: list[dict]) -> bytes:
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write({k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"})
    return buffer.getvalue()


@pytest.mark.parametrize("samples", [SAMPLES, SAMPLES[:1], []], ids=["every-kind", "one", "none"])
def test_a_shard_holds_exactly_the_bytes_webdatasets_tar_writer_writes(tmp_path, samples):
    with TarShard(tmp_path / "x.tar") as tar:
        for sample in samples:
            tar.write(sample)
    written = (tmp_path / "x.tar").read_bytes()
    assert written == tar_writer_bytes(samples)
    assert tar.size == len(written) and tar.sha256.hexdigest() == hashlib.sha256(written).hexdigest()
    assert tar.samples == len(samples)
    with tarfile.open(tmp_path / "x.tar") as archive:
        names = archive.getnames()
    assert names == [f"{s['__key__']}.{name}" for s in samples for name in sorted(s) if not name.startswith("_")]


def test_every_length_of_archive_ends_padded_as_tarfile_pads_it(tmp_path):
    """An archive ends with two zero blocks and is padded to whole records of 20 blocks, whatever its length."""
    for blocks in range(21):
        sample = {"__key__": "k", "a": b"x" * (512 * blocks)}
        with TarShard(tmp_path / "x.tar") as tar:
            tar.write(sample)
        assert (tmp_path / "x.tar").read_bytes() == tar_writer_bytes([sample]), blocks


def test_a_shard_that_fails_leaves_nothing_under_its_name(tmp_path):
    with pytest.raises(KeyError):
        with TarShard(tmp_path / "x.tar") as tar:
            tar.write(SAMPLES[0])
            tar.write({"no key": b""})
    assert list(tmp_path.iterdir()) == []


def test_a_shard_reads_back_as_webdataset_reads_it(tmp_path):
    with TarShard(tmp_path / "x.tar") as tar:
        for sample in SAMPLES:
            tar.write(sample)
    with open(tmp_path / "x.tar", "rb") as stream:
        ours = list(read_samples(stream, str(tmp_path / "x.tar")))
    theirs = list(wds.DataPipeline(wds.SimpleShardList([str(tmp_path / "x.tar")]), wds.tarfile_to_samples()))
    assert [{k: v for k, v in s.items() if k != "__local_path__"} for s in theirs] == ours
    assert [s["__key__"] for s in ours] == [s["__key__"] for s in SAMPLES] and ours[0]["cls"] == b"1"


def damaged(tar: bytes, offset: int, data: bytes) -> io.BytesIO:
    return io.BytesIO(tar[:offset] + data + tar[offset + len(data):])


def test_a_damaged_tar_is_named_where_it_is_damaged():
    tar = tar_writer_bytes(SAMPLES[:2])
    second_header = 512 + 512 * -(-len(SAMPLES[0]["chunk.npy.zst"]) // 512)  # after the first member
    cases = {
        "the tar header at byte 0 has a wrong checksum": damaged(tar, 0, b"X"),
        f"the tar header at byte {second_header} is not a tar header":
            damaged(tar, second_header, np.random.default_rng(0).bytes(512)),
        "ends after 1000 of its 76800 bytes": io.BytesIO(tar[:1512]),
        "the tar ends inside the header at byte 0": io.BytesIO(tar[:100]),
    }
    for problem, stream in cases.items():
        with pytest.raises(TarReadError, match=problem):
            list(read_samples(stream, "x.tar"))
    link = tarfile.TarInfo("k.link")
    link.type = tarfile.SYMTYPE
    with pytest.raises(TarReadError, match=r"the member k.link at byte 0 is of tar type b'2', not a file"):
        list(read_samples(io.BytesIO(link.tobuf()), "x.tar"))
    twice = tar_writer_bytes([{"__key__": "k", "a": b"1"}])[:1024] * 2
    with pytest.raises(TarReadError, match="sample k holds a twice"):
        list(read_samples(io.BytesIO(twice), "x.tar"))


def test_zero_blocks_end_a_tar_as_they_end_tarfiles():
    tar = tar_writer_bytes(SAMPLES[:2])
    cut = 512 + 512 * -(-len(SAMPLES[0]["chunk.npy.zst"]) // 512)
    samples = list(read_samples(io.BytesIO(tar[:cut] + bytes(1024) + tar[cut:]), "x.tar"))
    assert [sorted(s) for s in samples] == [["__key__", "__url__", "chunk.npy.zst"]]


def test_a_member_claiming_more_than_the_shard_holds_is_refused_before_it_is_read():
    """A header's size field (up to 8 GiB) was allocated whole before the read found the bytes missing."""
    import tracemalloc

    tar = tar_writer_bytes(SAMPLES[:2])
    header = bytearray(tar[:512])
    header[124:136], header[148:156] = b"77777777777\0", b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    tracemalloc.start()
    try:
        with pytest.raises(TarReadError, match=f"the member at byte 0 claims 8,589,934,591 bytes, more than the "
                                               f"{len(tar) - 512:,} left in the shard"):
            list(read_samples(io.BufferedReader(io.BytesIO(bytes(header) + tar[512:])), "x.tar", len(tar)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
