"""Applying a trigger to images: one function serves poison crafting and test-time evaluation."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from puregen_dist.types import TargetSpec


def apply_trigger(x_unit: Tensor, target: TargetSpec, magnification: float = 1.0) -> Tensor:
    """Stamp ``target``'s trigger on a batch.

    Masked triggers (``trigger_mask`` set) mix the pattern in: ``x * (1 - mask_eff) + mask_eff * pattern``
    with ``mask_eff = clamp(m * mask, 0, 1)``. A patch (mask 1 on the square, 0 elsewhere) overwrites its
    pixels and is unchanged by any m >= 1; Chen et al.'s alpha-blend (a constant mask alpha) is
    ``(1 - alpha) * x + alpha * pattern`` at m = 1 and blends with ``min(alpha * m, 1)`` at magnification m.
    Additive triggers give ``clip(x + m * delta, 0, 1)``.

    Args:
        x_unit: (N, C, H, W) float in [0, 1].
        target: a triggered TargetSpec; ``trigger`` is (H, W, C) float32 in [0, 1] units, ``trigger_mask``
            (H, W, 1) float32 in [0, 1] or None.
        magnification: m >= 0, the trigger scale at test time (1 for training poisons).

    Returns:
        (N, C, H, W) float in [0, 1].
    """
    if target.trigger is None:
        raise ValueError("apply_trigger needs a triggered TargetSpec (trigger is None)")
    pattern = _chw(target.trigger, x_unit)
    if target.trigger_mask is not None:
        mask = (magnification * _chw(target.trigger_mask, x_unit)).clamp(0.0, 1.0)
        return x_unit * (1.0 - mask) + mask * pattern
    return (x_unit + magnification * pattern).clamp(0.0, 1.0)


def _chw(array: np.ndarray, like: Tensor) -> Tensor:
    """(H, W, C) numpy -> (1, C, H, W) tensor on ``like``'s device and dtype."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).unsqueeze(0).to(like)
