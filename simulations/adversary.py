"""The colluding adversary of a simulated "A Little Is Enough" attack (shared/attacks/poisoning.py).

The colluders (``attack-fraction`` of the clients) train honestly and pool their updates over a channel
of their own; each then sends the same crafted model. In a simulation their replies meet where the
server receives them, so this strategy mixin stands for that channel: it goes first in the strategy's
bases (``server.strategy.build_strategy(mixins=...)``) and rewrites the colluders' replies before the
server's checks and aggregation see them. It uses only what the colluders hold: their own honest updates
and the global model they were all sent, never an honest client's update.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Message

from server.strategy import with_keys_of
from shared.attacks import poisoning
from shared.config import FedaeConfig

logger = logging.getLogger("fedae.simulations")


class ColludingAdversary:
    """Strategy mixin: replace the colluders' replies with ``poisoning.alie_update`` of their own."""

    colluders: frozenset[int] = frozenset()
    alie_z: float = 0.0  # 0: Baruch et al.'s z_max for the round's sample
    _sent_arrays: list[np.ndarray]  # the round's global model, kept by server.strategy.RoundGuard

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[object, object]:
        replies = list(replies)
        ours = [r for r in replies if not r.has_error() and _client(r) in self.colluders]
        colluders_round = server_round + getattr(self, "round_offset", 0)
        if len(ours) >= 2 and (self.alie_z or len(ours) < len(replies) // 2 + 1):
            honest = [r.content["arrays"].to_numpy_ndarrays() for r in ours]
            z = self.alie_z or poisoning.alie_z(len(replies), len(ours))
            crafted = poisoning.alie_update(self._sent_arrays, honest, z)
            for reply in ours:
                reply.content["arrays"] = with_keys_of(reply.content["arrays"], crafted)
            logger.info(
                "round %d: %d colluding clients send one 'a little is enough' model (z = %.3f)",
                colluders_round,
                len(ours),
                z,
            )
        elif ours:
            # Too few in this round's sample to estimate a spread, or a majority (z_max undefined):
            # the colluders send their honest updates this round.
            logger.info("round %d: %d colluder(s) sampled; no attack this round", colluders_round, len(ours))
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]


def _client(reply: Message) -> int | None:
    try:
        return int(reply.content["metrics"]["client-id"])
    except (KeyError, TypeError, ValueError):
        return None


def adversary_mixins(config: FedaeConfig, num_clients: int) -> tuple[type, ...]:
    """The strategy mixins a simulated run with ``config``'s attack needs (none for client-side ones)."""
    if config.attack != "alie":
        return ()
    colluders = poisoning.malicious_clients(num_clients, config.attack_fraction, config.seed)
    return (
        type("Colluders", (ColludingAdversary,), {"colluders": colluders, "alie_z": config.attack_alie_z}),
    )
