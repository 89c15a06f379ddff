"""Synthetic LUNA16-format data set: the default data for demos and tests.

Real LUNA16 data is large and licence-bound, so this module writes a small stand-in
that has exactly the real formats; code that reads it works unchanged on the real set.

Layout under OUT (as LUNA16 ships it)::

    subset0/ .. subset9/                <series_uid>.mhd + <series_uid>.raw (int16 HU);
                                        CT k goes into subset{k % 10}
    candidates.csv                      seriesuid,coordX,coordY,coordZ,class
    annotations.csv                     seriesuid,coordX,coordY,coordZ,diameter_mm
    annotations_with_malignancy.csv     ... ,diameter_mm,mal_bool  (True/False)
    annotations_excluded.csv            seriesuid,coordX,coordY,coordZ,diameter_mm: findings that
                                        LUNA16's evaluation ignores (diameter -1 = unknown)

Coordinates are millimetres in patient space, X/Y/Z order. Each CT is a chest phantom
(`luna_dist.synthetic.phantom`: body, lungs, vessels, spine, benign and malignant nodules),
its candidates and excluded findings placed by `luna_dist.synthetic.placing`.

Each CT draws from its own generator seeded by (seed, k): CT k is the same whatever
the number of CTs, and the same seed gives byte-identical files. The excluded findings
draw from a second stream, (seed, k, 1), so adding them left every CT, candidate and
nodule of a seed exactly as it was.

The command is `luna_dist/synth.py` (``python -m luna_dist.synth OUT --cts 10 --seed 0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from luna_dist.synthetic.phantom import (
    Nodule,
    Phantom,
    ScanGeometry,
    draw_geometry,
    draw_phantom,
    nodule_voxels,
    render,
)
from luna_dist.synthetic.placing import draw_candidates, draw_excluded

SERIES_UID_PREFIX = "1.3.6.1.4.1.14519.5.2.1.6279.6001."
"""The LIDC-IDRI root that every LUNA16 series uid starts with."""

N_SUBSETS = 10
DEFAULT_SHAPE = (80, 160, 160)
"""(slices, rows, columns): a scaled-down chest that generates in a fraction of a second."""
MIN_SHAPE = (32, 128, 128)
"""Below this the lungs get too small to hold a 4 mm nodule."""

CANDIDATES_HEADER = "seriesuid,coordX,coordY,coordZ,class"
ANNOTATIONS_HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm"
MALIGNANCY_HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm,mal_bool"


@dataclass(frozen=True)
class SynthSummary:
    """What make_dataset wrote, for callers and tests."""

    out: Path
    series_uids: tuple[str, ...]  # in CT order k = 0, 1, ...
    mhd_paths: tuple[Path, ...]  # in CT order
    n_candidates: int
    n_positive_candidates: int
    n_annotations: int
    n_malignant: int
    candidates_csv: Path
    annotations_csv: Path
    malignancy_csv: Path
    excluded_csv: Path
    n_excluded: int

    def __str__(self) -> str:
        return (
            f"wrote {len(self.series_uids)} CTs to {self.out}: {self.n_candidates} candidates "
            f"({self.n_positive_candidates} positive), {self.n_annotations} nodules "
            f"({self.n_malignant} malignant), {self.n_excluded} excluded findings"
        )


def _series_uid(rng: np.random.Generator) -> str:
    digits = np.concatenate([rng.integers(1, 10, 1), rng.integers(0, 10, 29)])
    return SERIES_UID_PREFIX + "".join(map(str, digits))


def write_ct(mhd_path: Path, volume: np.ndarray, geom: ScanGeometry) -> None:
    """Write <uid>.mhd + <uid>.raw, uncompressed like the real data."""
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(geom.spacing.tolist())
    image.SetOrigin(geom.origin.tolist())
    sitk.WriteImage(image, str(mhd_path), useCompression=False)


@dataclass(frozen=True)
class _CtRecord:
    uid: str
    mhd_path: Path
    nodules: tuple[Nodule, ...]
    points: np.ndarray
    labels: np.ndarray
    excluded: tuple[np.ndarray, np.ndarray]  # centres (n, 3), diameters (n,)


def _write_csvs(out: Path, records: list[_CtRecord]) -> None:
    """Write the four tables, rows grouped by series uid in sorted order as LUNA16 does."""
    candidates, annotations, malignancy = [CANDIDATES_HEADER], [ANNOTATIONS_HEADER], [MALIGNANCY_HEADER]
    excluded = [ANNOTATIONS_HEADER]
    for rec in sorted(records, key=lambda r: r.uid):
        # Candidates carry 2 decimals and annotations 10 significant digits, as in the real files.
        candidates += [
            f"{rec.uid},{x:.2f},{y:.2f},{z:.2f},{label}" for (x, y, z), label in zip(rec.points, rec.labels)
        ]
        for n in rec.nodules:
            row = f"{rec.uid},{n.centre[0]:.10g},{n.centre[1]:.10g},{n.centre[2]:.10g},{n.diameter:.10g}"
            annotations.append(row)
            malignancy.append(f"{row},{n.malignant}")
        excluded += [f"{rec.uid},{x:.10g},{y:.10g},{z:.10g},{d:.10g}" for (x, y, z), d in zip(*rec.excluded)]
    for name, lines in (
        ("candidates.csv", candidates),
        ("annotations.csv", annotations),
        ("annotations_with_malignancy.csv", malignancy),
        ("annotations_excluded.csv", excluded),
    ):
        (out / name).write_text("\n".join(lines) + "\n", newline="\n")


def _draw_ct(seed: int, k: int, shape: tuple[int, int, int]) -> tuple[np.random.Generator, str, Phantom]:
    """CT k's generator, uid and phantom: the first draws of its own random stream."""
    rng = np.random.default_rng([seed, k])
    uid = _series_uid(rng)
    phantom = draw_phantom(rng, draw_geometry(rng, shape))
    return rng, uid, phantom


