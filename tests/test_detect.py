"""The stages of an analysis, on arrays in this process: segmentation, grouping, classification, weights."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from helpers import THRESHOLD_HU, threshold_model
from scipy import ndimage

from luna_dist.analysis import segment as segmentation
from luna_dist.analysis.detect import Models, classify, load_model
from luna_dist.analysis.groups import FERET_DIRECTIONS, group, growth_reach
from luna_dist.analysis.segment import SEG_MARGIN, SEG_THRESHOLD, NonFiniteError, body_box, segment, segment_window
from luna_dist.models.classifier import LunaModel
from luna_dist.models.unet import SegmentationModel


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


def test_threshold_model_segments_by_hu():
    hu = torch.full((9, 16, 16), -800.0)
    hu[4, 3:7, 5:9] = 40.0  # soft tissue on slice 4 only
    hu[0, 0, 0] = -200.0  # an edge slice and corner: the context is clamped, not wrapped
    mask = segment(hu, threshold_model(), batch_size=4, autocast=_no_autocast)
    assert torch.equal(mask, hu > THRESHOLD_HU)


def _chest(shape=(4, 80, 112)) -> np.ndarray:
    """An int16 CT of air with a chest: an elliptical body (rows 30-50, columns 35-77: off the UNet's pooling
    grid, and more than SEG_MARGIN from the edges) of fat and soft tissue, two lungs in it, vessels and a
    nodule in the lungs, noise everywhere."""
    rng = np.random.default_rng(0)
    r, c = np.ogrid[:shape[1], :shape[2]]
    ellipse = ((r - 40) / 10.6) ** 2 + ((c - 56) / 21.6) ** 2
    hu = np.full(shape, -1000.0)
    hu[:, ellipse <= 1] = -100
    hu[:, ellipse <= 0.8] = 40
    for centre in (46, 66):
        hu[:, ((r - 40) / 6) ** 2 + ((c - centre) / 7) ** 2 <= 1] = -850
    hu[:, 39:41, 41:72:5] = 60  # vessels across the lungs
    hu[1:3, 37:40, 63:66] = 20  # a nodule
    return (hu + rng.normal(0, 20, shape)).astype(np.int16)


@pytest.mark.parametrize("draw, box", [
    ("chest", (slice(30, 51), slice(35, 78))),
    ("air", (slice(0, 0), slice(0, 0))),  # nothing above -500: nothing to segment
    ("touching the edge", (slice(0, 51), slice(35, 112))),  # cut off by the field of view: the box too
    ("table apart", (slice(30, 51), slice(35, 78))),  # the bed below the mattress is left out
    ("specks", (slice(30, 51), slice(35, 78))),  # single bright voxels in the air are too
])
def test_body_box_is_the_patient(draw, box):
    hu = _chest()
    if draw == "air":
        hu = np.full((4, 32, 32), -1000, dtype=np.int16)
    elif draw == "touching the edge":
        hu[:, :40] = np.where(hu[:, 40:41, :] > -500, 40, -1000)  # the body runs on up past row 0
        hu[:, 35:45, 68:] = 40  # and off the right side
    elif draw == "table apart":
        hu[:, 56:60, 5:107] = 200  # 5 rows of mattress (air here) between body and table
    elif draw == "specks":
        hu[2, 5, 5] = hu[3, 75, 106] = 1000
    assert body_box(hu) == box


@pytest.mark.parametrize("box, size, window", [
    ((slice(30, 51), slice(28, 68)), (80, 96), (slice(4, 76), slice(4, 92))),  # grown by 24, rounded out to 4
    ((slice(0, 51), slice(27, 96)), (80, 96), (slice(0, 76), slice(0, 96))),  # within the slice
    ((slice(40, 41), slice(60, 61)), (80, 85), (slice(16, 68), slice(36, 85))),  # the slice's end is off the grid
])
def test_segment_window_holds_the_margin_on_the_pooling_grid(box, size, window):
    assert segment_window(box, size, 4) == window


def _positive_unet() -> SegmentationModel:
    """A UNet whose every weight is positive and whose batch norms pass their input: no ReLU cuts a path, so
    the gradient of an output pixel is non-zero over its whole receptive field."""
    torch.manual_seed(0)
    model = SegmentationModel()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.abs_()
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.zero_()
                module.running_var.fill_(1.0)
    return model.eval()


def test_the_unets_receptive_field_fits_in_the_margin():
    """The output pixel of image k sits at offset k on the pooling grid (k = 0..3): the reach is the largest."""
    model = _positive_unet()
    x = torch.rand(4, 7, 56, 56, requires_grad=True)
    pixels = torch.tensor([[26 + k, 27 + k] for k in range(4)])
    model.unet(x)[torch.arange(4), 0, pixels[:, 0], pixels[:, 1]].sum().backward()  # logits: the rest is per pixel
    reached = torch.nonzero(x.grad.abs().sum(1))  # (image, row, column)
    reach = (reached[:, 1:] - pixels[reached[:, 0]]).abs().max().item()
    assert reach == 23 and reach <= SEG_MARGIN  # 23: measured; more would need a wider SEG_MARGIN


def _seeded_unet() -> SegmentationModel:
    """A random UNet whose input batch norm scales HU to about unit size, as a trained one does: probabilities
    spread over (0, 1), so a changed input shows."""
    torch.manual_seed(3)
    model = SegmentationModel()
    model.input_batchnorm.running_mean.fill_(-500.0)
    model.input_batchnorm.running_var.fill_(400.0**2)
    return model.eval()


def _probabilities(model: SegmentationModel, hu: torch.Tensor, window=(slice(None), slice(None))) -> torch.Tensor:
    """The UNet's probability of every slice's pixels in `window`, from the same context stacks as `segment`."""
    index = (torch.arange(len(hu))[:, None] + torch.arange(-3, 4)).clamp(0, len(hu) - 1)
    with torch.no_grad():
        return model(hu[:, window[0], window[1]][index])[:, 0]


@pytest.mark.parametrize("margin, agrees", [(SEG_MARGIN, True), (0, False)])
def test_the_body_crop_leaves_the_probabilities_inside_the_body_as_they_are(margin, agrees, monkeypatch):
    """With SEG_MARGIN each pixel of the box sees what it sees in the whole slice: the same probability but
    for float rounding; without a margin the pixels near the box's edge see the padding instead."""
    monkeypatch.setattr(segmentation, "SEG_MARGIN", margin)
    model, hu = _seeded_unet(), torch.from_numpy(_chest()).float()
    box = body_box(_chest())
    window = segment_window(box, hu.shape[1:], model.multiple)
    inner = tuple(slice(b.start - w.start, b.stop - w.start) for b, w in zip(box, window))
    whole = _probabilities(model, hu)[:, box[0], box[1]]
    cropped = _probabilities(model, hu, window)[:, inner[0], inner[1]]
    difference = (whole - cropped).abs().max().item()
    assert difference < 1e-5 if agrees else difference > 1e-2


