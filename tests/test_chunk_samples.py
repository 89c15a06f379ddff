"""Classification samples: decoding a shard's chunks into batches, checked against np.load."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import webdataset as wds
from helpers import chunk_sample, tar_samples
from helpers import open_cls as open_shard_set

from luna_dist.data.batches import collate
from luna_dist.imaging.chunks import CHUNK_SHAPE
from luna_dist.shards.format import ShardSetError


def test_collate_copies_payload_and_labels():
    samples = [chunk_sample(f"k{i}", i % 2, i * 7 - 20) for i in range(5)]
    chunks, labels = collate(samples)
    assert chunks.shape == (5, 1, *CHUNK_SHAPE) and chunks.dtype == torch.int16
    assert labels.tolist() == [0, 1, 0, 1, 0]
    for i in range(5):
        assert torch.all(chunks[i] == i * 7 - 20)


def test_collate_rejects_wrong_chunk_shape():
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((16, 48, 48), dtype=np.int16))
    with pytest.raises(ShardSetError, match="bad-sample"):
        collate([{"__key__": "bad-sample", "chunk.npy": buffer.getvalue(), "cls": b"0"}])


def test_collate_matches_np_load_on_real_shards(shard_dir):
    shards = open_shard_set(shard_dir)
    path = shards.shards([9], "pos")[0]
    expected = tar_samples(path)
    samples = list(wds.DataPipeline(wds.SimpleShardList([path]), wds.tarfile_to_samples()))
    chunks, labels = collate(samples)
    for n, sample in enumerate(samples):
        chunk, label = expected[sample["__key__"]]
        assert np.array_equal(chunks[n, 0].numpy(), chunk)
        assert labels[n].item() == label == 1
