"""HyperLightBench-style small/medium/large CIFAR networks.

Reference: Tysam&, "hlb-CIFAR10" (https://github.com/tysam-code/hlb-CIFAR10), as used by PureGen:
Bhat, Shao, Lipton et al., "PureGen: Universal Data Purification for Train-Time Poison Defense via
Generative Model Dynamics", https://arxiv.org/abs/2405.18627. The whitening-style first layer follows the
ZCA-initialised stem of hlb-CIFAR10; here it gets the identity-style (Dirac) initialisation only.

Layout: conv k=2 pad 0 (C_in -> 8 * C_in) -> BN -> GELU -> three ConvGroups -> global max pool -> flatten
-> Linear (no bias) -> logits * 1/9. ConvGroup = conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU;
the heavy variant (``hlb_large``) adds conv3x3 -> BN -> GELU plus a residual connection around it.
Convolutions are bias-free with Dirac init on the first min(C_in, C_out) filters; batch norms use eps 1e-12,
momentum 0.4, a frozen unit weight and a trainable bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from puregen_dist.config.schema import ClassifierConfig
from puregen_dist.registry import CLASSIFIERS

_BN_EPS = 1e-12
_BN_MOMENTUM = 0.4
_LOGIT_SCALE = 1.0 / 9.0
_WHITEN_KERNEL = 2


class HlbConv(nn.Conv2d):
    """Bias-free convolution with Dirac (identity) init on its first min(C_in, C_out) filters."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, padding: int | str = "same") -> None:
        super().__init__(c_in, c_out, kernel, padding=padding, bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        n_identity = min(self.in_channels, self.out_channels)
        with torch.no_grad():
            nn.init.dirac_(self.weight[:n_identity])


class HlbBatchNorm(nn.BatchNorm2d):
    """Batch norm with eps 1e-12, momentum 0.4, frozen unit weight and trainable zero-initialised bias."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self.weight.requires_grad_(False)


def _maxpool2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pooling, skipped when the feature map is already smaller than 2x2."""
    return F.max_pool2d(x, 2) if min(x.shape[-2:]) >= 2 else x


class ConvGroup(nn.Module):
    """conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU; heavy: + residual conv3x3 -> BN -> GELU."""

    def __init__(self, c_in: int, c_out: int, heavy: bool) -> None:
        super().__init__()
        self.conv1, self.norm1 = HlbConv(c_in, c_out), HlbBatchNorm(c_out)
        self.conv2, self.norm2 = HlbConv(c_out, c_out), HlbBatchNorm(c_out)
        self.conv3 = HlbConv(c_out, c_out) if heavy else None
        self.norm3 = HlbBatchNorm(c_out) if heavy else None
        self.activ = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activ(self.norm1(_maxpool2(self.conv1(x))))
        x = self.activ(self.norm2(self.conv2(x)))
        if self.conv3 is not None and self.norm3 is not None:
            x = x + self.activ(self.norm3(self.conv3(x)))
        return x


class HlbNet(nn.Module):
    """Whitening-style stem, three ConvGroups, global max pool and a scaled bias-free linear head."""

    def __init__(self, widths: Sequence[int], in_channels: int, num_classes: int, heavy: bool) -> None:
        super().__init__()
        whiten_width = 2 * in_channels * _WHITEN_KERNEL**2
        whiten = HlbConv(in_channels, whiten_width, _WHITEN_KERNEL, padding=0)
        self.stem = nn.Sequential(whiten, HlbBatchNorm(whiten_width), nn.GELU())
        channels = [whiten_width, *widths]
        pairs = zip(channels[:-1], channels[1:], strict=True)
        self.groups = nn.Sequential(*(ConvGroup(c_in, c_out, heavy) for c_in, c_out in pairs))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.linear = nn.Linear(widths[-1], num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.pool(self.groups(self.stem(x)))
        return self.linear(torch.flatten(features, 1)) * _LOGIT_SCALE


@CLASSIFIERS.register("hlb_small", ClassifierConfig)
def build_hlb_small(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """HLB small: ConvGroup widths 64, 256, 256.

    Input: (N, C, H, W) float with C == ``in_channels`` and H, W >= 8 (``image_size`` is not needed:
    pooling is global). Output: (N, num_classes) logits.
    """
    del image_size
    return HlbNet((64, 256, 256), in_channels, num_classes, heavy=False)


@CLASSIFIERS.register("hlb_medium", ClassifierConfig)
def build_hlb_medium(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """HLB medium: ConvGroup widths 128, 384, 384.

    Input: (N, C, H, W) float with C == ``in_channels`` and H, W >= 8 (``image_size`` is not needed:
    pooling is global). Output: (N, num_classes) logits.
    """
    del image_size
    return HlbNet((128, 384, 384), in_channels, num_classes, heavy=False)


@CLASSIFIERS.register("hlb_large", ClassifierConfig)
def build_hlb_large(*, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """HLB large: heavy ConvGroups (third conv + residual) with widths 128, 384, 512.

    Input: (N, C, H, W) float with C == ``in_channels`` and H, W >= 8 (``image_size`` is not needed:
    pooling is global). Output: (N, num_classes) logits.
    """
    del image_size
    return HlbNet((128, 384, 512), in_channels, num_classes, heavy=True)
