"""Native bf16 detection and the warning before training where bf16 is only emulated."""

from __future__ import annotations

import logging

import pytest
import torch

from luna_dist.common import hardware

EPYC_NO_AVX512 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma bmi2\nprocessor\t: 1\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n"
EPYC_BF16 = "flags\t\t: fpu avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx2 fma avx512f amx_bf16 amx_tile amx_int8\n"
GRAVITON3 = "Features\t: fp asimd evtstrm aes sve bf16 i8mm\n"
GRAVITON2 = "Features\t: fp asimd evtstrm aes\n"


@pytest.mark.parametrize("cpuinfo, native, shown", [
    (EPYC_NO_AVX512, False, ["avx2", "fma"]),
    (EPYC_BF16, True, ["avx2", "avx512_bf16", "avx512_vnni", "avx512bw", "avx512f", "fma"]),
    (SAPPHIRE_RAPIDS, True, ["amx_bf16", "amx_int8", "amx_tile", "avx2", "avx512f", "fma"]),
    (GRAVITON3, True, ["asimd", "bf16", "sve"]),
    (GRAVITON2, False, ["asimd"]),
])
def test_cpu_bf16_from_cpuinfo(cpuinfo, native, shown):
    features = hardware.cpu_features(cpuinfo)
    assert features == shown
    assert hardware.native_bf16(torch.device("cpu"), features)[0] is native


def test_warning_names_the_slowdown_and_the_flag():
    cpu = torch.device("cpu")
    features = hardware.cpu_features(EPYC_NO_AVX512)
    warning = hardware.precision_warning(cpu, "bf16", features)
    assert "avx2 fma" in warning and "20 times slower" in warning and "--mixed_precision no" in warning
    assert hardware.precision_warning(cpu, "no", features) is None  # fp32: nothing emulated
    assert hardware.precision_warning(cpu, "bf16", hardware.cpu_features(EPYC_BF16)) is None


def test_this_machine_reports_its_features():
    features = hardware.cpu_features()
    assert features and all(isinstance(f, str) for f in features)


@pytest.mark.slow
def test_training_warns_before_the_first_step(tiny_shards, tmp_path, monkeypatch, caplog):
    """bf16 on a CPU said to lack bf16 units: the warning comes before any training line."""
    from accelerate.state import AcceleratorState

    from luna_dist.training.options import parse_args
    from luna_dist.training.trainer import Trainer

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    without_bf16 = hardware.cpu_features(EPYC_NO_AVX512)
    monkeypatch.setattr(hardware, "cpu_features", lambda cpuinfo=None: without_bf16)
    AcceleratorState._reset_state(True)
    caplog.set_level(logging.INFO, logger="luna_dist.train")
    # The 4-CT set: its validation in emulated bf16 stays short on a CPU without bf16 units.
    trainer = Trainer(parse_args(["--shards", str(tiny_shards), "--out", str(tmp_path), "--run-name", "r",
                                  "--max-steps", "1", "--batch-size", "2", "--val-folds", "3"]))
    try:
        assert trainer.accelerator.mixed_precision == "bf16"
        trainer.run()
    finally:
        trainer.close()
        AcceleratorState._reset_state(True)
    lines = [record.getMessage() for record in caplog.records]
    warned = [n for n, line in enumerate(lines) if "torch emulates it" in line]
    trained = [n for n, line in enumerate(lines) if "E1 trained" in line]
    assert warned and trained and warned[0] < trained[0], lines


def test_the_unet_runs_channels_last_on_a_cpu_only():
    assert hardware.seg_memory_format(torch.device("cpu")) == torch.channels_last
    assert hardware.seg_memory_format(torch.device("cuda")) == torch.contiguous_format  # until a GPU is measured
