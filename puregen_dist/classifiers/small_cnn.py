"""A small, fast CNN for CPU-scale experiments (e.g. 16x16 digits).

Architecture in the spirit of the VGG family: Simonyan and Zisserman, "Very Deep Convolutional Networks for
Large-Scale Image Recognition", https://arxiv.org/abs/1409.1556, with batch normalisation from Ioffe and
Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing Internal Covariate Shift",
https://arxiv.org/abs/1502.03167.

Layout: conv3x3 32 -> BN -> ReLU -> conv3x3 64 -> BN -> ReLU -> maxpool2 -> conv3x3 128 -> BN -> ReLU ->
global average pool -> Linear 128 -> classes (about 94k parameters for one channel and 10 classes).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from puregen_dist.config.schema import ClassifierConfig
from puregen_dist.registry import CLASSIFIERS

_WIDTHS = (32, 64, 128)


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 "same" convolution (bias-free), batch norm and ReLU."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU layers, one 2x2 max pool, global average pooling and a linear head."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        c1, c2, c3 = _WIDTHS
        self.block1 = nn.Sequential(_conv_bn_relu(in_channels, c1), _conv_bn_relu(c1, c2))
        self.block2 = _conv_bn_relu(c2, c3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(x)
        x = F.max_pool2d(x, 2) if min(x.shape[-2:]) >= 2 else x
        features = self.pool(self.block2(x))
        return self.linear(torch.flatten(features, 1))


@CLASSIFIERS.register("small_cnn", ClassifierConfig)
def build_small_cnn(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Small CNN for fast CPU training.

    Input: (N, C, H, W) float with C == ``in_channels`` and H, W >= 8 (``image_size`` is not needed:
    pooling is global). Output: (N, num_classes) logits.
    """
    del image_size
    return SmallCNN(in_channels, num_classes)
