"""The synthetic chest phantom of `luna_dist.synthetic.generator`: a CT's anatomy drawn from a random stream
and rendered to HU (its candidates and excluded findings are placed by `luna_dist.synthetic.placing`).

Every CT is a simple chest: an elliptical body with a fat layer, two ellipsoidal lungs
with vessels, a spine, and 1-3 nodules. Malignant nodules are spiculated/lobulated and
denser; benign ones are smooth and round, some with a calcified core, so malignancy can
be learnt from the image. Negative candidates mostly sit in the lungs (many on vessels,
the classic false positive) or the body, a few within millimetres of the volume border.
Coordinates are millimetres in patient space, X/Y/Z order; arrays are (I, R, C).

Each function draws from the generator it is given, in a fixed order: replaying a CT's
stream replays its phantom exactly (`generator.true_nodule_mask` relies on it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


@dataclass(frozen=True)
class ScanGeometry:
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
class Ellipsoid:
    centre: np.ndarray  # (3,) X/Y/Z mm
    semi: np.ndarray  # (3,) semi-axes X/Y/Z mm


@dataclass(frozen=True)
class Tube:
    start: np.ndarray
    end: np.ndarray
    radius: float


@dataclass(frozen=True)
class Nodule:
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
class Phantom:
    geometry: ScanGeometry
    body_centre: np.ndarray  # (2,) X/Y mm
    body_semi: np.ndarray  # (2,) X/Y mm
    spine_centre: np.ndarray  # (2,) X/Y mm
    spine_radius: float
    lungs: tuple[Ellipsoid, ...]
    vessels: tuple[Tube, ...]
    nodules: tuple[Nodule, ...]
    noise_sd: float


def unit_ball(rng: np.random.Generator, n: int, dim: int = 3) -> np.ndarray:
    """n points uniform in the unit ball (disk for dim=2)."""
    v = rng.standard_normal((n, dim))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v * rng.random((n, 1)) ** (1 / dim)


def draw_geometry(rng: np.random.Generator, shape: tuple[int, int, int]) -> ScanGeometry:
    slices = round(shape[0] * rng.uniform(1 - SLICE_COUNT_JITTER, 1 + SLICE_COUNT_JITTER))
    inplane = rng.uniform(*INPLANE_SPACING_MM)
    spacing = np.array([inplane, inplane, rng.choice(SLICE_SPACINGS_MM)])
    origin = np.array([rng.uniform(*ORIGIN_XY_MM), rng.uniform(*ORIGIN_XY_MM), rng.uniform(*ORIGIN_Z_MM)])
    return ScanGeometry((slices, shape[1], shape[2]), spacing, origin)


def _lungs(
    rng: np.random.Generator, geom: ScanGeometry, body_c: np.ndarray, body_a: np.ndarray
) -> tuple[Ellipsoid, ...]:
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
        lungs.append(Ellipsoid(centre, semi))
    return tuple(lungs)


def _vessels(rng: np.random.Generator, lungs: tuple[Ellipsoid, ...]) -> tuple[Tube, ...]:
    """Tubes fanning out from each lung's hilum (its medial side) into the lung."""
    tubes = []
    for lung, towards_midline in zip(lungs, (1, -1)):
        hilum = lung.centre + np.array([towards_midline * 0.6, 0.0, 0.0]) * lung.semi
        n = int(rng.integers(4, 8))
        starts = hilum + rng.uniform(-0.15, 0.15, (n, 3)) * lung.semi
        ends = lung.centre + unit_ball(rng, n) * lung.semi * 0.9
        radii = rng.uniform(0.04, 0.09, n) * lung.semi[:2].min()
        tubes += [Tube(s, e, float(r)) for s, e, r in zip(starts, ends, radii)]
    return tuple(tubes)


