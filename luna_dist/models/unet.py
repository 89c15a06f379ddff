"""The segmentation model: a batch norm over the input slices, a 2-D UNet and a sigmoid."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from luna_dist.models.weights import init_weights


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
