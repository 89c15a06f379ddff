"""Where a phantom's candidates and excluded findings are drawn."""

from __future__ import annotations

import numpy as np

from luna_dist.synthetic.phantom import (
    EDGE_FRACTION,
    EDGE_MARGIN_MM,
    LOOKALIKES_PER_CT,
    LUNG_FRACTION,
    NEGATIVES_PER_CT,
    POSITIVES_PER_NODULE,
    TINY_DIAMETER_MM,
    TINY_NODULES_PER_CT,
    VESSEL_FRACTION,
    Ellipsoid,
    Phantom,
    ScanGeometry,
    Tube,
    unit_ball,
)


def _in_lungs(rng: np.random.Generator, lungs: tuple[Ellipsoid, ...], n: int) -> np.ndarray:
    which = rng.integers(len(lungs), size=n)
    centres = np.array([lung.centre for lung in lungs])[which]
    semis = np.array([lung.semi for lung in lungs])[which]
    return centres + unit_ball(rng, n) * semis


def _on_vessels(rng: np.random.Generator, tubes: tuple[Tube, ...], n: int) -> np.ndarray:
    which = rng.integers(len(tubes), size=n)
    starts = np.array([t.start for t in tubes])[which]
    ends = np.array([t.end for t in tubes])[which]
    return starts + rng.random((n, 1)) * (ends - starts)


def in_body(rng: np.random.Generator, ph: Phantom, n: int) -> np.ndarray:
    """Anywhere in the body's elliptic cylinder, over the whole scan length."""
    xy = ph.body_centre + unit_ball(rng, n, dim=2) * ph.body_semi
    geom = ph.geometry
    z = rng.uniform(geom.origin[2], geom.last_voxel[2], (n, 1))
    return np.hstack([xy, z])


def _near_edge(rng: np.random.Generator, geom: ScanGeometry, n: int) -> np.ndarray:
    """Points within EDGE_MARGIN_MM of one face of the volume: chunks there need padding."""
    lo, hi = geom.origin, geom.last_voxel
    points = rng.uniform(lo, hi, (n, 3))
    axis = rng.integers(3, size=n)
    offset = rng.uniform(0, EDGE_MARGIN_MM, n)
    at_high = rng.random(n) < 0.5
    rows = np.arange(n)
    points[rows, axis] = np.where(at_high, hi[axis] - offset, lo[axis] + offset)
    return points


def draw_candidates(rng: np.random.Generator, ph: Phantom) -> tuple[np.ndarray, np.ndarray]:
    """Candidate centres (n, 3) X/Y/Z mm and classes (n,), shuffled.

    Negatives too close to a nodule are dropped, so class 0 never marks a nodule;
    each nodule gets several jittered positives, as a CAD system reports them.
    """
    n_neg = int(rng.integers(NEGATIVES_PER_CT[0], NEGATIVES_PER_CT[1] + 1))
    n_edge = max(2, round(EDGE_FRACTION * n_neg))
    n_vessel = round(VESSEL_FRACTION * n_neg)
    n_lung = round(LUNG_FRACTION * n_neg)
    # Draw twice the mix, so enough remain after dropping those on a nodule.
    negatives = np.concatenate([
        _in_lungs(rng, ph.lungs, 2 * n_lung),
        _on_vessels(rng, ph.vessels, 2 * n_vessel),
        in_body(rng, ph, 2 * (n_neg - n_edge - n_vessel - n_lung)),
        _near_edge(rng, ph.geometry, 2 * n_edge),
    ])
    centres = np.array([n.centre for n in ph.nodules])
    diameters = np.array([n.diameter for n in ph.nodules])
    gap = np.linalg.norm(negatives[:, None, :] - centres[None, :, :], axis=2)
    negatives = negatives[(gap > diameters).all(axis=1)]
    negatives = negatives[rng.permutation(len(negatives))[:n_neg]]
    per_nodule = rng.integers(POSITIVES_PER_NODULE[0], POSITIVES_PER_NODULE[1] + 1, len(ph.nodules))
    positives = [n.centre + unit_ball(rng, int(k)) * n.diameter / 4 for n, k in zip(ph.nodules, per_nodule)]
    # Every centre lies inside the scan, as in the real table.
    points = np.clip(np.concatenate([negatives, *positives]), ph.geometry.origin, ph.geometry.last_voxel)
    labels = np.zeros(len(points), dtype=int)
    labels[len(negatives):] = 1
    order = rng.permutation(len(points))
    return points[order], labels[order]


def draw_excluded(seed: int, k: int, ph: Phantom) -> tuple[np.ndarray, np.ndarray]:
    """Excluded findings of CT k: centres (n, 3) X/Y/Z mm and diameters (n,) mm, -1 = unknown.

    Tiny nodules lie in the lungs away from the real nodules; look-alikes on vessels.
    Drawn from their own stream so the CT's own draws stay what they were.
    """
    rng = np.random.default_rng([seed, k, 1])
    n_tiny = int(rng.integers(TINY_NODULES_PER_CT[0], TINY_NODULES_PER_CT[1] + 1))
    tiny = _in_lungs(rng, ph.lungs, 4 * n_tiny)
    centres = np.array([n.centre for n in ph.nodules])
    gap = np.linalg.norm(tiny[:, None, :] - centres[None, :, :], axis=2)
    tiny = tiny[(gap > np.array([n.diameter for n in ph.nodules]) + 5).all(axis=1)][:n_tiny]
    lookalikes = _on_vessels(rng, ph.vessels, int(rng.integers(LOOKALIKES_PER_CT[0], LOOKALIKES_PER_CT[1] + 1)))
    diameters = np.concatenate([rng.uniform(*TINY_DIAMETER_MM, len(tiny)), np.full(len(lookalikes), -1.0)])
    return np.concatenate([tiny, lookalikes]), diameters
