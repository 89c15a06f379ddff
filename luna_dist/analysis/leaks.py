"""No scored CT is analysed by a model that saw it: each model's record (`luna_dist.models.provenance`) is read
and checked against the analysed series before the first CT, when the analysis scores them."""

from __future__ import annotations

from pathlib import Path

from luna_dist.analysis.detect import Models
from luna_dist.analysis.series import AnalysisError
from luna_dist.models import provenance
from luna_dist.models.provenance import Part, Provenance
from luna_dist.models.weights import WeightsError


def records(models: Models) -> dict[str, Provenance | None]:
    """What each network of `models` saw, by role ("seg", "nodule", "malignancy"), as its file records it."""
    found = {}
    for role, path in models.paths.items():
        if path is not None:
            try:
                found[role] = provenance.read(path)
            except WeightsError as err:
                raise AnalysisError(str(err)) from None
    return found


def check(models: Models, seen: dict[str, Provenance | None], series: list[str]) -> list[str]:
    """AnalysisError naming the model and the fold when a model trained or was selected on one of the scored
    `series`; else the warnings for models whose record cannot tell."""
    for role, record in seen.items():
        if (problem := provenance.leak(models.named(role), record, series)) is not None:
            raise AnalysisError(problem)
    return [warning for role, record in seen.items() if (warning := provenance.unchecked(models.named(role), record))]


def write_sidecar(submission: Path, models: Models, seen: dict[str, Provenance | None], series: list[str]) -> None:
    """submission.csv's sidecar: its series were marked by these models, with what each saw."""
    provenance.write_sidecar(submission, [Part(tuple(series), {models.named(role): record
                                                                for role, record in seen.items()})])
