"""Which command may start or continue a run folder: the flags compared, the run refused or started again."""

from __future__ import annotations

import argparse
import json

from luna_dist import __version__
from luna_dist.training import run_folder


def _record(**flags) -> dict:
    args = {"lr": 0.001, "batch_size": 32, "epochs": 2, "num_workers": None, "shards": "shards/a", "augment": False}
    return run_folder.record(argparse.Namespace(**{**args, **flags}), 1, "no", {"inputs": "abc"}, {"status": "passed"})


def test_flags_that_shape_an_epoch_must_match_and_the_others_may_change():
    saved = _record()
    assert run_folder.differences(saved, _record(epochs=5, num_workers=4, shards="https://host/a/")) == []
    assert run_folder.differences(saved, _record(lr=0.01, augment=True)) == ["--augment False (now True)",
                                                                               "--lr 0.001 (now 0.01)"]
    other_build = run_folder.record(argparse.Namespace(**saved["arguments"]), 1, "bf16", {"inputs": "xyz"}, {"status": "skipped"})
    assert run_folder.differences(saved, other_build) == ["the shard build differs", "mixed precision no (now bf16)"]


def test_a_run_of_another_version_is_refused_naming_the_way_out(tmp_path):
    """args.json before luna_dist 0.2 held the arguments alone: such a run is not resumed by guesswork."""
    (tmp_path / "args.json").write_text(json.dumps({"lr": "0.001", "batch_size": "32"}))
    problem = run_folder.check_resumed(tmp_path, _record())
    assert problem == (f"--resume: {tmp_path} was trained by luna_dist before 0.2, this is {__version__}: resume it "
                       f"with that version, or start a new run from its weights with --checkpoint {tmp_path / 'state'}")


def test_an_existing_run_is_refused_unless_started_again(tmp_path):
    run = tmp_path / "r"
    assert run_folder.check_new(run, overwrite=False) is None  # nothing there
    run.mkdir()
    assert run_folder.check_new(run, overwrite=False) is None  # an empty folder holds no run
    (run / "state").mkdir()
    (run / "state" / "model.safetensors").write_bytes(b"x")
    (run / "val-predictions-E1.csv").write_text("x")
    problem = run_folder.check_new(run, overwrite=False)
    assert problem.startswith(f"{run} holds a run already: pass --resume to continue it, --overwrite to start it again")
    assert (run / "state").is_dir()
    assert run_folder.check_new(run, overwrite=True) is None
    assert list(run.iterdir()) == []


def test_a_resume_with_other_settings_names_them_and_the_way_out(tmp_path):
    run_folder.write_record(tmp_path, _record())
    assert run_folder.check_resumed(tmp_path, _record(epochs=9)) is None
    problem = run_folder.check_resumed(tmp_path, _record(batch_size=64))
    assert problem.startswith(f"--resume: {tmp_path} was trained with other settings: --batch-size 32 (now 64). ")
    assert f"--checkpoint {tmp_path / 'state'}" in problem
    (tmp_path / "args.json").write_text("{not json")
    assert "args.json: unreadable" in run_folder.check_resumed(tmp_path, _record())
    assert json.loads(json.dumps(_record()))["arguments"]["lr"] == "0.001"  # the record is plain JSON, text values