def true_nodule_mask(seed: int, k: int, shape: tuple[int, int, int] | None = None) -> tuple[str, np.ndarray]:
    """The series uid of CT k of `make_dataset(..., seed=seed, shape=shape)` and its nodules' voxels.

    The mask (I, R, C) bool is True exactly where the generator painted a nodule
    (calcified cores included), before noise: the ground truth for label builders.
    Nothing is written; the CT's random stream is replayed up to its phantom.
    """
    _, uid, phantom = _draw_ct(seed, k, tuple(DEFAULT_SHAPE if shape is None else shape))
    mask = np.zeros(phantom.geometry.size, dtype=bool)
    axes = phantom.geometry.axes_mm()
    for nodule in phantom.nodules:
        voxels = nodule_voxels(axes, nodule)
        if voxels is not None:
            index, inside, _ = voxels
            mask[index] |= inside
    return uid, mask


def make_dataset(
    out: Path, n_cts: int = 10, seed: int = 0, shape: tuple[int, int, int] | None = None
) -> SynthSummary:
    """Write a synthetic LUNA16-format data set of n_cts CTs under out.

    shape is (slices, rows, columns): rows and columns are exact, the slice count varies
    per CT by up to +-25 % around it. None means DEFAULT_SHAPE, small enough for tests.
    """
    shape = tuple(DEFAULT_SHAPE if shape is None else shape)
    if len(shape) != 3 or any(s < m for s, m in zip(shape, MIN_SHAPE)):
        raise ValueError(f"shape must be 3 sizes of at least {MIN_SHAPE}, got {shape}")
    if n_cts < 1:
        raise ValueError(f"need at least one CT, got {n_cts}")
    out = Path(out)
    for subset in range(N_SUBSETS):
        (out / f"subset{subset}").mkdir(parents=True, exist_ok=True)
    records = []
    for k in range(n_cts):
        rng, uid, phantom = _draw_ct(seed, k, shape)
        geom = phantom.geometry
        points, labels = draw_candidates(rng, phantom)
        mhd_path = out / f"subset{k % N_SUBSETS}" / f"{uid}.mhd"
        write_ct(mhd_path, render(phantom, rng), geom)
        records.append(_CtRecord(uid, mhd_path, phantom.nodules, points, labels, draw_excluded(seed, k, phantom)))
    _write_csvs(out, records)
    return SynthSummary(
        out=out,
        series_uids=tuple(r.uid for r in records),
        mhd_paths=tuple(r.mhd_path for r in records),
        n_candidates=sum(len(r.labels) for r in records),
        n_positive_candidates=sum(int(r.labels.sum()) for r in records),
        n_annotations=sum(len(r.nodules) for r in records),
        n_malignant=sum(n.malignant for r in records for n in r.nodules),
        candidates_csv=out / "candidates.csv",
        annotations_csv=out / "annotations.csv",
        malignancy_csv=out / "annotations_with_malignancy.csv",
        excluded_csv=out / "annotations_excluded.csv",
        n_excluded=sum(len(r.excluded[1]) for r in records),
    )
