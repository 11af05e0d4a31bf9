"""Spectral Signatures, a training-set filter.

Paper: "Spectral Signatures in Backdoor Attacks" (Tran, Li, Madry; NeurIPS 2018),
https://arxiv.org/abs/1811.00636; code: MadryLab/backdoor_data_poisoning.

A detector is trained on the poisoned set (:mod:`~puregen_dist.defenses.filtering`). For each class c with
penultimate representations R_i (n_c, D): centre them, take the top right singular vector v of the centred
matrix, score every sample by its squared correlation ``tau_i = ((R_i - mean R) . v)^2``, and remove the
``removal_factor * poison_fraction * n_c`` highest-scoring samples of the class (the paper removes 1.5 times the
expected number of poisons, in every class, since the target class is unknown).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from puregen_dist.config.errors import check
from puregen_dist.defenses.filtering import FilterConfig, RowFilter, per_class
from puregen_dist.registry import DEFENSES


@dataclass(frozen=True, kw_only=True)
class SpectralSignaturesConfig(FilterConfig):
    """Spectral Signatures parameters."""

    name: str = "spectral_signatures"
    poison_fraction: float = 0.1
    """epsilon: the expected share of a class's training images that are poisoned (BackdoorBench's 0.1; ART's
    default is 0.33)."""
    removal_factor: float = 1.5
    """Remove this many times the expected poisons of each class (the paper's 1.5)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0.0 < self.poison_fraction < 1.0, "poison_fraction", "must lie in (0, 1)")
        check(math.isfinite(self.removal_factor) and self.removal_factor > 0, "removal_factor",
              "must be a finite number > 0")


def spectral_scores(features: Tensor) -> Tensor:
    """(n, D) representations of one class -> (n,) outlier scores ``((R_i - mean) . v)^2`` with v the top right
    singular vector of the centred representations."""
    centred = features.double() - features.double().mean(0, keepdim=True)
    if len(features) < 2:
        return torch.zeros(len(features), dtype=torch.float64)
    top = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    return (centred @ top).pow(2)


class SpectralSignatures(RowFilter):
    """DataDefense (filter): Spectral Signatures."""

    def flag(self, features: Tensor, labels: np.ndarray, *, seed: int) -> np.ndarray:
        flags = np.zeros(len(labels), dtype=bool)
        share = min(self.cfg.removal_factor * self.cfg.poison_fraction, 1.0)
        for members in per_class(labels):
            remove = int(round(share * len(members)))
            if remove:
                scores = spectral_scores(features[members])
                flags[members[torch.topk(scores, remove).indices.numpy()]] = True
        return flags


@DEFENSES.register("spectral_signatures", SpectralSignaturesConfig)
def build_spectral_signatures(cfg: SpectralSignaturesConfig) -> SpectralSignatures:
    return SpectralSignatures(cfg)
