"""LunaModel and the UNet on a device against the CPU, with the same weights and batch: the doctor's check 3,
and in its quick form the check every training and analysis makes before it trusts a device
(`luna_dist.devices.start`).

A pass runs what training runs: the forward in training mode (batch norms on the batch's
statistics), a loss (`loss_of`), the backward, one optimizer step (the task's: SGD with momentum for
LunaModel, Adam for the UNet), then the forward in evaluation mode (batch norms on their running
statistics, as validation and the analysis run them). Forward hooks keep every layer's output in
the order the layers run, so the first layer whose output differs is named; the gradients are
compared layer by layer, in the order backward reaches them. The reference pass runs on the CPU in
float32 in the contiguous layout; the device pass in the layout and precision training uses there,
independently, so even on the CPU the two passes run different kernels and the comparison is
exercised. The optimizer step is compared from the same gradients on both sides: Adam's first step
moves a weight by lr * sign(gradient), so a gradient element near zero whose sign rounding flips would
move it by 2 lr, a difference of the gradients (already compared), not of the step.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from luna_dist.devices.ops import AUTOCAST_DTYPES
from luna_dist.devices.tolerances import (
    MODEL_TOLERANCE,
    UPDATE_TOLERANCE,
    arithmetic,
    gradient_difference,
    relative_difference,
)
from luna_dist.imaging.chunks import CHUNK_SHAPE
from luna_dist.imaging.ct import HU_MAX, HU_MIN
from luna_dist.models.unet import SegmentationModel

KINDS = ("output", "gradients", "update", "evaluation output")
"""What a pass's comparison holds, in the order a fault shows: the training forward layer by layer, the
backward, the optimizer step, the evaluation forward."""
SEG_INPUT = (7, 64, 64)
"""The UNet's training input: 7-slice stacks cut to 64 x 64."""


def model_name(model: nn.Module) -> str:
    return "UNet" if isinstance(model, SegmentationModel) else type(model).__name__


def layout_for(model: nn.Module, channels_last: bool) -> torch.memory_format:
    """The memory layout a model with `channels_last` runs in: channels_last_3d for 3-D convolutions."""
    if not channels_last:
        return torch.contiguous_format
    three_d = any(p.dim() == 5 for p in model.parameters())
    return torch.channels_last_3d if three_d else torch.channels_last


def example_batch(model: nn.Module, size: int, seed: int = 0) -> Tensor:
    """A batch for `model` on the CPU: HU drawn uniformly, as the models see them raw (chunks for LunaModel,
    slice stacks for the UNet)."""
    shape = SEG_INPUT if isinstance(model, SegmentationModel) else (1, *CHUNK_SHAPE)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(HU_MIN, HU_MAX, (size, *shape), generator=generator).float()


def loss_of(output, seed: int = 0) -> Tensor:
    """A fixed positive weighting of the model's outputs summed (LunaModel's logits, the UNet's probabilities):
    both sides back-propagate the same upstream gradient. The tasks' own losses saturate: a confident softmax's
    gradient is the small difference p - y, which bf16 rounding changed by 147 % on LunaModel's head."""
    output = (output[0] if isinstance(output, tuple) else output).float()
    generator = torch.Generator().manual_seed(seed)
    weights = (0.5 + torch.rand(output.shape, generator=generator)) / output.numel()
    return (output * weights.to(output.device)).sum()


def optimizer_of(model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer the model's task trains it with, at the default --lr (and --momentum)."""
    if isinstance(model, SegmentationModel):
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.99)


@dataclass
class Pass:
    """What one pass computed, on the CPU in float32 (gradients and updates by parameter name)."""

    forward: list[tuple[str, Tensor]] = field(default_factory=list)  # (layer, output) as the layers ran
    gradients: dict[str, Tensor] = field(default_factory=dict)
    updates: dict[str, Tensor] = field(default_factory=dict)  # each weight's change in the optimizer step
    evaluation: list[tuple[str, Tensor]] = field(default_factory=list)  # (layer, output) in evaluation mode


@contextmanager
def _recorded(model: nn.Module, into: list[tuple[str, Tensor]]) -> Iterator[None]:
    """Each leaf layer's output appended to `into` as it runs: a copy on the CPU (a ReLU after it works in place)."""
    def keep(name: str):
        return lambda module, args, output: into.append((name, output.detach().to("cpu", copy=True).float()))

    handles = [module.register_forward_hook(keep(name)) for name, module in model.named_modules()
               if name and not any(module.children())]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_pass(model: nn.Module, batch: Tensor, device: torch.device, precision: str,
             layout: torch.memory_format, training: bool = True, step_with: dict[str, Tensor] | None = None) -> Pass:
    """One pass of a copy of `model` (on the CPU, left as it is) on `device` in `precision` ("fp32", "bf16",
    "fp16") and `layout`. `training`: the forward, `loss_of` and backward, the optimizer step (from `step_with`'s
    gradients when given, its own otherwise) and then the evaluation forward; else the evaluation forward alone."""
    model = copy.deepcopy(model).to(device, memory_format=layout)
    x = batch.to(device).contiguous(memory_format=layout)
    autocast = dict(device_type=device.type, dtype=AUTOCAST_DTYPES.get(precision, torch.float32),
                    enabled=precision in AUTOCAST_DTYPES)
    done = Pass()
    if training:
        model.train()
        with _recorded(model, done.forward), torch.autocast(**autocast):
            output = model(x)
        loss_of(output).backward()
        parameters = dict(model.named_parameters())
        done.gradients = {name: p.grad.detach().float().cpu() for name, p in parameters.items()}
        before = {name: p.detach().cpu().double() for name, p in parameters.items()}
        if step_with is not None:
            for name, p in parameters.items():
                p.grad = torch.empty_like(p).copy_(step_with[name])
        optimizer_of(model).step()
        done.updates = {name: p.detach().cpu().double() - before[name] for name, p in parameters.items()}
    model.eval()
    with torch.no_grad(), _recorded(model, done.evaluation), torch.autocast(**autocast):
        model(x)
    return done


