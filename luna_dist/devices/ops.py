"""Every operation the three models and the augmentation run, forward and backward, on a device against the
CPU: the doctor's check 2.

Each operation runs alone on small inputs, the same on both sides, so a difference is that
operation's own (a model compounds its layers' differences: `luna_dist.devices.numbers`). An operation
the device lacks is named with what to do: Apple's MPS raised NotImplementedError for
`max_pool3d_with_indices` (LunaModel's pooling) until mid-2025 (pytorch#156467) and for 3-D
`grid_sample` before torch 2.9; it has no float64 at all (pytorch#122602), and autocasts bf16 only from
macOS 14 (pytorch#139390), where it otherwise warns and computes in float32.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from luna_dist.devices.tolerances import OP_TOLERANCE, arithmetic, relative_difference

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CPU_REMEDY = "or run on the CPU (`accelerate launch --cpu ...`)"
_MPS_MISSING = re.compile(r"operator '([\w:.]+)' is not currently implemented for the MPS device")


@dataclass(frozen=True)
class Op:
    """One operation as the code runs it: `run(*inputs)` of float32 `inputs` drawn on the CPU."""

    name: str
    used_by: str
    shapes: tuple[tuple[int, ...], ...]
    run: Callable[..., Tensor]
    fallback: str | None = None
    """What the code does where the device lacks it (it still works), if anything."""


def _theta(n: int, dims: int) -> Tensor:
    """A fixed rotation, zoom and shift per sample, as the augmentation draws them."""
    angle = torch.linspace(0.3, 2.5, n)
    theta = torch.zeros(n, dims, dims + 1)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = angle.cos(), -angle.sin(), angle.sin(), angle.cos()
    if dims == 3:
        theta[:, 2, 2] = 1.1
    theta[:, :, dims] = 0.05
    return theta


def _resample(x: Tensor) -> Tensor:
    grid = F.affine_grid(_theta(x.shape[0], x.dim() - 2).to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _batch_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return F.batch_norm(x, None, None, weight[0], bias[0], training=True)


_CONV3D = ((2, 4, 8, 12, 12), (8, 4, 3, 3, 3), (8,))
OPS = (
    Op("conv3d", "LunaModel's blocks", _CONV3D, lambda x, w, b: F.conv3d(x, w, b, padding=1)),
    Op("conv3d channels_last_3d", "LunaModel as training lays it out (CUDA, CPU)", _CONV3D,
       lambda x, w, b: F.conv3d(x.contiguous(memory_format=torch.channels_last_3d),
                                w.contiguous(memory_format=torch.channels_last_3d), b, padding=1)),
    Op("max_pool3d", "LunaModel's blocks", ((2, 4, 8, 12, 12),), lambda x: F.max_pool3d(x, 2, 2)),
    Op("batch_norm 3-D", "LunaModel's tail", ((2, 3, 8, 12, 12), (1, 3), (1, 3)), _batch_norm),
    Op("relu", "both models", ((2, 4, 6, 6),), F.relu),
    Op("linear + softmax", "LunaModel's head", ((4, 36), (2, 36), (2,)), lambda x, w, b: F.linear(x, w, b).softmax(1)),
    Op("cross_entropy", "the classifiers' loss", ((4, 2),),
       lambda x: F.cross_entropy(x, torch.tensor([0, 1, 1, 0], device=x.device), reduction="none")),
    Op("conv2d", "the UNet", ((2, 7, 16, 16), (8, 7, 3, 3), (8,)), lambda x, w, b: F.conv2d(x, w, b, padding=1)),
    Op("batch_norm 2-D", "the UNet", ((2, 7, 16, 16), (1, 7), (1, 7)), _batch_norm),
    Op("max_pool2d", "the UNet", ((2, 4, 16, 16),), lambda x: F.max_pool2d(x, 2)),
    Op("conv_transpose2d", "the UNet's upsampling", ((2, 8, 8, 8), (8, 4, 2, 2), (4,)),
       lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2)),
    Op("cat + pad", "the UNet", ((2, 4, 6, 6), (2, 4, 6, 6)),
       lambda a, b: F.pad(torch.cat([a, b], dim=1), (0, 2, 0, 2))),
    Op("sigmoid", "the UNet's output", ((2, 1, 8, 8),), torch.sigmoid),
    Op("grid_sample 3-D", "the augmentation of chunks", ((2, 1, 8, 12, 12),), _resample,
       fallback="the augmentation resamples chunks on the CPU instead: it works, each batch's round trip slows it"),
    Op("grid_sample 2-D", "the augmentation of slice stacks", ((2, 7, 16, 16),), _resample),
    Op("flip + where", "the augmentation's mirroring", ((4, 1, 4, 6, 6),),
       lambda x: torch.where(torch.tensor([True, False, True, False], device=x.device).view(-1, 1, 1, 1, 1),
                             x.flip(-1), x)),
    Op("gather", "the segmentation's random crops", ((2, 7, 16, 16),),
       lambda x: x.flatten(2).gather(2, torch.arange(64, device=x.device).view(1, 1, -1).expand(2, 7, -1))),
)

AUTOCAST_OPS = ("conv3d", "max_pool3d", "batch_norm 3-D", "linear + softmax", "conv2d", "batch_norm 2-D",
                "conv_transpose2d")
"""What each model runs under autocast (its layers), checked again in each mixed precision the device offers."""


@dataclass
class OpResult:
    name: str
    used_by: str
    precision: str  # "fp32", or the autocast dtype's name
    status: str  # "ok", "differs", "missing", "fallback", "no autocast"
    difference: float = 0.0  # the largest of the output's and the input gradients' (relative to each one's scale)
    tolerance: float = 0.0
    detail: str = ""  # what was raised or differed, and what to do

    @property
    def failed(self) -> bool:
        return self.status in ("differs", "missing", "no autocast")


def inputs(op: Op, seed: int = 0) -> list[Tensor]:
    """The op's inputs on the CPU: values of a batch-normalised layer's scale, the same every call."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for shape in op.shapes]


