

import dataclasses
import itertools
import pickle

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from luna_dist.data.augment import AugmentConfig, augment, augment_with_mask, random_crop
from luna_dist.imaging.chunks import CHUNK_SHAPE
from luna_dist.imaging.ct import HU_MAX, HU_MIN

I, R, C = CHUNK_SHAPE
SPATIAL_DIMS = (2, 3, 4)  # I, R, C in a (N, 1, I, R, C) batch
FLIP_COMBINATIONS = [
    dims for k in range(4) for dims in itertools.combinations(SPATIAL_DIMS, k)
]  # all 8 subsets of axes


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_batch(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, *CHUNK_SHAPE, generator=_generator(seed)) * (HU_MAX - HU_MIN) + HU_MIN


def _ball(n: int, centre: tuple[float, float, float], radius: float) -> torch.Tensor:
    """(N, 1, I, R, C) batch of identical bright balls (+1000 HU) in air (-1000 HU)."""
    i, r, c = torch.meshgrid(*(torch.arange(size, dtype=torch.float32) for size in CHUNK_SHAPE), indexing="ij")
    inside = (i - centre[0]) ** 2 + (r - centre[1]) ** 2 + (c - centre[2]) ** 2 <= radius**2
    chunk = torch.where(inside, float(HU_MAX), float(HU_MIN))
    return chunk.expand(n, 1, *CHUNK_SHAPE).clone()


def _above_air(batch: torch.Tensor) -> torch.Tensor:
    """HU above air, (N, I, R, C); interpolating air gives -1000 +- rounding, which must not count."""
    weight = batch[:, 0] - HU_MIN
    return torch.where(weight > 1e-2, weight, 0.0)


