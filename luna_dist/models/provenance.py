"""What a model saw: the folds, and their series, it trained on and those its epoch was chosen on; so that no
score counts a CT its models learned from.

A LUNA16 score is honest only on CTs its models never learned from: neither by training on
them nor by keeping the epoch (best.pt) that scored best on them. A model records

    trained_on   fold -> series whose samples trained it, with those of the weights it started from
                 (--finetune, --checkpoint)
    selected_on  fold -> series whose validation score chose the epoch kept (--select-on val), with
                 those the weights it started from were chosen on
    selection    how the epoch kept was chosen, in words
    unknown      the weights it started from when they record nothing (then what they saw is unknown)

Series are kept beside their folds so that a check is exact whatever the data: fold numbers are
a build's, series UIDs name CTs. A check names the fold (`leak`).

Where it is kept: best.pt's `provenance` entry, a training state's `provenance.json`, and the
sidecar of a predictions CSV (`NAME.provenance.json`: the models that made its marks, the series
they marked, and the CSV's sha256, so a sidecar never vouches for another file). Plain lists,
strings and numbers: read by torch's weights-only loader, never unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from luna_dist.common.atomic import write_json
from luna_dist.models.weights import WeightsError, load_tensors
from luna_dist.shards.format import sha256_file

STATE_FILE = "provenance.json"
SIDECAR_SUFFIX = ".provenance.json"


@dataclass(frozen=True)
class Provenance:
    trained_on: dict[int, tuple[str, ...]]
    selected_on: dict[int, tuple[str, ...]]
    selection: str
    unknown: str | None = None  # the weights it started from that record nothing

    def to_json(self) -> dict:
        return {"trained_on": _folds_json(self.trained_on), "selected_on": _folds_json(self.selected_on),
                "selection": self.selection, "unknown": self.unknown}

    @classmethod
    def from_json(cls, data) -> Provenance:
        """ValueError unless `data` is as `to_json` writes it."""
        if not isinstance(data, dict) or not isinstance(data.get("selection"), str) \
                or not isinstance(data.get("unknown"), (str, type(None))):
            raise ValueError("not a provenance record")
        return cls(_folds(data.get("trained_on")), _folds(data.get("selected_on")), data["selection"],
                   data["unknown"])

    def folds(self) -> dict:
        """The folds alone, for summaries: {"trained_on": [...], "selected_on": [...], "selection", "unknown"}."""
        return {"trained_on": sorted(self.trained_on), "selected_on": sorted(self.selected_on),
                "selection": self.selection, "unknown": self.unknown}

    def after(self, start: tuple[str, Provenance | None] | None) -> Provenance:
        """This model's record once what the weights it started from (`start`: their name and record) saw is
        added."""
        if start is None:
            return self
        named, parent = start
        if parent is None:
            return Provenance(self.trained_on, self.selected_on, self.selection, named)
        return Provenance(_union(self.trained_on, parent.trained_on), _union(self.selected_on, parent.selected_on),
                          self.selection, self.unknown or parent.unknown)

    def seen(self, series: Iterable[str]) -> tuple[str, int, list[str]] | None:
        """How this model saw some of `series`, the first way found: ("trained on" or "was selected on", the fold,
        the series of it among `series`); None when it saw none of them."""
        wanted = set(series)
        for verb, folds in (("trained on", self.trained_on), ("was selected on", self.selected_on)):
            for fold in sorted(folds):
                if found := sorted(wanted.intersection(folds[fold])):
                    return verb, fold, found
        return None


UNTRAINED = Provenance({}, {}, "none: built, not trained")
"""The record of weights made by hand (a benchmark's, a test's), which saw no CT."""


def training(fold_series: dict[int, list[str]], train_folds: list[int], val_folds: list[int],
             select_on: str, best_by: str) -> Provenance:
    """The record of a model trained on `train_folds` of a build (`fold_series`: its series per fold), its epoch
    chosen by `select_on`: "val" (the best `best_by` score on `val_folds`) or "last"."""
    trained = {fold: tuple(fold_series.get(fold, ())) for fold in train_folds}
    if select_on == "last":
        return Provenance(trained, {}, "the last epoch")
    return Provenance(trained, {fold: tuple(fold_series.get(fold, ())) for fold in val_folds},
                      f"the best {best_by} on folds {sorted(val_folds)}")


def leak(named: str, provenance: Provenance | None, scored: Iterable[str]) -> str | None:
    """The line refusing to score `scored` (series) with the model `named` when it trained or was selected on
    one of them; None when it saw none (or records nothing: see `unchecked`)."""
    if provenance is None or (seen := provenance.seen(scored)) is None:
        return None
    verb, fold, series = seen
    return (f"{named} {verb} fold {fold}, and {len(series)} of its series {'is' if len(series) == 1 else 'are'} "
            f"scored here (e.g. {series[0]}): a fold is scored only by models that neither trained nor were "
            f"selected on it; train them without it (--val-folds {fold} --select-on last)")


def unchecked(named: str, provenance: Provenance | None) -> str | None:
    """The warning for a model whose record cannot tell whether it saw the scored series; None when it can."""
    if provenance is None:
        return (f"warning: {named} records no folds it trained or was selected on (saved before luna_dist "
                "recorded them, or by other software): whether it saw the scored series is not checked")
    if provenance.unknown is not None:
        return (f"warning: {named} started from {provenance.unknown}, which records no folds: whether those "
                "weights saw the scored series is not checked")
    return None


# -- where it is kept --------------------------------------------------------------------------------------
def read(path: Path) -> Provenance | None:
    """The record of the weights at `path` (a best.pt, a training state folder or its model.safetensors); None
    where none was written. WeightsError naming the file when one is there but not as luna_dist writes it."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        file = (path if path.is_dir() else path.parent) / STATE_FILE
        if not file.is_file():
            return None
        try:
            return Provenance.from_json(json.loads(file.read_text()))
        except ValueError as err:
            raise WeightsError(f"{file}: not as luna_dist writes it ({err})") from None
    try:
        recorded = load_tensors(path).get("provenance")
    except (ValueError, AttributeError) as err:
        raise WeightsError(f"{path}: not a readable checkpoint ({err})") from None
    if recorded is None:
        return None
    try:
        return Provenance.from_json(recorded)
    except ValueError as err:
        raise WeightsError(f"{path}: its provenance is not as luna_dist writes it ({err})") from None


