"""Pure tensor conversions between data at rest (uint8 NHWC) and model inputs (float NCHW).

This module is the one place where images change representation:
``unit`` = float in [0, 1], ``sym`` = float in [-1, 1] (the generative models' space, x_sym = (x_unit - 0.5) / 0.5).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def to_unit(images: np.ndarray) -> Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) float32 in [0, 1]. A read-only array (Ray's zero-copy objects) is
    copied first: torch.from_numpy wants a writable buffer even though the float conversion copies anyway."""
    return uint8_to_unit(as_tensor(images))


def as_tensor(images: np.ndarray) -> Tensor:
    """An array as a tensor sharing its memory (a read-only or non-contiguous array is copied first)."""
    return torch.from_numpy(np.require(images, requirements=["C", "W"]))


def uint8_to_unit(images: Tensor) -> Tensor:
    """(N, H, W, C) uint8 tensor on any device -> (N, C, H, W) float32 in [0, 1] on the same device."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def to_sym(images: np.ndarray) -> Tensor:
    """(N, H, W, C) uint8 -> (N, C, H, W) float32 in [-1, 1]."""
    return to_unit(images).mul_(2.0).sub_(1.0)


def unit_to_uint8(x_unit: Tensor) -> np.ndarray:
    """(N, C, H, W) float in [0, 1] -> (N, H, W, C) uint8, clamped and rounded to nearest (not truncated)."""
    x = x_unit.detach().float().clamp(0.0, 1.0).mul(255.0).round_()
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def sym_to_uint8(x_sym: Tensor) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1] -> (N, H, W, C) uint8, clamped and rounded."""
    return unit_to_uint8((x_sym.detach().float() + 1.0) * 0.5)


def normalize(x_unit: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Per-channel (x - mean) / std for (N, C, H, W); a single value broadcasts over channels."""
    m, s = channel_stats(mean, std, x_unit.shape[1], x_unit.dtype, x_unit.device)
    return (x_unit - m) / s


def channel_stats(mean: tuple[float, ...], std: tuple[float, ...], channels: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """(mean, std) as (1, C, 1, 1) tensors of ``dtype`` on ``device``, for :func:`normalize`: a tuple whose
    length is not ``channels`` gives its first value to every channel. On CUDA this is a blocking copy from
    the host: callers that normalise batch after batch keep the result."""
    c = channels
    m = torch.tensor(mean if len(mean) == c else mean[:1] * c, dtype=dtype, device=device)
    s = torch.tensor(std if len(std) == c else std[:1] * c, dtype=dtype, device=device)
    return m.view(1, c, 1, 1), s.view(1, c, 1, 1)


def random_crop_flip(
    x: Tensor, padding: int, flip: bool, generator: torch.Generator
) -> Tensor:
    """Standard CIFAR augmentation on a batch: zero-pad by ``padding``, random crop back, random h-flip.

    Args:
        x: (N, C, H, W) float on any device; the result is on the same device.
        padding: pixels of zero padding on each side (0 disables cropping).
        flip: whether to flip each image horizontally with probability 1/2.
        generator: CPU generator that drives the choices (keeps training seeded, and the same on every
            device); the draws are copied to ``x``'s device without waiting for it (a host-to-device copy of
            pageable memory is staged before the call returns, so non_blocking is safe here).
    """
    n, _, h, w = x.shape
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(x.device, non_blocking=True)
        cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(x.device, non_blocking=True)
        idx_n = torch.arange(n, device=x.device).view(n, 1, 1)
        x = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device, non_blocking=True)
        x = torch.where(mask.view(n, 1, 1, 1), x.flip(3), x)
    return x.contiguous()


def trigger_image(trigger: np.ndarray) -> np.ndarray:
    """(H, W, C) additive trigger in pixel units -> uint8 image, 0 mapped to mid-grey and the largest |value| to
    black/white (a faint trigger would otherwise be invisible)."""
    scale = float(np.abs(trigger).max()) or 1.0
    return np.clip(np.round((trigger / scale + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, columns: int = 8, pad: int = 1) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, columns*(W+pad)+pad, C) uint8 mosaic, white padding."""
    n, h, w, c = images.shape
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, k = divmod(i, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = image
    return grid
