"""XYZ (mm) <-> IRC (index) against SimpleITK's own transforms, on awkward geometries."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import SimpleITK as sitk

from luna_dist.imaging.geometry import (
    LPS,
    Geometry,
    irc_to_xyz,
    nearest_voxel,
    orientation,
    shear,
    xyz_to_irc,
    xyz_to_irc_float,
)


def rotation_z(degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])


def rotation_axis(axis, degrees: float) -> np.ndarray:
    """Rodrigues rotation about an arbitrary axis."""
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    a = math.radians(degrees)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(a) * cross + (1 - math.cos(a)) * cross @ cross


FLIP_Y = np.diag([1.0, -1.0, 1.0])
FLIP_Z = np.diag([1.0, 1.0, -1.0])

# (id, size (x, y, z), spacing (x, y, z) mm, origin (x, y, z) mm, direction 3x3)
GEOMETRIES = [
    ("identity-unit", (20, 30, 40), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3)),
    ("luna-like", (160, 160, 80), (0.7, 0.7, 2.5), (-198.1, -171.4, -335.25), np.eye(3)),
    ("anisotropic-all", (50, 60, 70), (0.55, 0.83, 1.25), (12.5, -40.2, 301.7), np.eye(3)),
    ("rot-z-30-flip-y", (64, 64, 32), (0.7, 0.7, 2.5), (-120.3, 85.9, -250.0), rotation_z(30) @ FLIP_Y),
    ("rot-z-90", (40, 50, 20), (0.7, 0.9, 2.5), (10.0, 20.0, 30.0), rotation_z(90)),
    ("flip-z", (40, 40, 40), (0.625, 0.625, 1.8), (-5.0, 5.0, -500.0), FLIP_Z),
    ("oblique", (30, 40, 50), (0.8, 0.6, 2.0), (33.3, -77.7, 111.1), rotation_axis((1, 2, 3), 37) @ FLIP_Z),
]


def make_image(size, spacing, origin, direction) -> sitk.Image:
    image = sitk.Image(list(size), sitk.sitkInt16)
    image.SetSpacing(list(spacing))
    image.SetOrigin(list(origin))
    image.SetDirection(np.asarray(direction, dtype=np.float64).ravel().tolist())
    return image


def random_points(image: sitk.Image, rng: np.random.Generator, n: int) -> np.ndarray:
    """Points in mm around (and beyond) the image: uniform indices in a box 20 % larger, then mapped."""
    size = np.array(image.GetSize(), dtype=np.float64)
    cri = rng.uniform(-0.2 * size, 1.2 * size, (n, 3))
    return np.array([image.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in cri])


@pytest.fixture(params=GEOMETRIES, ids=[g[0] for g in GEOMETRIES])
def image(request) -> sitk.Image:
    _, size, spacing, origin, direction = request.param
    return make_image(size, spacing, origin, direction)


def test_geometry_of_image_reads_origin_spacing_direction():
    direction = rotation_z(30) @ FLIP_Y
    image = make_image((5, 6, 7), (0.7, 0.8, 2.5), (1.5, -2.5, 3.5), direction)
    geometry = Geometry.of_image(image)
    np.testing.assert_array_equal(geometry.origin_xyz, [1.5, -2.5, 3.5])
    np.testing.assert_array_equal(geometry.spacing_xyz, [0.7, 0.8, 2.5])
    np.testing.assert_allclose(geometry.direction, direction, atol=1e-12)
    assert geometry.to_dict()["direction"] == pytest.approx(direction.ravel().tolist(), abs=1e-12)


def test_test_geometries_really_are_awkward():
    """Guard for the table: at least one flipped, one rotated, all with non-zero origin but one."""
    directions = [g[4] for g in GEOMETRIES]
    assert any(np.linalg.det(d) < 0 for d in directions)
    assert any(not np.allclose(np.abs(d), np.eye(3)) for d in directions)
    assert sum(any(g[3]) for g in GEOMETRIES) == len(GEOMETRIES) - 1


def test_xyz_to_irc_equals_simpleitk_for_random_points(image):
    geometry = Geometry.of_image(image)
    points = random_points(image, np.random.default_rng(0), 500)
    expected = np.array([image.TransformPhysicalPointToIndex(p.tolist())[::-1] for p in points])
    for point, want in zip(points, expected):
        got = xyz_to_irc(point, geometry)
        assert got.shape == (3,)
        assert got.tolist() == want.tolist(), f"point {point.tolist()}"


def test_xyz_to_irc_vectorised_equals_per_point(image):
    geometry = Geometry.of_image(image)
    points = random_points(image, np.random.default_rng(1), 300)
    batched = xyz_to_irc(points, geometry)
    assert batched.shape == (300, 3)
    assert batched.dtype == np.int64
    singles = np.array([xyz_to_irc(p, geometry) for p in points])
    np.testing.assert_array_equal(batched, singles)
    # Any leading shape works: (10, 30, 3) in, (10, 30, 3) out.
    np.testing.assert_array_equal(xyz_to_irc(points.reshape(10, 30, 3), geometry), batched.reshape(10, 30, 3))


def test_irc_to_xyz_equals_simpleitk_and_round_trips(image):
    geometry = Geometry.of_image(image)
    rng = np.random.default_rng(2)
    size_irc = np.array(image.GetSize()[::-1])
    irc = rng.integers(-5, size_irc + 5, (300, 3))
    xyz = irc_to_xyz(irc, geometry)
    assert xyz.shape == (300, 3)
    expected = np.array([image.TransformIndexToPhysicalPoint([int(v) for v in idx[::-1]]) for idx in irc])
    np.testing.assert_allclose(xyz, expected, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(xyz_to_irc(xyz, geometry), irc)


def test_xyz_to_irc_ignores_offsets_below_half_a_voxel(image):
    """Voxel centres moved by up to 0.49 voxel along each array axis still map to that voxel."""
    geometry = Geometry.of_image(image)
    rng = np.random.default_rng(3)
    irc = rng.integers(0, np.array(image.GetSize()[::-1]), (200, 3))
    jitter_cri = rng.uniform(-0.49, 0.49, (200, 3))
    continuous = irc[:, ::-1] + jitter_cri
    xyz = np.array([image.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in continuous])
    np.testing.assert_array_equal(xyz_to_irc(xyz, geometry), irc)


def test_exact_half_voxel_points_round_up_like_simpleitk():
    """On a binary-exact geometry, points halfway between voxels go to the higher index (also below zero)."""
    image = make_image((8, 8, 8), (0.5, 1.0, 2.0), (0.25, -4.0, 8.0), np.eye(3))
    geometry = Geometry.of_image(image)
    halves = np.arange(-5, 6) + 0.5
    points = np.array([image.TransformContinuousIndexToPhysicalPoint([h, -h, h]) for h in halves])
    expected = np.array([image.TransformPhysicalPointToIndex(p.tolist())[::-1] for p in points])
    np.testing.assert_array_equal(expected[:, 2], np.floor(halves) + 1)  # the table itself: ties go up
    np.testing.assert_array_equal(xyz_to_irc(points, geometry), expected)


def test_axis_order_is_index_row_column():
    """Moving along patient X changes the column, Y the row, Z the slice index (identity direction)."""
    geometry = Geometry.of_image(make_image((50, 60, 70), (0.7, 0.8, 2.5), (-10.0, -20.0, -30.0), np.eye(3)))
    base = np.array([-10.0, -20.0, -30.0])
    assert xyz_to_irc(base, geometry).tolist() == [0, 0, 0]
    assert xyz_to_irc(base + [0.7 * 5, 0, 0], geometry).tolist() == [0, 0, 5]
    assert xyz_to_irc(base + [0, 0.8 * 6, 0], geometry).tolist() == [0, 6, 0]
    assert xyz_to_irc(base + [0, 0, 2.5 * 7], geometry).tolist() == [7, 0, 0]
    assert irc_to_xyz(np.array([7, 6, 5]), geometry) == pytest.approx(base + [3.5, 4.8, 17.5])


def test_points_outside_the_volume_give_out_of_range_indices():
    image = make_image((10, 10, 10), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    geometry = Geometry.of_image(image)
    assert xyz_to_irc([-5.0, 0.0, 0.0], geometry).tolist() == [0, 0, -5]
    assert xyz_to_irc([0.0, 0.0, 1000.0], geometry).tolist() == [500, 0, 0]


def test_xyz_to_irc_float_equals_simpleitk_continuous_index_and_round_trips(image):
    geometry = Geometry.of_image(image)
    points = random_points(image, np.random.default_rng(4), 300)
    expected = np.array([image.TransformPhysicalPointToContinuousIndex(p.tolist())[::-1] for p in points])
    irc = xyz_to_irc_float(points, geometry)
    assert irc.shape == (300, 3) and irc.dtype == np.float64
    np.testing.assert_allclose(irc, expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(irc_to_xyz(irc, geometry), points, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(nearest_voxel(irc), xyz_to_irc(points, geometry))


@pytest.mark.parametrize("value, voxel", [(2.5, 3), (3.5, 4), (-0.5, 0), (-1.5, -1), (2.49, 2), (-2.51, -3)])
def test_nearest_voxel_rounds_halves_up_not_to_even(value, voxel):
    assert nearest_voxel(np.array([value, 0.0, 0.0]))[0] == voxel


AXIS_TURNS = [np.eye(3)[:, list(order)] * signs for order in itertools.permutations(range(3))
              for signs in itertools.product((1.0, -1.0), repeat=3)]
"""Every way of storing a CT's axes along LPS's: 6 orders of the axes, each axis either way."""


@pytest.mark.parametrize("oblique", [np.eye(3), rotation_axis((1, 2, 3), 20)], ids=["axis-aligned", "oblique"])
def test_the_turn_to_lps_from_the_header_is_what_dicom_orient_makes(oblique):
    """`Geometry.turned_to_lps` says, from a header, the size and geometry `sitk.DICOMOrient` gives the voxels,
    and every voxel keeps its point: a plan knows what the build cuts, and positions stay exact."""
    hu = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    for turn in AXIS_TURNS:
        image = sitk.GetImageFromArray(hu)
        image.SetSpacing((0.7, 0.8, 2.5))
        image.SetOrigin((3.5, -4.25, 5.125))
        image.SetDirection((oblique @ turn).ravel().tolist())
        turned = sitk.DICOMOrient(image, LPS)
        geometry, size = Geometry.of_image(image).turned_to_lps(image.GetSize())
        assert size == turned.GetSize()
        for field in ("origin_xyz", "spacing_xyz", "direction"):
            np.testing.assert_allclose(getattr(geometry, field), getattr(Geometry.of_image(turned), field), atol=1e-12)
        if np.allclose(oblique, np.eye(3)):
            np.testing.assert_array_equal(geometry.direction, np.eye(3))  # LUNA16's axes exactly
        stored, read = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(turned)
        irc = np.argwhere(read == 77)[0]  # one voxel, found by its value: at the same point in both
        np.testing.assert_allclose(irc_to_xyz(irc, geometry), irc_to_xyz(np.argwhere(stored == 77)[0],
                                                                          Geometry.of_image(image)), atol=1e-12)


def test_orientation_names_the_stored_axes():
    assert orientation(np.eye(3)) == LPS
    assert orientation(np.diag([-1.0, -1.0, 1.0])) == "RAS"
    assert orientation(np.diag([1.0, 1.0, -1.0])) == "LPI"


@pytest.mark.parametrize("degrees", [0.0, 5.0, 20.0])
def test_shear_measures_a_gantry_tilt(degrees):
    """Slices stepping 1.25 mm 20° off their normal: 20°, and 39 steps of 1.25 sin 20° = 16.7 mm at the last."""
    t = np.radians(degrees)
    steps = np.array([[0.7, 0, 1.25 * np.sin(t)], [0, 0.8, 0], [0, 0, 1.25 * np.cos(t)]])
    angle, offset = shear(steps, (24, 20, 40))
    assert angle == pytest.approx(degrees) and offset == pytest.approx(39 * 1.25 * np.sin(t))
    assert shear(rotation_axis((1, 2, 3), 37) * [0.8, 0.6, 2.0], (30, 40, 50))[1] < 1e-12  # rotated: no shear
