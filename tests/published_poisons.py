"""Writers of published poison layouts (Narcissus trigger, poisoning-benchmark trial, NTGA release) for an
ImageSet: what the import tests (and the attack contract suite) feed the ``trigger_file``, ``toxic`` and
``ntga`` attacks."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from puregen_dist.types import ImageSet

EPS = 8 / 255


def unit_trigger(shape: tuple[int, int, int], bound: float = EPS, seed: int = 0) -> np.ndarray:
    """(H, W, C) float32 in [-bound, bound] pixel units."""
    return np.random.default_rng(seed).uniform(-bound, bound, shape).astype(np.float32)


def write_trigger(path: Path, delta: np.ndarray, layout: str, convention: str) -> Path:
    """``delta`` ((H, W, C) pixel units) saved as a published trigger of ``layout`` and ``convention``."""
    stored = delta * 2 if convention == "symmetric" else delta
    chw = stored.transpose(2, 0, 1)
    array = {"1chw": chw[None], "chw": chw, "hwc": stored, "hw": stored[..., 0]}[layout]
    np.save(path, array.astype(np.float32))
    return path


def write_toxic(root: Path, data: ImageSet, base_ids: np.ndarray, *, shift: int = 8, as_pil: bool = True,
                labels: np.ndarray | None = None, index: str = "id", seed: int = 0) -> np.ndarray:
    """A poisoning-benchmark trial of ``data``'s rows ``base_ids``: poisons within ``shift``/255 of their base
    images, as PIL images (or float arrays in [0, 1]), base indices as ids or positions, a target pair.
    Returns the poisons (P, H, W, C) uint8."""
    root.mkdir(parents=True, exist_ok=True)
    pos = data.positions(base_ids)
    rng = np.random.default_rng(seed)
    noise = rng.integers(-shift, shift + 1, (len(pos), *data.shape))
    poisons = np.clip(data.images[pos].astype(int) + noise, 0, 255).astype(np.uint8)
    labels = data.labels[pos] if labels is None else labels
    mode = "RGB" if data.shape[2] == 3 else "L"
    entries = [Image.fromarray(p if mode == "RGB" else p[..., 0], mode) if as_pil else p.astype(np.float32) / 255
               for p in poisons]
    with open(root / "poisons.pickle", "wb") as f:
        pickle.dump([(img, int(lab)) for img, lab in zip(entries, labels, strict=True)], f)
    with open(root / "base_indices.pickle", "wb") as f:
        pickle.dump(list(base_ids if index == "id" else pos), f)
    target = rng.integers(0, 256, data.shape, dtype=np.uint8)
    with open(root / "target.pickle", "wb") as f:
        pickle.dump((Image.fromarray(target if mode == "RGB" else target[..., 0], mode), 3), f)
    return poisons


def write_ntga(root: Path, data: ImageSet, *, shift: int = 8, labels: np.ndarray | None = None) -> np.ndarray:
    """The NTGA release layout: x_train (N, H, W, C) float32 in [0, 1], one-hot y_train. Returns the uint8 rows."""
    root.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).integers(-shift, shift + 1, data.images.shape)
    poisoned = np.clip(data.images.astype(int) + noise, 0, 255).astype(np.uint8)
    np.save(root / "x_train.npy", poisoned.astype(np.float32) / 255)
    labels = data.labels if labels is None else labels
    np.save(root / "y_train.npy", np.eye(data.num_classes, dtype=np.float32)[labels])
    return poisoned
