"""The streaming pipelines: decoding, exact-once validation split, equal training steps, spawn workers."""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from luna_dist.ct import CHUNK_SHAPE
from luna_dist.stream import (
    ShardSetError,
    TrainStreamConfig,
    batched,
    batched_slices,
    collate,
    open_shard_set,
    train_loader,
    train_pipeline,
    val_loader,
    val_pipeline,
)


def _sample(key: str, label: int, value: int) -> dict:
    buffer = io.BytesIO()
    np.save(buffer, np.full(CHUNK_SHAPE, value, dtype=np.int16))
    return {"__key__": key, "chunk.npy": buffer.getvalue(), "cls": str(label).encode(), "json": b"{}"}


def _tar_samples(path) -> dict[str, tuple[np.ndarray, int]]:
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            data = tar.extractfile(member).read()
            entry = samples.setdefault(key, [None, None])
            if ext == "chunk.npy":
                entry[0] = np.load(io.BytesIO(data))
            elif ext == "cls":
                entry[1] = int(data)
    return samples


def test_collate_copies_payload_and_labels():
    samples = [_sample(f"k{i}", i % 2, i * 7 - 20) for i in range(5)]
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


@pytest.mark.parametrize("count,batch,partial_last,sizes", [
    (10, 4, True, [4, 4, 2]),
    (10, 4, False, [4, 4]),
    (8, 4, True, [4, 4]),
    (0, 4, True, []),
])
def test_batched_stage_on_a_plain_list(count, batch, partial_last, sizes):
    samples = [_sample(f"k{i}", 0, i) for i in range(count)]
    batches = list(batched(iter(samples), batch, partial_last))
    assert [len(labels) for _, labels in batches] == sizes


def test_collate_matches_np_load_on_real_shards(shard_dir):
    shards = open_shard_set(shard_dir)
    path = shards.shards([9], "pos")[0]
    expected = _tar_samples(path)
    samples = list(wds.DataPipeline(wds.SimpleShardList([path]), wds.tarfile_to_samples()))
    chunks, labels = collate(samples)
    for n, sample in enumerate(samples):
        chunk, label = expected[sample["__key__"]]
        assert np.array_equal(chunks[n, 0].numpy(), chunk)
        assert labels[n].item() == label == 1


@pytest.mark.slow
@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (2, 2), (3, 1), (5, 2)])
def test_validation_split_scores_each_sample_once(shard_dir, monkeypatch, world, workers):
    shards = open_shard_set(shard_dir)
    folds = [8, 9]
    # Samples are told apart by content and label; chunks entirely outside a CT are all
    # air and alike, so compare multisets: same elements, same multiplicities.
    expected = Counter()
    for path in shards.shards(folds, "pos") + shards.shards(folds, "neg"):
        expected.update((chunk.tobytes(), label) for chunk, label in _tar_samples(path).values())
    seen = Counter()
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        for chunks, labels in val_loader(shards, folds, batch_size=16, num_workers=workers):
            seen.update((chunk[0].numpy().tobytes(), int(label)) for chunk, label in zip(chunks, labels))
    assert sum(seen.values()) == shards.count(folds, "pos") + shards.count(folds, "neg")
    assert seen == expected


@pytest.mark.parametrize("steps,workers", [(5, 0), (5, 1), (5, 2), (7, 3), (2, 3)])
def test_train_loader_gives_exactly_the_steps_asked_whatever_the_workers(shard_dir, steps, workers):
    """Steps rounded up to a multiple of the workers let a node with more cores run more steps than
    the others, and DDP hung; every worker count must give the same epoch."""
    shards = open_shard_set(shard_dir)
    config = TrainStreamConfig(tuple(range(9)), batch_size=8, steps=steps, num_workers=workers, neg_per_pos=1,
                               shuffle_buffer=50)
    batches = list(train_loader(shards, config, epoch=0))
    assert len(batches) == steps
    assert all(len(labels) == 8 and chunks.shape == (8, 1, *CHUNK_SHAPE) for chunks, labels in batches)


@pytest.mark.parametrize("steps", [0, 1, 7, 10])
@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_worker_shares_add_up_to_the_steps(monkeypatch, steps, workers):
    from types import SimpleNamespace

    from luna_dist.stream import worker_share

    shares = []
    for worker in range(workers):
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=workers))
        shares.append(len(list(worker_share(iter(range(100)), steps))))
    assert sum(shares) == steps and max(shares) - min(shares) <= 1


