"""What a model saw: its record, read back from each file that keeps it, and the line that refuses a leak."""

from __future__ import annotations

import json

import pytest
import torch

from luna_dist.models import provenance
from luna_dist.models.classifier import LunaModel
from luna_dist.models.provenance import Part, Provenance
from luna_dist.models.weights import WeightsError

FOLDS = {0: ["a0", "a1"], 1: ["b0"], 2: ["c0"], 3: ["d0"]}


def test_a_model_saw_its_training_folds_and_the_folds_its_epoch_was_chosen_on():
    chosen = provenance.training(FOLDS, [0, 1], [2], "val", "cpm")
    assert chosen.trained_on == {0: ("a0", "a1"), 1: ("b0",)} and chosen.selected_on == {2: ("c0",)}
    assert chosen.selection == "the best cpm on folds [2]"
    assert chosen.seen(["c0", "d0"]) == ("was selected on", 2, ["c0"])
    assert chosen.seen(["a1", "x"]) == ("trained on", 0, ["a1"])
    assert chosen.seen(["d0"]) is None
    last = provenance.training(FOLDS, [0, 1], [2], "last", "cpm")
    assert last.selected_on == {} and last.selection == "the last epoch" and last.seen(["c0"]) is None


def test_a_fine_tuned_model_saw_what_its_start_saw():
    start = provenance.training(FOLDS, [0], [3], "val", "auc")
    tuned = provenance.training(FOLDS, [0, 1], [2], "last", "auc").after(("--finetune cls.pt", start))
    assert tuned.trained_on == {0: ("a0", "a1"), 1: ("b0",)} and tuned.selected_on == {3: ("d0",)}
    assert tuned.unknown is None
    blind = provenance.training(FOLDS, [0], [2], "last", "auc").after(("--finetune old.pt", None))
    assert blind.unknown == "--finetune old.pt" and blind.trained_on == {0: ("a0", "a1")}
    assert provenance.unchecked("the model", blind) == ("warning: the model started from --finetune old.pt, which "
                                                        "records no folds: whether those weights saw the scored "
                                                        "series is not checked")
    assert provenance.unchecked("the model", None).startswith("warning: the model records no folds")
    assert provenance.unchecked("the model", tuned) is None


def test_the_refusal_names_the_model_and_the_fold():
    chosen = provenance.training(FOLDS, [0, 1], [2], "val", "cpm")
    assert provenance.leak("--cls-model m.pt", chosen, ["c0"]) == (
        "--cls-model m.pt was selected on fold 2, and 1 of its series is scored here (e.g. c0): a fold is scored "
        "only by models that neither trained nor were selected on it; train them without it (--val-folds 2 "
        "--select-on last)")
    assert "trained on fold 0, and 2 of its series are scored" in provenance.leak("m", chosen, ["a1", "a0", "d0"])
    assert provenance.leak("m", chosen, ["d0"]) is None
    assert provenance.leak("m", None, ["a0"]) is None


def test_each_file_that_keeps_a_record_gives_it_back(tmp_path):
    record = provenance.training(FOLDS, [0, 1], [2], "val", "cpm").after(("--checkpoint x", None))
    assert Provenance.from_json(json.loads(json.dumps(record.to_json()))) == record
    torch.save({"model": LunaModel().state_dict(), "provenance": record.to_json()}, tmp_path / "best.pt")
    assert provenance.read(tmp_path / "best.pt") == record
    torch.save({"model": LunaModel().state_dict()}, tmp_path / "old.pt")
    assert provenance.read(tmp_path / "old.pt") is None
    state = tmp_path / "state"
    state.mkdir()
    assert provenance.read(state) is None
    (state / provenance.STATE_FILE).write_text(json.dumps(record.to_json()))
    assert provenance.read(state) == record == provenance.read(state / "model.safetensors")
    (state / provenance.STATE_FILE).write_text('{"trained_on": {"x": ["a"]}, "selected_on": {}, "selection": "s", '
                                               '"unknown": null}')
    with pytest.raises(WeightsError, match=r"state/provenance.json: not as luna_dist writes it \(a fold is not a"):
        provenance.read(state)
    torch.save({"model": LunaModel().state_dict(), "provenance": {"trained_on": "all"}}, tmp_path / "odd.pt")
    with pytest.raises(WeightsError, match="odd.pt: its provenance is not as luna_dist writes it"):
        provenance.read(tmp_path / "odd.pt")


def test_a_sidecar_vouches_only_for_the_file_it_was_written_for(tmp_path):
    csv = tmp_path / "predictions.csv"
    csv.write_text("seriesuid,coordX,coordY,coordZ,probability\nc0,1,2,3,0.5\n")
    assert provenance.read_sidecar(csv) is None
    record = provenance.training(FOLDS, [0, 1], [2], "last", "cpm")
    provenance.write_sidecar(csv, [Part(("c0",), {"the model": record}), Part(("d0",), None)])
    assert provenance.sidecar(csv) == tmp_path / "predictions.provenance.json"
    assert provenance.read_sidecar(csv) == [Part(("c0",), {"the model": record}), Part(("d0",), None)]
    csv.write_text(csv.read_text() + "c0,4,5,6,0.9\n")
    with pytest.raises(ValueError, match="predictions.provenance.json was written for other contents of .*"
                                         "remove predictions.provenance.json to score them unchecked"):
        provenance.read_sidecar(csv)
    provenance.sidecar(csv).write_text("{")
    with pytest.raises(ValueError, match="predictions.provenance.json: unreadable"):
        provenance.read_sidecar(csv)
