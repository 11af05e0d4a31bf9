"""CIFAR-style DenseNet-121.

Paper: Huang, Liu, van der Maaten, Weinberger, "Densely Connected Convolutional Networks",
https://arxiv.org/abs/1608.06993.

CIFAR variant (DenseNet-BC): a 3x3 stride-1 stem of 2 * growth channels, dense blocks of [6, 12, 24, 16]
bottleneck layers (BN-ReLU-1x1 conv to 4 * growth, BN-ReLU-3x3 conv to growth, concatenated to the input),
growth rate 32, transitions (BN-ReLU-1x1 conv with compression 0.5, then 2x2 average pooling), a final
BN-ReLU, global average pooling (any input size >= 8) and a linear head 1024 -> classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from puregen_dist.config.schema import ClassifierConfig
from puregen_dist.registry import CLASSIFIERS

_GROWTH = 32
_REDUCTION = 0.5
_BLOCKS_121 = (6, 12, 24, 16)


class Bottleneck(nn.Module):
    """BN-ReLU-conv1x1(4g) -> BN-ReLU-conv3x3(g); the output is concatenated onto the input."""

    def __init__(self, c_in: int, growth: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.BatchNorm2d(c_in),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_in, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth),
            nn.ReLU(inplace=True),
            nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.layers(x), x], dim=1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 (channel compression) then 2x2 average pooling (skipped below 2x2)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.layers = nn.Sequential(nn.BatchNorm2d(c_in), nn.ReLU(inplace=True), conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(x)
        return F.avg_pool2d(x, 2) if min(x.shape[-2:]) >= 2 else x


class CifarDenseNet(nn.Module):
    """DenseNet-BC with a CIFAR stem and global average pooling."""

    def __init__(self, blocks: Sequence[int], in_channels: int, num_classes: int) -> None:
        super().__init__()
        channels = 2 * _GROWTH
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)]
        for i, n_layers in enumerate(blocks):
            layers += [Bottleneck(channels + j * _GROWTH, _GROWTH) for j in range(n_layers)]
            channels += n_layers * _GROWTH
            if i < len(blocks) - 1:
                reduced = int(math.floor(channels * _REDUCTION))
                layers.append(Transition(channels, reduced))
                channels = reduced
        layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1)]
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.features(x), 1))


@CLASSIFIERS.register("densenet121", ClassifierConfig)
def build_densenet121(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """CIFAR DenseNet-121 (blocks [6, 12, 24, 16], growth 32, reduction 0.5).

    Input: (N, C, H, W) float with C == ``in_channels`` and H, W >= 8 (``image_size`` is not needed:
    pooling is global). Output: (N, num_classes) logits.
    """
    del image_size
    return CifarDenseNet(_BLOCKS_121, in_channels, num_classes)
