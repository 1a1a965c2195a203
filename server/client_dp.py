"""Client-level (central) DP over clients with Flower's DP strategy wrappers and Flower's accountant.

Sample-level DP-SGD (each client's ledger) protects one example of a site's data. Client-level DP
protects a whole site's contribution: each round's update is clipped to ``client-dp-clip`` (on the
server, or on the client with Flower's clipping mods), the server averages the sampled clients' updates
with equal weights and adds Gaussian noise of ``client-dp-noise-multiplier * clip / m``. The accounting
is Flower's own ``RdpAccountant`` with Flower's only supported model for these wrappers: add/remove one
client, no amplification by client sampling (each round is a full Gaussian mechanism at that noise
multiplier), cumulative over the rounds whose aggregate was released. The two figures answer different
questions and are reported side by side, never combined.

The fixed-clipping wrappers carry that accountant themselves (``max_epsilon`` stops the run before a
release that would pass ``client-dp-target-epsilon``). Flower 1.42's adaptive-clipping wrappers are
refused at start (``shared.config``): they add the update noise at the next round's clipping norm, noise
the un-centred clipped count, and aggregate rounds with missing replies, so no accountant can state
their guarantee.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp import (
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from shared.config import FedaeConfig, clients_per_round

WRAPPERS: dict[str, type[Strategy]] = {
    "server-fixed": DifferentialPrivacyServerSideFixedClipping,
    "client-fixed": DifferentialPrivacyClientSideFixedClipping,
}
ACCOUNTANT = "Flower RdpAccountant"
NEIGHBOURING = "add/remove one client"
SAMPLING = "no amplification by client sampling"


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


def wrapper_class(config: FedaeConfig) -> type[Strategy]:
    """The Flower DP wrapper for ``client-dp`` (fixed clipping; adaptive modes are refused at start)."""
    return WRAPPERS[config.client_dp]


def wrapper_arguments(config: FedaeConfig, num_clients: int) -> dict[str, Any]:
    """Keyword arguments for ``wrapper_class(config)`` (after the wrapped strategy)."""
    return dict(
        noise_multiplier=config.client_dp_noise_multiplier,
        clipping_norm=config.client_dp_clip,
        num_sampled_clients=clients_per_round(config, num_clients),
        accountant=make_accountant(config, num_clients),
    )


def client_level_section(strategy: Strategy, config: FedaeConfig, num_clients: int) -> dict[str, Any]:
    """The summary's client-level figures, with every assumption spelled out."""
    if not config.client_dp_enabled:
        return {"enabled": False}
    spent = strategy.privacy_spent()  # type: ignore[attr-defined]
    m = clients_per_round(config, num_clients)
    return {
        "enabled": True,
        "mode": config.client_dp,
        "noise_multiplier": config.client_dp_noise_multiplier,
        "clip": config.client_dp_clip,
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
