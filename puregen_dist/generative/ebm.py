"""Energy networks G_θ: images in [-1, 1] -> one scalar energy each (PUREGEN_REFERENCE §1.1).

Paper: "PureGen: Universal Data Purification for Train-Time Poison Defense via Generative Model Dynamics"
(Bhat et al., NeurIPS 2024), https://arxiv.org/abs/2405.18627. ``sngan32`` is the SNGAN-32 *discriminator*
residual network (Miyato et al., "Spectral Normalization for Generative Adversarial Networks",
https://arxiv.org/abs/1802.05957) used as an energy, as in PureGen's released models: no spectral norm, no
normalisation layers, mean-pooled features, bias-free linear head. ``convnet`` is the Nijkamp/Hill ConvNet
("On the Anatomy of MCMC-Based Maximum Likelihood Learning of Energy-Based Models", https://arxiv.org/abs/1903.12370).

Neither network has batch-dependent layers, so the gradient of the batch-summed energy is exactly per sample.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from puregen_dist.config.generative import EBMConfig


class OptimizedDBlock(nn.Module):
    """First SNGAN D-block: conv3x3 -> ReLU -> conv3x3 -> avgpool2, shortcut avgpool2 -> conv1x1. Halves H, W."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.c2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.c_sc = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.avg_pool2d(self.c2(F.relu(self.c1(x))), 2)
        return h + self.c_sc(F.avg_pool2d(x, 2))


class DBlock(nn.Module):
    """SNGAN D-block: ReLU -> conv3x3 -> ReLU -> conv3x3 [-> avgpool2]; learned 1x1 shortcut when
    downsampling or changing width, identity otherwise."""

    def __init__(self, c_in: int, c_out: int, downsample: bool) -> None:
        super().__init__()
        self.downsample = downsample
        self.c1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.c2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.c_sc = nn.Conv2d(c_in, c_out, 1) if downsample or c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.c2(F.relu(self.c1(F.relu(x))))
        shortcut = x if self.c_sc is None else self.c_sc(x)
        if self.downsample:
            h, shortcut = F.avg_pool2d(h, 2), F.avg_pool2d(shortcut, 2)
        return h + shortcut


class SNGAN32Energy(nn.Module):
    """SNGAN-32 discriminator as an energy (§1.1.3): (N, C, H, W) in [-1, 1] -> (N,) energies.

    Layers: OptimizedDBlock(C→nf, /2) → DBlock(nf, /2) → DBlock(nf) → DBlock(nf) → ReLU → mean over H, W →
    Linear(nf→1, no bias). 1,053,824 parameters at nf = 128, C = 3. H and W must be divisible by 4.
    """

    def __init__(self, in_channels: int = 3, nf: int = 128) -> None:
        super().__init__()
        self.blocks = nn.Sequential(OptimizedDBlock(in_channels, nf), DBlock(nf, nf, True),
                                    DBlock(nf, nf, False), DBlock(nf, nf, False))
        self.linear = nn.Linear(nf, 1, bias=False)
        _xavier_init(self)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.blocks(x))
        return self.linear(h.mean(dim=(2, 3))).squeeze(1)


class ConvNetEnergy(nn.Module):
    """Nijkamp/Hill ConvNet (§1.1.6): conv3x3(C→nf) → conv4x4/2 (→2nf) → conv4x4/2 (→4nf) → conv4x4/2 (→8nf) →
    conv (→1), LeakyReLU(0.05) between. The last conv covers the remaining map (4x4 at 32 px); any leftover
    spatial positions are averaged. (N, C, H, W) in [-1, 1] -> (N,) energies."""

    def __init__(self, in_channels: int = 3, nf: int = 32, image_size: int = 32) -> None:
        super().__init__()
        final = max(1, min(4, image_size // 8))
        self.convs = nn.ModuleList([
            nn.Conv2d(in_channels, nf, 3, 1, 1), nn.Conv2d(nf, 2 * nf, 4, 2, 1),
            nn.Conv2d(2 * nf, 4 * nf, 4, 2, 1), nn.Conv2d(4 * nf, 8 * nf, 4, 2, 1),
        ])
        self.head = nn.Conv2d(8 * nf, 1, final, 1, 0)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = F.leaky_relu(conv(x), 0.05)
        return self.head(x).mean(dim=(1, 2, 3))


def _xavier_init(model: nn.Module) -> None:
    """§1.1.4: xavier-uniform weights and zero biases for every conv; xavier-uniform final linear."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def build_ebm(cfg: EBMConfig) -> nn.Module:
    """The energy network configured by ``cfg`` (freshly initialised)."""
    if cfg.arch == "sngan32":
        return SNGAN32Energy(cfg.in_channels, cfg.nf)
    return ConvNetEnergy(cfg.in_channels, cfg.nf, cfg.image_size)
