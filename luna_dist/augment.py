"""Batched random augmentation of CT chunks, run on the training device.

Each sample of a batch gets its own random transform, yet the whole batch is
transformed by a handful of tensor ops: no loop over samples and no host-device
syncs, so augmentation never stalls a GPU. Every tensor is float32 because
Apple's MPS backend has no float64.
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

    Rows and columns have the same length (48), so rotating normalized
    coordinates is a true rotation of the voxel grid, not a shear.
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
    """Return a randomly transformed copy of ``batch`` (N, 1, I, R, C) float32 in HU.

    ``generator`` must live on ``batch.device``; pass a seeded one to make the
    transforms reproducible. The output has the input's shape, dtype and device;
    with nothing enabled it is ``batch`` itself.

    Spatial transforms are affines for ``affine_grid``, whose theta acts on
    (x, y, z) = (C, R, I): the tensor's spatial axes in reverse order.
    """
    if not config.enabled:
        return batch
    n, device = batch.shape[0], batch.device

    flips = torch.zeros(n, 3, device=device, dtype=torch.bool)
    if config.flip:
        flips = torch.rand(n, 3, generator=generator, device=device, dtype=torch.float32) < 0.5  # (C, R, I)
    if _needs_resampling(config):
        # Training calls this inside autocast, which would build the grid in bf16/fp16:
        # up to 0.1 voxel of jitter, hundreds of HU of error at sharp edges.
        with _autocast_disabled(device):
            batch = _resample(batch, _random_theta(flips, config, generator))
    elif config.flip:
        # Flips alone are exact index reversals: cheaper than resampling and bit-exact.
        batch = _flip(batch, flips)

    if config.noise_hu > 0:
        noise = torch.randn(batch.shape, generator=generator, device=device, dtype=torch.float32)
        batch = batch + noise * config.noise_hu
    return batch


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
    """One 3x4 affine per sample, mapping output to input coordinates in [-1, 1].

    ``flips`` is (N, 3) bool in (x, y, z) = (C, R, I) order.
    """
    n, device = flips.shape[0], flips.device
    ones = torch.ones(n, 3, device=device, dtype=torch.float32)
    diagonal = torch.where(flips, -ones, ones)  # (N, 3)
    if config.scale > 0:
        diagonal = diagonal * (1 + config.scale * _uniform((n, 3), generator, device))
    linear = torch.diag_embed(diagonal)  # (N, 3, 3)

    if config.rotate:
        angle = torch.rand(n, generator=generator, device=device, dtype=torch.float32) * (2 * math.pi)
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotation = torch.eye(3, device=device, dtype=torch.float32).repeat(n, 1, 1)  # (N, 3, 3)
        rotation[:, 0, 0], rotation[:, 0, 1] = cos, -sin  # x = C
        rotation[:, 1, 0], rotation[:, 1, 1] = sin, cos  # y = R; z = I stays put
        linear = rotation @ linear

    # The chunk spans 2 normalized units per axis, so a shift of fraction f is 2f.
    shift = torch.zeros(n, 3, device=device, dtype=torch.float32)
    if config.offset > 0:
        shift = _uniform((n, 3), generator, device) * (2 * config.offset)
    return torch.cat([linear, shift.unsqueeze(2)], dim=2)  # (N, 3, 4)


def _flip(batch: Tensor, flips: Tensor) -> Tensor:
    """Mirror each sample on its chosen axes; ``flips`` is (N, 3) bool in (C, R, I) order."""
    for axis, dim in enumerate((-1, -2, -3)):  # C, R, I
        mask = flips[:, axis].view(-1, 1, 1, 1, 1)
        batch = torch.where(mask, batch.flip(dim), batch)
    return batch


def _resample(batch: Tensor, theta: Tensor) -> Tensor:
    """Sample ``batch`` on the grid given by ``theta`` (N, 3, 4), edge voxels repeating outside."""
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)  # (N, I, R, C, 3)
    try:
        return F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False)
    except NotImplementedError:
        # MPS only gained 3-D grid_sample in torch 2.9; on older releases resample
        # on the CPU and come back, which syncs but keeps training working.
        if batch.device.type != "mps":
            raise
        out = F.grid_sample(batch.cpu(), grid.cpu(), mode="bilinear", padding_mode="border", align_corners=False)
        return out.to(batch.device)
