

import pickle

import pytest
import torch

from luna_dist.imaging.chunks import CHUNK_SHAPE
from luna_dist.models.classifier import LunaBlock, LunaModel
from luna_dist.models.unet import SegmentationModel


def _chunks(n: int, seed: int = 0) -> torch.Tensor:
    """Random chunks (N, 1, 32, 48, 48) spread over the HU range, like real inputs."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, *CHUNK_SHAPE, generator=generator) * 2000 - 1000


@pytest.fixture
def model() -> LunaModel:
    torch.manual_seed(0)
    return LunaModel()


def test_parameter_count(model):
    assert sum(p.numel() for p in model.parameters()) == 222_220


def test_block_halves_every_spatial_axis():
    out = LunaBlock(1, 8)(torch.zeros(2, 1, 8, 6, 4))
    assert out.shape == (2, 8, 4, 3, 2)


@pytest.mark.parametrize("n", [1, 3])
def test_forward_shapes_and_probabilities(model, n):
    model.eval()
    logits, probabilities = model(_chunks(n))
    assert logits.shape == probabilities.shape == (n, 2)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(n))
    torch.testing.assert_close(probabilities, torch.softmax(logits, dim=1))


@pytest.mark.parametrize(
    "shape",
    [
        (2, 1, 32, 32, 32),  # wrong spatial size: head sees too few features
        (2, 2, *CHUNK_SHAPE),  # two channels into a one-channel batch norm
        (1, *CHUNK_SHAPE),  # missing batch axis: batch norm rejects 4-D input
    ],
)
def test_wrong_input_shape_raises(model, shape):
    with pytest.raises((RuntimeError, ValueError)):
        model(torch.zeros(shape))


def test_init_is_kaiming_fan_out_with_small_normal_bias():
    torch.manual_seed(0)
    conv = LunaModel().block4.conv1  # 32 -> 64 channels: fan_out differs from fan_in
    fan_out = 64 * 27
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)
    # Bias is normal with mean -bound and std bound, bound = 1/sqrt(fan_out): small, centred below 0.
    bound = 1 / fan_out**0.5
    assert conv.bias.abs().max().item() < 6 * bound
    assert conv.bias.mean().item() == pytest.approx(-bound, abs=0.5 * bound)


def test_gradients_reach_every_parameter(model):
    model.train()
    logits, _ = model(_chunks(4))
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1])).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("train", [False, True])
def test_channels_last_3d_matches_default_layout(model, train):
    x = _chunks(2)
    model.train(train)
    expected_logits, expected_probabilities = model(x)

    model = model.to(memory_format=torch.channels_last_3d)
    x = x.to(memory_format=torch.channels_last_3d)
    assert model.block1.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    logits, probabilities = model(x)

    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(probabilities, expected_probabilities, rtol=1e-4, atol=1e-4)


def test_bfloat16_autocast_gives_finite_outputs(model):
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, probabilities = model(_chunks(2))
    assert logits.dtype == torch.bfloat16  # autocast really ran the layers in bf16
    assert torch.isfinite(logits).all()
    assert torch.isfinite(probabilities).all()
    torch.testing.assert_close(probabilities.float().sum(dim=1), torch.ones(2), atol=1e-2, rtol=0)


def test_pickle_and_state_dict_round_trip(model):
    model.eval()
    x = _chunks(2)
    expected, _ = model(x)

    unpickled = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(unpickled(x)[0], expected, rtol=0, atol=0)

    torch.manual_seed(1)
    fresh = LunaModel().eval()
    assert not torch.equal(fresh(x)[0], expected)  # different init, different output
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x)[0], expected, rtol=0, atol=0)


# -- the segmentation UNet ---------------------------------------------------------------------
def _slices(n: int, size: tuple[int, int] = (64, 64), seed: int = 0) -> torch.Tensor:
    """Random 7-slice context stacks (N, 7, H, W) in HU."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 7, *size, generator=generator) * 2000 - 1000


@pytest.fixture
def unet() -> SegmentationModel:
    torch.manual_seed(0)
    return SegmentationModel()


def test_unet_parameter_count(unet):
    def conv(c_in, c_out, k):
        return c_in * c_out * k * k + c_out

    def block(c_in, c_out):
        return conv(c_in, c_out, 3) + conv(c_out, c_out, 3) + 4 * c_out  # two convs, two BNs
    expected = (
        2 * 7  # input batch norm
        + block(7, 16) + block(16, 32) + block(32, 64)  # down
        + conv(64, 32, 2) + block(64, 32) + conv(32, 16, 2) + block(32, 16)  # up
        + conv(16, 1, 1)
    )
    assert sum(p.numel() for p in unet.parameters()) == expected == 118_271
    assert [b[0].out_channels for b in unet.unet.down] == [16, 32, 64]
    assert [type(m) for m in unet.unet.upsample] == [torch.nn.ConvTranspose2d] * 2
    assert unet.input_batchnorm.num_features == 7


