"""SNGAN-32 energy with its average pools folded into convolutions: the same function G, about 40 % fewer
FLOPs (an execution detail of :mod:`puregen_dist.generative.langevin_fast`; the network itself is
PUREGEN_REFERENCE §1.1, :class:`puregen_dist.generative.ebm.SNGAN32Energy`)."""

from __future__ import annotations

import copy
import logging
import weakref

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from puregen_dist.generative.ebm import DBlock, OptimizedDBlock, SNGAN32Energy

log = logging.getLogger(__name__)

_FOLD_VERDICTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[tuple[int, int], ...], bool]] = (
    weakref.WeakKeyDictionary())


def folds_exactly(energy: nn.Module) -> bool:
    """Whether ``FoldedSNGAN32(energy)`` computes ``energy``'s function: the module is laid out as §1.1.3
    and both agree in float64, on CPU, on a fixed probe (two 8x8 inputs) to 1e-9 relative. A mismatch (say, a
    changed ``SNGAN32Energy.forward``) is logged once. Cached per module until its parameters change."""
    if not FoldedSNGAN32.supports(energy):
        return False
    key = tuple((p.data_ptr(), p._version) for p in energy.parameters())
    cached = _FOLD_VERDICTS.get(energy)
    if cached is None or cached[0] != key:
        verdict = _fold_matches_in_float64(energy)
        if not verdict:
            log.warning("folded SNGAN-32 energy disagrees with the module; using the unfolded network")
        _FOLD_VERDICTS[energy] = cached = (key, verdict)
    return cached[1]


def _fold_matches_in_float64(energy: nn.Module) -> bool:
    """The float64 comparison of ``folds_exactly`` (NaN parameters: NaN matches NaN)."""
    plain = copy.deepcopy(energy).to("cpu", torch.float64).eval()
    generator = torch.Generator().manual_seed(0)
    probe = torch.rand((2, plain.blocks[0].c1.in_channels, 8, 8), generator=generator, dtype=torch.float64)
    with torch.no_grad():
        want, got = plain(2 * probe - 1), FoldedSNGAN32(plain)(2 * probe - 1)
    if want.shape != got.shape:
        return False
    scale = float(torch.nan_to_num(want.abs(), nan=0.0, posinf=0.0).max())
    return torch.allclose(got, want, rtol=1e-9, atol=1e-9 * max(scale, 1e-12), equal_nan=True)


def _fold_pool_into_conv(weight: Tensor) -> Tensor:
    """conv k×k (stride 1, padding p) followed by avgpool 2 == conv (k+1)×(k+1), stride 2, padding p.

    (O, I, k, k) -> (O, I, k+1, k+1): the kernel convolved with the 2×2 box filter / 4, summed in float64.
    """
    w = weight.detach().double()
    k = w.shape[-1]
    out = w.new_zeros(*w.shape[:2], k + 1, k + 1)
    for di in (0, 1):
        for dj in (0, 1):
            out[..., di:di + k, dj:dj + k] += w
    return (0.25 * out).to(weight.dtype)


class FoldedSNGAN32(nn.Module):
    """``SNGAN32Energy`` evaluated with fewer FLOPs; the same function of the same (frozen) parameters.

    Linear maps commute with average pooling, so in the two downsampling blocks ``avgpool2(conv3x3(h))``
    becomes one conv4x4/stride 2 (``_fold_pool_into_conv``; 16/9·¼ of the MACs) and the shortcut
    ``avgpool2(conv1x1(x))`` becomes ``conv1x1(avgpool2(x))`` (¼ of the MACs). The input gradient is then the
    same gradient as the module's, up to float rounding. (N, C, H, W) in [-1, 1] -> (N,), H and W even.
    """

    def __init__(self, energy: nn.Module) -> None:
        super().__init__()
        first, second, *rest = energy.blocks
        self.down = nn.ModuleList([_FoldedDown(first, pre_relu=False), _FoldedDown(second, pre_relu=True)])
        self.rest = nn.ModuleList(_Residual(block) for block in rest)
        self.head = copy.deepcopy(energy.linear)
        self.eval().requires_grad_(False)

    @staticmethod
    def supports(energy: nn.Module) -> bool:
        """Whether ``energy`` is an ``SNGAN32Energy`` laid out as §1.1.3 (two downsampling blocks first)."""
        if type(energy) is not SNGAN32Energy or len(energy.blocks) < 2:
            return False
        first, second, *rest = energy.blocks
        return (type(first) is OptimizedDBlock and type(second) is DBlock and second.downsample
                and second.c_sc is not None and all(type(b) is DBlock and not b.downsample for b in rest))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.down:
            x = block(x)
        for block in self.rest:
            x = block(x)
        return self.head(F.relu(x, inplace=True).mean(dim=(2, 3))).squeeze(1)


# ReLUs here run in place where their input is a fresh conv or sum output that nothing else reads (a conv
# saves its input for backward, not its output): one activation-sized allocation and pass fewer each.


class _Residual(nn.Module):
    """A non-downsampling D-block: conv3x3(ReLU(conv3x3(ReLU x))) + shortcut (identity or conv1x1)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.c1, self.c2, self.c_sc = (copy.deepcopy(m) for m in (block.c1, block.c2, block.c_sc))

    def forward(self, x: Tensor) -> Tensor:
        h = self.c2(F.relu(self.c1(F.relu(x)), inplace=True))
        return h + (x if self.c_sc is None else self.c_sc(x))


class _FoldedDown(nn.Module):
    """A downsampling D-block, pools folded: conv4x4/2(ReLU(conv3x3([ReLU] x))) + conv1x1(avgpool2(x))."""

    def __init__(self, block: nn.Module, *, pre_relu: bool) -> None:
        super().__init__()
        self.pre_relu = pre_relu
        self.c1 = copy.deepcopy(block.c1)
        conv = block.c2
        self.c2 = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size[0] + 1, stride=2,
                            padding=conv.padding, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            self.c2.weight.copy_(_fold_pool_into_conv(conv.weight))
            self.c2.bias.copy_(conv.bias)
        self.c_sc = copy.deepcopy(block.c_sc)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c2(F.relu(self.c1(F.relu(x) if self.pre_relu else x), inplace=True))
        return h + self.c_sc(F.avg_pool2d(x, 2))