def draw_nodule(
    rng: np.random.Generator, centre: np.ndarray, diameter: float, malignant: bool | None = None
) -> Nodule:
    """A nodule's look at a given centre (X/Y/Z mm) and diameter (mm): malignant ones lobulated,
    spiculated and denser, benign ones smooth, some with a calcified core.

    `malignant` None draws it (MALIGNANT_FRACTION of them); given, as for a real annotation of
    known malignancy (`luna_dist.synthetic.rehearsal`), that draw is skipped and the rest is as drawn.
    """
    if malignant is None:
        malignant = bool(rng.random() < MALIGNANT_FRACTION)
    if malignant:
        n_lobes, n_spicules = int(rng.integers(2, 5)), int(rng.integers(8, 16))
        dirs = rng.standard_normal((n_lobes + n_spicules, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        amps = np.concatenate([rng.uniform(0.1, 0.25, n_lobes), rng.uniform(0.5, 1.0, n_spicules)])
        sharpness = np.concatenate([np.full(n_lobes, 2.0), rng.uniform(8, 30, n_spicules)])
        return Nodule(centre, diameter, True, rng.uniform(*HU_MALIGNANT), dirs, amps, sharpness, 0.0, 0.0)
    calcified = rng.random() < CALCIFIED_FRACTION
    calcified_radius = diameter / 2 * rng.uniform(0.3, 0.6) if calcified else 0.0
    empty = np.zeros(0)
    return Nodule(
        centre, diameter, False, rng.uniform(*HU_BENIGN), np.zeros((0, 3)), empty, empty,
        calcified_radius, rng.uniform(*HU_CALCIFIED),
    )


def _nodules(rng: np.random.Generator, lungs: tuple[Ellipsoid, ...]) -> tuple[Nodule, ...]:
    """1-3 nodules well inside the lungs, apart from each other.

    A nodule that finds no free place in 20 tries is left out; the first always fits.
    Diameters are log-uniform (small nodules are the common case) and capped so the
    nodule fits inside the lung.
    """
    nodules: list[Nodule] = []
    for _ in range(int(rng.integers(NODULES_PER_CT[0], NODULES_PER_CT[1] + 1))):
        for _attempt in range(20):
            lung = lungs[int(rng.integers(len(lungs)))]
            cap = min(DIAMETER_MM[1], lung.semi.min())
            diameter = float(np.exp(rng.uniform(np.log(DIAMETER_MM[0]), np.log(cap))))
            centre = lung.centre + unit_ball(rng, 1)[0] * (0.75 * lung.semi - diameter / 2)
            if all(np.linalg.norm(centre - o.centre) > diameter + o.diameter + 5 for o in nodules):
                nodules.append(draw_nodule(rng, centre, diameter))
                break
    return tuple(nodules)


def draw_phantom(rng: np.random.Generator, geom: ScanGeometry) -> Phantom:
    extent_xy = geom.extent[:2]
    body_c = geom.origin[:2] + extent_xy * (0.5 + rng.uniform(-0.02, 0.02, 2))
    body_a = extent_xy * np.array([rng.uniform(0.40, 0.46), rng.uniform(0.30, 0.36)])
    lungs = _lungs(rng, geom, body_c, body_a)
    # +y is posterior in LUNA16's patient space, so the spine sits at larger y.
    spine_c = body_c + np.array([0.0, 0.78 * body_a[1]])
    return Phantom(
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


def _base_slice(ph: Phantom, y: np.ndarray, x: np.ndarray) -> np.ndarray:
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


def _paint_lung(slab: np.ndarray, axes: tuple[np.ndarray, ...], lung: Ellipsoid) -> None:
    win = _window(axes, lung.centre - lung.semi, lung.centre + lung.semi)
    if win is None:
        return
    index, (z, y, x) = win
    c, a = lung.centre.tolist(), lung.semi.tolist()
    inside = ((x - c[0]) / a[0]) ** 2 + ((y - c[1]) / a[1]) ** 2 + ((z - c[2]) / a[2]) ** 2 <= 1
    slab[index][inside] = HU_LUNG


def _paint_vessel(slab: np.ndarray, axes: tuple[np.ndarray, ...], tube: Tube) -> None:
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


def nodule_voxels(axes: tuple[np.ndarray, ...], nodule: Nodule):
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


def _paint_nodule(slab: np.ndarray, axes: tuple[np.ndarray, ...], nodule: Nodule) -> None:
    voxels = nodule_voxels(axes, nodule)
    if voxels is None:
        return
    index, inside, calcified = voxels
    view = slab[index]
    view[inside] = nodule.hu
    view[calcified] = nodule.calcified_hu


def render(ph: Phantom, rng: np.random.Generator) -> np.ndarray:
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
