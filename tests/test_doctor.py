"""`python -m luna_dist.doctor` on the CPU: every check passes comparing the CPU with itself in other kernels, and a
stand-in for a broken backend fails check 3 naming the layer."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import on_a_broken_device

from luna_dist import doctor


@pytest.mark.slow
def test_the_doctor_passes_on_the_cpu(tiny_shards, tmp_path, capsys):
    out = tmp_path / "doctor.json"
    assert doctor.main(["--device", "cpu", "--mixed-precision", "no", "--shards", str(tiny_shards), "--steps", "1",
                        "--worker-samples", "256", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    found = json.loads(out.read_text())
    assert found["passed"] and found["failed"] == []
    for title in ("1. the machine", "2. operations against the CPU", "3. the models against the CPU", "4. speed"):
        assert any(line.startswith(title) and line.endswith("passed") for line in printed.splitlines()), title
    assert printed.rstrip().endswith("every check passed")
    assert found["machine"]["facts"]["torch"] == torch.__version__ and found["machine"]["facts"]["usable_cores"] >= 1
    models = {(m["model"], m["precision"]) for m in found["numbers"]["models"]}
    assert models == {("LunaModel", "fp32"), ("UNet", "fp32")}
    # the CPU against itself still compares: its device pass runs channels_last kernels, the reference contiguous
    assert all(m["largest"]["output"]["value"] > 0 for m in found["numbers"]["models"])
    speed = found["speed"]
    assert set(speed["device_samples_per_s"]) == {"cls", "seg", "malignancy"} and speed["worker_samples_per_s"] > 0
    assert 0 <= speed["advice"]["workers"] <= max(0, found["machine"]["facts"]["usable_cores"] - 1)


@pytest.mark.slow
def test_a_device_whose_convolution_is_perturbed_fails_check_3_naming_the_layer(tmp_path, monkeypatch, capsys):
    on_a_broken_device(monkeypatch, perturbed=(torch.ops.aten.convolution.default,))
    out = tmp_path / "doctor.json"
    assert doctor.main(["--device", "cpu", "--mixed-precision", "no", "--skip-speed", "--json", str(out)]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert errors == ["error: check 3, numbers: LunaModel in fp32: the output of block1.conv1 differs from the CPU's "
                      "by 1.0e-01 of its scale (tolerance 1e-02)"], errors
    found = json.loads(out.read_text())
    assert found["failed"] == ["numbers"]
    unet = [m for m in found["numbers"]["models"] if m["model"] == "UNet"][0]
    assert not unet["passed"] and unet["largest"]["output"]["value"] >= 0.1
    assert "3. the models against the CPU" in captured.out and "4. speed" in captured.out


def test_a_wrong_shards_folder_fails_before_any_check(tmp_path, monkeypatch, capsys):
    def checked(*args):
        raise AssertionError("a check ran before --shards was opened")

    monkeypatch.setattr(doctor, "check_machine", checked)
    assert doctor.main(["--device", "cpu", "--shards", str(tmp_path / "none")]) == 1
    assert capsys.readouterr().err.startswith(f"error: --shards: {tmp_path / 'none'}")


def test_a_device_out_of_memory_at_batch_32_fails_check_4_saying_so(tiny_shards, monkeypatch):
    def out_of_memory(task, device, size, *args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(doctor.speed, "device_rate", out_of_memory)
    found = doctor.check_speed(torch.device("cpu"), "no", doctor.open_shards(tiny_shards), 1, 64)
    assert not found["passed"] and found["shards_task"] == "cls"
    assert found["problem"] == ("the device ran out of memory training --task cls at --batch-size 32: train with a "
                                "smaller --batch-size, or on a device with more memory")
    rows = dict(doctor.speed_rows(found))
    assert rows["cls samples/s"] == "" and rows["a data worker"].endswith(f"samples/s ({tiny_shards})")
