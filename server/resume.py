"""Resuming a run from its per-round checkpoint (``shared/checkpoint.py``): the strategy's side.

What a resumed run needs besides the weights: the round table and records (``RoundBook.state``), which
clients ran out of budget, the server optimiser's moments (FedAdam), and the client-level accountant.
Flower's ``Strategy.start`` numbers rounds from 1, so the resumed strategy is told how many rounds are
behind it (``round_offset``) and every round keeps its number.

The client-level accountant is saved on its own, right after each release and before the released model
leaves the server (``save_accountant``): a server that dies between a release and the round's checkpoint
has shown the clients that release, and the round it runs again is a second one; both are counted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.serverapp.strategy import Strategy

from server.rounds import RoundBook
from shared.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    atomic_write,
    check_resumable,
    load_checkpoint,
    save_checkpoint,
)
from shared.config import ConfigError, FedaeConfig
from shared.pipeline import RunSetup
from shared.setup import encode_setup

logger = logging.getLogger("fedae.server")
ACCOUNTANT_FILE = "client-dp-accountant.json"


@dataclass
class Resumption:
    """Where the run's checkpoint lives, the run's key, and what was found there (None: a new run)."""

    path: Path
    run_key: str
    setup_digest: str
    found: Checkpoint | None

    @property
    def completed_round(self) -> int:
        return self.found.completed_round if self.found else 0

    @property
    def accountant_path(self) -> Path:
        return self.path.with_name(ACCOUNTANT_FILE)


def open_run(setup: RunSetup) -> Resumption:
    """The checkpoint in the run's out-dir if there is one (checked against its config and data
    preparation), else a new run key."""
    config = setup.config
    path = setup.out_dir / CHECKPOINT_FILE
    values = json.dumps(encode_setup(config.replace(out_dir=""), setup.spec, setup.scaler), sort_keys=True)
    digest = hashlib.sha256(values.encode()).hexdigest()
    found = load_checkpoint(path)
    if found is None:
        return Resumption(path, uuid.uuid4().hex[:16], digest, None)
    if config.secure_aggregation != "none":
        raise ConfigError(f"{path}: runs under SecAgg+ do not resume; use a new out-dir")
    check_resumable(found, config, digest, path)
    logger.info(
        "resuming run %s from its checkpoint after round %d of %d (%s)",
        found.run_key,
        found.completed_round,
        config.num_server_rounds,
        path,
    )
    return Resumption(path, found.run_key, digest, found)


def restore(resumption: Resumption, book: RoundBook, strategy: Strategy) -> list[np.ndarray]:
    """Put the checkpoint's state into ``book`` and ``strategy``; returns the weights to start from."""
    accountant = getattr(strategy, "accountant", None)
    if accountant is not None and resumption.accountant_path.exists():
        accountant.load_state_dict(json.loads(resumption.accountant_path.read_text()))
    found = resumption.found
    if found is None:
        return book.best_weights
    book.restore(found.state["book"], found.arrays["best"])
    strategy.round_offset = found.completed_round  # type: ignore[attr-defined]
    saved = found.state["strategy"]
    # By client id: node ids change when a SuperLink or a simulation starts again. An exhausted client
    # sampled again refuses again, from its own ledger, and is excluded again.
    strategy.previously_exhausted = list(saved["exhausted_clients"])  # type: ignore[attr-defined]
    optimiser = _optimiser(strategy)
    if optimiser is not None and "moment_keys" in saved:
        keys = saved["moment_keys"]
        optimiser.m_t = dict(zip(keys, found.arrays["m_t"], strict=True))
        optimiser.v_t = dict(zip(keys, found.arrays["v_t"], strict=True))
    return found.arrays["global"]


def save(
    resumption: Resumption,
    book: RoundBook,
    strategy: Strategy,
    config: FedaeConfig,
    server_round: int,
    weights: list[np.ndarray],
) -> None:
    """Checkpoint the run after ``server_round`` (0: before round 1) whose global model is ``weights``."""
    state: dict = {"exhausted_clients": strategy.exhausted_clients()}  # type: ignore[attr-defined]
    arrays = {"global": weights, "best": book.best_weights}
    optimiser = _optimiser(strategy)
    if optimiser is not None and optimiser.m_t is not None and optimiser.v_t is not None:
        state["moment_keys"] = list(optimiser.m_t)
        arrays["m_t"] = [optimiser.m_t[k] for k in state["moment_keys"]]
        arrays["v_t"] = [optimiser.v_t[k] for k in state["moment_keys"]]
    book_state = {"book": book.state(), "strategy": state, "setup_digest": resumption.setup_digest}
    checkpoint = Checkpoint(resumption.run_key, server_round, config.to_run_config(), arrays, book_state)
    save_checkpoint(resumption.path, checkpoint)


def save_accountant(resumption: Resumption, strategy: Strategy) -> None:
    """Flower's client-level accountant, as its own ``state_dict``, durable before a release leaves."""
    state = json.dumps(strategy.accountant.state_dict(), indent=1)  # type: ignore[attr-defined]
    resumption.path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(resumption.accountant_path, lambda handle: handle.write(state.encode()))


def _optimiser(strategy: Strategy) -> Strategy | None:
    """The strategy holding server-optimiser moments (FedAdam), itself or inside a DP wrapper."""
    inner = getattr(strategy, "strategy", strategy)
    return inner if hasattr(inner, "m_t") else None
