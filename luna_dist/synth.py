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

Coordinates are millimetres in patient space, X/Y/Z order. Every CT is a simple chest
phantom: an elliptical body with a fat layer, two ellipsoidal lungs with vessels, a
spine, and 1-3 nodules. Malignant nodules are spiculated/lobulated and denser; benign
ones are smooth and round, some with a calcified core, so malignancy can be learnt
from the image. Negative candidates mostly sit in the lungs (many on vessels, the
classic false positive) or the body, a few within millimetres of the volume border.

Each CT draws from its own generator seeded by (seed, k): CT k is the same whatever
the number of CTs, and the same seed gives byte-identical files. The excluded findings
draw from a second stream, (seed, k, 1), so adding them left every CT, candidate and
nodule of a seed exactly as it was.

Usage: ``python -m luna_dist.synth OUT --cts 10 --seed 0 [--shape 200 512 512]``
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

SERIES_UID_PREFIX = "1.3.6.1.4.1.14519.5.2.1.6279.6001."
"""The LIDC-IDRI root that every LUNA16 series uid starts with."""

N_SUBSETS = 10
DEFAULT_SHAPE = (80, 160, 160)
"""(slices, rows, columns): a scaled-down chest that generates in a fraction of a second."""
MIN_SHAPE = (32, 128, 128)
"""Below this the lungs get too small to hold a 4 mm nodule."""
SLICE_COUNT_JITTER = 0.25
"""Slice counts vary by up to this fraction around the requested count, as real scans do."""

# Hounsfield units of the phantom's tissues.
HU_AIR = -1000
HU_LUNG = -850
HU_FAT = -100
HU_SOFT_TISSUE = 40
HU_VESSEL = 60
HU_CANCELLOUS_BONE = 250
HU_CORTICAL_BONE = 900
HU_BENIGN = (-60.0, 0.0)
HU_MALIGNANT = (30.0, 90.0)
HU_CALCIFIED = (500.0, 900.0)
HU_STORED = (-1024, 3071)
"""Range a CT scanner stores; noise is clipped to it."""
NOISE_SD_HU = (12.0, 30.0)

# Geometry ranges (mm); LUNA16 scans have identity direction.
INPLANE_SPACING_MM = (0.5, 0.9)
SLICE_SPACINGS_MM = (0.625, 0.7, 0.8, 1.0, 1.25, 1.5, 1.8, 2.0, 2.5)
ORIGIN_XY_MM = (-250.0, -150.0)
ORIGIN_Z_MM = (-400.0, -100.0)

# Nodules.
NODULES_PER_CT = (1, 3)
DIAMETER_MM = (4.0, 30.0)
MALIGNANT_FRACTION = 0.5
CALCIFIED_FRACTION = 0.4
"""Share of benign nodules with a calcified core, a strong sign of benignity."""

# Candidates.
NEGATIVES_PER_CT = (200, 500)
LUNG_FRACTION = 0.5
VESSEL_FRACTION = 0.15
"""Negatives on vessels: the lookalikes a real CAD system reports most."""
POSITIVES_PER_NODULE = (1, 4)
EDGE_FRACTION = 0.04
EDGE_MARGIN_MM = 3.0
"""Edge negatives lie this close to the border, so any chunk around them crosses it."""

# Excluded findings: what LUNA16's annotators marked but the challenge does not count.
TINY_NODULES_PER_CT = (0, 2)
TINY_DIAMETER_MM = (1.0, 3.0)
"""Nodules under 3 mm; listed, not drawn (drawing them would change the voxels of every CT)."""
LOOKALIKES_PER_CT = (1, 3)
"""Points on the CT's vessels, the classic look-alike, listed with an unknown (-1) diameter."""

SLAB_SLICES = 32
"""Slices rendered at once: bounds the float working memory for 512 x 512 volumes."""

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


