"""Epsilon lower bounds from one training run with canaries (Steinke, Nasr, Jagielski 2023).

"Privacy Auditing with One (1) Training Run" (NeurIPS 2023, arXiv:2305.08846): train once on data
plus ``m`` canaries, each included independently with probability 1/2; the auditor then makes ``r``
guesses ("in" or "out", abstaining on the rest) and ``v`` of them are right. Their main theorem: if the
training is (epsilon, delta)-DP for adding or removing one canary, then for every ``v``

    P[W >= v] <= f(v) + 2 m delta * max_{i = 1..m} (f(v - i) - f(v)) / i,

where ``W`` is the number of correct guesses and ``f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v]``.
The right-hand side is therefore a p-value for the hypothesis "the training is (epsilon, delta)-DP";
the lower bound at confidence ``c`` is the largest epsilon that hypothesis can be rejected at, i.e.
where the p-value is still at most ``1 - c``.

Written here rather than taken from a library: tensorflow-privacy has no one-run audit, and the one
library that has (jax_privacy) would bring JAX into a TensorFlow project for a dozen lines of SciPy.
Pure NumPy/SciPy, so it is tested without TensorFlow.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

# Bisection on epsilon stops at this many digits; the bound is reported to 4.
_TOLERANCE = 1e-7
# Above this no finite outcome is rejected at any sensible confidence (e^50 odds of a correct guess).
_EPSILON_CAP = 50.0


def _check(canaries: int, guesses: int, correct: int, delta: float) -> None:
    if canaries < 1:
        raise ValueError(f"canaries must be >= 1, got {canaries}")
    if not 1 <= guesses <= canaries:
        raise ValueError(f"guesses must be in [1, canaries={canaries}], got {guesses}")
    if not 0 <= correct <= guesses:
        raise ValueError(f"correct must be in [0, guesses={guesses}], got {correct}")
    if not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1), got {delta}")


def one_run_p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Probability of ``correct`` or more right guesses if the training were (epsilon, delta)-DP.

    The theorem's right-hand side, capped at 1.
    """
    _check(canaries, guesses, correct, delta)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if correct == 0:
        return 1.0
    # An (epsilon, 0)-DP guess about a fair coin is right with probability at most e^eps / (1 + e^eps):
    # randomized response, the worst case.
    accuracy = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(correct - 1, guesses, accuracy))  # f(v) = P[Binomial >= v]
    if delta == 0:
        return min(1.0, tail)
    # f(v - i) - f(v) = P[v - i <= Binomial <= v - 1]: cumulative sums of the pmf from v - 1 downwards.
    # For i >= v it stays 1 - f(v) while i grows, so the maximum over i = 1..m is reached at i <= v.
    pmf_down = stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, accuracy)
    steps = np.arange(1, correct + 1)
    worst = float(np.max(np.cumsum(pmf_down) / steps))
    return min(1.0, tail + 2.0 * canaries * delta * worst)


def one_run_epsilon_lower_bound(
    canaries: int, guesses: int, correct: int, *, delta: float, confidence: float = 0.95
) -> float:
    """The largest epsilon that ``correct`` right guesses out of ``guesses`` rule out at ``confidence``.

    0 when the outcome is consistent with perfect privacy (e.g. half the guesses right). The p-value grows
    with epsilon, so the bound is found by bisection.
    """
    _check(canaries, guesses, correct, delta)
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    alpha = 1.0 - confidence

    def rejected(epsilon: float) -> bool:
        return one_run_p_value(canaries, guesses, correct, epsilon, delta) <= alpha

    if not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high):
        if high >= _EPSILON_CAP:
            return _EPSILON_CAP
        low, high = high, min(2.0 * high, _EPSILON_CAP)
    while high - low > _TOLERANCE:
        middle = 0.5 * (low + high)
        low, high = (middle, high) if rejected(middle) else (low, middle)
    return low


def one_run_ceiling(canaries: int, guesses: int, *, delta: float, confidence: float = 0.95) -> float:
    """The best bound this audit could ever give: every guess right.

    With 1,000 canaries and 100 guesses at 95% confidence and delta 1e-5 it is about 3.5, whatever the
    training did; an accountant's epsilon above the ceiling cannot be contradicted by this audit.
    """
    return one_run_epsilon_lower_bound(canaries, guesses, guesses, delta=delta, confidence=confidence)