@pytest.mark.slow
@pytest.mark.parametrize("neg_per_pos,expected_pos_fraction", [(1, 0.5), (3, 0.25)])
def test_balanced_mixing(shard_dir, neg_per_pos, expected_pos_fraction):
    shards = open_shard_set(shard_dir)
    config = TrainStreamConfig(tuple(range(9)), batch_size=50, steps=24, num_workers=0, neg_per_pos=neg_per_pos,
                               shuffle_buffer=50)
    labels = torch.cat([labels for _, labels in train_loader(shards, config, epoch=0)])
    assert abs(labels.float().mean().item() - expected_pos_fraction) < 0.06


def test_natural_frequencies_without_balancing(shard_dir):
    shards = open_shard_set(shard_dir)
    folds = tuple(range(9))
    natural = shards.count(folds, "pos") / (shards.count(folds, "pos") + shards.count(folds, "neg"))
    config = TrainStreamConfig(folds, batch_size=50, steps=30, num_workers=0, neg_per_pos=0, shuffle_buffer=50)
    labels = torch.cat([labels for _, labels in train_loader(shards, config, epoch=0)])
    assert labels.float().mean().item() < natural + 0.03


@pytest.mark.slow
def test_pipelines_pickle_and_run_in_spawn_workers(shard_dir):
    shards = open_shard_set(shard_dir)
    config = TrainStreamConfig(tuple(range(9)), batch_size=4, steps=4, num_workers=2, neg_per_pos=1,
                               shuffle_buffer=20)
    dataset = train_pipeline(shards, config, epoch=0)
    pickle.dumps(dataset)  # what spawn does to everything handed to a worker
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    assert len(list(loader)) == 4

    validation = val_pipeline(shards, [9], batch_size=64)
    pickle.dumps(validation)
    loader = wds.WebLoader(validation, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    total = sum(len(labels) for _, labels in loader)
    assert total == shards.count([9], "pos") + shards.count([9], "neg")


def test_training_needs_both_classes(shard_dir):
    shards = open_shard_set(shard_dir)
    config = TrainStreamConfig((42,), batch_size=4, steps=1, num_workers=0, neg_per_pos=1)
    with pytest.raises(ShardSetError, match="both classes"):
        train_loader(shards, config, epoch=0)


# --- damaged shard sets: every error names the file, and the shard and sample -----------------------


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


def _damaged_copy(shard_dir, tmp_path, damage, fold: int = 9) -> tuple:
    """A copy of the shard set whose first negative shard of `fold` `damage(file, members)` changes in place."""
    out = Path(shutil.copytree(shard_dir, tmp_path / "shards"))
    shards = open_shard_set(out)
    victim = Path(shards.shards([fold], "neg")[0])
    with tarfile.open(victim) as tar:
        members = tar.getmembers()
    with open(victim, "r+b") as file:
        key = damage(file, members)
    return shards, victim, key


def _zero_magic(file, members) -> str:
    member = next(m for m in members[30:] if m.name.endswith(".chunk.npy"))
    file.seek(member.offset_data)
    file.write(b"\0" * 6)  # np.load then takes it for a pickle
    return member.name.split(".")[0]


def _zero_middle(file, members) -> str:
    member = next(m for m in members[len(members) // 2:] if m.name.endswith(".cls"))
    file.seek(member.offset)
    file.write(b"\0" * 2048)  # tar readers stop at zero blocks: this sample ends without its cls
    return member.name.split(".")[0]


@pytest.mark.parametrize("damage, problem", [(_zero_magic, "chunk.npy does not match its CRC-32"), (_zero_middle, "no crc32.json (cut short? it holds only chunk.npy)")])
def test_damaged_shard_names_the_shard_and_the_sample(shard_dir, tmp_path, damage, problem):
    shards, victim, key = _damaged_copy(shard_dir, tmp_path, damage)
    with pytest.raises(ShardSetError) as err:
        list(val_pipeline(shards, [9], batch_size=16))
    assert str(err.value).startswith(f"{victim}: sample {key}: {problem}")
    assert "rebuild" in str(err.value)


@pytest.mark.parametrize("slab, problem", [
    ({"json": b"{}", "ct.npy": b"\0" * 200, "mask.npy": b"\0" * 200}, "unreadable ("),
    ({"json": b"{}", "ct.npy": b"\0" * 200}, "no mask.npy"),
])
def test_damaged_segmentation_slab_names_the_shard_and_the_slab(slab, problem):
    with pytest.raises(ShardSetError) as err:
        list(batched_slices(iter([{"__url__": "fold9-val-000000.tar", "__key__": "uid_3", **slab}]), batch_size=4))
    assert str(err.value).startswith(f"fold9-val-000000.tar: sample uid_3: {problem}")


def _random_header(file, members) -> str:
    """512 random bytes over a tar header in mid-archive: Python's tarfile takes it for the end of the archive."""
    member = members[len(members) // 2]
    file.seek(member.offset)
    file.write(np.random.default_rng(0).bytes(512))
    return member.name.split(".")[0]


def _random_payload(file, members) -> str:
    """8 KB of random bytes inside a chunk: every sample still reads, one holds garbage."""
    member = next(m for m in members[len(members) // 2:] if m.name.endswith(".chunk.npy"))
    file.seek(member.offset_data + 1024)
    file.write(np.random.default_rng(0).bytes(8192))
    return member.name.split(".")[0]


@pytest.mark.parametrize("damage", [_random_header, _random_payload])
def test_damage_in_place_keeps_the_size_and_stops_validation(shard_dir, tmp_path, damage):
    shards, victim, key = _damaged_copy(shard_dir, tmp_path, damage)
    entry = next(s for s in shards.manifest["shards"] if s["name"] == victim.name)
    assert victim.stat().st_size == entry["bytes"]  # the manifest's size check still passes
    with pytest.raises(ShardSetError) as err:
        list(val_pipeline(shards, [9], batch_size=16))
    if damage is _random_header:
        assert re.match(rf"{re.escape(str(victim))}: \d+ samples read, its manifest entry says {entry['samples']}",
                        str(err.value)), err.value
    else:
        assert str(err.value).startswith(f"{victim}: sample {key}: chunk.npy does not match its CRC-32")


@pytest.mark.parametrize("damage", [_random_header, _random_payload])
def test_damaged_shard_stops_training_naming_it(shard_dir, tmp_path, damage):
    """The training stream resamples shards: it must meet the damaged one and fail, not train on it."""
    shards, victim, _ = _damaged_copy(shard_dir, tmp_path, damage)
    config = TrainStreamConfig(folds=(9,), batch_size=16, steps=200, num_workers=0, neg_per_pos=0, shuffle_buffer=10)
    with pytest.raises(ShardSetError) as err:
        list(train_pipeline(shards, config, epoch=0))
    assert str(err.value).startswith(str(victim))


@pytest.mark.slow
def test_verify_names_the_shard_whose_sha256_differs(shard_dir, tmp_path):
    assert open_shard_set(shard_dir).verify()[0] == []
    shards, victim, _ = _damaged_copy(shard_dir, tmp_path, _random_payload)
    problems, seconds = shards.verify()
    assert len(problems) == 1 and problems[0].startswith(f"{victim}: {victim.stat().st_size} bytes streamed with sha256 ")
    assert "the manifest says" in problems[0] and seconds > 0


# -- shard sets behind a URL ------------------------------------------------------------------------
def _serve_copy(shard_dir, www) -> Path:
    shutil.copytree(shard_dir, www / "shards")
    return www / "shards"


@pytest.mark.slow
def test_shards_over_http_read_like_the_folder(shard_dir, served, tmp_path):
    www, url = served
    _serve_copy(shard_dir, www)
    local, remote = open_shard_set(shard_dir), open_shard_set(f"{url}/shards/")
    assert remote.manifest == local.manifest
    assert remote.shards([9], "neg") == [f"{url}/shards/{Path(p).name}" for p in local.shards([9], "neg")]
    keys = {}
    for name, shards in (("local", local), ("http", remote)):
        keys[name] = [key for batch in val_pipeline(shards, [9], batch_size=16, batcher=_keys) for key in batch]
    assert keys["http"] == keys["local"] and len(keys["local"]) == local.count([9], "pos") + local.count([9], "neg")
    assert remote.verify()[0] == []


def _keys(samples, batch_size: int):
    """A batcher that keeps only the sample keys."""
    batch = []
    for sample in samples:
        batch.append(sample["__key__"])
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


@pytest.mark.slow
def test_bytes_served_must_match_the_manifest(shard_dir, served):
    """A byte changed after the tar's end: no sample differs, but the sha256 of the stream does."""
    www, url = served
    copy = _serve_copy(shard_dir, www)
    victim = sorted(copy.glob("fold9-neg-*.tar"))[0]
    with open(victim, "r+b") as file:
        file.seek(-1, 2)
        file.write(b"\1")
    shards = open_shard_set(f"{url}/shards")
    with pytest.raises(ShardSetError) as err:
        list(val_pipeline(shards, [9], batch_size=16))
    assert str(err.value).startswith(f"{url}/shards/{victim.name}: {victim.stat().st_size} bytes streamed with sha256")
    problems = shards.verify()[0]
    assert len(problems) == 1 and problems[0].startswith(f"{url}/shards/{victim.name}: ")


def test_cache_keeps_checked_copies_and_replaces_a_damaged_one(shard_dir, served, tmp_path):
    www, url = served
    _serve_copy(shard_dir, www)
    cache = tmp_path / "cache"
    shards = open_shard_set(f"{url}/shards", cache_dir=cache)
    first = list(val_pipeline(shards, [9], batch_size=16, batcher=_keys))
    copies = sorted(cache.iterdir())
    assert len(copies) == len(shards.shards([9], "pos") + shards.shards([9], "neg"))
    damaged = copies[0]
    damaged.write_bytes(b"\0" * damaged.stat().st_size)  # same size, other bytes
    assert list(val_pipeline(shards, [9], batch_size=16, batcher=_keys)) == first  # fetched again, not used
    source = shards.source
    location = next(loc for loc in source.entries if damaged.name.endswith(loc.rsplit("/", 1)[-1]))
    assert damaged.read_bytes()[:512] != b"\0" * 512
    assert source.entries[location][2] == sha256_of(damaged)


def sha256_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_frozen_server_fails_within_the_read_timeout_naming_the_url(tiny_shards, stalling_server):
    """curl had a connect timeout only: a server that accepts and then sends nothing hung the reader for ever."""
    import time

    www, url, stall = stalling_server
    shutil.copytree(tiny_shards, www / "shards")
    stall.add("manifest.json")
    started = time.monotonic()
    with pytest.raises(ShardSetError) as err:
        open_shard_set(f"{url}/shards", read_timeout=1)
    assert str(err.value) == f"{url}/shards/manifest.json: nothing arrived for 1 s (a stalled server or network; " \
                             "--read-timeout sets this bound)"
    stall.clear()
    stall.add(".tar")
    shards = open_shard_set(f"{url}/shards", read_timeout=1)
    with pytest.raises(ShardSetError) as err:
        list(val_pipeline(shards, [3], batch_size=16))
    assert time.monotonic() - started < 20
    first = sorted(shards.shards([3], "neg") + shards.shards([3], "pos"))[0]
    assert str(err.value).startswith(f"{first}: reading it from its server failed after 0 bytes: nothing arrived for "
                                     "1 s"), str(err.value)
    assert "not of the shard" in str(err.value) and "damaged" not in str(err.value)


def test_a_dead_server_is_not_called_a_damaged_shard(tiny_shards, stalling_server, tmp_path):
    www, url, _ = stalling_server
    shutil.copytree(tiny_shards, www / "shards")
    shards = open_shard_set(f"{url}/shards", read_timeout=2)
    shutil.rmtree(www / "shards")  # the manifest was read; now the server has nothing (404)
    with pytest.raises(ShardSetError) as err:
        list(val_pipeline(shards, [3], batch_size=16))
    assert "reading it from its server failed after 0 bytes: the server answers with an HTTP error" in str(err.value)
    assert "damaged" not in str(err.value) and "rebuild" not in str(err.value)
    with pytest.raises(ShardSetError) as err:
        open_shard_set(f"{url}/shards")
    assert str(err.value).startswith(f"{url}/shards/manifest.json not found: {url}/shards must be where the files of a "
                                     "finished shard build are served")
    assert "luna_dist.shard" not in str(err.value)  # no hint to build shards at a URL


def test_pipe_shard_set_runs_a_command_per_file(shard_dir):
    local, piped = open_shard_set(shard_dir), open_shard_set(f"pipe:cat {shard_dir}/{{name}}")
    assert piped.manifest == local.manifest
    keys = [[key for batch in val_pipeline(shards, [9], batch_size=16, batcher=_keys) for key in batch]
            for shards in (local, piped)]
    assert keys[0] == keys[1]
    with pytest.raises(ShardSetError, match="needs {name}"):
        open_shard_set(f"pipe:cat {shard_dir}/manifest.json")