@dataclass(frozen=True)
class _Geometry:
    size: tuple[int, int, int]  # (I, R, C)
    spacing: np.ndarray  # (3,) X/Y/Z mm
    origin: np.ndarray  # (3,) X/Y/Z mm, centre of voxel (0, 0, 0)

    @property
    def extent(self) -> np.ndarray:
        """Physical size X/Y/Z, mm (the body is laid out as fractions of it)."""
        return self.spacing * np.array(self.size[::-1])

    @property
    def last_voxel(self) -> np.ndarray:
        return self.origin + self.spacing * (np.array(self.size[::-1]) - 1)

    def axes_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel-centre coordinates along I, R, C (z, y, x)."""
        return tuple(
            self.origin[a] + self.spacing[a] * np.arange(self.size[2 - a]) for a in (2, 1, 0)
        )


@dataclass(frozen=True)
class _Ellipsoid:
    centre: np.ndarray  # (3,) X/Y/Z mm
    semi: np.ndarray  # (3,) semi-axes X/Y/Z mm


@dataclass(frozen=True)
class _Tube:
    start: np.ndarray
    end: np.ndarray
    radius: float


@dataclass(frozen=True)
class _Nodule:
    centre: np.ndarray
    diameter: float
    malignant: bool
    hu: float
    lobe_dirs: np.ndarray  # (K, 3) unit vectors; K = 0 for a smooth nodule
    lobe_amps: np.ndarray  # (K,) how far each lobe/spicule reaches, in base radii
    lobe_sharpness: np.ndarray  # (K,) high = thin spicule, low = broad lobe
    calcified_radius: float  # mm; 0 = no calcification
    calcified_hu: float

    @property
    def base_radius(self) -> float:
        # Spiculated nodules shrink their core so their mean size stays near the diameter.
        return self.diameter / 2 * (0.85 if self.malignant else 1.0)

    @property
    def reach(self) -> float:
        """How far the nodule extends: a spicule may ride on a lobe, so the two largest count."""
        return self.base_radius * (1 + np.sort(self.lobe_amps)[-2:].sum())


@dataclass(frozen=True)
class _Phantom:
    geometry: _Geometry
    body_centre: np.ndarray  # (2,) X/Y mm
    body_semi: np.ndarray  # (2,) X/Y mm
    spine_centre: np.ndarray  # (2,) X/Y mm
    spine_radius: float
    lungs: tuple[_Ellipsoid, ...]
    vessels: tuple[_Tube, ...]
    nodules: tuple[_Nodule, ...]
    noise_sd: float


def _unit_ball(rng: np.random.Generator, n: int, dim: int = 3) -> np.ndarray:
    """n points uniform in the unit ball (disk for dim=2)."""
    v = rng.standard_normal((n, dim))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v * rng.random((n, 1)) ** (1 / dim)


def _series_uid(rng: np.random.Generator) -> str:
    digits = np.concatenate([rng.integers(1, 10, 1), rng.integers(0, 10, 29)])
    return SERIES_UID_PREFIX + "".join(map(str, digits))


def _geometry(rng: np.random.Generator, shape: tuple[int, int, int]) -> _Geometry:
    slices = round(shape[0] * rng.uniform(1 - SLICE_COUNT_JITTER, 1 + SLICE_COUNT_JITTER))
    inplane = rng.uniform(*INPLANE_SPACING_MM)
    spacing = np.array([inplane, inplane, rng.choice(SLICE_SPACINGS_MM)])
    origin = np.array([rng.uniform(*ORIGIN_XY_MM), rng.uniform(*ORIGIN_XY_MM), rng.uniform(*ORIGIN_Z_MM)])
    return _Geometry((slices, shape[1], shape[2]), spacing, origin)


def _lungs(
    rng: np.random.Generator, geom: _Geometry, body_c: np.ndarray, body_a: np.ndarray
) -> tuple[_Ellipsoid, ...]:
    """Two ellipsoids left and right of the mediastinum, wholly inside body and scan."""
    mid_z = geom.origin[2] + geom.extent[2] * rng.uniform(0.46, 0.54)
    lungs = []
    for side in (-1, 1):
        centre = np.array([
            body_c[0] + side * body_a[0] * rng.uniform(0.45, 0.55),
            body_c[1] + body_a[1] * rng.uniform(-0.05, 0.05),
            mid_z,
        ])
        semi = np.array([
            body_a[0] * rng.uniform(0.32, 0.38),
            body_a[1] * rng.uniform(0.58, 0.65),
            geom.extent[2] * rng.uniform(0.38, 0.45),
        ])
        lungs.append(_Ellipsoid(centre, semi))
    return tuple(lungs)


def _vessels(rng: np.random.Generator, lungs: tuple[_Ellipsoid, ...]) -> tuple[_Tube, ...]:
    """Tubes fanning out from each lung's hilum (its medial side) into the lung."""
    tubes = []
    for lung, towards_midline in zip(lungs, (1, -1)):
        hilum = lung.centre + np.array([towards_midline * 0.6, 0.0, 0.0]) * lung.semi
        n = int(rng.integers(4, 8))
        starts = hilum + rng.uniform(-0.15, 0.15, (n, 3)) * lung.semi
        ends = lung.centre + _unit_ball(rng, n) * lung.semi * 0.9
        radii = rng.uniform(0.04, 0.09, n) * lung.semi[:2].min()
        tubes += [_Tube(s, e, float(r)) for s, e, r in zip(starts, ends, radii)]
    return tuple(tubes)