def _mass_and_centroid(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mass above air, (N,), and its centre in voxels, (N, 3) in (I, R, C) order."""
    weight = _above_air(batch)
    mass = weight.sum(dim=(1, 2, 3))
    coords = torch.meshgrid(*(torch.arange(size, dtype=torch.float32) for size in CHUNK_SHAPE), indexing="ij")
    centroid = torch.stack([(weight * x).sum(dim=(1, 2, 3)) / mass for x in coords], dim=1)
    return mass, centroid


def _spread(batch: torch.Tensor, centroid: torch.Tensor) -> torch.Tensor:
    """Standard deviation of the mass along each axis, (N, 3) in (I, R, C) order."""
    weight = _above_air(batch)
    mass = weight.sum(dim=(1, 2, 3))
    coords = torch.meshgrid(*(torch.arange(size, dtype=torch.float32) for size in CHUNK_SHAPE), indexing="ij")
    variances = [
        (weight * (x - centroid[:, axis].view(-1, 1, 1, 1)) ** 2).sum(dim=(1, 2, 3)) / mass
        for axis, x in enumerate(coords)
    ]
    return torch.stack(variances, dim=1).sqrt()


@pytest.mark.parametrize(
    ("config", "enabled"),
    [
        (AugmentConfig.none(), False),
        (AugmentConfig.all(), True),
        (AugmentConfig(flip=True), True),
        (AugmentConfig(offset=0.1), True),
        (AugmentConfig(scale=0.2), True),
        (AugmentConfig(rotate=True), True),
        (AugmentConfig(noise_hu=25.0), True),
    ],
)
def test_enabled(config, enabled):
    assert config.enabled is enabled


def test_all_has_documented_strengths():
    assert AugmentConfig.all() == AugmentConfig(flip=True, offset=0.1, scale=0.2, rotate=True, noise_hu=25.0)


def test_config_pickles_and_is_frozen():
    config = AugmentConfig.all()
    assert pickle.loads(pickle.dumps(config)) == config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.flip = False


def test_none_is_identity():
    batch = _random_batch(4)
    assert torch.equal(augment(batch, AugmentConfig.none(), _generator()), batch)


def _matching_flips(out: torch.Tensor, sample: torch.Tensor, atol: float) -> list[tuple[int, ...]]:
    """Which axis subsets, flipped, turn ``sample`` (1, I, R, C) into ``out``."""
    return [
        dims
        for dims in FLIP_COMBINATIONS
        if torch.allclose(out, sample.flip([d - 1 for d in dims]) if dims else sample, rtol=0, atol=atol)
    ]


def test_flip_only_gives_exact_flips_and_both_outcomes_per_axis():
    batch = _random_batch(64)
    out = augment(batch, AugmentConfig(flip=True), _generator())

    flipped = torch.zeros(64, 3, dtype=torch.bool)  # (N, 3) in (I, R, C) order
    for n in range(64):
        matches = _matching_flips(out[n], batch[n], atol=0)
        assert len(matches) == 1, f"sample {n} is no exact flip of its input"
        for dim in matches[0]:
            flipped[n, dim - 2] = True
    assert flipped.any(dim=0).all() and (~flipped).any(dim=0).all()


def test_flip_through_resampling_matches_index_flips():
    """With another spatial transform on, flips go into the affine: same flips, same axes."""
    batch = _random_batch(16)
    out = augment(batch, AugmentConfig(flip=True, scale=1e-6), _generator())
    matches = [_matching_flips(out[n], batch[n], atol=0.5) for n in range(16)]
    assert all(len(m) == 1 for m in matches)
    assert len({m[0] for m in matches}) > 1


@pytest.mark.slow
def test_offset_shifts_by_at_most_ten_percent():
    centre = (I / 2, R / 2, C / 2)
    batch = _ball(64, centre, radius=0.5)  # a single bright voxel
    out = augment(batch, AugmentConfig(offset=0.1), _generator())

    mass, centroid = _mass_and_centroid(out)
    _, start = _mass_and_centroid(batch)
    shift = (centroid - start).abs()  # (N, 3) voxels, (I, R, C)
    limit = torch.tensor(CHUNK_SHAPE, dtype=torch.float32) * 0.1
    assert (shift <= limit + 1).all()
    # Shifts really use the whole range: some sample moves most of the way on every axis.
    assert (shift.amax(dim=0) >= 0.8 * limit).all()
    torch.testing.assert_close(mass, torch.full_like(mass, 2000.0), rtol=1e-4, atol=0)  # nothing lost


def test_rotation_leaves_head_foot_profile_unchanged():
    profile = torch.linspace(HU_MIN, HU_MAX, I).view(1, 1, I, 1, 1)
    batch = profile.expand(16, 1, *CHUNK_SHAPE).clone()
    out = augment(batch, AugmentConfig(rotate=True), _generator())
    torch.testing.assert_close(out, batch, rtol=0, atol=1e-2)


def test_rotation_turns_column_pattern_into_row_pattern():
    ramp = torch.linspace(HU_MIN, HU_MAX, C).view(1, 1, 1, 1, C)
    batch = ramp.expand(32, 1, *CHUNK_SHAPE).clone()
    out = augment(batch, AugmentConfig(rotate=True), _generator())

    centre = out[:, 0, :, 12:36, 12:36]  # away from the border-padded corners
    along_r = centre.diff(dim=2).abs().mean(dim=(1, 2, 3))  # (N,)
    along_c = centre.diff(dim=3).abs().mean(dim=(1, 2, 3))
    assert (along_r > 5 * along_c).any()  # near ±90°: the ramp now runs along rows
    assert (along_c > 5 * along_r).any()  # near 0° or 180°: still along columns
    assert torch.equal(out.diff(dim=2), torch.zeros_like(out.diff(dim=2)))  # nothing along I


def test_rotation_moves_an_off_axis_blob_around_the_head_foot_axis():
    centre = (I / 2 - 0.5, R / 2 - 0.5 + 10, C / 2 - 0.5)  # 10 voxels off the rotation axis
    batch = _ball(32, centre, radius=4)
    out = augment(batch, AugmentConfig(rotate=True), _generator())

    mass_in, centroid_in = _mass_and_centroid(batch)
    mass_out, centroid_out = _mass_and_centroid(out)
    torch.testing.assert_close(mass_out, mass_in, rtol=0.03, atol=0)

    axis = torch.tensor([R / 2 - 0.5, C / 2 - 0.5])
    radius = (centroid_out[:, 1:] - axis).norm(dim=1)  # (N,) distance from the I axis
    torch.testing.assert_close(radius, torch.full_like(radius, 10.0), rtol=0, atol=0.5)
    torch.testing.assert_close(centroid_out[:, 0], centroid_in[:, 0], rtol=0, atol=1e-3)
    angles = torch.atan2(*(centroid_out[:, 1:] - axis).unbind(dim=1))
    assert angles.max() - angles.min() > 3  # spread over much of the circle


def test_scale_changes_blob_size_within_bounds():
    batch = _ball(64, (I / 2 - 0.5, R / 2 - 0.5, C / 2 - 0.5), radius=8)
    out = augment(batch, AugmentConfig(scale=0.2), _generator())

    _, centroid_in = _mass_and_centroid(batch)
    _, centroid_out = _mass_and_centroid(out)
    ratio = _spread(out, centroid_out) / _spread(batch, centroid_in)  # (N, 3)
    # A scale factor s in [0.8, 1.2] makes the ball 1/s as large along that axis.
    assert (ratio >= 1 / 1.2 - 0.03).all() and (ratio <= 1 / 0.8 + 0.03).all()
    assert ratio.min() < 0.9 and ratio.max() > 1.15
    # Axes are scaled independently: the ball becomes an ellipsoid.
    assert ((ratio.amax(dim=1) - ratio.amin(dim=1)) > 0.1).any()


def test_noise_has_requested_spread():
    batch = torch.zeros(8, 1, *CHUNK_SHAPE)
    out = augment(batch, AugmentConfig(noise_hu=25.0), _generator())
    assert out.std().item() == pytest.approx(25.0, rel=0.1)
    assert abs(out.mean().item()) < 1.0
    per_sample = out - out[:1]
    assert (per_sample[1:].abs().amax(dim=(1, 2, 3, 4)) > 0).all()  # fresh noise per sample


def test_each_sample_gets_its_own_transform():
    batch = _random_batch(1).expand(16, 1, *CHUNK_SHAPE).clone()  # 16 copies of one chunk
    spatial = dataclasses.replace(AugmentConfig.all(), noise_hu=0.0)
    out = augment(batch, spatial, _generator())
    flat = out.flatten(1)
    distance = torch.cdist(flat, flat)  # (N, N)
    off_diagonal = ~torch.eye(16, dtype=torch.bool)
    assert (distance[off_diagonal] > 1.0).all()


@pytest.mark.parametrize("config", [AugmentConfig.all(), AugmentConfig(flip=True), AugmentConfig(noise_hu=25.0)])
def test_same_seed_same_output(config):
    batch = _random_batch(4)
    first = augment(batch, config, _generator(7))
    assert torch.equal(first, augment(batch, config, _generator(7)))
    assert not torch.equal(first, augment(batch, config, _generator(8)))


@pytest.mark.slow
@pytest.mark.parametrize("config", [AugmentConfig.all(), AugmentConfig(flip=True), AugmentConfig(noise_hu=25.0)])
def test_keeps_shape_dtype_device_and_never_makes_float64(config):
    class DtypeRecorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.dtypes.add(t.dtype)
            return out

    batch = _random_batch(4)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # a stray tensor without dtype= would be float64
    try:
        with DtypeRecorder() as recorder:
            out = augment(batch, config, _generator())
    finally:
        torch.set_default_dtype(previous)

    assert torch.float64 not in recorder.dtypes
    assert torch.float32 in recorder.dtypes
    assert out.shape == batch.shape and out.dtype == torch.float32 and out.device == batch.device


def test_autocast_does_not_lower_precision():
    """Training augments inside autocast; the affine grid must still be built in float32."""
    batch = _random_batch(4)
    expected = augment(batch, AugmentConfig.all(), _generator())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = augment(batch, AugmentConfig.all(), _generator())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-3)


def test_default_generator_is_used_when_none_given():
    batch = _random_batch(4)
    torch.manual_seed(3)
    first = augment(batch, AugmentConfig.all())
    torch.manual_seed(3)
    assert torch.equal(first, augment(batch, AugmentConfig.all()))


# -- 2-D slice stacks with their masks (segmentation) ------------------------------------------
S = 64  # segmentation crops are 64 x 64


def _disk_stack(n: int, centre: tuple[float, float], radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 7, S, S) stacks of a bright disk (+1000 HU) in air, and its mask (N, 1, S, S) bool."""
    r, c = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij")
    inside = (r - centre[0]) ** 2 + (c - centre[1]) ** 2 <= radius**2
    image = torch.where(inside, float(HU_MAX), float(HU_MIN)).expand(n, 7, S, S).clone()
    return image, inside.expand(n, 1, S, S).clone()


def _centroids_2d(weight: torch.Tensor) -> torch.Tensor:
    """Centre of mass (N, 2) in (R, C) of weights (N, S, S)."""
    r, c = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij")
    mass = weight.sum(dim=(1, 2))
    return torch.stack([(weight * r).sum(dim=(1, 2)) / mass, (weight * c).sum(dim=(1, 2)) / mass], dim=1)


@pytest.mark.parametrize(
    "config",
    [AugmentConfig.all(), AugmentConfig(offset=0.1), AugmentConfig(flip=True), AugmentConfig(rotate=True),
     AugmentConfig(scale=0.2)],
)
def test_mask_moves_with_the_image(config):
    image, mask = _disk_stack(64, (20.0, 40.0), radius=6)  # off-centre, so flips and rotations move it
    out_image, out_mask = augment_with_mask(image, mask, config, _generator())
    assert out_mask.dtype == torch.bool and out_mask.shape == mask.shape
    assert out_image.shape == image.shape and out_image.dtype == torch.float32
    # Every channel of the stack moved alike (noise aside), and the mask sits on the disk.
    bright = out_image.mean(dim=1) > 0  # (N, S, S) disk after the move, noise averaged over 7 channels
    agreement = (bright == out_mask[:, 0]).float().mean(dim=(1, 2))
    assert (agreement > 0.99).all()
    torch.testing.assert_close(_centroids_2d(out_mask[:, 0].float()), _centroids_2d(bright.float()), rtol=0, atol=0.3)
    # The mask keeps its size up to the scale.
    area = out_mask.sum(dim=(1, 2, 3)).float() / mask[0].sum()
    assert ((area > 0.6) & (area < 1.6)).all()


def test_offset_moves_image_and_mask_by_up_to_ten_percent():
    """The book's offset is written into a row of the matrix that is thrown away; this one moves."""
    image, mask = _disk_stack(64, (S / 2 - 0.5, S / 2 - 0.5), radius=5)
    out_image, out_mask = augment_with_mask(image, mask, AugmentConfig(offset=0.1), _generator())
    shift = _centroids_2d(out_mask[:, 0].float()) - _centroids_2d(mask[:, 0].float())  # (N, 2) pixels
    image_shift = _centroids_2d(out_image[:, 0] - HU_MIN) - _centroids_2d(image[:, 0] - HU_MIN)
    # The thresholded mask moves by whole pixels, the interpolated image by fractions of one.
    torch.testing.assert_close(shift, image_shift, rtol=0, atol=0.6)
    assert (shift.abs() <= 0.1 * S + 0.5).all()
    assert (shift.abs().amax(dim=0) >= 0.8 * 0.1 * S).all()  # both axes, most of the range
    assert (shift.norm(dim=1) > 1).float().mean() > 0.7  # most samples really move


def test_noise_goes_to_the_image_only():
    image, mask = _disk_stack(8, (30.0, 30.0), radius=8)
    out_image, out_mask = augment_with_mask(image, mask, AugmentConfig(noise_hu=25.0), _generator())
    assert torch.equal(out_mask, mask)
    assert (out_image - image).std().item() == pytest.approx(25.0, rel=0.1)


def test_nothing_enabled_returns_the_inputs():
    image, mask = _disk_stack(2, (30.0, 30.0), radius=8)
    out_image, out_mask = augment_with_mask(image, mask, AugmentConfig.none())
    assert out_image is image and out_mask is mask


def test_random_crop_takes_the_same_window_of_image_and_mask():
    n, rows, cols = 32, 96, 80
    position = torch.arange(rows * cols, dtype=torch.float32).view(1, 1, rows, cols)
    image = position.expand(n, 7, rows, cols) + torch.arange(7, dtype=torch.float32).view(1, 7, 1, 1) * 1e5
    mask = (position.long() % 3 == 0).expand(n, 1, rows, cols)
    crop_image, crop_mask = random_crop(image, mask, S, _generator())
    assert crop_image.shape == (n, 7, S, S) and crop_mask.shape == (n, 1, S, S) and crop_mask.dtype == torch.bool
    corner = crop_image[:, 0, 0, 0].long()  # (N,) flat index of each window's top-left pixel
    top, left = corner // cols, corner % cols
    assert ((top >= 0) & (top <= rows - S) & (left >= 0) & (left <= cols - S)).all()
    assert len(set(top.tolist())) > 5 and len(set(left.tolist())) > 5  # windows differ
    expected = corner.view(n, 1, 1, 1) + (torch.arange(S).view(-1, 1) * cols + torch.arange(S)).view(1, 1, S, S)
    expected = expected + torch.arange(7).view(1, 7, 1, 1) * 100_000
    assert torch.equal(crop_image.long(), expected)
    assert torch.equal(crop_mask, expected[:, :1] % 3 == 0)


def test_random_crop_larger_than_the_slice_is_refused():
    image, mask = _disk_stack(1, (30.0, 30.0), radius=8)
    with pytest.raises(ValueError, match="must fit"):
        random_crop(image, mask, S + 1)
