"""Import of published poisons: the files the community already shares, checked and turned into a PoisonSet.

Three layouts (docs/attacks.md, "Importing published poisons"):

- ``trigger_file``: a learned additive trigger saved as ``.npy``, as Narcissus releases it
  (``best_noise_lab{c}.npy``; "Narcissus: A Practical Clean-Label Backdoor Attack with Limited Information",
  Zeng et al., CCS'23, https://arxiv.org/abs/2204.05255, README of github.com/reds-lab/Narcissus). It is
  stamped on target-class training rows (clean label); PureGen poisons the last 500 of class c (1%).
- ``toxic``: the poisoning-benchmark directory of "Just How Toxic is Data Poisoning? A Unified Benchmark for
  Backdoor and Data Poisoning Attacks" (Schwarzschild et al., ICML'21, https://arxiv.org/abs/2006.12557),
  the layout in which Witches' Brew (gradient matching) and Bullseye Polytope poisons are redistributed:
  ``poisons.pickle``, ``base_indices.pickle``, ``target.pickle``. Triggerless: one target image per trial.
- ``ntga``: a whole poisoned training set as arrays, as NTGA releases it ("Neural Tangent Generalization
  Attacks", Yuan & Wu, ICML'21, http://proceedings.mlr.press/v139/yuan21b.html): ``x_train`` (N, H, W, C)
  float in [0, 1] and one-hot ``y_train``. An availability attack: every row is poisoned.

Every check (files, shapes, labels, indices, the clean-label bound ``||poison - base||_inf <= eps + 1/255``,
the 1/255 allowing for 8-bit rounding as the benchmark does) runs in ``validate``, before anything is computed
or written. Files are loaded without running code from them (:mod:`puregen_dist.attacks.safe_load`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from puregen_dist.attacks.clean_label import CleanLabelTriggerConfig, check_target_and_budget, stamp_trigger
from puregen_dist.attacks.safe_load import (
    as_uint8_image,
    is_image,
    load_npy,
    load_pickle,
    require_file,
    to_uint8,
)
from puregen_dist.config.errors import UserInputError, check, check_eps
from puregen_dist.config.identity import file_ref
from puregen_dist.config.schema import AttackConfig
from puregen_dist.registry import ATTACKS
from puregen_dist.types import ImageSet, PoisonSet, TargetSpec

Shape = tuple[int, int, int]


def _levels(eps: float) -> str:
    """``eps`` in /255 units for messages: 8/255 -> '8'."""
    return f"{round(eps * 255, 2):g}"


# ------------------------------------------------------------------------------------------ trigger_file


@dataclass(frozen=True, kw_only=True)
class TriggerFileConfig(CleanLabelTriggerConfig):
    """A published additive trigger (e.g. Narcissus' ``best_noise_lab{c}.npy``) stamped on target-class rows;
    ``eps`` is the clean-label budget it must respect: ||delta||_inf <= eps + 1/255."""

    name: str = "trigger_file"
    path: str = file_ref()
    """The trigger, a float ``.npy`` of shape (1, C, H, W), (C, H, W) or (H, W, C) (C = 1: also (H, W))."""
    convention: Literal["symmetric", "unit"]
    """symmetric: stored in [-1, 1] image space as Narcissus does, pixel units = value / 2; unit: already in
    [0, 1] pixel units."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(bool(self.path), "path", "required: the trigger .npy file")


class TriggerFileAttack:
    """Poisons N target-class rows with ``clip(x + delta)``; see the module docstring."""

    def __init__(self, cfg: TriggerFileConfig) -> None:
        self.cfg = cfg
        self._delta: dict[Shape, np.ndarray] = {}

    def validate(self, train: ImageSet) -> None:
        """The file loads, its shape fits the dataset, ``||delta||_inf <= eps + 1/255``, enough target rows."""
        check_target_and_budget(self.cfg, train)
        self.trigger(train.shape)

    def trigger(self, shape: Shape) -> np.ndarray:
        """The trigger for images of (H, W, C) ``shape``: (H, W, C) float32 in [0, 1] pixel units."""
        if shape not in self._delta:
            self._delta[shape] = self._load(shape)
        return self._delta[shape]

    def _load(self, shape: Shape) -> np.ndarray:
        cfg = self.cfg
        path = require_file(cfg.path, "attack.path")
        raw = load_npy(path, "attack.path")
        if not np.issubdtype(raw.dtype, np.floating):
            raise UserInputError(f"attack.path: {path}: expected a float trigger, got dtype {raw.dtype}")
        delta = _trigger_hwc(np.array(raw, np.float32), shape, path)  # a copy: not the memory map
        if not np.all(np.isfinite(delta)):
            raise UserInputError(f"attack.path: {path}: the trigger has non-finite values")
        if cfg.convention == "symmetric":
            delta = delta / 2.0
        worst = float(np.abs(delta).max()) * 255
        if worst > cfg.eps * 255 + 1 + 1e-4:
            raise UserInputError(f"attack.path: the trigger's largest entry is {worst:.1f}/255 in pixel units "
                                 f"(convention {cfg.convention}) > eps {_levels(cfg.eps)}/255 + 1/255")
        return np.ascontiguousarray(delta, np.float32)

    def craft(self, train: ImageSet, *, seed: int,
              test: ImageSet | None = None) -> PoisonSet:
        """Stamp the trigger on the selected target-class rows (labels unchanged)."""
        self.validate(train)
        start = time.perf_counter()
        poison = stamp_trigger(self.cfg, train, self.trigger(train.shape), seed, {})
        poison.meta["craft_seconds"] = time.perf_counter() - start
        return poison


def _trigger_hwc(raw: np.ndarray, shape: Shape, path: Path) -> np.ndarray:
    """(1, C, H, W), (C, H, W), (H, W, C) or, for C = 1, (H, W) -> (H, W, C)."""
    h, w, c = shape
    if raw.shape == (h, w, c):
        return raw
    if raw.shape in ((1, c, h, w), (c, h, w)):
        return raw.reshape(c, h, w).transpose(1, 2, 0)
    if c == 1 and raw.shape == (h, w):
        return raw[..., None]
    raise UserInputError(f"attack.path: {path}: trigger of shape {raw.shape} does not fit the dataset's "
                         f"(H, W, C) = {shape}; accepted: (1, C, H, W), (C, H, W), (H, W, C)")


# ------------------------------------------------------------------------------------------------ toxic


TOXIC_FILES = ("poisons.pickle", "base_indices.pickle", "target.pickle")
"""The files of a poisoning-benchmark trial directory."""


@dataclass(frozen=True, kw_only=True)
class ToxicConfig(AttackConfig):
    """A poisoning-benchmark trial directory (Witches' Brew, Bullseye Polytope, ... poisons)."""

    name: str = "toxic"
    path: str = file_ref(members=TOXIC_FILES)
    """Directory with ``poisons.pickle``, ``base_indices.pickle`` and ``target.pickle``."""
    eps: float = 8 / 255
    """Clean-label budget in pixel units: every poison within eps + 1/255 of its base image."""
    index: Literal["id", "position"] = "id"
    """What ``base_indices`` are: the dataset's ids, or row positions in the loaded training set. CIFAR-10's
    canonical train indices equal our ids only when the whole training split is loaded in canonical order."""

    def __post_init__(self) -> None:
        check(bool(self.path), "path", "required: the directory holding the three pickles")
        check_eps(self.eps, 8)


@dataclass(frozen=True)
class _Trial:
    """A benchmark trial's files, images as (H, W, C) uint8."""

    poisons: np.ndarray  # (P, H, W, C)
    labels: np.ndarray  # (P,) int64
    base: np.ndarray  # (P,) int64, ids or positions
    target_images: np.ndarray  # (T, H, W, C)
    target_labels: np.ndarray  # (T,) int64


class ToxicAttack:
    """Replaces the base rows by the pickled poisons; triggerless target from ``target.pickle``."""

    def __init__(self, cfg: ToxicConfig) -> None:
        self.cfg = cfg
        self._trials: dict[Shape, _Trial] = {}

    def validate(self, train: ImageSet) -> None:
        """Files load safely, shapes fit, indices exist (no duplicates), labels are clean, eps holds."""
        self._positions(train)

    def craft(self, train: ImageSet, *, seed: int,
              test: ImageSet | None = None) -> PoisonSet:
        """The poisons in file order at their base rows; the seed is unused (the files are the attack)."""
        self.validate(train)
        start = time.perf_counter()
        trial = self._trial(train.shape)
        pos = _base_positions(trial.base, train, self.cfg.index)
        target = TargetSpec("triggerless", adversarial_label=int(trial.labels[0]),
                            target_images=trial.target_images, target_labels=trial.target_labels)
        meta = {"craft_seconds": time.perf_counter() - start, "num_poisons": int(len(pos))}
        return PoisonSet(train, train.ids[pos], trial.poisons.copy(), trial.labels.copy(), target,
                         self.cfg.eps, meta)

    def _trial(self, shape: Shape) -> _Trial:
        if shape not in self._trials:
            self._trials[shape] = self._load(shape)
        return self._trials[shape]

    def _load(self, shape: Shape) -> _Trial:
        root = require_file(self.cfg.path, "attack.path", directory=True)
        for name in TOXIC_FILES:
            if not (root / name).is_file():
                raise UserInputError(f"attack.path: {root / name} not found (the poisoning-benchmark layout has "
                                     f"{', '.join(TOXIC_FILES)})")
        poisons = _pairs(load_pickle(root / "poisons.pickle", "attack.path"), shape, "poisons.pickle")
        if not poisons:
            raise UserInputError(f"attack.path: {root / 'poisons.pickle'} holds no poisons")
        base = _indices(load_pickle(root / "base_indices.pickle", "attack.path"), len(poisons))
        target = load_pickle(root / "target.pickle", "attack.path")
        targets = _pairs([target] if _is_pair(target) else target, shape, "target.pickle")
        if not targets:
            raise UserInputError(f"attack.path: {root / 'target.pickle'} holds no target")
        return _Trial(np.stack([p[0] for p in poisons]), np.array([p[1] for p in poisons], np.int64), base,
                      np.stack([t[0] for t in targets]), np.array([t[1] for t in targets], np.int64))

    def _positions(self, train: ImageSet) -> np.ndarray:
        """Positions of the base rows in ``train``, after every check of the module docstring."""
        trial = self._trial(train.shape)
        pos = _base_positions(trial.base, train, self.cfg.index)
        for name, labels in (("poisons.pickle", trial.labels), ("target.pickle", trial.target_labels)):
            bad = np.flatnonzero((labels < 0) | (labels >= train.num_classes))
            if len(bad):
                raise UserInputError(f"attack.path: {name} row {bad[0]}: label {labels[bad[0]]} is not a class "
                                     f"of the dataset (expected 0..{train.num_classes - 1})")
        _check_clean_labels(trial.labels, train, pos, "poisons.pickle row")
        if len(classes := np.unique(trial.labels)) > 1:
            raise UserInputError(f"attack.path: poisons.pickle: poisons span classes {classes.tolist()}; a "
                                 "triggerless benchmark trial has one poison class")
        _check_bound(trial.poisons, train.images, pos, train.ids, self.cfg.eps, "attack.path")
        return pos


def _is_pair(obj: Any) -> bool:
    return isinstance(obj, (tuple, list)) and len(obj) == 2 and is_image(obj[0])


def _pairs(obj: Any, shape: Shape, name: str) -> list[tuple[np.ndarray, int]]:
    """A list of (image, label) pairs as ((H, W, C) uint8, int)."""
    if not isinstance(obj, (list, tuple)):
        raise UserInputError(f"attack.path: {name}: expected a list of (image, label) pairs, got "
                             f"{type(obj).__name__}")
    out = []
    for i, pair in enumerate(obj):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise UserInputError(f"attack.path: {name} row {i}: expected an (image, label) pair")
        out.append((as_uint8_image(pair[0], shape, f"attack.path: {name} row {i}"),
                    _integer(pair[1], f"attack.path: {name} row {i}: label")))
    return out


def _integer(value: Any, what: str) -> int:
    array = np.asarray(value)
    if array.ndim != 0 or not np.issubdtype(array.dtype, np.integer):
        raise UserInputError(f"{what}: expected an integer, got {value!r}")
    return int(array)


def _indices(obj: Any, count: int) -> np.ndarray:
    """base_indices as (P,) int64, one per poison."""
    array = np.asarray(obj) if isinstance(obj, (list, tuple, np.ndarray)) else None
    if array is None or array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.size == 0):
        raise UserInputError("attack.path: base_indices.pickle: expected a list of integer indices")
    if len(array) != count:
        raise UserInputError(f"attack.path: base_indices.pickle lists {len(array)} indices for {count} poisons")
    return array.astype(np.int64)


