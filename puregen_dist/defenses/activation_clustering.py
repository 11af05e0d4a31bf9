"""Activation Clustering, a training-set filter.

Paper: "Detecting Backdoor Attacks on Deep Neural Networks by Activation Clustering" (Chen, Carvalho,
Baracaldo, Ludwig, Edwards, Lee, Molloy, Srivastava; AAAI SafeAI 2019), https://arxiv.org/abs/1811.03728;
reference implementation: ART's ``ActivationDefence``.

A detector is trained on the poisoned set (:mod:`~puregen_dist.defenses.filtering`). For each class, its
penultimate activations are reduced to ``nb_dims`` dimensions and split by k-means into ``nb_clusters`` clusters;
a cluster holding less than ``size_threshold`` of the class (``relative_size``, the paper's criterion), or the
smallest cluster (``smaller``, ART's default), is taken to be poison and removed.

``reduce: pca`` (the default, ART's ``ActivationDefence`` default) projects on the top principal components.
``reduce: ica`` is the paper's ICA. Its components are the whitened principal components rotated by an
orthogonal unmixing matrix; Euclidean distances, and so k-means (k-means++ seeding included), do not change under
that rotation, so the clusters are those of the whitened principal components, which is what is computed. On a
digits BadNets poison (5%, dirty label) PCA split the target class into exactly its poisons and its clean images;
the whitened components did not (23 of 67 poisons flagged), so PCA is the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from puregen_dist.config.errors import check
from puregen_dist.defenses.filtering import FilterConfig, RowFilter, per_class
from puregen_dist.registry import DEFENSES


@dataclass(frozen=True, kw_only=True)
class ActivationClusteringConfig(FilterConfig):
    """Activation Clustering parameters (defaults: the paper's and ART's)."""

    name: str = "activation_clustering"
    nb_dims: int = 10
    """Dimensions the activations are reduced to."""
    nb_clusters: int = 2
    reduce: Literal["pca", "ica"] = "pca"
    """pca: the top principal components (ART's default); ica: the paper's ICA (see the module docstring; on
    digits it splits the poisoned class worse: the whitening gives the low-variance directions equal weight)."""
    analysis: Literal["relative_size", "smaller"] = "relative_size"
    size_threshold: float = 0.35
    """relative_size: a cluster with less than this share of its class is flagged."""
    n_init: int = 10
    """k-means restarts (the lowest inertia wins)."""
    max_iter: int = 300

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.nb_dims >= 1, "nb_dims", "must be >= 1")
        check(self.nb_clusters >= 2, "nb_clusters", "must be >= 2")
        check(0.0 < self.size_threshold < 1.0, "size_threshold", "must lie in (0, 1)")
        check(self.n_init >= 1, "n_init", "must be >= 1")
        check(self.max_iter >= 1, "max_iter", "must be >= 1")


def reduce_dims(features: Tensor, dims: int, whiten: bool) -> Tensor:
    """(n, D) -> (n, min(dims, D, n - 1)) projection on the top principal components (unit variance each
    when ``whiten``)."""
    centred = features.double() - features.double().mean(0, keepdim=True)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    k = max(min(dims, centred.shape[1], len(features) - 1), 1)
    if whiten:
        return u[:, :k] * (len(features) - 1) ** 0.5
    return u[:, :k] * s[:k]


def kmeans(points: Tensor, k: int, *, n_init: int, max_iter: int, generator: torch.Generator) -> Tensor:
    """Lloyd's k-means with k-means++ seeding, ``n_init`` restarts (lowest inertia kept): (n,) cluster ids."""
    best, best_inertia = None, float("inf")
    for _ in range(n_init):
        centres = _kmeans_plus_plus(points, k, generator)
        assignment = torch.full((len(points),), -1, dtype=torch.int64)
        for _ in range(max_iter):
            new = torch.cdist(points, centres).argmin(1)
            if torch.equal(new, assignment):
                break
            assignment = new
            for c in range(k):
                members = points[assignment == c]
                if len(members):
                    centres[c] = members.mean(0)
        inertia = float(torch.cdist(points, centres).min(1).values.pow(2).sum())
        if inertia < best_inertia:
            best, best_inertia = assignment, inertia
    return best


def _kmeans_plus_plus(points: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k initial centres: the first uniformly, each next with probability proportional to its squared distance
    to the nearest centre so far."""
    first = int(torch.randint(len(points), (1,), generator=generator))
    centres = [points[first]]
    for _ in range(1, k):
        dist = torch.cdist(points, torch.stack(centres)).min(1).values.pow(2)
        if float(dist.sum()) <= 0:
            centres.append(points[int(torch.randint(len(points), (1,), generator=generator))])
            continue
        centres.append(points[int(torch.multinomial(dist / dist.sum(), 1, generator=generator))])
    return torch.stack(centres).clone()


class ActivationClustering(RowFilter):
    """DataDefense (filter): Activation Clustering."""

    def flag(self, features: Tensor, labels: np.ndarray, *, seed: int) -> np.ndarray:
        cfg = self.cfg
        generator = torch.Generator().manual_seed(seed)
        flags = np.zeros(len(labels), dtype=bool)
        for members in per_class(labels):
            if len(members) < cfg.nb_clusters + 1:
                continue
            reduced = reduce_dims(features[members], cfg.nb_dims, whiten=cfg.reduce == "ica")
            clusters = kmeans(reduced, cfg.nb_clusters, n_init=cfg.n_init, max_iter=cfg.max_iter,
                              generator=generator)
            sizes = torch.bincount(clusters, minlength=cfg.nb_clusters).double() / len(members)
            if cfg.analysis == "smaller":
                poison = sizes == sizes.min()
            else:
                poison = sizes < cfg.size_threshold
            flags[members[poison[clusters].numpy()]] = True
        return flags


@DEFENSES.register("activation_clustering", ActivationClusteringConfig)
def build_activation_clustering(cfg: ActivationClusteringConfig) -> ActivationClustering:
    return ActivationClustering(cfg)
