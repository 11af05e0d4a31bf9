"""JPEG compression as a train-time data defense (PureGen reference §4.1; qualities 25, 50, 75, 85).

Paper: "Keeping the Bad Guys Out: Protecting and Vaccinating Deep Learning with JPEG Compression"
(Das et al., 2017), https://arxiv.org/abs/1705.02900; used as a poisoning baseline in PureGen (Bhat et al., NeurIPS
2024), https://arxiv.org/abs/2405.18627.

Every training image is encoded as a JPEG at quality q with PIL and decoded back to uint8; ids, labels and order
are preserved. Deterministic (no randomness), so ``seed`` is unused.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from PIL import Image

from puregen_dist.config.errors import check
from puregen_dist.config.schema import DefenseConfig
from puregen_dist.registry import DEFENSES
from puregen_dist.types import ImageSet


@dataclass(frozen=True, kw_only=True)
class JPEGConfig(DefenseConfig):
    """JPEG defense parameters."""

    rowwise: ClassVar[bool] = True
    name: str = "jpeg"
    quality: int = 75
    """PIL JPEG quality in [1, 95] (the paper's tables use 25, 50, 75, 85)."""

    def __post_init__(self) -> None:
        check(1 <= self.quality <= 95, "quality", "must lie in [1, 95]")


def jpeg_roundtrip(images: np.ndarray, quality: int) -> np.ndarray:
    """(N, H, W, C) uint8 with C in {1, 3} -> the same shape after JPEG encode/decode at ``quality``."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        pil = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        decoded = np.asarray(Image.open(buffer))
        out[i] = decoded.reshape(image.shape)
    return out


class JPEGDefense:
    """DataDefense: JPEG round trip of every training image."""

    def __init__(self, cfg: JPEGConfig) -> None:
        self.cfg = cfg

    def validate(self, train: ImageSet) -> None:
        """Works on any image set."""

    def apply(self, train: ImageSet, *, seed: int) -> ImageSet:
        return train.replace(images=jpeg_roundtrip(train.images, self.cfg.quality))


@DEFENSES.register("jpeg", JPEGConfig)
def build_jpeg(cfg: JPEGConfig) -> JPEGDefense:
    return JPEGDefense(cfg)
