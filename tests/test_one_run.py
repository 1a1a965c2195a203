"""The one-run audit bound (Steinke, Nasr, Jagielski 2023): reference figures, shape, and validity."""

import itertools
import math

import numpy as np
import pytest

from shared.one_run import one_run_ceiling, one_run_epsilon_lower_bound, one_run_p_value


def test_reference_figure_1000_canaries_100_correct_guesses_is_about_3_5() -> None:
    # The paper reports its bounds at 95% confidence and delta 1e-5; with 1,000 canaries and 100 guesses,
    # all correct, the best provable bound is only about 3.5.
    assert one_run_ceiling(1000, 100, delta=1e-5, confidence=0.95) == pytest.approx(3.47, abs=0.02)
    assert one_run_epsilon_lower_bound(1000, 100, 100, delta=1e-5) == one_run_ceiling(1000, 100, delta=1e-5)


@pytest.mark.parametrize("guesses", [10, 100, 1000])
def test_pure_dp_all_correct_matches_the_closed_form(guesses: int) -> None:
    # delta = 0, every guess right: the p-value is accuracy^r, so accuracy = 0.05^(1/r) at 95% and
    # epsilon = log(accuracy / (1 - accuracy)).
    accuracy = 0.05 ** (1 / guesses)
    expected = math.log(accuracy / (1 - accuracy))
    assert one_run_ceiling(1000, guesses, delta=0.0) == pytest.approx(expected, abs=1e-5)


def test_bound_grows_with_correct_guesses_and_is_zero_at_chance() -> None:
    bounds = [one_run_epsilon_lower_bound(1000, 100, v, delta=1e-5) for v in range(0, 101)]
    assert all(b2 >= b1 for b1, b2 in itertools.pairwise(bounds))
    assert bounds[50] == 0.0 and bounds[55] == 0.0  # half right (or a little more) is what luck gives
    assert 0.0 < bounds[75] < bounds[90] < bounds[100]


def test_more_confidence_or_more_delta_never_gives_a_larger_bound() -> None:
    at_95 = one_run_epsilon_lower_bound(1000, 200, 180, delta=1e-5, confidence=0.95)
    at_99 = one_run_epsilon_lower_bound(1000, 200, 180, delta=1e-5, confidence=0.99)
    pure = one_run_epsilon_lower_bound(1000, 200, 180, delta=0.0)
    assert 0 < at_99 < at_95 < pure
    assert one_run_ceiling(1000, 200, delta=1e-5) > one_run_ceiling(1000, 100, delta=1e-5)


def test_p_value_is_one_without_correct_guesses_and_grows_with_epsilon() -> None:
    assert one_run_p_value(100, 10, 0, 1.0, 1e-5) == 1.0
    p = [one_run_p_value(1000, 100, 80, eps, 1e-5) for eps in (0.0, 0.5, 1.0, 2.0)]
    assert p == sorted(p) and p[0] < 1e-3 and p[-1] > 0.5


def test_the_bound_holds_for_a_mechanism_that_is_exactly_epsilon_dp() -> None:
    # Randomized response with epsilon = 1 on each canary's coin is exactly 1-DP: the auditor's guess
    # is right with probability e / (1 + e). A valid 95% lower bound exceeds 1 in at most 5% of runs,
    # and is not vacuous either: it sits close to 1 most of the time.
    rng = np.random.default_rng(7)
    epsilon, canaries, trials = 1.0, 1000, 300
    correct = rng.binomial(canaries, 1 / (1 + math.exp(-epsilon)), size=trials)
    bounds = np.array([one_run_epsilon_lower_bound(canaries, canaries, int(v), delta=1e-5) for v in correct])
    assert (bounds > epsilon).mean() <= 0.08
    assert np.median(bounds) > 0.7


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((0, 1, 0), "canaries must be >= 1, got 0"),
        ((10, 11, 0), "guesses must be in [1, canaries=10], got 11"),
        ((10, 5, 6), "correct must be in [0, guesses=5], got 6"),
    ],
)
def test_bad_arguments_are_refused_with_the_value(args: tuple[int, int, int], needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        one_run_epsilon_lower_bound(*args, delta=1e-5)


def test_confidence_and_delta_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="confidence must be in"):
        one_run_epsilon_lower_bound(10, 5, 5, delta=1e-5, confidence=1.0)
    with pytest.raises(ValueError, match="delta must be in"):
        one_run_epsilon_lower_bound(10, 5, 5, delta=1.0)