def _base_positions(base: np.ndarray, train: ImageSet, index: str) -> np.ndarray:
    """Positions in ``train`` of ``base`` (ids or positions); duplicates and unknown indices are errors."""
    values, counts = np.unique(base, return_counts=True)
    if np.any(counts > 1):
        raise UserInputError(f"attack.path: base_indices.pickle lists index {values[counts > 1][0]} twice")
    if index == "position":
        bad = np.flatnonzero((base < 0) | (base >= len(train)))
        if len(bad):
            raise UserInputError(f"attack.path: base_indices.pickle row {bad[0]}: position {base[bad[0]]} is "
                                 f"outside the training set (0..{len(train) - 1})")
        return base
    bad = np.flatnonzero(~np.isin(base, train.ids))
    if len(bad):
        raise UserInputError(f"attack.path: base_indices.pickle row {bad[0]}: id {base[bad[0]]} is not in the "
                             "training set (attack.index: id; use position for row positions)")
    return train.positions(base)


def _check_clean_labels(labels: np.ndarray, train: ImageSet, pos: np.ndarray, row: str) -> None:
    """Imported poisons are clean-label: each label equals its base row's."""
    bad = np.flatnonzero(labels != train.labels[pos])
    if len(bad):
        i = bad[0]
        raise UserInputError(f"attack.path: {row} {i}: label {labels[i]} differs from its base image's label "
                             f"{train.labels[pos[i]]} (id {train.ids[pos[i]]}); imported poisons must be "
                             "clean-label")