def _nodule(rng: np.random.Generator, centre: np.ndarray, diameter: float) -> _Nodule:
    malignant = bool(rng.random() < MALIGNANT_FRACTION)
    if malignant:
        n_lobes, n_spicules = int(rng.integers(2, 5)), int(rng.integers(8, 16))
        dirs = rng.standard_normal((n_lobes + n_spicules, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        amps = np.concatenate([rng.uniform(0.1, 0.25, n_lobes), rng.uniform(0.5, 1.0, n_spicules)])
        sharpness = np.concatenate([np.full(n_lobes, 2.0), rng.uniform(8, 30, n_spicules)])
        return _Nodule(centre, diameter, True, rng.uniform(*HU_MALIGNANT), dirs, amps, sharpness, 0.0, 0.0)
    calcified = rng.random() < CALCIFIED_FRACTION
    calcified_radius = diameter / 2 * rng.uniform(0.3, 0.6) if calcified else 0.0
    empty = np.zeros(0)
    return _Nodule(
        centre, diameter, False, rng.uniform(*HU_BENIGN), np.zeros((0, 3)), empty, empty,
        calcified_radius, rng.uniform(*HU_CALCIFIED),
    )


def _nodules(rng: np.random.Generator, lungs: tuple[_Ellipsoid, ...]) -> tuple[_Nodule, ...]:
    """1-3 nodules well inside the lungs, apart from each other.

    A nodule that finds no free place in 20 tries is left out; the first always fits.
    Diameters are log-uniform (small nodules are the common case) and capped so the
    nodule fits inside the lung.
    """
    nodules: list[_Nodule] = []
    for _ in range(int(rng.integers(NODULES_PER_CT[0], NODULES_PER_CT[1] + 1))):
        for _attempt in range(20):
            lung = lungs[int(rng.integers(len(lungs)))]
            cap = min(DIAMETER_MM[1], lung.semi.min())
            diameter = float(np.exp(rng.uniform(np.log(DIAMETER_MM[0]), np.log(cap))))
            centre = lung.centre + _unit_ball(rng, 1)[0] * (0.75 * lung.semi - diameter / 2)
            if all(np.linalg.norm(centre - o.centre) > diameter + o.diameter + 5 for o in nodules):
                nodules.append(_nodule(rng, centre, diameter))
                break
    return tuple(nodules)


def _phantom(rng: np.random.Generator, geom: _Geometry) -> _Phantom:
    extent_xy = geom.extent[:2]
    body_c = geom.origin[:2] + extent_xy * (0.5 + rng.uniform(-0.02, 0.02, 2))
    body_a = extent_xy * np.array([rng.uniform(0.40, 0.46), rng.uniform(0.30, 0.36)])
    lungs = _lungs(rng, geom, body_c, body_a)
    # +y is posterior in LUNA16's patient space, so the spine sits at larger y.
    spine_c = body_c + np.array([0.0, 0.78 * body_a[1]])
    return _Phantom(
        geometry=geom,
        body_centre=body_c,
        body_semi=body_a,
        spine_centre=spine_c,
        spine_radius=0.14 * body_a[1],
        lungs=lungs,
        vessels=_vessels(rng, lungs),
        nodules=_nodules(rng, lungs),
        noise_sd=rng.uniform(*NOISE_SD_HU),
    )


def _window(axes: tuple[np.ndarray, ...], lo: np.ndarray, hi: np.ndarray):
    """Index slices and open mm grids (z, y, x) of the voxels in the X/Y/Z box lo..hi.

    Painting only inside each structure's bounding box keeps full-size volumes fast.
    Returns None when the box misses the slab.
    """
    index, grids = [], []
    for axis, a in zip(axes, (2, 1, 0)):
        start, stop = np.searchsorted(axis, [lo[a], hi[a]], side="left")
        if start >= stop:
            return None
        index.append(slice(start, stop))
        grids.append(axis[start:stop].astype(np.float32))
    z, y, x = grids
    return tuple(index), (z[:, None, None], y[None, :, None], x[None, None, :])


def _base_slice(ph: _Phantom, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The part of every axial slice that does not change along z: body, fat, spine."""
    ex = (x[None, :] - ph.body_centre[0]) / ph.body_semi[0]
    ey = (y[:, None] - ph.body_centre[1]) / ph.body_semi[1]
    r2 = ex**2 + ey**2
    base = np.full(r2.shape, HU_AIR, dtype=np.float32)
    base[r2 <= 1] = HU_FAT
    base[r2 <= 0.88**2] = HU_SOFT_TISSUE
    spine_r2 = (x[None, :] - ph.spine_centre[0]) ** 2 + (y[:, None] - ph.spine_centre[1]) ** 2
    base[spine_r2 <= ph.spine_radius**2] = HU_CORTICAL_BONE
    base[spine_r2 <= (0.75 * ph.spine_radius) ** 2] = HU_CANCELLOUS_BONE
    return base


def _paint_lung(slab: np.ndarray, axes: tuple[np.ndarray, ...], lung: _Ellipsoid) -> None:
    win = _window(axes, lung.centre - lung.semi, lung.centre + lung.semi)
    if win is None:
        return
    index, (z, y, x) = win
    c, a = lung.centre.tolist(), lung.semi.tolist()
    inside = ((x - c[0]) / a[0]) ** 2 + ((y - c[1]) / a[1]) ** 2 + ((z - c[2]) / a[2]) ** 2 <= 1
    slab[index][inside] = HU_LUNG


def _paint_vessel(slab: np.ndarray, axes: tuple[np.ndarray, ...], tube: _Tube) -> None:
    """A tube only shows where it runs through parenchyma, so it never leaves the lungs."""
    lo = np.minimum(tube.start, tube.end) - tube.radius
    hi = np.maximum(tube.start, tube.end) + tube.radius
    win = _window(axes, lo, hi)
    if win is None:
        return
    index, (z, y, x) = win
    length = float(np.linalg.norm(tube.end - tube.start))
    u = ((tube.end - tube.start) / length).tolist()
    s = tube.start.tolist()
    dx, dy, dz = x - s[0], y - s[1], z - s[2]
    t = np.clip(dx * u[0] + dy * u[1] + dz * u[2], 0, length)
    dist2 = (dx - t * u[0]) ** 2 + (dy - t * u[1]) ** 2 + (dz - t * u[2]) ** 2
    view = slab[index]
    view[(dist2 <= tube.radius**2) & (view == HU_LUNG)] = HU_VESSEL


def _nodule_voxels(axes: tuple[np.ndarray, ...], nodule: _Nodule):
    """A sphere whose radius grows along each lobe/spicule direction.

    Returns the index slices of the nodule's bounding box in the slab and two boolean
    masks of that box: the nodule's voxels and its calcified core; None when the box
    misses the slab.
    """
    win = _window(axes, nodule.centre - nodule.reach, nodule.centre + nodule.reach)
    if win is None:
        return None
    index, (z, y, x) = win
    c = nodule.centre.tolist()
    dx, dy, dz = x - c[0], y - c[1], z - c[2]
    dist = np.sqrt(dx**2 + dy**2 + dz**2)
    safe = np.maximum(dist, 1e-6)
    radius = np.full(dist.shape, nodule.base_radius, dtype=np.float32)
    lobes = zip(nodule.lobe_dirs.tolist(), nodule.lobe_amps.tolist(), nodule.lobe_sharpness.tolist())
    for d, amp, sharp in lobes:
        cos = np.clip((dx * d[0] + dy * d[1] + dz * d[2]) / safe, 0, 1)
        radius += nodule.base_radius * amp * cos**sharp
    return index, dist <= radius, dist <= nodule.calcified_radius


def _paint_nodule(slab: np.ndarray, axes: tuple[np.ndarray, ...], nodule: _Nodule) -> None:
    voxels = _nodule_voxels(axes, nodule)
    if voxels is None:
        return
    index, inside, calcified = voxels
    view = slab[index]
    view[inside] = nodule.hu
    view[calcified] = nodule.calcified_hu


def _render(ph: _Phantom, rng: np.random.Generator) -> np.ndarray:
    """The CT as int16 HU, built slab by slab so memory stays small at full size."""
    geom = ph.geometry
    z, y, x = geom.axes_mm()
    base = _base_slice(ph, y, x)
    volume = np.empty(geom.size, dtype=np.int16)
    for start in range(0, geom.size[0], SLAB_SLICES):
        stop = min(start + SLAB_SLICES, geom.size[0])
        slab = np.repeat(base[None], stop - start, axis=0)
        axes = (z[start:stop], y, x)
        for lung in ph.lungs:
            _paint_lung(slab, axes, lung)
        for tube in ph.vessels:
            _paint_vessel(slab, axes, tube)
        for nodule in ph.nodules:
            _paint_nodule(slab, axes, nodule)
        slab += rng.standard_normal(slab.shape, dtype=np.float32) * np.float32(ph.noise_sd)
        volume[start:stop] = np.clip(np.rint(slab), *HU_STORED)
    return volume


def _in_lungs(rng: np.random.Generator, lungs: tuple[_Ellipsoid, ...], n: int) -> np.ndarray:
    which = rng.integers(len(lungs), size=n)
    centres = np.array([lung.centre for lung in lungs])[which]
    semis = np.array([lung.semi for lung in lungs])[which]
    return centres + _unit_ball(rng, n) * semis


def _on_vessels(rng: np.random.Generator, tubes: tuple[_Tube, ...], n: int) -> np.ndarray:
    which = rng.integers(len(tubes), size=n)
    starts = np.array([t.start for t in tubes])[which]
    ends = np.array([t.end for t in tubes])[which]
    return starts + rng.random((n, 1)) * (ends - starts)


def _in_body(rng: np.random.Generator, ph: _Phantom, n: int) -> np.ndarray:
    """Anywhere in the body's elliptic cylinder, over the whole scan length."""
    xy = ph.body_centre + _unit_ball(rng, n, dim=2) * ph.body_semi
    geom = ph.geometry
    z = rng.uniform(geom.origin[2], geom.last_voxel[2], (n, 1))
    return np.hstack([xy, z])


def _near_edge(rng: np.random.Generator, geom: _Geometry, n: int) -> np.ndarray:
    """Points within EDGE_MARGIN_MM of one face of the volume: chunks there need padding."""
    lo, hi = geom.origin, geom.last_voxel
    points = rng.uniform(lo, hi, (n, 3))
    axis = rng.integers(3, size=n)
    offset = rng.uniform(0, EDGE_MARGIN_MM, n)
    at_high = rng.random(n) < 0.5
    rows = np.arange(n)
    points[rows, axis] = np.where(at_high, hi[axis] - offset, lo[axis] + offset)
    return points


def _candidates(rng: np.random.Generator, ph: _Phantom) -> tuple[np.ndarray, np.ndarray]:
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
        _in_body(rng, ph, 2 * (n_neg - n_edge - n_vessel - n_lung)),
        _near_edge(rng, ph.geometry, 2 * n_edge),
    ])
    centres = np.array([n.centre for n in ph.nodules])
    diameters = np.array([n.diameter for n in ph.nodules])
    gap = np.linalg.norm(negatives[:, None, :] - centres[None, :, :], axis=2)
    negatives = negatives[(gap > diameters).all(axis=1)]
    negatives = negatives[rng.permutation(len(negatives))[:n_neg]]
    per_nodule = rng.integers(POSITIVES_PER_NODULE[0], POSITIVES_PER_NODULE[1] + 1, len(ph.nodules))
    positives = [n.centre + _unit_ball(rng, int(k)) * n.diameter / 4 for n, k in zip(ph.nodules, per_nodule)]
    # Every centre lies inside the scan, as in the real table.
    points = np.clip(np.concatenate([negatives, *positives]), ph.geometry.origin, ph.geometry.last_voxel)
    labels = np.zeros(len(points), dtype=int)
    labels[len(negatives):] = 1
    order = rng.permutation(len(points))
    return points[order], labels[order]


def _write_ct(mhd_path: Path, volume: np.ndarray, geom: _Geometry) -> None:
    """Write <uid>.mhd + <uid>.raw, uncompressed like the real data."""
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(geom.spacing.tolist())
    image.SetOrigin(geom.origin.tolist())
    sitk.WriteImage(image, str(mhd_path), useCompression=False)


def _excluded(seed: int, k: int, ph: _Phantom) -> tuple[np.ndarray, np.ndarray]:
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


@dataclass(frozen=True)
class _CtRecord:
    uid: str
    mhd_path: Path
    nodules: tuple[_Nodule, ...]
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


def _draw_ct(seed: int, k: int, shape: tuple[int, int, int]) -> tuple[np.random.Generator, str, _Phantom]:
    """CT k's generator, uid and phantom: the first draws of its own random stream."""
    rng = np.random.default_rng([seed, k])
    uid = _series_uid(rng)
    phantom = _phantom(rng, _geometry(rng, shape))
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
        voxels = _nodule_voxels(axes, nodule)
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
        points, labels = _candidates(rng, phantom)
        mhd_path = out / f"subset{k % N_SUBSETS}" / f"{uid}.mhd"
        _write_ct(mhd_path, _render(phantom, rng), geom)
        records.append(_CtRecord(uid, mhd_path, phantom.nodules, points, labels, _excluded(seed, k, phantom)))
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m luna_dist.synth", description="Write a synthetic LUNA16-format data set."
    )
    parser.add_argument("out", type=Path, help="folder to write subset0..9 and the CSVs into")
    parser.add_argument("--cts", type=int, default=10, help="number of CTs (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--shape", type=int, nargs=3, metavar=("I", "R", "C"), default=list(DEFAULT_SHAPE),
        help="slices rows columns; slices vary +-25%% per CT (default %(default)s; full size: 300 512 512)",
    )
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    try:
        summary = make_dataset(args.out, args.cts, args.seed, tuple(args.shape))
    except ValueError as err:
        parser.error(str(err))
    print(summary)


if __name__ == "__main__":
    main()
