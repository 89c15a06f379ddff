"""The build's tar writer: the bytes webdataset's TarWriter writes, never a half-written file under its name."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest
import webdataset as wds

from luna_dist.shard_write import TarShard

SAMPLES = [
    {"__key__": "1_3_6_1_4_1_14519_5_2_1_6279_6001_105756658031515062000744821260_1234",
     "chunk.npy.zst": bytes(range(256)) * 300, "cls": b"1", "json": b'{"a": 1}', "crc32.json": b"{}"},
    {"__key__": "short", "empty": b"", "exact": b"x" * 512, "__url__": "not a member"},
    {"__key__": "k" * 120, "long.npy": b"name over ustar's 100 bytes: a pax header"},
    {"__key__": "caf\u00e9", "json": "non-ASCII names take a pax header too".encode()},
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


def test_a_shard_that_fails_leaves_nothing_under_its_name(tmp_path):
    with pytest.raises(KeyError):
        with TarShard(tmp_path / "x.tar") as tar:
            tar.write(SAMPLES[0])
            tar.write({"no key": b""})
    assert list(tmp_path.iterdir()) == []