def test_segment_with_the_body_crop_finds_what_the_whole_slices_give_inside_the_body():
    model, ct = _seeded_unet(), _chest()
    hu, box = torch.from_numpy(ct).float(), body_box(ct)
    whole = segment(hu, model, 5, _no_autocast)
    assert 0 < whole.sum() < whole.numel()  # a mask to compare: neither empty nor full
    outside = torch.ones_like(whole)
    outside[:, box[0], box[1]] = False
    for memory_format in (torch.contiguous_format, torch.channels_last):
        cropped = segment(hu, model, 5, _no_autocast, box, memory_format)
        assert torch.equal(cropped, whole & ~outside)  # the body as before, nothing outside it
    assert not segment(hu, model, 5, _no_autocast, (slice(0, 0), slice(0, 0))).any()
    assert SEG_THRESHOLD == 0.5


class _NanWhereDense(torch.nn.Module):
    """A stand-in UNet whose probability is NaN wherever the middle slice is above 0 HU, as a network's
    overflowing sums give it: NaN is never above the threshold, so it read as no nodule."""

    multiple = 4

    def forward(self, x):  # (B, 7, H, W)
        middle = x[:, 3:4]
        return torch.where(middle > 0, torch.nan, 0.0)


def test_segment_refuses_probabilities_that_are_not_finite():
    hu = torch.full((6, 16, 16), -800.0)
    hu[2, 3:7, 5:9] = 40.0
    with pytest.raises(NonFiniteError, match=r"^16 of 1,536 voxel probabilities$"):
        segment(hu, _NanWhereDense(), batch_size=4, autocast=_no_autocast)


