"""The check every training and analysis makes of its device before trusting it: the doctor's check 3 in its
quick form (`luna_dist.devices.numbers`: the run's own models, one batch of QUICK_BATCH, in float32 and the
run's mixed precision), a second or two. A device that computes wrongly is refused with one line saying
what differed and how to go on; `--skip-device-check` accepts it unchecked. Either way the run records
what was decided (`record`): training in args.json, the analysis in summary.json.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from luna_dist.devices.machine import device_name
from luna_dist.devices.numbers import KINDS, ModelCheck, check_model
from luna_dist.devices.ops import CPU_REMEDY, explain

QUICK_BATCH = 2
"""Samples of the start check: the fewest on which a batch norm in training mode has a variance to divide by."""


class DeviceCheckError(Exception):
    """The device computes differently from the CPU, or cannot run the models; the message says how to go on."""


def checked_at_start(device: torch.device) -> bool:
    """Whether a run on `device` checks it first: every device but the CPU, the reference every device is
    compared with. (Tests replace this rule to check the CPU as a device under a stand-in for a broken one.)"""
    return device.type != "cpu"


def start_check(models: list[tuple[nn.Module, torch.memory_format]], device: torch.device, precision: str,
                training: bool, skip: bool) -> tuple[dict, str | None]:
    """Check `device` on `models` (each on the CPU, with the layout the run gives it) in float32 and `precision`,
    training (forward, backward, step) or evaluating only: the record the run keeps, and the line refusing the
    device (None: accepted). The global random state is left as it was."""
    if skip:
        return {"status": "skipped", "why": "--skip-device-check: the device is accepted unchecked"}, None
    if not checked_at_start(device):
        return {"status": "skipped", "why": "the CPU is the reference every device is compared with"}, None
    named = f"{device} ({device_name(device)})"
    started = time.perf_counter()
    checks: list[ModelCheck] = []
    problem = None
    with torch.random.fork_rng(devices=[]):
        for model, layout in models:
            try:
                checks += check_model(model, device, [precision], layout, QUICK_BATCH, training)
            except Exception as err:  # a kernel the device lacks: the run would fail at its first step
                problem = f"{type(model).__name__} cannot run on {named}: {explain(err, device)}"
                break
    failures = [line for check in checks if (line := check.failure_line())]
    if failures and problem is None:
        problem = (f"{named} computes differently from the CPU: {failures[0]}. Look closer with `python -m "
                   f"luna_dist.doctor`; {CPU_REMEDY.removeprefix('or ')}, or accept the device with "
                   "--skip-device-check")
    record = {"status": "failed" if problem else "passed", "device": named,
              "seconds": round(time.perf_counter() - started, 2), "checks": [_summary(c) for c in checks]}
    if problem:
        record["problem"] = problem
    return record, problem


def _summary(check: ModelCheck) -> dict:
    """A model's check as a record keeps it: the largest difference of each kind, where, and its tolerance."""
    largest = {}
    for what in KINDS:
        if (found := check.largest(what)) is not None:
            largest[what] = {"where": found.where, "difference": found.value, "tolerance": found.tolerance}
    return {"model": check.model, "precision": check.precision, "arithmetic": check.arithmetic,
            "passed": check.first_failure is None, "largest": largest}


def summary_line(record: dict) -> str:
    """The log line of a start check."""
    if record["status"] == "skipped":
        return f"device check skipped: {record['why']}"
    checked = ", ".join(f"{c['model']} {c['precision']}" for c in record["checks"])
    worst = max((item["difference"] / item["tolerance"], what, item["where"]) for c in record["checks"]
                for what, item in c["largest"].items()) if record["checks"] else None
    closest = f"; closest to its tolerance: the {worst[1]} of {worst[2]} at {worst[0]:.0%} of it" if worst else ""
    return f"device check {record['status']} on {record['device']} ({checked}; {record['seconds']:.1f} s{closest})"


def check_every_rank(accelerator, models: list[tuple[nn.Module, torch.memory_format]], training: bool,
                     skip: bool) -> dict:
    """`start_check` of each process's own device in the run's mixed precision; logged, and its record returned.
    Where any rank's device is refused, every rank raises DeviceCheckError alike (none is left waiting in a
    collective), with the first refusal, naming its rank where there are several."""
    from accelerate.utils import gather_object

    record, problem = start_check(models, accelerator.device, accelerator.mixed_precision, training, skip)
    refused = [(rank, line) for rank, line in enumerate(gather_object([problem])) if line]
    if refused:
        rank, line = refused[0]
        raise DeviceCheckError(f"rank {rank}: {line}" if accelerator.num_processes > 1 else line)
    if accelerator.is_main_process:
        logging.getLogger(__name__).info(summary_line(record))
    return record
