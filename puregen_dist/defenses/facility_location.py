"""Greedy facility location, the coreset selection of EPIC (and of CRAIG, which EPIC builds on).

Facility location over a similarity matrix S (n, n), S >= 0, picks medoids A maximising

    F(A) = sum_i max_{j in A} S[i, j]

(every point is served by its most similar medoid). F is monotone submodular, so the greedy algorithm (add the
point of largest marginal gain, k times) is within 1 - 1/e of the optimum (Nemhauser, Wolsey, Fisher 1978).
The originals call submodlib's ``FacilityLocationFunction(...).maximize(optimizer="LazyGreedy")``; this is our
own vectorised PyTorch version that gives the same selection as plain greedy: marginal gains of many candidates
are computed as one tensor expression, and the lazy (Minoux 1978) bound check re-evaluates only the candidates
whose stale upper bound could still win. Runs on the device of ``similarity`` (CPU or CUDA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

GAIN_CHUNK = 1024
"""Candidates whose marginal gains are computed in one (n, chunk) tensor (bounds memory for large classes)."""


@dataclass(frozen=True)
class Medoids:
    """A facility-location selection.

    Attributes:
        order: (k,) int64 indices of the selected points, in the order greedy picked them.
        assignment: (n,) int64, for every point the position in ``order`` of its most similar medoid.
        weights: (k,) float, the number of points each medoid serves (its cluster size; >= 1, sums to n).
    """

    order: Tensor
    assignment: Tensor
    weights: Tensor


def euclidean_similarity(x: Tensor) -> Tensor:
    """(n, d) points -> (n, n) similarity ``exp(-||x_i - x_j|| / d)``: submodlib's "euclidean" kernel, which
    EPIC selects with (``gamma = 1 / n_features`` times the plain, not squared, distance; 1 on the diagonal)."""
    return torch.exp(-torch.cdist(x, x) / x.shape[1])


def marginal_gains(similarity: Tensor, served: Tensor, candidates: Tensor) -> Tensor:
    """Gain of adding each candidate: ``sum_i max(S[i, j] - served_i, 0)`` for j in ``candidates`` (m,)."""
    gains = [(similarity[:, chunk] - served[:, None]).clamp_min_(0).sum(0)
             for chunk in candidates.split(GAIN_CHUNK)]
    return torch.cat(gains) if gains else similarity.new_zeros(0)


def greedy_facility_location(similarity: Tensor, k: int) -> Medoids:
    """The greedy facility-location selection of ``k`` medoids (ties go to the lower index).

    Args:
        similarity: (n, n) non-negative similarities, on any device.
        k: number of medoids, 1 <= k <= n.
    """
    n = similarity.shape[0]
    if similarity.shape != (n, n) or not 1 <= k <= n:
        raise ValueError(f"need an (n, n) similarity and 1 <= k <= n, got {tuple(similarity.shape)} and k={k}")
    device = similarity.device
    served = similarity.new_zeros(n)
    everyone = torch.arange(n, device=device)
    bounds = marginal_gains(similarity, served, everyone)
    chosen = torch.zeros(n, dtype=torch.bool, device=device)
    order = []
    for _ in range(k):
        pick = _lazy_argmax(similarity, served, bounds, chosen)
        order.append(pick)
        chosen[pick] = True
        bounds[pick] = -torch.inf
        served = torch.maximum(served, similarity[:, pick])
    picked = torch.tensor(order, dtype=torch.int64, device=device)
    assignment = similarity[:, picked].argmax(1)
    weights = torch.bincount(assignment, minlength=k).to(similarity.dtype)
    return Medoids(picked, assignment, weights)


def _lazy_argmax(similarity: Tensor, served: Tensor, bounds: Tensor, chosen: Tensor) -> int:
    """The unchosen index of largest true marginal gain (lowest index on ties). ``bounds`` holds upper bounds
    of the gains (submodularity: gains only shrink); the top few are refreshed in place, and the search widens
    until the best fresh gain strictly beats every stale bound outside the refreshed set."""
    remaining = int((~chosen).sum())
    width = 8
    while True:
        width = min(width, remaining)
        top = torch.topk(bounds, width).indices
        fresh = marginal_gains(similarity, served, top)
        bounds[top] = fresh
        best = fresh.max()
        winners = top[fresh == best]
        if width == remaining:
            return int(winners.min())
        others = bounds.clone()
        others[top] = -torch.inf
        if best > others.max():
            return int(winners.min())
        width *= 4
