"""The models: a small 3-D CNN that classifies a CT chunk as nodule or not, and a
2-D UNet that segments nodules in a CT slice.

Both follow *Deep Learning with PyTorch*: the classifier (chapter 11) is a batch-norm
"tail" that standardises raw HU values, four conv blocks that halve every spatial axis,
and a linear "head" over the flattened features; the segmentation model (chapter 13)
is a batch norm over the input slices, a UNet and a sigmoid.
"""

import math

from torch import Tensor, nn

from luna_dist.imaging.chunks import CHUNK_SHAPE
from luna_dist.models.weights import init_weights


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
