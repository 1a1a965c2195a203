"""Client-level (central) DP over clients with Flower's DP strategy wrappers and Flower's accountant.

Sample-level DP-SGD (each client's ledger) protects one example of a site's data. Client-level DP
protects a whole site's contribution: each round's update is clipped to ``client-dp-clip`` (on the
server, or on the client with Flower's clipping mods), the server averages the sampled clients' updates
with equal weights and adds Gaussian noise of ``client-dp-noise-multiplier * clip / m``. The accounting
is Flower's own ``RdpAccountant`` with Flower's only supported model for these wrappers: add/remove one
client, no amplification by client sampling (each round is a full Gaussian mechanism at that noise
multiplier), cumulative over the rounds whose aggregate was released. The two figures answer different
questions and are reported side by side, never combined.

Fixed clipping uses the wrappers' built-in accountant (``max_epsilon`` stops the run before a release
that would pass ``client-dp-target-epsilon``). Flower's adaptive-clipping wrappers take no accountant;
their noise is split between the update and the clipped-count query so that, together, the round is a
Gaussian mechanism with the configured noise multiplier (Andrew et al. 2021), so the same Flower
accountant is composed here per released round, with the same budget check.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import (
    GaussianPrivacyEvent,
    Grid,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from shared.config import FedaeConfig

WRAPPERS: dict[str, type[Strategy]] = {
    "server-fixed": DifferentialPrivacyServerSideFixedClipping,
    "client-fixed": DifferentialPrivacyClientSideFixedClipping,
    "server-adaptive": DifferentialPrivacyServerSideAdaptiveClipping,
    "client-adaptive": DifferentialPrivacyClientSideAdaptiveClipping,
}
ACCOUNTANT = "Flower RdpAccountant"
NEIGHBOURING = "add/remove one client"
SAMPLING = "no amplification by client sampling"


def num_sampled_clients(config: FedaeConfig, num_clients: int) -> int:
    """Clients per round, fixed for the whole run: the noise is calibrated to it."""
    minimum = min(config.min_available_clients, num_clients)
    return max(int(num_clients * config.fraction_train), minimum)


def make_accountant(config: FedaeConfig, num_clients: int) -> Any:
    from flwr.serverapp import RdpAccountant

    privacy_config = PrivacyConfig(
        target_delta=config.delta,
        population_size=num_clients,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=config.client_dp_target_epsilon or None,
    )
    return RdpAccountant(privacy_config)


class AccountedAdaptive:
    """Mixin for Flower's adaptive-clipping wrappers: compose Flower's accountant per released round
    and refuse, before configuring it, a round whose release would pass the budget."""

    accountant: Any = None
    noise_multiplier_total: float = 0.0

    def _event(self) -> GaussianPrivacyEvent:
        return GaussianPrivacyEvent(
            noise_multiplier=self.noise_multiplier_total,
            sample_size=self.num_sampled_clients,  # type: ignore[attr-defined]
            population_size=self.accountant.config.population_size,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        if self.accountant.config.max_epsilon is not None and self.accountant.would_exceed(self._event()):
            spent = self.accountant.get_privacy_spent()
            limit = self.accountant.config.max_epsilon
            raise PrivacyBudgetExhausted(
                f"the next client-level release would exceed client-dp-target-epsilon {limit:g} "
                f"(now epsilon {spent.epsilon:.4f}, delta {spent.delta:g})"
            )
        return list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]

    def aggregate_train(self, server_round: int, replies: Any) -> tuple[Any, Any]:
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is not None:
            self.accountant.compose(self._event())
        return arrays, metrics

    def privacy_spent(self) -> Any:
        return self.accountant.get_privacy_spent()


def wrapper_class(config: FedaeConfig) -> type[Strategy]:
    """The Flower DP wrapper for ``client-dp`` (adaptive ones extended with accounting)."""
    wrapper = WRAPPERS[config.client_dp]
    if "adaptive" in config.client_dp:
        return type(f"Accounted{wrapper.__name__}", (AccountedAdaptive, wrapper), {})
    return wrapper


def wrapper_arguments(config: FedaeConfig, num_clients: int) -> dict[str, Any]:
    """Keyword arguments for ``wrapper_class(config)`` (after the wrapped strategy)."""
    m = num_sampled_clients(config, num_clients)
    z = config.client_dp_noise_multiplier
    if "adaptive" in config.client_dp:
        # Flower's default count noise (m / 20) must exceed z / 2; small federations need more.
        return dict(
            noise_multiplier=z,
            num_sampled_clients=m,
            initial_clipping_norm=config.client_dp_clip,
            clipped_count_stddev=max(m / 20.0, z),
        )
    return dict(
        noise_multiplier=z,
        clipping_norm=config.client_dp_clip,
        num_sampled_clients=m,
        accountant=make_accountant(config, num_clients),
    )


def attach_accountant(strategy: Strategy, config: FedaeConfig, num_clients: int) -> None:
    """Give an adaptive wrapper its accountant (the fixed ones got theirs as an argument)."""
    if isinstance(strategy, AccountedAdaptive):
        strategy.accountant = make_accountant(config, num_clients)
        strategy.noise_multiplier_total = config.client_dp_noise_multiplier


def client_level_section(strategy: Strategy, config: FedaeConfig, num_clients: int) -> dict[str, Any]:
    """The summary's client-level figures, with every assumption spelled out."""
    if not config.client_dp_enabled:
        return {"enabled": False}
    spent = strategy.privacy_spent()  # type: ignore[attr-defined]
    m = num_sampled_clients(config, num_clients)
    return {
        "enabled": True,
        "mode": config.client_dp,
        "noise_multiplier": config.client_dp_noise_multiplier,
        "clip": config.client_dp_clip,
        "final_clip": float(getattr(strategy, "clipping_norm", config.client_dp_clip)),
        "clients_per_round": m,
        "population": num_clients,
        "releases": spent.num_releases,
        "epsilon": spent.epsilon if spent.num_releases else 0.0,
        "delta": spent.delta,
        "target_epsilon": config.client_dp_target_epsilon or None,
        "accountant": ACCOUNTANT,
        "neighbouring": NEIGHBOURING,
        "sampling": SAMPLING,
        "statement": (
            f"client-level ({NEIGHBOURING}), whole federation, cumulative over {spent.num_releases} "
            f"released rounds, delta={spent.delta:g}, {ACCOUNTANT}, {SAMPLING}, "
            f"{config.client_dp} clipping"
        ),
    }
