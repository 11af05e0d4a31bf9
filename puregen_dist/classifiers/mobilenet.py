"""CIFAR-style MobileNetV2.

Paper: Sandler, Howard, Zhu, Zhmoginov, Chen, "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
https://arxiv.org/abs/1801.04381.

CIFAR changes relative to the ImageNet network: the 3x3 stem runs at stride 1 and the second stage (24
channels) at stride 1 instead of 2, so the total downsampling is 8x. As in the common CIFAR implementation
used by the PureGen code, a stride-1 block whose width changes gets a 1x1 conv-BN projection shortcut.
A 1x1 conv to 1280 channels, global average pooling (any input size >= 8) and a linear head 1280 -> classes
finish the network.
"""

from __future__ import annotations

import torch
from torch import nn

from puregen_dist.config.schema import ClassifierConfig
from puregen_dist.registry import CLASSIFIERS

# (expansion, out_channels, num_blocks, stride of the first block)
_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 in the ImageNet network
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_STEM_WIDTH = 32
_LAST_WIDTH = 1280


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """A bias-free convolution ("same" padding) and batch norm, as a list of modules."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(c_out)]


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear project (1x1), with a shortcut when the stride is 1."""

    def __init__(self, c_in: int, c_out: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.branch = nn.Sequential(
            *_conv_bn(c_in, hidden, 1),
            nn.ReLU6(inplace=True),
            *_conv_bn(hidden, hidden, 3, stride=stride, groups=hidden),
            nn.ReLU6(inplace=True),
            *_conv_bn(hidden, c_out, 1),
        )
        self.shortcut: nn.Module | None = None
        if stride == 1:
            self.shortcut = nn.Identity() if c_in == c_out else nn.Sequential(*_conv_bn(c_in, c_out, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        return out if self.shortcut is None else out + self.shortcut(x)


class CifarMobileNetV2(nn.Module):
    """MobileNetV2 with the CIFAR stride changes and global average pooling."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, _STEM_WIDTH, 3), nn.ReLU6(inplace=True))
        self.blocks = _blocks(_STEM_WIDTH)
        self.head = nn.Sequential(*_conv_bn(_STAGES[-1][1], _LAST_WIDTH, 1), nn.ReLU6(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(_LAST_WIDTH, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.pool(self.head(self.blocks(self.stem(x))))
        return self.linear(torch.flatten(features, 1))


def _blocks(c_in: int) -> nn.Sequential:
    """All inverted-residual stages; the first block of a stage carries its stride."""
    layers: list[nn.Module] = []
    for expansion, c_out, n_blocks, stride in _STAGES:
        for i in range(n_blocks):
            layers.append(InvertedResidual(c_in, c_out, expansion, stride if i == 0 else 1))
            c_in = c_out
    return nn.Sequential(*layers)


@CLASSIFIERS.register("mobilenet_v2", ClassifierConfig)
def build_mobilenet_v2(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """CIFAR MobileNetV2.

    Input: (N, C, H, W) float with C == ``in_channels`` and H, W >= 8 (``image_size`` is not needed:
    pooling is global). Output: (N, num_classes) logits.
    """
    del image_size
    return CifarMobileNetV2(in_channels, num_classes)
