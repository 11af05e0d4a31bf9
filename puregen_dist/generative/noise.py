"""Per-sample random streams: noise is a function of (seed, sample id, stream), never of batch position.

This is what makes purification independent of how the data is split into batches, blocks or actors
(DESIGN §3): each image owns a CPU ``torch.Generator`` seeded from (seed, id, stream).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

STREAM_LANGEVIN = 1
STREAM_DIFFUSION = 2


def sample_seed(seed: int, sample_id: int, stream: int) -> int:
    """A 63-bit seed derived from (seed, sample id, stream) with NumPy's SeedSequence (well mixed)."""
    words = np.random.SeedSequence([int(seed), int(sample_id) & 0xFFFFFFFFFFFF, int(stream)]).generate_state(2)
    return int((int(words[0]) << 31) ^ int(words[1])) & 0x7FFFFFFFFFFFFFFF


class SampleNoise:
    """Independent Gaussian streams, one per sample.

    Args:
        ids: (B,) int sample ids.
        seed: experiment-level seed.
        stream: separates uses (Langevin vs diffusion) so they never share numbers.
    """

    def __init__(self, ids: Tensor | np.ndarray, seed: int, stream: int) -> None:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        self.generators = [torch.Generator().manual_seed(sample_seed(seed, i, stream)) for i in ids]

    def randn(self, shape: tuple[int, ...], device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> Tensor:
        """(B, *shape) standard normal, row b drawn from sample b's stream (drawn on CPU, then moved)."""
        rows = [torch.randn(shape, generator=g, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(device, non_blocking=True)
