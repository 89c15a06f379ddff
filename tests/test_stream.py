"""The streaming pipelines: batching, the exact-once validation split, equal training steps whatever the workers,
class mixing, spawn workers, a damaged shard met by training."""

from __future__ import annotations

import itertools
import os
import pickle
from collections import Counter

import pytest
import torch
import webdataset as wds
from helpers import CLS_BATCHES, POS_NEG, chunk_sample, damaged_copy, random_header, random_payload, tar_samples
from helpers import open_cls as open_shard_set

from luna_dist.data.batches import collate
from luna_dist.data.loaders import train_loader, val_loader
from luna_dist.data.streams import (
    Rank,
    TrainStreamConfig,
    batched,
    mixed,
    pos_neg_streams,
    train_pipeline,
    val_pipeline,
)
from luna_dist.imaging.chunks import CHUNK_SHAPE
from luna_dist.shards.format import ShardSetError


@pytest.mark.parametrize("count,batch,partial_last,sizes", [
    (10, 4, True, [4, 4, 2]),
    (10, 4, False, [4, 4]),
    (8, 4, True, [4, 4]),
    (0, 4, True, []),
])
def test_batched_stage_on_a_plain_list(count, batch, partial_last, sizes):
    samples = [chunk_sample(f"k{i}", 0, i) for i in range(count)]
    batches = list(batched(iter(samples), batch, collate, partial_last))
    assert [len(labels) for _, labels in batches] == sizes


@pytest.mark.slow
@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (2, 2), (3, 1), (5, 2)])
def test_validation_split_scores_each_sample_once(shard_dir, monkeypatch, world, workers):
    shards = open_shard_set(shard_dir)
    folds = [8, 9]
    # Samples are told apart by content and label; chunks entirely outside a CT are all
    # air and alike, so compare multisets: same elements, same multiplicities.
    expected = Counter()
    for path in shards.shards(folds, "pos") + shards.shards(folds, "neg"):
        expected.update((chunk.tobytes(), label) for chunk, label in tar_samples(path).values())
    seen = Counter()
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        for chunks, labels in val_loader(shards, folds, 16, workers, POS_NEG, CLS_BATCHES):
            seen.update((chunk[0].numpy().tobytes(), int(label)) for chunk, label in zip(chunks, labels))
    assert sum(seen.values()) == shards.count(folds, "pos") + shards.count(folds, "neg")
    assert seen == expected


@pytest.mark.parametrize("steps,workers", [(5, 0), (5, 1), (5, 2), (7, 3), (2, 3)])
def test_train_loader_gives_exactly_the_steps_asked_whatever_the_workers(shard_dir, steps, workers):
    """Steps rounded up to a multiple of the workers let a node with more cores run more steps than
    the others, and DDP hung; every worker count must give the same epoch."""
    shards = open_shard_set(shard_dir)
    config = TrainStreamConfig(tuple(range(9)), batch_size=8, steps=steps, num_workers=workers, streams=pos_neg_streams(1),
                               shuffle_buffer=50)
    batches = list(train_loader(shards, config, 0, collate))
    assert len(batches) == steps
    assert all(len(labels) == 8 and chunks.shape == (8, 1, *CHUNK_SHAPE) for chunks, labels in batches)


@pytest.mark.parametrize("steps", [0, 1, 7, 10])
@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_worker_shares_add_up_to_the_steps(monkeypatch, steps, workers):
    from types import SimpleNamespace

    from luna_dist.data.streams import worker_share

    shares = []
    for worker in range(workers):
        info = SimpleNamespace(id=worker, num_workers=workers)
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda info=info: info)
        shares.append(len(list(worker_share(iter(range(100)), steps))))
    assert sum(shares) == steps and max(shares) - min(shares) <= 1


def test_mixed_draws_in_proportion_to_the_weights_reproducibly():
    def draws(weights, seed, rank=None, count=8000):
        sources = [itertools.repeat(name) for name in "abc"]
        return list(itertools.islice(mixed(sources, weights, seed, rank or Rank(0, 1)), count))

    counts = Counter(draws([1.0, 3.0, 0.0], seed=7))
    assert abs(counts["b"] / 8000 - 0.75) < 0.02 and "c" not in counts  # a weight of 0 is never drawn
    assert draws([1.0, 3.0, 0.0], seed=7) == draws([1.0, 3.0, 0.0], seed=7)
    assert draws([1.0, 3.0, 0.0], seed=7) != draws([1.0, 3.0, 0.0], seed=8)
    assert draws([1.0, 3.0, 0.0], seed=7, rank=Rank(0, 2)) != draws([1.0, 3.0, 0.0], seed=7, rank=Rank(1, 2))


def test_mixed_ends_when_a_stream_ends():
    assert sorted(mixed([iter([1, 2]), itertools.repeat(0)], [1.0, 1e-9], 0, Rank(0, 1))) == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("neg_per_pos,expected_pos_fraction", [(1, 0.5), (3, 0.25)])