@dataclass(frozen=True)
class Part:
    """Marks of `series` made by `models` (a model's name -> its record; None: the marks' models are unknown)."""

    series: tuple[str, ...]
    models: dict[str, Provenance | None] | None


def sidecar(predictions: Path) -> Path:
    """`NAME.provenance.json` beside `NAME.csv`."""
    predictions = Path(predictions)
    return predictions.with_name(predictions.stem + SIDECAR_SUFFIX)


def write_sidecar(predictions: Path, parts: list[Part]) -> None:
    """The sidecar of a predictions CSV already written: its parts and the CSV's sha256."""
    write_json(sidecar(predictions), {
        "predictions_sha256": sha256_file(predictions),
        "parts": [{"series": sorted(part.series),
                   "models": None if part.models is None else
                   {name: None if record is None else record.to_json() for name, record in part.models.items()}}
                  for part in parts]})


def read_sidecar(predictions: Path) -> list[Part] | None:
    """The parts of a predictions CSV's sidecar; None where it has none. ValueError naming the sidecar when it is
    unreadable or was written for other contents of the CSV."""
    path = sidecar(predictions)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        parts = [Part(tuple(part["series"]), None if part["models"] is None else
                      {str(name): None if record is None else Provenance.from_json(record)
                       for name, record in part["models"].items()}) for part in data["parts"]]
        recorded = data["predictions_sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{path}: unreadable ({type(err).__name__}: {err}); remove it to score "
                         f"{Path(predictions).name} unchecked") from None
    if recorded != sha256_file(predictions):
        raise ValueError(f"{path} was written for other contents of {predictions} (its sha256 differs): write both "
                         f"again with the command that made them, or remove {path.name} to score them unchecked")
    return parts


def _folds_json(folds: dict[int, tuple[str, ...]]) -> dict[str, list[str]]:
    return {str(fold): sorted(series) for fold, series in sorted(folds.items())}


def _folds(data) -> dict[int, tuple[str, ...]]:
    if not isinstance(data, dict) or not all(isinstance(series, list) and all(isinstance(s, str) for s in series)
                                             for series in data.values()):
        raise ValueError("its folds are not lists of series")
    try:
        return {int(fold): tuple(series) for fold, series in data.items()}
    except ValueError:
        raise ValueError("a fold is not a number") from None


def _union(a: dict[int, tuple[str, ...]], b: dict[int, tuple[str, ...]]) -> dict[int, tuple[str, ...]]:
    return {fold: tuple(sorted(set(a.get(fold, ())) | set(b.get(fold, ())))) for fold in sorted(set(a) | set(b))}
