"""The models: a small 3-D CNN that classifies a CT chunk as nodule or not, and a
2-D UNet that segments nodules in a CT slice.

Both follow *Deep Learning with PyTorch*: the classifier (chapter 11) is a batch-norm
"tail" that standardises raw HU values, four conv blocks that halve every spatial axis,
and a linear "head" over the flattened features; the segmentation model (chapter 13)
is a batch norm over the input slices, a UNet and a sigmoid.
"""

import math
import pickle
import re
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from luna_dist.ct import CHUNK_SHAPE


def init_weights(model: nn.Module) -> None:
    """Kaiming init scaled for ReLU, so activations keep their size through the layers."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(module.weight, a=0, mode="fan_out", nonlinearity="relu")
            # fan_out = output units times kernel elements, as kaiming's mode="fan_out".
            fan_out = module.weight.shape[0] * module.weight[0, 0].numel()
            bound = 1 / math.sqrt(fan_out)
            # A small normal bias init: normal_ takes (mean, std), so this is
            # mean -bound, std bound, as in the book (not a uniform in ±bound).
            nn.init.normal_(module.bias, -bound, bound)


class LunaBlock(nn.Module):
    """Two 3x3x3 convolutions then a 2x max-pool: doubles the receptive field per block."""

    def __init__(self, in_channels: int, conv_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, conv_channels, kernel_size=3, padding=1, bias=True)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(conv_channels, conv_channels, kernel_size=3, padding=1, bias=True)
        self.relu2 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        # (N, in, I, R, C) -> (N, conv, I/2, R/2, C/2)
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        return self.maxpool(x)


class LunaModel(nn.Module):
    """Nodule classifier for chunks of shape ``(N, 1, *CHUNK_SHAPE)``.

    ``forward`` returns ``(logits, probabilities)``: logits feed the
    cross-entropy loss, probabilities feed the metrics.
    """

    def __init__(self, in_channels: int = 1, conv_channels: int = 8) -> None:
        super().__init__()
        # Learns the HU offset and scale, so inputs need no fixed normalisation.
        self.tail_batchnorm = nn.BatchNorm3d(in_channels)

        self.block1 = LunaBlock(in_channels, conv_channels)
        self.block2 = LunaBlock(conv_channels, conv_channels * 2)
        self.block3 = LunaBlock(conv_channels * 2, conv_channels * 4)
        self.block4 = LunaBlock(conv_channels * 4, conv_channels * 8)

        # Four 2x pools: (32, 48, 48) -> (2, 3, 3), so 64 * 18 = 1152 features by default.
        pooled = math.prod(size // 2**4 for size in CHUNK_SHAPE)
        self.head_linear = nn.Linear(conv_channels * 8 * pooled, 2)
        self.head_softmax = nn.Softmax(dim=1)

        init_weights(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # x: (N, 1, 32, 48, 48) in HU
        x = self.tail_batchnorm(x)
        x = self.block1(x)  # (N, 8, 16, 24, 24)
        x = self.block2(x)  # (N, 16, 8, 12, 12)
        x = self.block3(x)  # (N, 32, 4, 6, 6)
        x = self.block4(x)  # (N, 64, 2, 3, 3)
        # flatten, not view: a channels_last_3d tensor is not contiguous in NCDHW order.
        logits = self.head_linear(x.flatten(1))  # (N, 2)
        return logits, self.head_softmax(logits)


class UNetBlock(nn.Sequential):
    """Two padded 3x3 convolutions, each followed by ReLU and batch norm: the size is kept."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(out_channels),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(out_channels),
        )


