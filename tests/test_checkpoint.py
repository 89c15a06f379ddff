"""The state swap survives a kill at any moment; the best-model rule; progress of older states."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from luna_dist.training.checkpoint import (
    BEST,
    COMPLETE,
    OLD,
    PARTIAL,
    STATE,
    Progress,
    is_better,
    newest_state,
    recover,
)


def _state(folder: Path, epoch: int, complete: bool = True) -> None:
    folder.mkdir()
    (folder / "model.safetensors").write_text(f"weights of epoch {epoch}")
    if complete:
        (folder / COMPLETE).write_text(f'{{"epoch": {epoch}, "step": 0}}')


def _epoch(folder: Path) -> str:
    return (folder / "model.safetensors").read_text()


# What a kill leaves at each moment of a save of epoch 2 (a new best model) over epoch 1, and what a
# resume must find: (state folders left as name -> (epoch, marked complete), best.pt.partial left?).
@pytest.mark.parametrize("left, partial_best, expected", [
    ({STATE: (1, True), PARTIAL: (2, False)}, True, 1),  # killed while writing the new state
    ({STATE: (1, True), PARTIAL: (2, True)}, True, 2),   # marked complete, not yet renamed
    ({OLD: (1, True), PARTIAL: (2, True)}, True, 2),     # between the two renames: no state/ at all
    ({OLD: (1, True), STATE: (2, True)}, True, 2),       # renamed, the old state not yet removed
    ({STATE: (2, True)}, True, 2),                       # the state in place, best.pt not yet renamed
    ({OLD: (1, True)}, False, 1),                        # an old state alone is still a state
], ids=["writing", "marked", "between renames", "renamed", "best not renamed", "old only"])
def test_a_resume_finds_the_newest_complete_state_whatever_a_kill_left(tmp_path, left, partial_best, expected):
    for name, (epoch, complete) in left.items():
        _state(tmp_path / name, epoch, complete)
    (tmp_path / BEST).write_text("best of epoch 1")
    if partial_best:
        (tmp_path / (BEST + ".partial")).write_text("best of epoch 2")
    # What a stopped run's message reports, before the resume moves anything:
    assert _epoch(newest_state(tmp_path)) == f"weights of epoch {expected}"
    assert recover(tmp_path) == tmp_path / STATE
    assert _epoch(tmp_path / STATE) == f"weights of epoch {expected}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([STATE, BEST])
    # best.pt.partial belongs to the save it was written in: kept with its state, dropped without it.
    assert (tmp_path / BEST).read_text() == f"best of epoch {expected}"


def test_no_state_at_all_is_none(tmp_path):
    _state(tmp_path / PARTIAL, 1, complete=False)
    assert newest_state(tmp_path) is None
    assert recover(tmp_path) is None
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("score, best, better", [
    ([0.5, 0.1], None, True),
    ([math.nan], None, False),                   # NaN never wins, not even the first time
    ([0.6, 0.1], [0.5, 0.9], True),              # CPM decides
    ([0.5, 0.9], [0.5, 0.8], True),              # a tie in CPM: AUC decides
    ([0.5, 0.8], [0.5, 0.8], False),             # equal: the earlier model stays
    ([0.5, math.nan], [0.5, 0.1], False),        # an undefined tie-breaker is below any number
    ([0.5, 0.1], [0.5, math.nan], True),
    ([-0.3], [-0.4], True),                      # -loss: lower loss wins
])
def test_best_score_compares_entry_by_entry(score, best, better):
    assert is_better(score, best) is better


def test_each_rank_takes_its_own_random_states():
    import random

    from luna_dist.training.checkpoint import stream_random_states

    states = []
    for seed in (0, 1):
        random.seed(seed)
        states.append(stream_random_states())
    layout = {"processes": 2, "batch_size": 4, "num_workers": 0}
    saved = Progress(epoch=1, step=4, epoch_rngs=states, layout=layout).state_dict()
    for rank in (0, 1):
        progress = Progress(rank=rank)
        progress.load_state_dict(saved)
        assert progress.epoch_rng == states[rank]
    with pytest.raises(ValueError, match=r"^epoch_rngs holds 1 rank\(s\)' random states, its layout"):
        Progress().load_state_dict({**saved, "epoch_rngs": states[:1]})


def test_a_state_comes_back_exactly_from_files_that_run_no_code(tmp_path, monkeypatch):
    """Model, optimizer, fp16 loss scale, the random states and the progress, kept as safetensors, a weights-only
    torch file and JSON (accelerate pickled the progress and random states), come back as they were saved."""
    import json
    import random

    import numpy as np
    import torch
    from accelerate import Accelerator

    from luna_dist.training.checkpoint import Checkpointer

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    accelerator = Accelerator()

    def trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2)).to(
            memory_format=torch.channels_last_3d)
        model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        model(torch.randn(2, 1, 4, 4, 4)).sum().backward()
        optimizer.step()
        return model, optimizer

    model, optimizer = trained(0)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=7)  # as fp16 on a GPU has
    progress = Progress(epoch=2, samples_seen=16, best_score=[0.5, math.nan], best_by="cpm", validated=1,
                        train_metrics={"loss/all": 0.25})
    Checkpointer(tmp_path, accelerator, model, optimizer).save(progress, None)
    draws = (random.random(), np.random.rand(), torch.rand(3))
    assert sorted(p.name for p in (tmp_path / STATE).iterdir()) == [
        COMPLETE, "model.safetensors", "optimizer.bin", "progress.json", "random_states.json", "scaler.json"]

    accelerator.scaler = None
    other_model, other_optimizer = trained(1)
    accelerator.scaler = torch.amp.GradScaler("cpu")
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    loaded = Progress()
    Checkpointer(tmp_path, accelerator, other_model, other_optimizer).load(loaded)
    assert json.dumps(loaded.state_dict()) == json.dumps(progress.state_dict())
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(3), draws[2])
    assert accelerator.scaler.state_dict()["scale"] == 8.0 and accelerator.scaler.state_dict()["growth_interval"] == 7
    for name, tensor in model.state_dict().items():
        assert torch.equal(other_model.state_dict()[name], tensor), name
    for saved, read in zip(optimizer.state_dict()["state"].values(), other_optimizer.state_dict()["state"].values()):
        assert torch.equal(read["momentum_buffer"], saved["momentum_buffer"])
