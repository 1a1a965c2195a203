import numpy as np
import pytest

from shared.data import partition


def test_iid_covers_every_example_once(rng) -> None:
    parts = partition.iid(103, 4, rng)
    joined = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(joined, np.arange(103))
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_balanced() -> None:
    groups = np.repeat(np.arange(5), 200)

    def skew(alpha: float) -> float:
        parts = partition.dirichlet(groups, 5, alpha, np.random.default_rng(0), min_size=5)
        np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(1000))
        # Mean share of each client's dominant group.
        return float(np.mean([np.bincount(groups[p], minlength=5).max() / len(p) for p in parts]))

    assert skew(0.1) > 0.6
    assert skew(100.0) < 0.35


def test_dirichlet_needs_two_groups_and_positive_alpha(rng) -> None:
    with pytest.raises(ValueError, match="at least two groups"):
        partition.dirichlet(np.zeros(10, int), 2, 0.5, rng)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        partition.dirichlet(np.arange(10) % 2, 2, 0.0, rng)
