"""The checks of a device on the CPU: every operation against the CPU, the models layer by layer, the rule for
the workers, and the check of every run's start, with stand-ins for broken backends (`helpers.broken_backend`)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import broken_backend, on_a_broken_device

from luna_dist import train as train_command
from luna_dist.devices import numbers, ops, speed
from luna_dist.models.classifier import LunaModel
from luna_dist.models.unet import SegmentationModel

CPU = torch.device("cpu")
ATEN = torch.ops.aten


def _quick(shards, out, *extra: str) -> list[str]:
    """A one-process run on `tiny_shards`: 1 step of a batch of 4, validated on fold 3."""
    return ["--shards", str(shards), "--out", str(out), "--run-name", "r", "--max-steps", "1", "--batch-size", "4",
            "--balanced", "1", "--val-folds", "3", "--num-workers", "0", *extra]


# -- check 2: the operations -----------------------------------------------------------------------------------------
def test_every_operation_runs_on_the_cpu_as_on_the_cpu():
    results = ops.check_ops(CPU, ["bf16"])
    assert {r.name for r in results} == {op.name for op in ops.OPS}
    assert not [r for r in results if r.failed], [vars(r) for r in results if r.failed]
    autocast = [r for r in results if r.precision == "bf16"]
    assert {r.name for r in autocast} == set(ops.AUTOCAST_OPS) and any(r.difference > 0 for r in autocast)


def test_a_kernel_missing_as_on_mps_is_named_with_its_remedy(monkeypatch):
    """MPS raised NotImplementedError for max_pool3d_with_indices (LunaModel's pooling) and 3-D grid sampling
    (the augmentation, which then resamples on the CPU)."""
    device_run = ops.device_run

    def on_mps_of_2024(*args, **kwargs):
        with broken_backend(missing=(ATEN.max_pool3d_with_indices.default, ATEN.grid_sampler_3d.default)):
            return device_run(*args, **kwargs)

    monkeypatch.setattr(ops, "device_run", on_mps_of_2024)
    results = {r.name: r for r in ops.check_ops(CPU, [])}
    pool = results["max_pool3d"]
    assert pool.failed and pool.status == "missing"
    for remedy in ("aten::max_pool3d_with_indices is not implemented on MPS", "pip install -U torch",
                   "PYTORCH_ENABLE_MPS_FALLBACK=1", "accelerate launch --cpu"):
        assert remedy in pool.detail, pool.detail
    assert pool.detail.startswith("max_pool3d (LunaModel's blocks)")
    sampling = results["grid_sample 3-D"]
    assert sampling.status == "fallback" and not sampling.failed and "resamples chunks on the CPU" in sampling.detail
    assert [name for name, r in results.items() if r.failed] == ["max_pool3d"]


# -- check 3: the models ---------------------------------------------------------------------------------------------
def test_a_model_is_compared_layer_by_layer_as_its_layers_run():
    """On the CPU the device pass runs other kernels (channels_last) than the reference: differences appear, small.
    (LunaModel's are in the doctor's own test.)"""
    torch.manual_seed(0)
    model = SegmentationModel()
    (check,) = numbers.check_model(model, CPU, [], torch.channels_last)
    assert {d.what for d in check.differences} == set(numbers.KINDS) and check.first_failure is None
    layers = [d.where for d in check.differences if d.what == "output"]
    assert sorted(layers) == sorted(name for name, m in model.named_modules() if name and not any(m.children()))
    assert layers.index("unet.upsample.0") < layers.index("unet.up.0.0") < layers.index("unet.upsample.1")  # as run
    assert 0 < check.largest("output").value < 1e-3


def test_a_perturbed_convolution_is_named_at_the_first_layer_it_reaches(monkeypatch):
    on_a_broken_device(monkeypatch, perturbed=(ATEN.convolution.default,))
    torch.manual_seed(0)
    (luna,) = numbers.check_model(LunaModel(), CPU, [], torch.channels_last_3d)
    assert luna.failure_line().startswith("LunaModel in fp32: the output of block1.conv1 differs from the CPU's by "
                                          "1.0e-01 of its scale (tolerance 1e-02)"), luna.failure_line()
    backward = broken_backend(perturbed=(ATEN.convolution_backward.default,), scale=1.5)
    monkeypatch.setattr(numbers, "device_pass", lambda *args, **kwargs: _under(backward, *args, **kwargs))
    (unet,) = numbers.check_model(SegmentationModel(), CPU, [], torch.channels_last)
    first = unet.first_failure
    assert (first.what, first.where) == ("gradients", "unet.last"), unet.failure_line()


def _under(mode, *args, **kwargs):
    with mode:
        return numbers.run_pass(*args, **kwargs)


# -- check 4: the rule for the workers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("device, worker, cores, workers, waiting", [
    (30, 5000, 2, 0, 30 / 5030),  # a CPU: reading in the training process costs it 0.6 % of its time
    (30, 5000, 1, 0, 30 / 5030),
    (8000, 5000, 16, 3, 0.0),  # a GPU: 3 workers deliver 10,000 samples/s at 1/1.5 of their rate
    (8000, 5000, 2, 1, 1 - 5000 / 8000),  # one core to spare: the device waits
    (400, 5000, 8, 1, 0.0),
])
def test_workers_feed_the_device_within_the_cores(device, worker, cores, workers, waiting):
    advice = speed.recommend_workers(device, worker, cores)
    assert (advice.workers, advice.waiting) == (workers, pytest.approx(waiting))
    assert ("limited by" in advice.reason) == (cores == 2 and device == 8000)


def test_a_worker_too_slow_for_the_device_asks_for_more_workers(tiny_shards, monkeypatch):
    """At a run's start the figures are timed: this CPU against its own decoding needs no worker, a decoding 50
    times slower than the CPU trains asks for every core but the training process's."""
    from helpers import open_cls

    shards = open_cls(tiny_shards)
    fed = speed.start_advice("cls", CPU, 32, "no", True, shards, [0, 1, 2], cores=4)
    assert fed.workers == 0 and fed.waiting < speed.FED
    rate = speed.device_rate("cls", CPU, 4, 1)
    monkeypatch.setattr(speed, "decode_rate", lambda *args: rate / 50)
    assert speed.start_advice("cls", CPU, 32, "no", True, shards, [0, 1, 2], cores=4).workers == 3


# -- the check of every start -----------------------------------------------------------------------------------------
def test_a_training_start_on_a_device_that_computes_wrongly_is_refused(tiny_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    on_a_broken_device(monkeypatch, perturbed=(ATEN.convolution.default,))
    assert train_command.main(_quick(tiny_shards, tmp_path)) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and not (tmp_path / "r").exists()
    for said in ("computes differently from the CPU: LunaModel in fp32: the output of block1.conv1 differs",
                 "python -m luna_dist.doctor", "accelerate launch --cpu", "accept the device with --skip-device-check"):
        assert said in errors[0], errors[0]


def test_a_training_start_on_a_device_missing_a_kernel_is_refused_with_its_remedy(tiny_shards, tmp_path, monkeypatch,
                                                                                  capsys):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    on_a_broken_device(monkeypatch, missing=(ATEN.max_pool3d_with_indices.default,))
    assert train_command.main(_quick(tiny_shards, tmp_path)) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: LunaModel cannot run on cpu"), errors
    assert "PYTORCH_ENABLE_MPS_FALLBACK=1" in errors[0] and "--skip-device-check" not in errors[0]


@pytest.mark.parametrize("broken, flags, status", [(True, ["--skip-device-check"], "skipped"), (False, [], "passed")],
                         ids=["accepted unchecked", "checked"])
def test_the_start_check_is_recorded_in_args_json(broken, flags, status, tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    on_a_broken_device(monkeypatch, perturbed=(ATEN.convolution.default,) if broken else ())
    assert train_command.main(_quick(tiny_shards, tmp_path, *flags)) == 0
    record = json.loads((tmp_path / "r" / "args.json").read_text())["device_check"]
    assert record["status"] == status
    if broken:
        assert record["why"].startswith("--skip-device-check")
    else:
        (check,) = record["checks"]
        assert (check["model"], check["precision"], check["passed"]) == ("LunaModel", "fp32", True)
        assert set(check["largest"]) == set(numbers.KINDS)
