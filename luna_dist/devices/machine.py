"""The machine a run would use, as a bug report needs it: torch and its backends, the OS, the device and its
memory, the cores a process may use, the shared memory data workers hand batches through, the Accelerate
configuration in force and the precision training would choose.

Nothing here measures: each fact is read from torch, the OS or Accelerate. The one verdict is the shared
memory: a container's default /dev/shm of 64 MB is smaller than what the data workers of one training
process keep there (`luna_dist.data.batch_memory`: up to SLOTS batches a worker), and a DataLoader worker
that runs out of it dies with a bus error.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
from pathlib import Path

import torch

from luna_dist.common.hardware import cpu_features, native_bf16, precision_warning
from luna_dist.data.batch_memory import SLOTS
from luna_dist.imaging.chunks import CHUNK_SHAPE

SHM = Path("/dev/shm")


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, within a container's CPU quota (cgroup v2's
    cpu.max), where `os.cpu_count()` counts the host's."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def shared_memory_bytes() -> int | None:
    """The size of /dev/shm, where Linux's DataLoader workers put their batches; None where there is none
    (macOS, Windows: shared memory is not a file system there)."""
    try:
        return shutil.disk_usage(SHM).total if SHM.is_dir() else None
    except OSError:
        return None


def shared_memory_needed(workers: int, batch_size: int) -> int:
    """What the data workers of one training process may keep in shared memory at once: SLOTS batches of
    chunks each (int16), the classifier's batches being the largest the loaders hand over."""
    return workers * SLOTS * batch_size * math.prod(CHUNK_SHAPE) * 2


def accelerate_config() -> tuple[str, dict]:
    """Where `accelerate launch` takes its settings from (the default config file, or none) and those that
    decide a run here: processes, machines, mixed precision, the CPU forced; ACCELERATE_* variables win."""
    from accelerate.commands.config import default_config_file

    settings: dict = {}
    source = "none (accelerate launch's defaults)"
    if Path(default_config_file).is_file():
        source = default_config_file
        try:
            from accelerate.commands.config.config_args import load_config_from_file

            config = load_config_from_file(None).to_dict()
            settings = {key: config[key] for key in ("distributed_type", "num_processes", "num_machines",
                                                     "mixed_precision", "use_cpu") if key in config}
        except Exception as err:  # a broken file is a fact to report, not a reason to stop the doctor
            source = f"{default_config_file} (unreadable: {type(err).__name__}: {err})"
    for key, variable in (("mixed_precision", "ACCELERATE_MIXED_PRECISION"), ("use_cpu", "ACCELERATE_USE_CPU")):
        if variable in os.environ:
            settings[key] = f"{os.environ[variable]} (from {variable})"
    return source, settings


def chosen_precision() -> str:
    """The mixed precision a training started here would run in: ACCELERATE_MIXED_PRECISION (which `accelerate
    launch` sets from its flags and config file), else the default config file's, else none ("no")."""
    if value := os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return value.lower()
    _, settings = accelerate_config()
    return str(settings.get("mixed_precision", "no")).lower()


def device_name(device: torch.device) -> str:
    """The device as a person names it: the GPU's model, or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple GPU ({platform.machine()})"
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_memory(device: torch.device) -> int | None:
    """Bytes the device may use: a GPU's own memory, the share of the system's Metal recommends for MPS, the
    system's memory for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "mps":
        return torch.mps.recommended_max_memory() if hasattr(torch.mps, "recommended_max_memory") else None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def facts(device: torch.device, precision: str) -> dict:
    """Everything above, for the doctor's table and its JSON."""
    source, settings = accelerate_config()
    found = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "not built",
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "mps": "available" if torch.backends.mps.is_available() else
        ("built, not available" if torch.backends.mps.is_built() else "not built"),
        "os": platform.platform(),
        "device": str(device),
        "device_name": device_name(device),
        "device_memory_bytes": device_memory(device),
        "cpu_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "cpu_features": cpu_features(),
        "shared_memory_bytes": shared_memory_bytes(),
        "accelerate_config": source,
        "accelerate_settings": settings,
        "mixed_precision": precision,
        "bf16_native": native_bf16(device)[0],
        "precision_warning": precision_warning(device, precision),
    }
    if device.type == "cuda":
        found["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        found["tf32_convolutions"] = torch.backends.cudnn.allow_tf32
        found["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    if device.type == "mps":
        found["macos"] = platform.mac_ver()[0]
    return found


def shared_memory_problem(available: int | None, workers: int, batch_size: int) -> str | None:
    """Why /dev/shm cannot hold what `workers` data workers keep at `batch_size` (None: it can, or there is
    none to fill), with what to do."""
    needed = shared_memory_needed(workers, batch_size)
    if available is None or not workers or available >= needed:
        return None
    return (f"{SHM} holds {available / 2**20:,.0f} MiB, {workers} data worker(s) at --batch-size {batch_size} keep "
            f"up to {needed / 2**20:,.0f} MiB there: a worker would die of a bus error. In a container start it with "
            f"--shm-size={math.ceil(needed / 2**30)}g or more (docker), or train with fewer --num-workers")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
