"""Our greedy facility location equals the textbook greedy (brute force) and submodlib's kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from puregen_dist.defenses.facility_location import euclidean_similarity, greedy_facility_location


def brute_force_greedy(similarity: np.ndarray, k: int) -> list[int]:
    """Textbook greedy: every step evaluates every unchosen point's gain; ties go to the lower index."""
    n = len(similarity)
    served, chosen = np.zeros(n), []
    for _ in range(k):
        gains = [(-1.0 if j in chosen else float(np.maximum(similarity[:, j] - served, 0).sum())) for j in range(n)]
        best = int(np.argmax(gains))  # first maximum
        chosen.append(best)
        served = np.maximum(served, similarity[:, best])
    return chosen


def facility_value(similarity: np.ndarray, chosen: list[int]) -> float:
    return float(similarity[:, chosen].max(1).sum())


@pytest.mark.parametrize("seed", range(12))
def test_selection_equals_brute_force_greedy(seed):
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(5, 60)), int(rng.integers(2, 12))
    points = torch.from_numpy(rng.normal(size=(n, d)) * rng.uniform(0.2, 3.0))
    similarity = euclidean_similarity(points)
    k = int(rng.integers(1, n + 1))
    medoids = greedy_facility_location(similarity, k)
    assert medoids.order.tolist() == brute_force_greedy(similarity.numpy(), k)


def test_ties_go_to_the_lower_index_like_brute_force():
    points = torch.tensor([[0.0], [0.0], [5.0], [5.0], [5.0], [9.0]], dtype=torch.float64)  # duplicates: ties
    similarity = euclidean_similarity(points)
    for k in range(1, 7):
        assert greedy_facility_location(similarity, k).order.tolist() == brute_force_greedy(similarity.numpy(), k)


def test_greedy_is_near_the_optimum_on_small_problems():
    """Greedy reaches at least 1 - 1/e of the exhaustive optimum (here, in practice, nearly all of it)."""
    from itertools import combinations

    rng = np.random.default_rng(0)
    points = torch.from_numpy(rng.normal(size=(10, 3)))
    similarity = euclidean_similarity(points).numpy()
    for k in (1, 2, 3):
        best = max(facility_value(similarity, list(c)) for c in combinations(range(10), k))
        got = facility_value(similarity, greedy_facility_location(torch.from_numpy(similarity), k).order.tolist())
        assert got >= (1 - 1 / np.e) * best and got >= 0.95 * best


def test_kernel_is_submodlib_euclidean_and_weights_are_cluster_sizes():
    points = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.1], [3.0, 4.1]])
    similarity = euclidean_similarity(points)
    assert torch.allclose(similarity[0, 1], torch.exp(torch.tensor(-5.0 / 2)))  # exp(-||d|| / n_features)
    assert torch.allclose(similarity.diagonal(), torch.ones(4))
    medoids = greedy_facility_location(similarity, 2)
    assert medoids.weights.tolist() == [2.0, 2.0] and medoids.weights.sum() == 4
    for i in range(4):  # each point joins its most similar medoid
        assert medoids.assignment[i] == similarity[i, medoids.order].argmax()


def test_refuses_a_bad_budget():
    with pytest.raises(ValueError, match="k="):
        greedy_facility_location(torch.eye(3), 4)