def test_group_finds_a_planted_blob_at_its_exact_centre():
    hu = np.full((40, 50, 60), -900, dtype=np.int16)
    i, r, c = np.ogrid[:40, :50, :60]
    ball = (i - 12) ** 2 + (r - 20) ** 2 + (c - 33) ** 2 <= 4**2
    hu[ball] = 50
    # A second blob whose left half is denser: its centre moves towards the dense half
    # by the weights HU + 1001, as computed here by hand.
    box = (slice(28, 33), slice(30, 35), slice(10, 16))
    hu[box] = 0
    hu[28:33, 30:35, 10:13] = 1000
    mask = hu > -500
    mask[2, 2, 2] = True  # a speck: one erosion removes it, and no core is near enough to regain it
    groups = group(mask, hu)
    centres, voxels = groups.centres, groups.voxels
    assert len(centres) == 2
    order = np.argsort(centres[:, 0])
    np.testing.assert_allclose(centres[order[0]], [12, 20, 33], atol=1e-9)
    # The centre is the core's: after one erosion the box keeps its inner 3x3x4 voxels, columns 11..14, two
    # dense (2001), two not (1001). Its size is the whole box's, grown back.
    expected_c = (11 * 2001 + 12 * 2001 + 13 * 1001 + 14 * 1001) / (2 * 2001 + 2 * 1001)
    np.testing.assert_allclose(centres[order[1]], [30, 32, expected_c], atol=1e-9)
    assert (voxels[order[0]], voxels[order[1]]) == (ball.sum(), 5 * 5 * 6)
    assert groups.labels[2, 2, 2] == 0


def _center_of_mass_groups(mask: np.ndarray, hu: np.ndarray, reach: tuple[int, int, int]
                           ) -> tuple[np.ndarray, np.ndarray]:
    """The grouping over whole-volume arrays, the reference: the cores' centres as scipy's center_of_mass
    computes them, and each core grown by whole-volume dilations, a layer at a time, within its box widened by
    `reach`, a voxel two cores reach at once going to the lower label."""
    labels, count = ndimage.label(ndimage.binary_erosion(mask, iterations=1))
    weights = np.clip(hu, -1000, 1000).astype(np.float32) + 1001
    centres = np.array(ndimage.center_of_mass(weights, labels, np.arange(1, count + 1))).reshape(-1, 3)
    boxes = ndimage.find_objects(labels)
    while True:
        claims = np.zeros_like(labels)
        for label in range(count, 0, -1):  # the lower label's claim written last: it wins
            within = tuple(slice(max(0, b.start - r), b.stop + r) for b, r in zip(boxes[label - 1], reach))
            reached = ndimage.binary_dilation(labels[within] == label, np.ones((3, 3, 3))) & mask[within] & \
                (labels[within] == 0)
            claims[within][reached] = label
        if not claims.any():
            return centres, np.bincount(labels.ravel(), minlength=count + 1)[1:], labels
        labels[claims > 0] = claims[claims > 0]


@pytest.mark.parametrize("shape, spacing", [((30, 40, 50), (1.0, 1.0, 1.0)), ((3, 9, 200), (2.5, 0.6, 0.6)),
                                            ((2, 20, 20), (1.0, 1.0, 1.0)), ((20, 40, 40), (1.25, 0.7, 0.7))])
