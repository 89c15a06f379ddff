"""What the hardware runs natively, so a precision it only emulates is named before training; and the
layout each device runs the analysis's UNet fastest in.

bf16 autocast more than doubles training speed where the hardware has bf16 arithmetic
(CUDA compute capability 8.0 and up; x86 CPUs with AVX-512 BF16 or AMX; recent Arm
cores) and makes it many times slower where torch has to emulate it: on a 2-core AMD
EPYC without AVX-512, LunaModel trained at 1.5 samples/s in bf16 against 28 in fp32.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

# /proc/cpuinfo flags that decide CPU speed for these models: vector width, bf16 and matrix units.
_REPORTED_PREFIXES = ("avx512", "amx", "avx2", "fma", "bf16", "asimd", "sve")
# Any of these makes bf16 native on a CPU (x86: AVX-512 BF16 or AMX; Arm: the BF16 extension).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_features(cpuinfo: str | None = None) -> list[str]:
    """The CPU flags that matter for training speed, sorted; `cpuinfo` is /proc/cpuinfo's text (read if None).

    Linux lists them in /proc/cpuinfo (`flags` on x86, `Features` on Arm); on macOS the
    Arm BF16 extension is asked from sysctl. Elsewhere: torch's own capability name.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags.update(value.split())
    if not cpuinfo and platform.system() == "Darwin" and platform.machine() == "arm64":
        answer = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True)
        flags.add("asimd")
        if answer.stdout.strip() == "1":
            flags.add("bf16")
    reported = sorted(f for f in flags if f.startswith(_REPORTED_PREFIXES))
    return reported or [f"torch:{torch.backends.cpu.get_cpu_capability()}"]


def native_bf16(device: torch.device, features: list[str] | None = None) -> tuple[bool, str]:
    """Whether `device` computes in bf16 natively, and what that answer rests on (for messages)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return (major, minor) >= (8, 0), f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"
    if device.type == "mps":
        return torch.backends.mps.is_macos_or_newer(14, 0), "Apple GPU (bf16 from macOS 14)"
    features = cpu_features() if features is None else features
    native = [f for f in features if f in BF16_CPU_FLAGS]
    if native:
        return True, f"CPU with {', '.join(native)}"
    return False, f"CPU without AVX-512 BF16, AMX or Arm BF16 (features: {' '.join(features)})"


def precision_warning(device: torch.device, mixed_precision: str, features: list[str] | None = None) -> str | None:
    """A warning when bf16 mixed precision would be emulated on `device`; None when it is native or unused."""
    if mixed_precision != "bf16":
        return None
    native, basis = native_bf16(device, features)
    if native:
        return None
    return (f"bf16 mixed precision on a {basis}: torch emulates it, expect training up to 20 times slower than "
            "fp32 (1.5 vs 28 samples/s measured on such a CPU); launch with `--mixed_precision no` "
            "(or `mixed_precision: no` in the accelerate config)")


def seg_memory_format(device: torch.device) -> torch.memory_format:
    """The layout of the analysis's UNet inputs on `device`: channels_last on a CPU, where oneDNN's
    convolutions and batch norms work in it natively and NCHW is reordered at every layer (the UNet ran
    1.5 times faster so on a 2-core Xeon with AVX-512, fp32, probabilities the same to float rounding);
    NCHW elsewhere, until a GPU's figures (`launch/bench_gpu.sh`) say otherwise."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format
