"""Shared fixtures: tiny seeded data, and paths to the repository and the shared datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from puregen_dist.types import ImageSet

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"


def make_imageset(n: int = 64, size: int = 8, channels: int = 3, classes: int = 4, seed: int = 0) -> ImageSet:
    """Random uint8 images, labels cycling over ``classes``, ids 100..100+n-1 (not positions, on purpose)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    labels = (np.arange(n) % classes).astype(np.int64)
    ids = np.arange(100, 100 + n, dtype=np.int64)
    return ImageSet(images, labels, ids, tuple(f"c{i}" for i in range(classes)))


@pytest.fixture
def tiny_imageset() -> ImageSet:
    return make_imageset()


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """Tests may change the default dtype, thread count or global seed; put them back."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    state = torch.random.get_rng_state()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    torch.random.set_rng_state(state)
