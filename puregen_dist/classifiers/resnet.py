"""CIFAR-style ResNet-18 and ResNet-34.

Paper: He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", https://arxiv.org/abs/1512.03385.

The CIFAR variant uses a 3x3 stride-1 stem without max-pooling, four stages of basic blocks with widths
64/128/256/512 and strides 1/2/2/2, then global average pooling (so any input size >= 8 works) and a linear
head 512 -> classes. ResNet-18 with 3 input channels and 10 classes has 11,173,962 parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from puregen_dist.config.schema import ClassifierConfig
from puregen_dist.registry import CLASSIFIERS

_WIDTHS = (64, 128, 256, 512)
_STRIDES = (1, 2, 2, 2)


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    """A bias-free convolution ("same" padding for odd kernels) followed by batch norm."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            _conv_bn(c_in, c_out, 3, stride), nn.ReLU(inplace=True), _conv_bn(c_out, c_out, 3, 1)
        )
        needs_projection = stride != 1 or c_in != c_out
        self.shortcut: nn.Module = _conv_bn(c_in, c_out, 1, stride) if needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.branch(x) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet with a CIFAR stem, basic blocks, global average pooling and a linear classifier."""

    def __init__(self, blocks: Sequence[int], in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(in_channels, 64, 3, 1), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        c_in = 64
        for n_blocks, width, stride in zip(blocks, _WIDTHS, _STRIDES, strict=True):
            stages.append(_stage(c_in, width, n_blocks, stride))
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(_WIDTHS[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.pool(self.stages(self.stem(x)))
        return self.linear(torch.flatten(features, 1))


def _stage(c_in: int, c_out: int, n_blocks: int, stride: int) -> nn.Sequential:
    """``n_blocks`` basic blocks; only the first one changes width and stride."""
    layers = [BasicBlock(c_in, c_out, stride)]
    layers += [BasicBlock(c_out, c_out, 1) for _ in range(n_blocks - 1)]
    return nn.Sequential(*layers)


@CLASSIFIERS.register("resnet18", ClassifierConfig)
def build_resnet18(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """CIFAR ResNet-18 (blocks [2, 2, 2, 2]).

    Input: (N, C, H, W) float with C == ``in_channels`` and H, W >= 8 (``image_size`` is not needed:
    pooling is global). Output: (N, num_classes) logits.
    """
    del image_size
    return CifarResNet((2, 2, 2, 2), in_channels, num_classes)


@CLASSIFIERS.register("resnet34", ClassifierConfig)
def build_resnet34(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """CIFAR ResNet-34 (blocks [3, 4, 6, 3]).

    Input: (N, C, H, W) float with C == ``in_channels`` and H, W >= 8 (``image_size`` is not needed:
    pooling is global). Output: (N, num_classes) logits.
    """
    del image_size
    return CifarResNet((3, 4, 6, 3), in_channels, num_classes)
