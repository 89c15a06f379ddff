"""Batched random augmentation of CT chunks and slices, run on the training device.

Each sample of a batch gets its own random transform, yet the whole batch is
transformed by a handful of tensor ops: no loop over samples and no host-device
syncs, so augmentation never stalls a GPU. Every tensor is float32 because
Apple's MPS backend has no float64.

The same transforms serve 3-D chunks (N, 1, I, R, C) for classification and 2-D
slice stacks (N, 7, R, C) for segmentation, where the mask moves with the image
(`augment_with_mask`); `random_crop` cuts the segmentation crops on the device.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations to apply; frozen so it can be shared and pickled safely."""

    flip: bool = False
    """Mirror each spatial axis independently with probability 0.5."""

    offset: float = 0.0
    """Largest shift per axis, as a fraction of the chunk size (0.1 = up to 10%)."""

    scale: float = 0.0
    """Largest relative scale per axis: 0.2 draws a factor in [0.8, 1.2]."""

    rotate: bool = False
    """Rotate by a random angle in [0, 2π) about the head-foot (I) axis, i.e. in the (R, C) plane.

    Rows and columns have the same length (48 in chunks, 64 in segmentation crops), so
    rotating normalized coordinates is a true rotation of the voxel grid, not a shear.
    """

    noise_hu: float = 0.0
    """Standard deviation of additive Gaussian noise, in HU."""

    @classmethod
    def all(cls) -> "AugmentConfig":
        """Everything on, with the strengths used for nodule training."""
        return cls(flip=True, offset=0.1, scale=0.2, rotate=True, noise_hu=25.0)

    @classmethod
    def none(cls) -> "AugmentConfig":
        """Nothing on: ``augment`` returns its input unchanged."""
        return cls()

    @property
    def enabled(self) -> bool:
        """Whether there is anything to do."""
        return self.flip or _needs_resampling(self) or self.noise_hu > 0


def augment(batch: Tensor, config: AugmentConfig, generator: torch.Generator | None = None) -> Tensor:
    """Return a randomly transformed copy of ``batch`` in HU, float32: (N, 1, I, R, C) chunks
    or (N, channels, R, C) slice stacks, every channel of a sample moved alike.

    ``generator`` must live on ``batch.device``; pass a seeded one to make the
    transforms reproducible. The output has the input's shape, dtype and device;
    with nothing enabled it is ``batch`` itself.
    """
    if not config.enabled:
        return batch
    return _add_noise(_move(batch, config, generator), config, generator)


def augment_with_mask(
    image: Tensor, mask: Tensor, config: AugmentConfig, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Transform slice stacks (N, channels, R, C) float32 HU and their masks (N, 1, R, C) bool together.

    Both go through one resampling, so the mask stays on the nodule whatever the flip,
    offset, scale or rotation; it is resampled bilinearly and thresholded at 0.5 back to
    bool. Noise goes to the image only.
    """
    if not config.enabled:
        return image, mask
    moved = _move(torch.cat([image, mask.to(image.dtype)], dim=1), config, generator)
    image, mask = moved[:, :-1], moved[:, -1:] > 0.5
    return _add_noise(image, config, generator), mask


def random_crop(
    image: Tensor, mask: Tensor, size: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """A random size x size window per sample of image (N, C, R, C') and mask (N, 1, R, C'), alike.

    Every window lies wholly inside; the offsets are drawn on the device and the crops
    gathered in one indexing call per tensor, so nothing syncs with the host.
    """
    n, rows, cols = image.shape[0], image.shape[-2], image.shape[-1]
    if size > min(rows, cols):
        raise ValueError(f"crop of {size} pixels from {rows}x{cols} slices: the crop must fit")
    device = image.device
    top = torch.randint(0, rows - size + 1, (n, 1, 1), generator=generator, device=device)
    left = torch.randint(0, cols - size + 1, (n, 1, 1), generator=generator, device=device)
    offsets = torch.arange(size, device=device)
    index = (top + offsets.view(1, -1, 1)) * cols + left + offsets.view(1, 1, -1)  # (N, size, size) into R*C'

    def crop(x: Tensor) -> Tensor:
        flat = x.flatten(2)  # (N, C, R*C')
        picked = flat.gather(2, index.view(n, 1, -1).expand(-1, x.shape[1], -1))
        return picked.view(n, x.shape[1], size, size)

    return crop(image), crop(mask)


def _move(batch: Tensor, config: AugmentConfig, generator: torch.Generator | None) -> Tensor:
    """The spatial part: flips, and the offset, scale and rotation as one resampling.

    Spatial transforms are affines for ``affine_grid``, whose theta acts on
    (x, y, z) = (C, R, I): the tensor's spatial axes in reverse order.
    """
    n, dims, device = batch.shape[0], batch.dim() - 2, batch.device
    flips = torch.zeros(n, dims, device=device, dtype=torch.bool)
    if config.flip:
        flips = torch.rand(n, dims, generator=generator, device=device, dtype=torch.float32) < 0.5  # (C, R[, I])
    if _needs_resampling(config):
        # Training calls this inside autocast, which would build the grid in bf16/fp16:
        # up to 0.1 voxel of jitter, hundreds of HU of error at sharp edges.
        with _autocast_disabled(device):
            return _resample(batch, _random_theta(flips, config, generator))
    if config.flip:
        # Flips alone are exact index reversals: cheaper than resampling and bit-exact.
        return _flip(batch, flips)
    return batch


def _add_noise(batch: Tensor, config: AugmentConfig, generator: torch.Generator | None) -> Tensor:
    if config.noise_hu <= 0:
        return batch
    noise = torch.randn(batch.shape, generator=generator, device=batch.device, dtype=torch.float32)
    return batch + noise * config.noise_hu


def _needs_resampling(config: AugmentConfig) -> bool:
    return config.offset > 0 or config.scale > 0 or config.rotate


def _autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager:
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:
        # Devices without an autocast backend (MPS before torch 2.5) reject even a
        # disabled region; nothing can be autocasting there anyway.
        return contextlib.nullcontext()


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform values in [-1, 1)."""
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32) * 2 - 1