def run_op(op: Op, tensors: list[Tensor], device: torch.device, precision: str) -> list[Tensor]:
    """The op's output and the gradient of each input, on `device` (under autocast for "bf16"/"fp16"), back on
    the CPU in float32. The output's gradient is fixed, so both sides back-propagate the same."""
    leaves = [t.to(device).requires_grad_() for t in tensors]
    with torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(precision, torch.float32),
                        enabled=precision in AUTOCAST_DTYPES):
        out = op.run(*leaves)
    upstream = torch.linspace(-1, 1, out.numel()).view(out.shape).to(device, out.dtype)
    out.backward(upstream)
    return [out.detach().float().cpu(), *(leaf.grad.float().cpu() for leaf in leaves)]


def device_run(op: Op, tensors: list[Tensor], device: torch.device, precision: str) -> list[Tensor]:
    """`run_op` on the device checked (the reference runs `run_op` on the CPU)."""
    return run_op(op, tensors, device, precision)


def check_op(op: Op, device: torch.device, precision: str = "fp32") -> OpResult:
    """Run `op` on `device` and on the CPU in float32; compare, or say why it could not run and what to do."""
    result = OpResult(op.name, op.used_by, precision, "ok", tolerance=OP_TOLERANCE[arithmetic(device, precision)])
    tensors = inputs(op)
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            got = device_run(op, tensors, device, precision)
    except Exception as err:  # any failure of the device is the finding; the doctor goes on to the next op
        result.status, result.detail = classify(op, err, device)
        return result
    if precision in AUTOCAST_DTYPES and (note := _autocast_disabled(warned, device, precision)):
        result.status, result.detail = "no autocast", note
        return result
    reference = run_op(op, tensors, torch.device("cpu"), "fp32")
    result.difference = max(relative_difference(g, r) for g, r in zip(got, reference))
    if not result.difference <= result.tolerance:  # NaN too
        result.status = "differs"
        result.detail = (f"{op.name} ({op.used_by}) on {device} differs from the CPU by {result.difference:.1e} of "
                         f"its scale (tolerance {result.tolerance:.0e}): this device computes it wrongly; a newer "
                         f"torch may fix it, {CPU_REMEDY}")
    return result


def check_ops(device: torch.device, precisions: list[str]) -> list[OpResult]:
    """Every op in float32, and those of the models again under each autocast precision in `precisions`."""
    results = [check_op(op, device) for op in OPS]
    for precision in precisions:
        if precision in AUTOCAST_DTYPES:
            results += [check_op(op, device, precision) for op in OPS if op.name in AUTOCAST_OPS]
    return results


def classify(op: Op, err: Exception, device: torch.device) -> tuple[str, str]:
    """(status, one line) for `op` that raised `err` on `device`: a kernel missing (or a fallback the code takes)."""
    if op.fallback and _MPS_MISSING.search(str(err)):
        return "fallback", f"{_MPS_MISSING.search(str(err))[1]} is missing on MPS; {op.fallback}"
    return "missing", f"{op.name} ({op.used_by}): {explain(err, device)}"


def explain(err: Exception, device: torch.device) -> str:
    """What an error raised by the device means, and what to do: a kernel MPS lacks (named, with its remedies),
    float64 (which MPS has not), anything else (a newer torch, or the CPU)."""
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if missing := _MPS_MISSING.search(str(err)):
        return (f"{missing[1]} is not implemented on MPS in torch {torch.__version__}: install a newer torch "
                f"(pip install -U torch), or set PYTORCH_ENABLE_MPS_FALLBACK=1 to run it on the CPU (slowly), "
                f"{CPU_REMEDY}")
    if "autocast" in message.lower():
        return (f"{message[:200]}: train in another precision (`--mixed_precision no`, or fp16), or install a newer "
                f"torch, {CPU_REMEDY}")
    if "float64" in message.lower():
        return f"{message[:200]} ({device} has no float64: please report it), {CPU_REMEDY}"
    return (f"fails on {device} with torch {torch.__version__}: {type(err).__name__}: {message[:200]}; install a "
            f"newer torch, {CPU_REMEDY}")


def _autocast_disabled(warned: list[warnings.WarningMessage], device: torch.device, precision: str) -> str | None:
    """The line for an autocast torch turned off on `device` (it warns and computes in float32), else None."""
    for warning in warned:
        text = str(warning.message)
        if "autocast" in text.lower() and ("not supported" in text or "disabl" in text.lower()):
            need = " (bf16 autocast on MPS needs macOS 14 or newer)" if device.type == "mps" and precision == "bf16" \
                else ""
            return (f"{precision} autocast is off on {device}: {text.splitlines()[0]}{need}; train with "
                    f"`--mixed_precision no`" + (" or fp16" if precision == "bf16" else ""))
    return None