@pytest.mark.parametrize("size", [(64, 64), (96, 96), (30, 50)])
def test_unet_keeps_the_size_and_gives_probabilities(unet, size):
    unet.eval()
    out = unet(_slices(2, size))
    assert out.shape == (2, 1, *size)
    assert ((out >= 0) & (out <= 1)).all()  # untrained on raw HU, many saturate at 0 or 1


def test_unet_output_is_local(unet):
    """Padded convolutions of limited reach: a change in one corner leaves the far corner alone."""
    unet.eval()
    x = _slices(1, (96, 96))
    changed = x.clone()
    changed[..., :4, :4] += 500
    a, b = unet(x), unet(changed)
    assert not torch.equal(a[..., :8, :8], b[..., :8, :8])
    torch.testing.assert_close(a[..., -40:, -40:], b[..., -40:, -40:], rtol=0, atol=0)


def test_unet_gradients_reach_every_parameter(unet):
    unet.train()
    out = unet(_slices(2))
    out.mean().backward()
    for name, parameter in unet.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_unet_channels_last_and_pickle(unet):
    x = _slices(2)
    unet.eval()
    expected = unet(x)
    torch.testing.assert_close(pickle.loads(pickle.dumps(unet))(x), expected, rtol=0, atol=0)
    fast = unet.to(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), expected, rtol=0, atol=1e-3)


# -- weights files ---------------------------------------------------------------------------------
def _weights_files(folder) -> dict:
    """Each kind of file a user may pass as a model, written as training writes them."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = LunaModel()
    state = folder / "state"
    state.mkdir()
    save_file(model.state_dict(), state / "model.safetensors")
    torch.save({"state": {}, "param_groups": [{"lr": 0.001}]}, state / "optimizer.bin")
    torch.save({"model": model.state_dict(), "task": "cls"}, folder / "best.pt")
    torch.save({"model": SegmentationModel().state_dict(), "task": "seg"}, folder / "seg.pt")
    (folder / "notes.txt").write_text("not a model\n")
    truncated = (state / "model.safetensors").read_bytes()
    (folder / "short.safetensors").write_bytes(truncated[: len(truncated) // 2])
    (folder / "short.pt").write_bytes((folder / "best.pt").read_bytes()[:5000])
    return model.state_dict()


@pytest.mark.parametrize("name", ["best.pt", "state", "state/model.safetensors"])
def test_weights_load_from_best_pt_state_folder_or_safetensors(tmp_path, name):
    from luna_dist.models.weights import load_into

    expected = _weights_files(tmp_path)
    loaded = load_into(LunaModel(), tmp_path / name).state_dict()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)


@pytest.mark.parametrize("name, message", [
    ("notes.txt", "notes.txt: not a readable checkpoint ("),
    ("state/optimizer.bin", "optimizer.bin: holds no model weights (it holds param_groups, state)"),
    ("short.safetensors", "short.safetensors: not a readable checkpoint ("),
    ("short.pt", "short.pt: not a readable checkpoint ("),
    ("seg.pt", "seg.pt: not weights of a LunaModel (23 of its tensors missing, e.g. tail_batchnorm.weight; 81 unexpected"),
])
def test_a_file_that_holds_no_usable_weights_is_one_line_naming_it(tmp_path, name, message):
    from luna_dist.models.weights import WeightsError, load_into

    _weights_files(tmp_path)
    with pytest.raises(WeightsError) as err:
        load_into(LunaModel(), tmp_path / name)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert "weights_only" not in str(err.value)  # torch's hint to load it unsafely is not passed on


def test_a_file_with_pickled_code_is_refused_and_not_run(tmp_path):
    """torch's refusal suggested weights_only=False, which runs the file's code; the message says what the
    file holds and that it is refused."""
    from helpers import OpensAFile

    from luna_dist.models.weights import WeightsError, load_into

    marker = tmp_path / "ran"
    torch.save({"model": LunaModel().state_dict(), "extra": OpensAFile(marker)}, tmp_path / "planted.pt")
    with pytest.raises(WeightsError) as err:
        load_into(LunaModel(), tmp_path / "planted.pt")
    assert str(err.value).startswith(f"{tmp_path / 'planted.pt'}: holds pickled Python objects besides tensors "
                                     "(io.open); refused: loading them could run code")
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["best.pt", "state"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_refused_naming_the_file_and_the_tensor(tmp_path, name, value):
    """They scored every candidate NaN, and the analysis wrote p_nodule = nan with exit 0."""
    from safetensors.torch import save_file

    from luna_dist.models.weights import WeightsError, load_into

    weights = _weights_files(tmp_path)
    weights["block2.conv1.weight"][0, 0, 0, 0, 1] = value
    weights["head_linear.bias"][0] = value
    torch.save({"model": weights}, tmp_path / "best.pt")
    save_file(weights, tmp_path / "state" / "model.safetensors")
    file = tmp_path / name if name == "best.pt" else tmp_path / "state" / "model.safetensors"
    with pytest.raises(WeightsError) as err:
        load_into(LunaModel(), tmp_path / name)
    assert str(err.value) == (f"{file}: block2.conv1.weight holds 1 of its 3,456 values that are not finite numbers "
                              "(NaN or infinity): the weights of a diverged model; pass weights saved before it "
                              "diverged")