def _random_theta(flips: Tensor, config: AugmentConfig, generator: torch.Generator | None) -> Tensor:
    """One affine per sample, (N, d, d + 1), mapping output to input coordinates in [-1, 1].

    ``flips`` is (N, d) bool in (x, y[, z]) = (C, R[, I]) order; d is 2 or 3.
    """
    n, dims, device = flips.shape[0], flips.shape[1], flips.device
    ones = torch.ones(n, dims, device=device, dtype=torch.float32)
    diagonal = torch.where(flips, -ones, ones)  # (N, d)
    if config.scale > 0:
        diagonal = diagonal * (1 + config.scale * _uniform((n, dims), generator, device))
    linear = torch.diag_embed(diagonal)  # (N, d, d)

    if config.rotate:
        angle = torch.rand(n, generator=generator, device=device, dtype=torch.float32) * (2 * math.pi)
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotation = torch.eye(dims, device=device, dtype=torch.float32).repeat(n, 1, 1)  # (N, d, d)
        rotation[:, 0, 0], rotation[:, 0, 1] = cos, -sin  # x = C
        rotation[:, 1, 0], rotation[:, 1, 1] = sin, cos  # y = R; z = I stays put
        linear = rotation @ linear

    # The chunk spans 2 normalized units per axis, so a shift of fraction f is 2f.
    shift = torch.zeros(n, dims, device=device, dtype=torch.float32)
    if config.offset > 0:
        shift = _uniform((n, dims), generator, device) * (2 * config.offset)
    return torch.cat([linear, shift.unsqueeze(2)], dim=2)  # (N, d, d + 1)


def _flip(batch: Tensor, flips: Tensor) -> Tensor:
    """Mirror each sample on its chosen axes; ``flips`` is (N, d) bool in (C, R[, I]) order."""
    shape = (-1,) + (1,) * (batch.dim() - 1)
    for axis in range(flips.shape[1]):
        dim = -1 - axis  # C, R, I
        batch = torch.where(flips[:, axis].view(shape), batch.flip(dim), batch)
    return batch


def _resample(batch: Tensor, theta: Tensor) -> Tensor:
    """Sample ``batch`` on the grid given by ``theta`` (N, d, d + 1), edge voxels repeating outside."""
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)  # (N, [I,] R, C, d)
    try:
        return F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
    except NotImplementedError:
        # MPS only gained 3-D grid_sample in torch 2.9; on older releases resample
        # on the CPU and come back, which syncs but keeps training working.
        if batch.device.type != "mps":
            raise
        out = F.grid_sample(batch.cpu(), grid.cpu(), mode="bilinear", padding_mode="border", align_corners=False)
        return out.to(batch.device)