class UNet(nn.Module):
    """A 2-D UNet: blocks of `channels` going down (2x max-pool between them), then up
    again by 2x2 transposed convolutions, each joined with the block of its size on the
    way down; a 1x1 convolution gives one logit per pixel.

    Input height and width must be multiples of 2**(depth - 1).
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.down = nn.ModuleList(
            UNetBlock(c_in, c_out) for c_in, c_out in zip((in_channels, *channels[:-1]), channels)
        )
        widths = channels[::-1]  # e.g. 64 -> 32 -> 16
        self.upsample = nn.ModuleList(
            nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2) for c_in, c_out in zip(widths, widths[1:])
        )
        self.up = nn.ModuleList(UNetBlock(2 * c_out, c_out) for c_out in widths[1:])
        self.last = nn.Conv2d(channels[0], 1, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for depth, block in enumerate(self.down):
            if depth:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)  # (N, 16, H, W), (N, 32, H/2, W/2), (N, 64, H/4, W/4)
        for upsample, block, skip in zip(self.upsample, self.up, reversed(skips[:-1])):
            x = block(torch.cat([upsample(x), skip], dim=1))
        return self.last(x)  # (N, 1, H, W) logits


class SegmentationModel(nn.Module):
    """Nodule segmentation of a CT slice from its 7-slice context, as the book's `UNetWrapper`.

    Input (N, 7, H, W) in HU (the slice and 3 on each side); output (N, 1, H, W) the
    probability that each pixel of the middle slice is nodule. Any H and W work: the
    input is padded to a multiple of 4 for the two poolings and the output cropped back.
    """

    def __init__(self, in_channels: int = 7, channels: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.input_batchnorm = nn.BatchNorm2d(in_channels)  # learns the HU offset and scale
        self.unet = UNet(in_channels, channels)
        self.multiple = 2 ** (len(channels) - 1)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        x = self.input_batchnorm(x)
        pad_h, pad_w = -height % self.multiple, -width % self.multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        logits = self.unet(x)[..., :height, :width]
        return torch.sigmoid(logits)


class WeightsError(ValueError):
    """A file that holds no weights of the model asked for; the message names the file and what it holds."""


_WEIGHTS_HINT = "pass a best.pt, a run's state/ folder or its model.safetensors"


def load_tensors(file: Path):
    """What a torch file holds, read by torch's weights-only unpickler: tensors, numbers, strings and containers of
    them, never code. WeightsError naming the file when it holds other pickled objects; ValueError when it is no
    torch file."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's message suggests weights_only=False, which would run the code
        with open(file, "rb") as f:  # a torch file is a zip archive holding a pickle, or (before torch 1.6) a pickle
            zipped = zipfile.is_zipfile(f)
            f.seek(0)
            pickled = f.read(1) == pickle.PROTO
        if not (zipped or pickled):
            raise ValueError("not a torch file") from None
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
        raise WeightsError(f"{file}: holds pickled Python objects besides tensors{f' ({found[1]})' if found else ''}; "
                           "refused: loading them could run code") from None


def load_weights(path: Path) -> dict:
    """Model weights from a best-model file (best.pt), a saved training state folder or its model.safetensors.

    FileNotFoundError when there is no such file; WeightsError when the file is damaged
    (truncated, not a checkpoint at all), holds something else (an optimizer state) or holds
    pickled objects besides tensors (refused: unpickling them could run code).
    """
    from safetensors.torch import load_file

    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no model.safetensors; {_WEIGHTS_HINT}" if path.is_dir()
                                else f"{path}: checkpoint not found")
    try:
        checkpoint = {"model": load_file(file)} if file.suffix == ".safetensors" else load_tensors(file)
    except WeightsError:
        raise
    except Exception as err:  # torch and safetensors each word a damaged file their own way
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(f"{file}: not a readable checkpoint ({reason[:200]}); truncated or another kind of "
                           f"file? {_WEIGHTS_HINT}") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        held = (", ".join(sorted(map(str, checkpoint))[:6]) if isinstance(checkpoint, dict)
                else type(checkpoint).__name__)
        raise WeightsError(f"{file}: holds no model weights (it holds {held}); {_WEIGHTS_HINT}")
    _refuse_nonfinite(file, checkpoint["model"])
    return checkpoint["model"]


def _refuse_nonfinite(file: Path, weights: dict) -> None:
    """WeightsError naming the first tensor (in the file's order) holding a NaN or an infinity: such weights
    give every input a probability of NaN, which nothing downstream may turn into a finding or a score."""
    for name, tensor in weights.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            count = int((~torch.isfinite(tensor)).sum())
            raise WeightsError(f"{file}: {name} holds {count:,} of its {tensor.numel():,} values that are not finite "
                               "numbers (NaN or infinity): the weights of a diverged model; pass weights saved "
                               "before it diverged")


def load_into(model: nn.Module, path: Path) -> nn.Module:
    """`model` with the weights of `path` (see `load_weights`); WeightsError naming the file when they are
    another network's."""
    weights = load_weights(path)
    expected = model.state_dict()
    missing = [name for name in expected if name not in weights]
    unexpected = [name for name in weights if name not in expected]
    resized = [name for name in expected if name in weights and weights[name].shape != expected[name].shape]
    if missing or unexpected or resized:
        problems = [f"{len(names)} {what}, e.g. {names[0]}" for names, what in
                    ((missing, "of its tensors missing"), (unexpected, "unexpected"), (resized, "of another shape"))
                    if names]
        raise WeightsError(f"{path}: not weights of a {type(model).__name__} ({'; '.join(problems)})")
    model.load_state_dict(weights)
    return model