def _check_bound(poisons: np.ndarray, images: np.ndarray, pos: np.ndarray, ids: np.ndarray, eps: float,
                 key: str) -> None:
    """``max |poison - base| <= eps + 1/255`` (in /255 levels) for every poison, else name the worst one."""
    dist = np.empty(len(pos), np.int64)
    for lo in range(0, len(pos), 4096):
        diff = poisons[lo:lo + 4096].astype(np.int16) - images[pos[lo:lo + 4096]].astype(np.int16)
        dist[lo:lo + 4096] = np.abs(diff).reshape(len(diff), -1).max(axis=1)
    worst = int(np.argmax(dist)) if len(dist) else 0
    if len(dist) and dist[worst] > eps * 255 + 1 + 1e-4:
        raise UserInputError(f"{key}: poison {worst} (id {ids[pos[worst]]}) differs from its base image by "
                             f"{dist[worst]}/255 > eps {_levels(eps)}/255 + 1/255")


# ------------------------------------------------------------------------------------------------- ntga


@dataclass(frozen=True, kw_only=True)
class NTGAConfig(AttackConfig):
    """A whole poisoned training set as arrays (the NTGA release); an availability attack."""

    name: str = "ntga"
    images: str = file_ref()
    """``.npy`` of (N, H, W, C) float in [0, 1] (or uint8); row i replaces training row i (position)."""
    labels: str = file_ref()
    """``.npy`` of one-hot (N, K) (or (N,) integer) labels; must equal the training labels (clean label)."""
    eps: float = 8 / 255
    """Clean-label budget in pixel units: every row within eps + 1/255 of the training image it replaces."""

    def __post_init__(self) -> None:
        check(bool(self.images), "images", "required: the poisoned images .npy")
        check(bool(self.labels), "labels", "required: the labels .npy")
        check_eps(self.eps, 8)


