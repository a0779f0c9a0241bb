"""Dense U-Net: a U-Net whose encoder and decoder stages are DenseNet dense blocks (Huang et al.
2017; the fully convolutional form of Jégou et al. 2017, "The One Hundred Layers Tiramisu").

Written here rather than taken from segmentation-models-pytorch: smp's U-Net with a DenseNet-121
encoder has 13.6 M parameters and trains at ~4.5 s/step on 2 CPU cores, too slow to train the
shipped weights here; this faithful dense-block U-Net has ~1 M parameters.
"""

from __future__ import annotations

import torch
from torch import nn


class DenseLayer(nn.Sequential):
    def __init__(self, channels: int, growth: int) -> None:
        super().__init__(
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, growth, kernel_size=3, padding=1, bias=False),
        )


class DenseBlock(nn.Module):
    """Each layer sees the concatenation of the block input and every earlier layer's output."""

    def __init__(self, channels: int, growth: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(channels + k * growth, growth) for k in range(layers)
        )
        self.new_channels = layers * growth
        self.out_channels = channels + self.new_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class TransitionDown(nn.Sequential):
    def __init__(self, channels: int) -> None:
        super().__init__(
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, kernel_size=1, bias=False),
            nn.MaxPool2d(2),
        )


class DenseUNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        classes: int = 4,
        stem: int = 32,
        growth: int = 12,
        layers: tuple[int, ...] = (2, 3, 4, 4),
        bottleneck_layers: int = 6,
    ) -> None:
        super().__init__()
        # A strided stem runs the dense blocks at half resolution (dense blocks at full resolution
        # cost ~12 s per training step on 2 CPU cores); a learned upsampling restores it.
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem, stem, kernel_size=3, stride=2, padding=1, bias=False),
        )
        self.down_blocks, self.transitions, skip_channels = nn.ModuleList(), nn.ModuleList(), []
        channels = stem
        for n in layers:
            block = DenseBlock(channels, growth, n)
            self.down_blocks.append(block)
            channels = block.out_channels
            skip_channels.append(channels)
            self.transitions.append(TransitionDown(channels))
        self.bottleneck = DenseBlock(channels, growth, bottleneck_layers)
        channels = self.bottleneck.new_channels  # only a block's new features go up (Jégou et al.)
        self.ups, self.up_blocks = nn.ModuleList(), nn.ModuleList()
        for n, skip in zip(reversed(layers), reversed(skip_channels), strict=False):
            self.ups.append(nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2))
            block = DenseBlock(channels + skip, growth, n)
            self.up_blocks.append(block)
            channels = block.new_channels
        channels = self.up_blocks[-1].out_channels  # the last block's full output feeds the head
        self.head = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(channels, stem, kernel_size=2, stride=2),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem, classes, kernel_size=3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        skips = []
        for block, down in zip(self.down_blocks, self.transitions, strict=False):
            x = block(x)
            skips.append(x)
            x = down(x)
        x = self.bottleneck(x)[:, -self.bottleneck.new_channels :]
        for k, (up, block, skip) in enumerate(
            zip(self.ups, self.up_blocks, reversed(skips), strict=False)
        ):
            x = block(torch.cat([up(x), skip], 1))
            if k < len(self.up_blocks) - 1:
                x = x[:, -block.new_channels :]
        return self.head(x)
