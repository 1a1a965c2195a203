"""Resuming a run from its per-round checkpoint (``shared/checkpoint.py``): the strategy's side.

What a resumed run needs besides the weights: the round table and records (``RoundBook.state``), which
clients ran out of budget, the server optimiser's moments (FedAdam), and the client-level accountant's
releases (Flower's DP wrappers). Flower's ``Strategy.start`` numbers rounds from 1, so the resumed
strategy is told how many rounds are behind it (``round_offset``) and every round keeps its number.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.serverapp import GaussianPrivacyEvent
from flwr.serverapp.strategy import Strategy

from server.rounds import RoundBook
from shared.checkpoint import CHECKPOINT_FILE, Checkpoint, check_resumable, load_checkpoint, save_checkpoint
from shared.config import ConfigError, FedaeConfig, clients_per_round

logger = logging.getLogger("fedae.server")


@dataclass
class Resumption:
    """Where the run's checkpoint lives, the run's key, and what was found there (None: a new run)."""

    path: Path
    run_key: str
    found: Checkpoint | None

    @property
    def completed_round(self) -> int:
        return self.found.completed_round if self.found else 0


def open_run(out_dir: Path, config: FedaeConfig) -> Resumption:
    """The checkpoint in ``out_dir`` if there is one (checked against ``config``), else a new run key."""
    path = out_dir / CHECKPOINT_FILE
    found = load_checkpoint(path)
    if found is None:
        return Resumption(path, uuid.uuid4().hex[:16], None)
    check_resumable(found, config, path)
    if config.secure_aggregation != "none":
        raise ConfigError(f"{path}: runs under SecAgg+ do not resume; use a new out-dir")
    logger.info(
        "resuming run %s from its checkpoint after round %d of %d (%s)",
        found.run_key,
        found.completed_round,
        config.num_server_rounds,
        path,
    )
    return Resumption(path, found.run_key, found)


def restore(
    resumption: Resumption, book: RoundBook, strategy: Strategy, config: FedaeConfig, num_clients: int
) -> list[np.ndarray]:
    """Put the checkpoint's state into ``book`` and ``strategy``; returns the weights to start from."""
    found = resumption.found
    if found is None:
        return book.best_weights
    book.restore(found.state["book"], found.arrays["best"])
    strategy.round_offset = found.completed_round  # type: ignore[attr-defined]
    saved = found.state["strategy"]
    strategy.exhausted.update({int(node): reason for node, reason in saved["exhausted"].items()})  # type: ignore[attr-defined]
    optimiser = _optimiser(strategy)
    if optimiser is not None and "moment_keys" in saved:
        keys = saved["moment_keys"]
        optimiser.m_t = dict(zip(keys, found.arrays["m_t"], strict=True))
        optimiser.v_t = dict(zip(keys, found.arrays["v_t"], strict=True))
    releases = int(saved.get("client_dp_releases", 0))
    if releases:
        event = GaussianPrivacyEvent(
            noise_multiplier=config.client_dp_noise_multiplier,
            sample_size=clients_per_round(config, num_clients),
            population_size=num_clients,
        )
        strategy.accountant.compose(event, count=releases)  # type: ignore[attr-defined]
    return found.arrays["global"]


def save(
    resumption: Resumption,
    book: RoundBook,
    strategy: Strategy,
    config: FedaeConfig,
    server_round: int,
    weights: list[np.ndarray],
) -> None:
    """Checkpoint the run after ``server_round`` (its global model is ``weights``)."""
    state: dict = {"exhausted": {str(node): r for node, r in strategy.exhausted.items()}}  # type: ignore[attr-defined]
    arrays = {"global": weights, "best": book.best_weights}
    optimiser = _optimiser(strategy)
    if optimiser is not None and optimiser.m_t is not None and optimiser.v_t is not None:
        state["moment_keys"] = list(optimiser.m_t)
        arrays["m_t"] = [optimiser.m_t[k] for k in state["moment_keys"]]
        arrays["v_t"] = [optimiser.v_t[k] for k in state["moment_keys"]]
    if getattr(strategy, "accountant", None) is not None:
        state["client_dp_releases"] = strategy.accountant.num_releases  # type: ignore[attr-defined]
    checkpoint = Checkpoint(
        resumption.run_key,
        server_round,
        config.to_run_config(),
        arrays,
        {"book": book.state(), "strategy": state},
    )
    save_checkpoint(resumption.path, checkpoint)


def _optimiser(strategy: Strategy) -> Strategy | None:
    """The strategy holding server-optimiser moments (FedAdam), itself or inside a DP wrapper."""
    inner = getattr(strategy, "strategy", strategy)
    return inner if hasattr(inner, "m_t") else None