class NTGAAttack:
    """Replaces every training row by the released one; see the module docstring."""

    def __init__(self, cfg: NTGAConfig) -> None:
        self.cfg = cfg
        self._images: dict[tuple[int, ...], np.ndarray] = {}

    def validate(self, train: ImageSet) -> None:
        """Lengths and shapes match, labels equal the training labels, eps holds for every row."""
        images = self._load_images(train)
        labels = _ntga_labels(load_npy(require_file(self.cfg.labels, "attack.labels"), "attack.labels"), train)
        bad = np.flatnonzero(labels != train.labels)
        if len(bad):
            i = bad[0]
            raise UserInputError(f"attack.labels: row {i}: label {labels[i]} differs from the training label "
                                 f"{train.labels[i]} (id {train.ids[i]}); imported poisons must be clean-label")
        _check_bound(images, train.images, np.arange(len(train)), train.ids, self.cfg.eps, "attack.images")

    def craft(self, train: ImageSet, *, seed: int,
              test: ImageSet | None = None) -> PoisonSet:
        """Every row poisoned; the seed is unused (the files are the attack)."""
        self.validate(train)
        start = time.perf_counter()
        images = self._load_images(train)
        meta = {"craft_seconds": time.perf_counter() - start, "num_poisons": len(train)}
        return PoisonSet(train, train.ids.copy(), images.copy(), train.labels.copy(), TargetSpec("availability"),
                         self.cfg.eps, meta)

    def _load_images(self, train: ImageSet) -> np.ndarray:
        """(N, H, W, C) uint8 of the images file, checked against ``train``'s length and shape."""
        shape = (len(train), *train.shape)
        if shape not in self._images:
            raw = load_npy(require_file(self.cfg.images, "attack.images"), "attack.images")
            if raw.shape != shape:
                raise UserInputError(f"attack.images: {self.cfg.images}: shape {raw.shape} does not match the "
                                     f"training set's (N, H, W, C) = {shape}")
            out = np.empty(shape, np.uint8)
            for lo in range(0, len(raw), 4096):  # memory-mapped: convert in chunks
                out[lo:lo + 4096] = to_uint8(np.asarray(raw[lo:lo + 4096]), f"attack.images: rows {lo}..")
            self._images[shape] = out
        return self._images[shape]


def _ntga_labels(raw: np.ndarray, train: ImageSet) -> np.ndarray:
    """One-hot (N, K) -> argmax, or (N,) integers, as (N,) int64."""
    n, k = len(train), train.num_classes
    if raw.shape == (n, k):
        return np.asarray(raw).argmax(axis=1).astype(np.int64)
    if raw.shape == (n,) and np.issubdtype(raw.dtype, np.integer):
        return np.asarray(raw, np.int64)
    raise UserInputError(f"attack.labels: shape {raw.shape} does not match the training set: expected one-hot "
                         f"({n}, {k}) or integer ({n},)")


@ATTACKS.register("trigger_file", TriggerFileConfig)
def build_trigger_file(cfg: TriggerFileConfig) -> TriggerFileAttack:
    return TriggerFileAttack(cfg)


@ATTACKS.register("toxic", ToxicConfig)
def build_toxic(cfg: ToxicConfig) -> ToxicAttack:
    return ToxicAttack(cfg)


@ATTACKS.register("ntga", NTGAConfig)
def build_ntga(cfg: NTGAConfig) -> NTGAAttack:
    return NTGAAttack(cfg)