def test_group_equals_the_whole_volume_center_of_mass_and_dilations_exactly(shape, spacing):
    rng = np.random.default_rng(sum(shape))
    hu = rng.integers(-1500, 1500, shape).astype(np.int16)  # beyond both ends of the clipping
    mask = ndimage.uniform_filter(rng.random(shape), 3) > 0.5  # blobs of every size, some touching the border
    groups = group(mask, hu, spacing)
    centres, voxels = groups.centres, groups.voxels
    expected_centres, expected_voxels, expected_labels = _center_of_mass_groups(mask, hu, growth_reach(spacing))
    np.testing.assert_array_equal(centres, expected_centres)
    np.testing.assert_array_equal(voxels, expected_voxels)
    np.testing.assert_array_equal(groups.labels, expected_labels)
    assert voxels.dtype == np.int64 and centres.shape == (len(voxels), 3)
    np.testing.assert_array_equal(np.bincount(groups.labels.ravel(), minlength=len(voxels) + 1)[1:], voxels)
    assert not (groups.labels > 0)[~mask].any()  # grown within the segmentation only


def _feret_by_every_pair(inside: np.ndarray, spacing_rc: tuple[float, float]) -> float:
    """The reference: the largest distance between corners of a slice's voxels, over every pair, every slice."""
    longest = 0.0
    for plane in inside:
        r, c = np.nonzero(plane)
        corners = np.concatenate([np.stack([r + dr, c + dc], axis=1) for dr in (-0.5, 0.5) for dc in (-0.5, 0.5)])
        mm = corners * np.asarray(spacing_rc)
        if len(mm):
            longest = max(longest, float(np.linalg.norm(mm[:, None] - mm[None], axis=2).max()))
    return longest


def test_longest_axial_diameter_of_a_box_is_its_diagonal_in_mm():
    mask = np.zeros((9, 20, 30), dtype=bool)
    mask[2:7, 3:12, 5:18] = True  # 5 x 9 x 13: 3 x 7 x 11 after the erosion, grown back
    groups = group(mask, np.zeros(mask.shape, dtype=np.int16), spacing_irc=(1.0, 0.7, 0.5))
    exact = np.hypot(9 * 0.7, 13 * 0.5)
    assert groups.voxels.tolist() == [5 * 9 * 13]
    assert exact * np.cos(np.pi / 2 / FERET_DIRECTIONS) <= groups.axial_diameter_mm[0] <= exact + 1e-9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_longest_axial_diameter_is_the_largest_distance_in_a_slice(seed):
    """Blobs of every shape, anisotropic pixels: never more than every pair's maximum, at most 0.03 % less."""
    rng = np.random.default_rng(seed)
    shape, spacing = (6, 30, 40), (0.6 + 0.4 * rng.random(), 0.6 + 0.4 * rng.random())
    mask = ndimage.uniform_filter(rng.random(shape), 3) > 0.5
    groups = group(mask, np.zeros(shape, dtype=np.int16), spacing_irc=(1.0, *spacing))
    for k, diameter in enumerate(groups.axial_diameter_mm):
        exact = _feret_by_every_pair(groups.labels == k + 1, spacing)
        assert exact * np.cos(np.pi / 2 / FERET_DIRECTIONS) - 1e-9 <= diameter <= exact + 1e-9, k


def test_group_needs_at_most_6_bytes_per_voxel():
    """One group spans the whole volume (a body) and many are small; numpy reports its arrays to tracemalloc."""
    i, r, c = np.ogrid[:48, :128, :128]
    hu = np.where(((i - 24) / 22) ** 2 + ((r - 64) / 60) ** 2 + ((c - 64) / 60) ** 2 <= 1, 40, -900).astype(np.int16)
    hu[::6, ::9, ::9] = -1000  # holes, so the body's box holds voxels of other groups
    mask = hu > -500
    mask[2:46:4, 2:126:5, 2:126:5] = True
    tracemalloc.start()
    try:
        group(mask, hu)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak / hu.size <= 6, f"{peak / hu.size:.1f} bytes per voxel"