def reference_pass(model: nn.Module, batch: Tensor, training: bool = True) -> Pass:
    """The pass the device is compared with: the CPU, float32, contiguous."""
    return run_pass(model, batch, torch.device("cpu"), "fp32", torch.contiguous_format, training)


def device_pass(model: nn.Module, batch: Tensor, device: torch.device, precision: str,
                layout: torch.memory_format, training: bool, step_with: dict[str, Tensor] | None) -> Pass:
    """The pass of the device checked (a seam: tests run it under a stand-in for a broken backend)."""
    return run_pass(model, batch, device, precision, layout, training, step_with)


@dataclass
class Difference:
    """One compared quantity: what and where, how far the device is from the CPU, and how far it may be."""

    what: str  # one of KINDS
    where: str  # the layer (or parameter)
    value: float
    tolerance: float

    @property
    def within(self) -> bool:
        return self.value <= self.tolerance  # NaN is not

    def line(self) -> str:
        if self.what == "gradients":
            return (f"the gradients differ from the CPU's by {self.value:.1e} of their length (tolerance "
                    f"{self.tolerance:.0e}), first at {self.where} going back from the output")
        return (f"the {self.what} of {self.where} differs from the CPU's by {self.value:.1e} of its scale "
                f"(tolerance {self.tolerance:.0e})")


@dataclass
class ModelCheck:
    """A model's comparison in one precision: every difference, in the order a fault would show."""

    model: str
    precision: str
    arithmetic: str
    differences: list[Difference]

    @property
    def first_failure(self) -> Difference | None:
        return next((d for d in self.differences if not d.within), None)

    def largest(self, what: str) -> Difference | None:
        found = [d for d in self.differences if d.what == what]
        return max(found, key=lambda d: (d.value != d.value, d.value)) if found else None  # NaN first

    def failure_line(self) -> str | None:
        """One line for the first difference out of tolerance, naming the model and the layer; None if none."""
        first = self.first_failure
        if first is None:
            return None
        return f"{self.model} in {self.precision}: {first.line()}"


def compare(reference: Pass, device: Pass, kind: str, model: nn.Module) -> list[Difference]:
    """Every difference of `device` from `reference`: layer outputs as they ran; the gradients of all parameters
    together, named by the first layer back from the output whose own gradients differ beyond the tolerance
    (one layer's alone can be ill-conditioned: a batch norm of a channel ReLU left nearly constant divides
    rounding by its tiny spread); each weight's update; the evaluation's layer outputs. `kind`: the arithmetic
    whose tolerances apply (`luna_dist.devices.tolerances.arithmetic`)."""
    tolerance = MODEL_TOLERANCE[kind]
    found = [Difference("output", name, relative_difference(d, r), tolerance.forward)
             for (name, d), (_, r) in zip(device.forward, reference.forward)]
    if reference.gradients and device.gradients:
        layers = [(layer, _joined(device.gradients, names), _joined(reference.gradients, names))
                  for layer, names in reversed(_layers(model))]
        total = gradient_difference(torch.cat([d for _, d, _ in layers]), torch.cat([r for _, _, r in layers]))
        each = [(layer, gradient_difference(d, r)) for layer, d, r in layers]
        first = next((layer for layer, value in each if not value <= tolerance.gradient),
                     max(each, key=lambda item: item[1])[0])
        found.append(Difference("gradients", first, total, tolerance.gradient))
    found += [Difference("update", name, relative_difference(device.updates[name], update), UPDATE_TOLERANCE)
              for name, update in reference.updates.items() if name in device.updates]
    found += [Difference("evaluation output", name, relative_difference(d, r), tolerance.forward)
              for (name, d), (_, r) in zip(device.evaluation, reference.evaluation)]
    return found


def _joined(gradients: dict[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([gradients[name].flatten() for name in names])


def _layers(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(layer, its parameters' names) of each layer with parameters, in module order."""
    return [(name, [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)])
            for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]


def check_model(model: nn.Module, device: torch.device, precisions: list[str], layout: torch.memory_format,
                batch_size: int = 2, training: bool = True) -> list[ModelCheck]:
    """`model` (on the CPU) on `device` against the CPU in float32, then in each mixed precision of `precisions`
    ("bf16", "fp16"; others are not autocast and are left out); the step only in float32."""
    batch = example_batch(model, batch_size)
    reference = reference_pass(model, batch, training)
    checks = []
    for precision in ["fp32", *(p for p in precisions if p in AUTOCAST_DTYPES)]:
        got = device_pass(model, batch, device, precision, layout, training, reference.gradients if training else None)
        if precision != "fp32":
            got.updates = {}  # the step is float32 in every precision: compared once
        kind = arithmetic(device, precision)
        checks.append(ModelCheck(model_name(model), precision, kind, compare(reference, got, kind, model)))
    return checks
