"""Attack surrogates (issue 10): the classifier an attacker crafts on, trained on public out-of-distribution
images (POOD) plus the victim's target-class images, each target class an extra output after the POOD classes
(Narcissus, Zeng et al. CCS'23, https://arxiv.org/abs/2204.05255; PEERS_AND_ATTACKS §5.3).

Pure PyTorch: assembling the surrogate's training set, and loading a trained surrogate with the facts an attack
needs (which output is which target class, the input normalisation). Training is
:func:`puregen_dist.classifiers.training.train_classifier`, run by the ``surrogate`` model kind (``jobs.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from puregen_dist.classifiers import build_classifier
from puregen_dist.classifiers.training import Normalized
from puregen_dist.config.errors import UserInputError
from puregen_dist.generative.checkpoints import CheckpointError, read_state
from puregen_dist.types import ImageSet

TARGET_PREFIX = "target:"
"""Class-name prefix of the surrogate outputs that stand for the victim's target classes."""


def surrogate_training_set(victim: ImageSet, pood: ImageSet, target_classes: Sequence[int],
                           pood_drop_classes: Sequence[int] = ()) -> ImageSet:
    """POOD images (minus ``pood_drop_classes``, relabelled 0..P-1) followed by the victim's images of
    ``target_classes`` (relabelled P + i for the i-th listed class); fresh ids 0..N-1.

    Raises UserInputError naming the key when a target class is not a victim class, a dropped class is not a
    POOD class, or the two sets' image shapes differ."""
    for c in target_classes:
        if not 0 <= c < victim.num_classes:
            raise UserInputError(f"target_classes: {c} is not a class of the victim data "
                                 f"(expected 0..{victim.num_classes - 1})")
    for c in pood_drop_classes:
        if not 0 <= c < pood.num_classes:
            raise UserInputError(f"pood_drop_classes: {c} is not a POOD class (expected 0..{pood.num_classes - 1})")
    if pood.shape != victim.shape:
        raise UserInputError(f"pood: images are {pood.shape} (H, W, C), the victim's are {victim.shape}: set "
                             f"pood.image_size (and use a dataset with the same channel count)")
    kept = [c for c in range(pood.num_classes) if c not in set(pood_drop_classes)]
    if not kept:
        raise UserInputError("pood_drop_classes: drops every POOD class")
    relabel = np.full(pood.num_classes, -1, np.int64)
    relabel[kept] = np.arange(len(kept))
    pood_rows = np.flatnonzero(relabel[pood.labels] >= 0)
    parts_images, parts_labels = [pood.images[pood_rows]], [relabel[pood.labels[pood_rows]]]
    for i, c in enumerate(target_classes):
        rows = np.flatnonzero(victim.labels == c)
        parts_images.append(victim.images[rows])
        parts_labels.append(np.full(len(rows), len(kept) + i, np.int64))
    images, labels = np.concatenate(parts_images), np.concatenate(parts_labels)
    classes = tuple(pood.classes[c] for c in kept) + tuple(f"{TARGET_PREFIX}{victim.classes[c]}"
                                                             for c in target_classes)
    return ImageSet(images, labels, np.arange(len(images), dtype=np.int64), classes)


@dataclass(frozen=True)
class Surrogate:
    """A trained surrogate: ``model`` maps (N, C, H, W) images in [0, 1] to (N, P + T) logits (eval mode)."""

    model: Normalized
    pood_classes: int
    target_classes: tuple[int, ...]
    image_shape: tuple[int, int, int]
    """(H, W, C) of the images it was trained on."""

    def output_of(self, target_class: int) -> int:
        """The logit index that stands for victim class ``target_class``."""
        if target_class not in self.target_classes:
            raise UserInputError(f"attack.target_class: {target_class} is not among the surrogate's target "
                                 f"classes {list(self.target_classes)} (retrain it with that class listed in "
                                 "target_classes)")
        return self.pood_classes + self.target_classes.index(target_class)


def surrogate_meta(pood_classes: int, target_classes: Sequence[int], mean: Sequence[float],
                   std: Sequence[float]) -> dict[str, object]:
    """What a surrogate checkpoint records beside its weights (read back by :func:`load_surrogate`)."""
    return {"pood_classes": int(pood_classes), "target_classes": [int(c) for c in target_classes],
            "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def load_surrogate(directory: str | Path, device: torch.device | str = "cpu") -> Surrogate:
    """Load a surrogate checkpoint (``train-surrogate``'s output: a classifier checkpoint whose meta holds
    :func:`surrogate_meta`). Raises CheckpointError naming the file when it is not one."""
    model, shape, meta = _load_normalized(
        directory, device, ("pood_classes", "target_classes", "mean", "std"),
        "a classifier checkpoint, but not a surrogate (its meta lacks pood_classes / target_classes / mean / std: "
        "train it with `puregen-dist train-surrogate`)")
    return Surrogate(model, int(meta["pood_classes"]), tuple(int(c) for c in meta["target_classes"]), shape)


def load_classifier(directory: str | Path, device: torch.device | str = "cpu") -> tuple[Normalized, tuple[int, int, int]]:
    """A clean classifier checkpoint (``train-classifier``, or a sweep's ``kind: classifier`` model) as an eval-mode
    model on [0, 1] images with the normalisation it was trained with, and the (H, W, C) of those images: the
    surrogate of Gradient Matching. Raises CheckpointError naming the file when it cannot be used."""
    model, shape, _ = _load_normalized(
        directory, device, ("mean", "std"),
        "the checkpoint does not record its input normalisation (mean, std); retrain it with this version of "
        "`puregen-dist train-classifier`")
    return model, shape


def _load_normalized(directory: str | Path, device: torch.device | str, required: tuple[str, ...], missing: str
                     ) -> tuple[Normalized, tuple[int, int, int], dict]:
    """(eval-mode model on [0, 1] images, (H, W, C) it was trained on, checkpoint meta) of a classifier checkpoint
    whose meta holds ``required`` keys (else CheckpointError ``missing``, naming the file)."""
    config, state, _ = read_state(directory, kind="classifier")
    meta, arch = config.get("meta", {}), config.get("model", {})
    source = Path(directory) / "config.json"
    if not set(required) <= set(meta):
        raise CheckpointError(f"{source}: {missing}")
    try:
        net = build_classifier(arch["name"], in_channels=arch["in_channels"], num_classes=arch["num_classes"],
                               image_size=arch["image_size"])
        net.load_state_dict(state)
    except (KeyError, RuntimeError, UserInputError) as exc:
        raise CheckpointError(f"{source}: the classifier's architecture and weights do not load "
                              f"({type(exc).__name__}: {exc})") from None
    shape = (int(arch["image_size"]), int(arch["image_size"]), int(arch["in_channels"]))
    return Normalized(net, meta["mean"], meta["std"]).to(device).eval(), shape, meta


__all__ = ["TARGET_PREFIX", "Surrogate", "load_classifier", "load_surrogate", "surrogate_meta",
           "surrogate_training_set"]
