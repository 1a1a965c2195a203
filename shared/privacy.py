"""Sample-level privacy accounting for DP-SGD with dp-accounting (RDP or PLD).

The guarantee is per client, on that client's local data set, and *cumulative*: it composes every local
DP-SGD step the client ran, over all rounds so far. What one training contributes depends on how its
batches were drawn, which the ledger records with each event:

- ``poisson`` (default): each step is a Poisson-subsampled Gaussian mechanism (sampling probability q,
  noise multiplier sigma), for the add/remove-one-example neighbouring relation. This is what
  ``shared.training`` does, so the amplification-by-sampling bound holds.
- ``shuffle``: fixed-size batches from a per-epoch permutation. No bound with amplification by
  sampling applies to that (shuffling is not Poisson sampling, and the gap is real: Chua et al. 2024,
  "How Private are DP-SGD Implementations?"), so fedae claims none: with a fixed batch size the data set
  size is public, the relation is replace-one-example, each epoch puts any one example in exactly one
  batch, whose clipped sum then moves by at most 2C against noise sigma*C. Each epoch is therefore one
  Gaussian mechanism with noise multiplier sigma/2, and the epochs compose. Valid, and much larger than
  the Poisson figure for the same sigma.

Besides trainings, a ledger holds the federated threshold's histogram releases (``mechanism``
"histogram", ``shared.federated_threshold``): one Gaussian mechanism on the counts of the client's
training rows, sensitivity 1 under add/remove-one (one row moves one count by 1) and sqrt(2) under
replace-one (one count down, another up), so it composes with whichever relation the ledger's DP-SGD
events hold for. It is recorded with sampling probability 1 and one step: no subsampling, one release.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import dp_accounting
from dp_accounting import pld, rdp

NEIGHBOURING = {"poisson": "add/remove one example", "shuffle": "replace one example"}
SAMPLING_BOUND = {
    "poisson": "Poisson sampling, subsampled Gaussian per step",
    "shuffle": "shuffled fixed-size batches, no amplification: one Gaussian (sigma/2) per epoch",
}
MECHANISMS = ("dp-sgd", "histogram")
# L2 sensitivity of a histogram release under each ledger's neighbouring relation (keyed like NEIGHBOURING).
HISTOGRAM_SENSITIVITY = {"poisson": 1.0, "shuffle": math.sqrt(2.0)}


@dataclass(frozen=True)
class TrainingEvent:
    """One privacy event of a client: a local training (``steps`` noisy steps over ``epochs`` passes of its
    data) or, with ``mechanism`` "histogram", one Gaussian release of its training rows' score histogram
    (noise multiplier = the noise's standard deviation per count; q = 1, one step, one epoch)."""

    round: int
    noise_multiplier: float
    sampling_probability: float
    steps: int
    num_examples: int
    sampling: str = "poisson"
    epochs: int = 1  # only the shuffle bound needs it (one Gaussian release per epoch)
    mechanism: str = "dp-sgd"

    def __post_init__(self) -> None:
        if self.noise_multiplier <= 0:
            raise ValueError(
                f"noise_multiplier must be > 0 for an accounted event, got {self.noise_multiplier}"
            )
        if not 0 < self.sampling_probability <= 1:
            raise ValueError(f"sampling_probability must be in (0, 1], got {self.sampling_probability}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.sampling not in SAMPLING_BOUND:
            raise ValueError(f"sampling must be one of {sorted(SAMPLING_BOUND)}, got {self.sampling!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {self.mechanism!r}")
        single = (self.sampling_probability, self.steps, self.epochs) == (1, 1, 1)
        if self.mechanism == "histogram" and not single:
            raise ValueError(
                "a histogram release is one Gaussian mechanism on all the rows: sampling probability 1, one "
                f"step, one epoch; got {self.sampling_probability}, {self.steps}, {self.epochs}"
            )


def histogram_event(
    noise_multiplier: float, num_examples: int, sampling: str = "poisson", server_round: int = 0
) -> TrainingEvent:
    """One threshold-histogram release: Gaussian noise ``noise_multiplier`` on every count of
    ``num_examples`` rows, accounted under the neighbouring relation of ``sampling``'s ledgers."""
    return TrainingEvent(server_round, noise_multiplier, 1.0, 1, num_examples, sampling, 1, "histogram")


def _accountant(name: str) -> dp_accounting.PrivacyAccountant:
    if name == "rdp":
        return rdp.RdpAccountant()
    if name == "pld":
        # PLD discretisation 1e-4 keeps the bound tight (under 1% looser than exact) at modest cost.
        return pld.PLDAccountant(value_discretization_interval=1e-4)
    raise ValueError(f"accountant must be 'rdp' or 'pld', got {name!r}")


def cumulative_epsilon(events: Iterable[TrainingEvent], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of all ``events`` composed (0 when there are none)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    events = list(events)
    if not events:
        return 0.0
    return _epsilon(_grouped(events), delta, accountant)


def _grouped(events: Iterable[TrainingEvent]) -> tuple[tuple[TrainingEvent, int], ...]:
    """Each distinct training (its round aside) with how often it occurred, in a canonical order."""
    counts: Counter[TrainingEvent] = Counter(replace(e, round=0) for e in events)
    return tuple(sorted(counts.items(), key=repr))


@lru_cache(maxsize=4096)
def _epsilon(grouped: tuple[tuple[TrainingEvent, int], ...], delta: float, accountant: str) -> float:
    """Memoised: epsilon is a pure function of the grouped events. A round asks twice for the same
    ledger (the budget check before training, the report after), and the clients of a simulation with
    equal data sizes share their ledgers' shapes: RDP at fractional orders costs ~0.1 s per call."""
    acc = _accountant(accountant)
    acc.compose(_dp_event(grouped))
    return float(acc.get_epsilon(delta))


def composed_event(events: Iterable[TrainingEvent]) -> dp_accounting.DpEvent:
    """All ``events`` as one DpEvent, identical trainings grouped into one self-composition.

    The same bound as composing them one by one; grouping lets the PLD accountant use one
    self-convolution per distinct training instead of one convolution per round (minutes -> ms for a
    long ledger, and calibration evaluates many candidate ledgers).
    """
    return _dp_event(_grouped(events))


def _dp_event(grouped: tuple[tuple[TrainingEvent, int], ...]) -> dp_accounting.DpEvent:
    parts = []
    for event, count in grouped:
        if event.mechanism == "histogram":
            # One Gaussian mechanism per release: noise std over the relation's L2 sensitivity.
            release = dp_accounting.GaussianDpEvent(
                event.noise_multiplier / HISTOGRAM_SENSITIVITY[event.sampling]
            )
            parts.append(dp_accounting.SelfComposedDpEvent(release, count))
        elif event.sampling == "shuffle":
            epoch = dp_accounting.GaussianDpEvent(event.noise_multiplier / 2.0)
            parts.append(dp_accounting.SelfComposedDpEvent(epoch, event.epochs * count if event.steps else 0))
        else:
            step = dp_accounting.PoissonSampledDpEvent(
                event.sampling_probability, dp_accounting.GaussianDpEvent(event.noise_multiplier)
            )
            parts.append(dp_accounting.SelfComposedDpEvent(step, event.steps * count))
    return dp_accounting.ComposedDpEvent(parts)


# Calibration searches sigma in this range; above the top, training would be noise and nothing else.
MIN_CALIBRATED_SIGMA, MAX_CALIBRATED_SIGMA = 0.05, 100.0


class CalibrationError(ValueError):
    """No noise multiplier reaches the target epsilon with the planned training."""


def calibrate_noise_multiplier(
    history: list[TrainingEvent],
    plan: Callable[[float], list[TrainingEvent]],
    target_epsilon: float,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """The smallest sigma whose planned events, after ``history``, keep epsilon within the target.

    Like Opacus' ``make_private_with_epsilon``, but the target is the client's whole budget: what its
    ledger already holds counts, and ``plan(sigma)`` lists every training still planned (all remaining
    rounds of the run), so that spending the same sigma each round ends exactly at the target.
    """
    if not target_epsilon > 0:
        raise CalibrationError(f"noise-multiplier 'auto' needs target-epsilon > 0, got {target_epsilon}")
    spent = cumulative_epsilon(history, delta, accountant)
    if spent >= target_epsilon:
        raise CalibrationError(
            f"the ledger already holds epsilon {spent:.4f} >= target-epsilon {target_epsilon:g} "
            f"(delta {delta:g}): no budget left to calibrate for"
        )

    def event(sigma: float) -> dp_accounting.DpEvent:
        return composed_event([*history, *plan(sigma)])

    if cumulative_epsilon([*history, *plan(MIN_CALIBRATED_SIGMA)], delta, accountant) <= target_epsilon:
        return MIN_CALIBRATED_SIGMA  # a budget this loose is met by any sigma in the search range
    if cumulative_epsilon([*history, *plan(MAX_CALIBRATED_SIGMA)], delta, accountant) > target_epsilon:
        raise CalibrationError(
            f"even noise-multiplier {MAX_CALIBRATED_SIGMA:g} would exceed target-epsilon {target_epsilon:g} "
            f"(delta {delta:g}) with the planned rounds and epochs; raise the target or train less"
        )

    def search(make: Callable[[], dp_accounting.PrivacyAccountant], bracket: Any, tol: float) -> float:
        return float(
            dp_accounting.calibrate_dp_mechanism(make, event, target_epsilon, delta, bracket, tol=tol)
        )

    start = dp_accounting.LowerEndpointAndGuess(MIN_CALIBRATED_SIGMA, 1.0)
    try:
        sigma = _search_sigma(search, start, accountant)
    except dp_accounting.mechanism_calibration.NoBracketIntervalFoundError as err:
        raise CalibrationError(
            f"no noise multiplier reaches target-epsilon {target_epsilon:g} ({err})"
        ) from err
    # Brent's method stops within tol of the crossing, on either side: step up until the bound holds.
    while cumulative_epsilon([*history, *plan(sigma)], delta, accountant) > target_epsilon:
        sigma *= 1.0 + 1e-4
    return sigma


def _search_sigma(search: Callable[..., float], start: Any, accountant: str) -> float:
    if accountant == "pld":
        # A fine PLD grid is slow for the small sigmas a search visits; coarse grids are still valid
        # (pessimistic) bounds. Bracket with a coarse grid, refine near it, verify with the real one.
        coarse = search(lambda: pld.PLDAccountant(value_discretization_interval=1e-2), start, 1e-3)
        try:
            bracket = dp_accounting.ExplicitBracketInterval(0.9 * coarse, coarse)
            sigma = search(lambda: pld.PLDAccountant(value_discretization_interval=1e-3), bracket, 1e-4)
        except ValueError:  # no crossing inside the bracket: keep the coarse figure, verified below
            sigma = coarse
        return sigma
    return search(lambda: _accountant(accountant), start, 1e-4)


BUDGET_EXHAUSTED = 4201  # error code of a client's "budget exhausted" reply
CANNOT_ACCOUNT = 4202  # error code of a client that cannot state a valid bound for this round
REFUSAL_CODES = (BUDGET_EXHAUSTED, CANNOT_ACCOUNT)  # the server drops such a client from later rounds


class PrivacyRefusal(Exception):
    """A client does not train this round, for a privacy reason it states; it will not later either."""

    code = CANNOT_ACCOUNT


class IncompatibleLedger(PrivacyRefusal):
    """The ledger holds events whose bound cannot compose with this round's (or the site's settings are
    invalid): training would leave the client with no valid epsilon."""


class BudgetExhausted(PrivacyRefusal):
    """Training this round would take a client's cumulative epsilon past its budget."""

    code = BUDGET_EXHAUSTED

    def __init__(
        self, client_id: int, current: float, projected: float, budget: float, delta: float, why: str = ""
    ) -> None:
        because = why or f"this round would take it to {projected:.4f}, above its target-epsilon {budget:g}"
        super().__init__(
            f"budget exhausted: client-id={client_id} is at epsilon {current:.4f} (delta {delta:g}) and "
            f"{because}; it does not train"
        )
        self.client_id, self.current, self.projected, self.budget = client_id, current, projected, budget


def check_delta(delta: float, num_examples: int) -> None:
    """Refuse a delta that permits leaking a whole record: delta must be below 1/n."""
    if delta >= 1.0 / max(num_examples, 1):
        raise ValueError(
            f"delta {delta:g} must be below 1/n = {1.0 / num_examples:.3g} for a client with "
            f"n = {num_examples} examples; lower delta"
        )


def describe(
    delta: float, accountant: str, sampling: str = "poisson", threshold_release: bool = False
) -> str:
    """The words every printed sample-level epsilon carries; ``threshold_release``: the figures include
    the federated threshold's histogram release."""
    # Only the clients that sent a histogram paid for one: the statement covers every client's figure.
    scope = (
        "all rounds and, for each client that released one, the threshold histogram"
        if threshold_release
        else "all rounds"
    )
    return (
        f"sample-level ({NEIGHBOURING[sampling]}), per client, cumulative over {scope}, delta={delta:g}, "
        f"{accountant.upper()} accountant, {SAMPLING_BOUND[sampling]}"
    )


def describe_release(delta: float, accountant: str, sampling: str = "poisson") -> str:
    """The words the epsilon of one threshold-histogram release carries."""
    return (
        f"sample-level ({NEIGHBOURING[sampling]}), per client, one release (Gaussian histogram, L2 "
        f"sensitivity {HISTOGRAM_SENSITIVITY[sampling]:.4g}), delta={delta:g}, "
        f"{accountant.upper()} accountant"
    )
