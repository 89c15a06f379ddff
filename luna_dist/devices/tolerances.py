"""How far a device's numbers may lie from the CPU's, by the arithmetic it computes in, and why.

Every difference is relative to the scale of what is compared, never element by element (an element
near zero has no meaningful relative error):

    relative_difference(device, cpu) = max |device - cpu| / max |cpu|       (outputs, updates)
    gradient_difference(device, cpu) = ||device - cpu|| / ||cpu||           (gradients, L2)

A float32 result computed in another order differs from the CPU's by rounding alone, ~1e-7 of its
scale per operation, and a model compounds it. The largest differences the checks of
`luna_dist.devices.numbers` found on the CPU (2 models, 4 draws of weights and batch, batches of 2 and
4; docs/doctor.md): float32 in channels_last against the contiguous layout (other kernels, another
order of summation): layer outputs 1.4e-4, gradients 1.3e-2 (the UNet: its batch norms after ReLUs
divide the rounding of nearly constant channels by their tiny spread); TF32, CUDA's default for
convolutions on compute capability 8.0 and up, emulated by rounding each convolution's operands to 10
bits of mantissa: 1.0e-2 and 7.7e-2; fp16 autocast: 8.8e-3 and 8.9e-2; bf16 autocast (8 bits):
0.10 and 0.23. Each tolerance is several times the largest found (float32's many times: a GPU's
convolution algorithms round differently from the CPU's), so a sound device passes, and below what a
broken kernel gives: a result unrelated to the right one differs by about its own size, 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Tolerance:
    """The largest differences a sound device shows from the CPU in one arithmetic."""

    forward: float  # relative_difference of a layer's output, in training and in evaluation mode
    gradient: float  # gradient_difference of all the model's parameter gradients together, after its backward


MODEL_TOLERANCE = {
    "fp32": Tolerance(forward=1e-2, gradient=0.1),
    "tf32": Tolerance(forward=5e-2, gradient=0.3),
    "fp16": Tolerance(forward=5e-2, gradient=0.4),
    "bf16": Tolerance(forward=0.4, gradient=0.7),
}
UPDATE_TOLERANCE = 1e-3
"""relative_difference of the weights' change in one optimizer step, both sides given the same gradients:
the step is elementwise, so only the rounding of each weight (~1e-7 of it) differs, which relative to a
change of ~1e-3 of a weight is below 1e-4."""
OP_TOLERANCE = {"fp32": 1e-4, "tf32": 5e-3, "fp16": 5e-3, "bf16": 5e-2}
"""relative_difference of one operation's output and input gradients (`luna_dist.devices.ops`): nothing
compounds there. Measured on the CPU over 5 draws of inputs: float32 0 (the same kernels), emulated TF32
4.1e-4, fp16 6.7e-4, bf16 8.4e-3; float32 on a GPU sums in other orders, ~1e-6 of the scale."""


def arithmetic(device: torch.device, precision: str) -> str:
    """What `device` computes a model's layers in under `precision` ("no"/"fp32", "bf16", "fp16"): float32 is
    TF32 on CUDA devices of compute capability 8.0 and up while torch allows it (its default for convolutions)."""
    if precision in ("bf16", "fp16"):
        return precision
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0) and (
            torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32):
        return "tf32"
    return "fp32"


def relative_difference(device: Tensor, cpu: Tensor) -> float:
    """max |device - cpu| / max |cpu|, in float64; 0 for two zero tensors, inf where only the device's is not zero
    or its shape differs, NaN where the device's holds a value that is not a number."""
    if device.shape != cpu.shape:
        return float("inf")
    device, cpu = device.double(), cpu.double()
    difference, scale = (device - cpu).abs().max().item() if device.numel() else 0.0, \
        cpu.abs().max().item() if cpu.numel() else 0.0
    if scale == 0:
        return 0.0 if difference == 0 else float("inf")
    return difference / scale


def gradient_difference(device: Tensor, cpu: Tensor) -> float:
    """||device - cpu|| / ||cpu|| (L2, float64): how much of the gradient's length differs; 1 for a zero or
    unrelated gradient, 2 for one pointing the other way."""
    if device.shape != cpu.shape:
        return float("inf")
    device, cpu = device.double(), cpu.double()
    norm = cpu.norm().item()
    difference = (device - cpu).norm().item()
    if norm == 0:
        return 0.0 if difference == 0 else float("inf")
    return difference / norm