def test_balanced_mixing(shard_dir, neg_per_pos, expected_pos_fraction):
    shards = open_shard_set(shard_dir)
    config = TrainStreamConfig(tuple(range(9)), batch_size=50, steps=24, num_workers=0, streams=pos_neg_streams(neg_per_pos),
                               shuffle_buffer=50)
    labels = torch.cat([labels for _, labels in train_loader(shards, config, 0, collate)])
    assert abs(labels.float().mean().item() - expected_pos_fraction) < 0.06


def test_natural_frequencies_without_balancing(shard_dir):
    shards = open_shard_set(shard_dir)
    folds = tuple(range(9))
    natural = shards.count(folds, "pos") / (shards.count(folds, "pos") + shards.count(folds, "neg"))
    config = TrainStreamConfig(folds, batch_size=50, steps=30, num_workers=0, streams=pos_neg_streams(0), shuffle_buffer=50)
    labels = torch.cat([labels for _, labels in train_loader(shards, config, 0, collate)])
    assert labels.float().mean().item() < natural + 0.03


@pytest.mark.slow
def test_pipelines_pickle_and_run_in_spawn_workers(shard_dir):
    shards = open_shard_set(shard_dir)
    config = TrainStreamConfig(tuple(range(9)), batch_size=4, steps=4, num_workers=2, streams=pos_neg_streams(1),
                               shuffle_buffer=20)
    dataset = train_pipeline(shards, config, 0, collate)
    pickle.dumps(dataset)  # what spawn does to everything handed to a worker
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    assert len(list(loader)) == 4

    validation = val_pipeline(shards, [9], 64, POS_NEG, CLS_BATCHES)
    pickle.dumps(validation)
    loader = wds.WebLoader(validation, batch_size=None, num_workers=2, multiprocessing_context="spawn")
    total = sum(len(labels) for _, labels in loader)
    assert total == shards.count([9], "pos") + shards.count([9], "neg")


def _parent_pid(samples, batch_size: int):
    """A batcher that reads its worker's samples and tells which process started the worker."""
    yield torch.tensor([sum(1 for _ in samples), os.getppid()]),


def test_workers_are_not_forked_from_the_training_process(shard_dir):
    """The training process runs threads (TensorBoard's writers, tqdm's monitor, the DataLoader's queue
    feeders, C++ threads that call into Python); a fork copies whatever lock one of them holds at that
    instant. Python 3.11.7 and older then deadlock in the child on the interpreter's own lock (CPython
    gh-112275): a CI run's validation worker never started, its rank waited on it for ever and the other
    rank in all_gather. The workers come from a process with no such threads."""
    shards = open_shard_set(shard_dir)
    batches = list(val_loader(shards, [9], 64, 2, POS_NEG, _parent_pid))
    read, parents = torch.stack([batch for batch, in batches]).T.tolist()
    assert sum(read) == shards.count([9], "pos") + shards.count([9], "neg")
    assert os.getpid() not in parents


@pytest.mark.slow
def test_a_rank_trains_on_its_own_stream_in_process_or_in_a_worker(shard_dir, monkeypatch):
    """A worker's rank is the one its pipeline was built for, not what the worker's process finds: one
    started by the fork server has the environment of the moment the server started (here no RANK)."""
    shards = open_shard_set(shard_dir)
    monkeypatch.setenv("WORLD_SIZE", "2")
    streams = {}
    for rank, workers in itertools.product((0, 1), (0, 1)):
        monkeypatch.setenv("RANK", str(rank))
        config = TrainStreamConfig(tuple(range(9)), batch_size=4, steps=3, num_workers=workers,
                                   streams=pos_neg_streams(1), shuffle_buffer=20)
        streams[rank, workers] = torch.cat([chunks for chunks, _ in train_loader(shards, config, 0, collate)])
    assert torch.equal(streams[0, 0], streams[0, 1]) and torch.equal(streams[1, 0], streams[1, 1])
    assert not torch.equal(streams[0, 0], streams[1, 0])


def test_training_needs_both_classes(shard_dir):
    shards = open_shard_set(shard_dir)
    config = TrainStreamConfig((42,), batch_size=4, steps=1, num_workers=0, streams=pos_neg_streams(1))
    with pytest.raises(ShardSetError, match="both classes"):
        train_loader(shards, config, 0, collate)


@pytest.mark.parametrize("damage", [random_header, random_payload])
def test_damaged_shard_stops_training_naming_it(shard_dir, tmp_path, damage):
    """The training stream resamples shards: it must meet the damaged one and fail, not train on it."""
    shards, victim, _ = damaged_copy(shard_dir, tmp_path, damage)
    config = TrainStreamConfig(folds=(9,), batch_size=16, steps=200, num_workers=0, streams=pos_neg_streams(0), shuffle_buffer=10)
    with pytest.raises(ShardSetError) as err:
        list(train_pipeline(shards, config, 0, collate))
    assert str(err.value).startswith(str(victim))
