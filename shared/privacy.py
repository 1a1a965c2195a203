"""Sample-level privacy accounting for DP-SGD with dp-accounting (RDP or PLD).

The guarantee is per client, for the add/remove-one-example neighbouring relation on that client's
local data set, and *cumulative*: it composes every local DP-SGD step the client ran, over all rounds
so far. Each step is a Poisson-subsampled Gaussian mechanism (sampling probability q, noise multiplier
sigma), which is what ``shared.training`` actually does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import dp_accounting
from dp_accounting import pld, rdp

SAMPLING = "poisson"
NEIGHBOURING = "add/remove one example"


@dataclass(frozen=True)
class TrainingEvent:
    """One local training of a client: ``steps`` Poisson-sampled Gaussian steps."""

    round: int
    noise_multiplier: float
    sampling_probability: float
    steps: int
    num_examples: int

    def __post_init__(self) -> None:
        if self.noise_multiplier <= 0:
            raise ValueError(
                f"noise_multiplier must be > 0 for an accounted event, got {self.noise_multiplier}"
            )
        if not 0 < self.sampling_probability <= 1:
            raise ValueError(f"sampling_probability must be in (0, 1], got {self.sampling_probability}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")

    def dp_event(self) -> dp_accounting.DpEvent:
        step = dp_accounting.PoissonSampledDpEvent(
            self.sampling_probability, dp_accounting.GaussianDpEvent(self.noise_multiplier)
        )
        return dp_accounting.SelfComposedDpEvent(step, self.steps)


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
    acc = _accountant(accountant)
    acc.compose(dp_accounting.ComposedDpEvent([e.dp_event() for e in events]))
    return float(acc.get_epsilon(delta))


BUDGET_EXHAUSTED = 4201  # error code of a client's "budget exhausted" reply


class BudgetExhausted(Exception):
    """Training this round would take a client's cumulative epsilon past its budget."""

    def __init__(self, client_id: int, current: float, projected: float, budget: float, delta: float) -> None:
        super().__init__(
            f"budget exhausted: client-id={client_id} is at epsilon {current:.4f} and this round would take "
            f"it to {projected:.4f}, above its target-epsilon {budget:g} (delta {delta:g}); it does not train"
        )
        self.client_id, self.current, self.projected, self.budget = client_id, current, projected, budget


def check_delta(delta: float, num_examples: int) -> None:
    """Refuse a delta that permits leaking a whole record: delta must be below 1/n."""
    if delta >= 1.0 / max(num_examples, 1):
        raise ValueError(
            f"delta {delta:g} must be below 1/n = {1.0 / num_examples:.3g} for a client with "
            f"n = {num_examples} examples; lower delta"
        )


def describe(delta: float, accountant: str) -> str:
    """The words every printed epsilon carries."""
    return (
        f"sample-level ({NEIGHBOURING}), per client, cumulative over all rounds, delta={delta:g}, "
        f"{accountant.upper()} accountant, {SAMPLING} sampling"
    )