class _CentreVoxelModel(torch.nn.Module):
    """A stand-in classifier whose p_nodule is the HU of its chunk's centre voxel / 1000: it shows where a chunk
    was cut (the chunk around voxel v spans v - w//2 .. v + w//2 - 1, so v sits at index w//2)."""

    def forward(self, x):  # (B, 1, 32, 48, 48)
        p = x[:, 0, 16, 24, 24] / 1000
        return None, torch.stack([1 - p, p], dim=1)


def test_classify_cuts_around_the_voxel_the_shard_build_rounds_to():
    """A centre of mass at column 30.5 is cut around column 31 (halves up, as the build's xyz_to_irc), not 30."""
    hu = np.zeros((20, 40, 60), dtype=np.int16)
    hu[10, 20, 31] = 700
    models = Models(seg=None, nodule=_CentreVoxelModel(), malignancy=None)
    p_nodule, _ = classify(hu, np.array([[9.5, 20.0, 30.5]]), models, torch.device("cpu"), 4, _no_autocast)
    assert p_nodule[0] == pytest.approx(0.7)


def test_weights_hash_is_the_same_for_a_best_pt_and_a_state_folder_of_those_weights(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = LunaModel().state_dict()
    torch.save({"model": weights}, tmp_path / "best.pt")
    (tmp_path / "state").mkdir()
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, tmp_path / "state" / "model.safetensors")
    torch.manual_seed(1)
    torch.save({"model": LunaModel().state_dict()}, tmp_path / "other.pt")
    cpu = torch.device("cpu")
    hashes = [load_model(LunaModel(), tmp_path / name, cpu)[1] for name in ("best.pt", "state", "other.pt")]
    assert hashes[0] == hashes[1] != hashes[2]


def _ball(diameter_mm: float, spacing_irc: tuple[float, float, float], offset: np.ndarray) -> np.ndarray:
    """The voxels whose centres lie in a ball of `diameter_mm`, its centre `offset` voxels off a voxel centre:
    a perfect segmentation of a spherical nodule."""
    shape = tuple(int(np.ceil(diameter_mm / s)) + 8 for s in spacing_irc)
    centre = (np.array(shape) // 2 + offset) * spacing_irc
    i, r, c = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((axis * s - m) ** 2 for axis, s, m in zip((i, r, c), spacing_irc, centre))) <= (diameter_mm / 2) ** 2


@pytest.mark.parametrize("spacing", [(1.25, 0.7, 0.7), (2.5, 0.6, 0.6), (1.0, 0.8, 0.8), (0.625, 0.6, 0.6)])
@pytest.mark.parametrize("diameter", [6.0, 8.0, 10.0, 20.0])
def test_a_perfectly_segmented_nodule_measures_its_size(spacing, diameter):
    """Measured on the eroded group, an 8 mm nodule at 0.7 x 0.7 x 1.25 mm read 128 of its 268 mm³ and a 6 mm
    one 48 of 113; the group now is its core grown back within the segmentation. At LUNA16's spacings, from
    6 mm up: the volume within 15 % of the sphere's, the longest axial diameter within a pixel and a half of
    its diameter (the widest slice may miss the sphere's equator by half a slice)."""
    rng = np.random.default_rng(int(diameter * 100 + spacing[0] * 10))
    for _ in range(4):
        mask = _ball(diameter, spacing, rng.random(3) - 0.5)
        groups = group(mask, np.where(mask, 50, -900).astype(np.int16), spacing)
        if not len(groups.voxels):
            assert spacing[0] >= diameter / 3  # the erosion left nothing: a nodule 3 slices thick or less
            continue
        assert len(groups.voxels) == 1
        volume = groups.voxels[0] * np.prod(spacing)
        assert volume == pytest.approx(np.pi / 6 * diameter**3, rel=0.15)
        assert abs(groups.axial_diameter_mm[0] - diameter) <= 1.5 * spacing[1], groups.axial_diameter_mm[0]
