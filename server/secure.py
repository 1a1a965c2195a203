"""The SecAgg+ rounds: Flower's legacy ``DefaultWorkflow`` with its ``SecAggPlusWorkflow``.

Flower 1.42 has SecAgg+ only in its legacy workflows (the message-API strategies have none), so this path
runs a legacy strategy (FedAvg or FedAdam) under ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))``.
SecAgg+ hands the strategy only the weighted mean of the clients' models; the strategy never sees one
client's weights. The outputs are the plain path's: the same round table (``server.rounds``), budget
handling and ``summary.json``, plus what ``summary.json`` records under ``aggregation``.

Per-client metrics (example count, training loss, cumulative epsilon) travel in the clear beside each
masked model, in the same reply: this module reads them from the replies themselves, so a client that
trained is reported even in a round that SecAgg+ halted (too few clients left to unmask the sum).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Context, Message
from flwr.common import Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAdam, FedAvg, Strategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from server.rounds import RoundBook
from server.strategy import RoundRecorder, client_ids
from shared import pipeline
from shared.config import check_combinations, clients_per_round
from shared.privacy import REFUSAL_CODES
from shared.setup import SECAGG_CLIPPED, encode_setup

logger = logging.getLogger("fedae.server")

# How long each protocol stage waits for replies: the message API's Strategy.start waits this long for a
# round's replies too. A client that does not answer in time counts as dropped out.
STAGE_TIMEOUT_S = 3600.0

NOT_HIDDEN = (
    "each client's per-round metrics (example count, training loss, cumulative epsilon, held-out loss and "
    "AUC, and how many of its weights the quantisation clipped) travel in the clear beside its masked "
    "model, as on the plain path; the server sees the aggregate model, and so does every client"
)


@dataclass
class SecureOutcome:
    stopped_early: str | None  # why the run ended before its last round, or None
    exhausted: list[int]  # client ids that ran out of privacy budget
    summary: dict[str, Any]  # summary.json's "aggregation"


class RoundWatch:
    """The grid as the SecAgg+ workflow sees it: nodes out of budget are gone, and every reply is read
    for the clients' metrics and refusals before the workflow gets it."""

    def __init__(self, grid: Grid, recorder: RoundRecorder) -> None:
        self._grid, self._recorder = grid, recorder
        self.exhausted: dict[int, str] = {}  # node id -> the client's reason
        self.clipped: dict[int, int] = defaultdict(int)  # round -> weights clipped, all clients
        self.errors: dict[int, int] = defaultdict(int)  # round -> error replies (dropouts, refusals)

    def get_node_ids(self) -> list[int]:
        # Flower's legacy client manager re-reads this before each sampling: exhausted nodes drop out.
        return [n for n in self._grid.get_node_ids() if n not in self.exhausted]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            server_round = int(reply.metadata.group_id or 0)
            if reply.has_error():
                self.errors[server_round] += 1
                if reply.error.code in REFUSAL_CODES:
                    self.exhausted[reply.metadata.src_node_id] = reply.error.reason
                    logger.warning(
                        "round %d: %s; excluded from later rounds", server_round, reply.error.reason
                    )
                continue
            records = reply.content.config_records
            if "fitres.metrics" in records:  # SecAgg+'s masked-vector stage: the client trained
                metrics = dict(records["fitres.metrics"])
                self.clipped[server_round] += int(metrics.pop(SECAGG_CLIPPED, 0))
                self._recorder.record(self._recorder.train, server_round, metrics)
                self._recorder.phase_ended["train"] = time.perf_counter()  # the last such reply counts
            elif "evaluateres.metrics" in records:
                self._recorder.phase_ended["evaluate"] = time.perf_counter()
                self._recorder.record(
                    self._recorder.evaluate, server_round, dict(records["evaluateres.metrics"])
                )
        return replies

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)


class SecureRounds:
    """Legacy strategy mixin: stops sampling when too few clients are left, and hands each round's global
    model to the round book once its held-out evaluation is in.

    Flower's legacy workflow evaluates centrally before it sends the round's evaluate messages (the message
    API does it after), so the round is held here until those replies are in, or no evaluation comes.
    """

    def __init__(self, *args: Any, setup: pipeline.RunSetup, book: RoundBook, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.setup, self.book = setup, book
        config = setup.config
        self.min_clients = min(config.min_available_clients, setup.num_clients)
        # Fewer than num-shares clients cannot share secrets among num-shares clients of the round.
        self.min_secure = max(self.min_clients, config.secagg_num_shares)
        self.dtypes = [w.dtype for w in book.best_weights]
        self.stopped_early: str | None = None
        self.aggregated: dict[int, int] = {}  # round -> clients in the unmasked sum
        self._held: tuple[int, list[np.ndarray], float] | None = None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, Any]]:
        self.flush()
        available = client_manager.num_available()
        if self.stopped_early is None and available < self.min_secure:
            self.stopped_early = (
                f"{available} client(s) with privacy budget left, fewer than the {self.min_secure} that "
                f"min-available-clients ({self.min_clients}) and secagg-num-shares "
                f"({self.setup.config.secagg_num_shares}) need; ending the run before round {server_round}"
            )
            logger.warning("%s", self.stopped_early)
        if self.stopped_early:
            return []  # SecAgg+ halts the round; the workflow runs out its remaining rounds idle
        return super().configure_fit(server_round, parameters, client_manager)  # type: ignore[misc]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, Any]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        # Every result carries the same unmasked weighted mean: FedAvg returns it, FedAdam steps to it.
        self.aggregated[server_round] = len(results)
        parameters, metrics = super().aggregate_fit(server_round, results, failures)  # type: ignore[misc]
        if parameters is None:
            return None, metrics
        # Dequantisation yields float64; keep the model's own dtypes for the clients and the bundle.
        weights = parameters_to_ndarrays(parameters)
        return ndarrays_to_parameters(
            [w.astype(d) for w, d in zip(weights, self.dtypes, strict=True)]
        ), metrics

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        if server_round == 0 or self.stopped_early:
            return None  # the initial model is no round; a stopped run trains nothing new
        weights = parameters_to_ndarrays(parameters)
        loss = pipeline.calibration_loss(self.setup, weights)
        self._held = (server_round, weights, loss)
        return loss, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, Any]]:
        instructions = []
        # Flower's legacy sampler would wait a day for nodes that will never come back: evaluate nobody.
        if self.stopped_early is None and client_manager.num_available() >= self.min_clients:
            instructions = super().configure_evaluate(server_round, parameters, client_manager)  # type: ignore[misc]
        if not instructions:
            self.flush()
        return instructions

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]) -> Any:
        outcome = super().aggregate_evaluate(server_round, results, failures)  # type: ignore[misc]
        self.flush()
        return outcome

    def flush(self) -> None:
        """Hand the held round to the book (its evaluate replies are in, or none will come)."""
        if self._held is not None:
            held, self._held = self._held, None
            self.book.close_round(*held)
            self.book.recorder.end_round(held[0])  # the next round's clock starts now


def _no_metrics(results: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    return {}  # RoundWatch reads each client's metrics from its reply; nothing to aggregate here


def build_secure_strategy(setup: pipeline.RunSetup, book: RoundBook) -> Strategy:
    """The legacy strategy under SecAgg+, with the plain path's sampling settings."""
    config = setup.config
    minimum = min(config.min_available_clients, setup.num_clients)
    setup_values = encode_setup(config, setup.spec, setup.scaler)
    common: dict[str, Any] = dict(
        fraction_fit=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_fit_clients=minimum,
        min_evaluate_clients=minimum if config.fraction_evaluate > 0 else 0,
        min_available_clients=minimum,
        on_fit_config_fn=lambda server_round: {**setup_values, "server-round": server_round},
        on_evaluate_config_fn=lambda server_round: dict(setup_values),
        initial_parameters=ndarrays_to_parameters(book.best_weights),
        fit_metrics_aggregation_fn=_no_metrics,
        evaluate_metrics_aggregation_fn=_no_metrics,
    )
    # fedprox aggregates as FedAvg does (its proximal term is the clients', read from the run config);
    # Flower's legacy FedProx would add a config key the clients' setup does not know.
    base, extra = FedAvg, {}
    if config.strategy == "fedadam":
        # tau as the message API's FedAdam (the plain path) has it; the legacy default is 1e-9.
        base, extra = (
            FedAdam,
            {"eta": config.server_learning_rate, "eta_l": config.learning_rate, "tau": 1e-3},
        )
    cls = type(f"Secure{base.__name__}", (SecureRounds, base), {})
    return cls(**common, **extra, setup=setup, book=book)


def secagg_workflow(config: Any) -> DefaultWorkflow:
    """Flower's legacy default workflow with SecAgg+ as its fit stage, from the run config."""
    return DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=config.secagg_num_shares,
            reconstruction_threshold=config.secagg_reconstruction_threshold,
            max_weight=config.secagg_max_weight,
            clipping_range=config.secagg_clipping_range,
            timeout=STAGE_TIMEOUT_S,
        )
    )


def run_secagg_rounds(
    grid: Grid, context: Context, setup: pipeline.RunSetup, book: RoundBook
) -> SecureOutcome:
    """Run every round under SecAgg+; the round table and best model end up in ``book``."""
    config = setup.config
    check_combinations(config, setup.num_clients)  # now with the number of clients the data has
    _warn_if_outside_range(book.best_weights, config.secagg_clipping_range)
    watch = RoundWatch(grid, book.recorder)
    strategy = build_secure_strategy(setup, book)
    workflow = secagg_workflow(config)
    logger.info(
        "secure aggregation: SecAgg+ over %d of %d clients per round, %d shares, reconstruction threshold %d",
        clients_per_round(config, setup.num_clients),
        setup.num_clients,
        config.secagg_num_shares,
        config.secagg_reconstruction_threshold,
    )
    legacy_context = LegacyContext(
        context=context, config=ServerConfig(num_rounds=config.num_server_rounds), strategy=strategy
    )
    book.recorder.end_round(0)  # round 1's clock starts with the workflow, as on the plain path
    workflow(watch, legacy_context)  # type: ignore[arg-type]
    strategy.flush()
    fit = workflow.fit_workflow
    rounds = sorted(set(book.recorder.train) | set(strategy.aggregated) | set(watch.errors))
    summary = {
        "secure_aggregation": "secagg+",
        "protocol": "SecAgg+ (Flower SecAggPlusWorkflow with secaggplus_mod)",
        "num_shares": config.secagg_num_shares,
        "reconstruction_threshold": config.secagg_reconstruction_threshold,
        "clipping_range": config.secagg_clipping_range,
        "max_weight": config.secagg_max_weight,
        "quantization_range": fit.quantization_range,
        "modulus_range": fit.modulus_range,
        "not_hidden": NOT_HIDDEN,
        "per_round": [
            {
                "round": r,
                # None: SecAgg+ halted the round (too few clients to unmask the sum); the model stayed.
                "clients_in_sum": strategy.aggregated.get(r),
                "error_replies": watch.errors.get(r, 0),
                "clipped_weights": watch.clipped.get(r, 0),
            }
            for r in rounds
            if r > 0
        ],
    }
    clipped = sum(watch.clipped.values())
    if clipped:
        logger.warning(
            "SecAgg+ clipped %d weight value(s) over the run (each client's weights times n/max-weight "
            "beyond +-%g); raise secagg-clipping-range",
            clipped,
            config.secagg_clipping_range,
        )
    return SecureOutcome(strategy.stopped_early, client_ids(watch.exhausted.values()), summary)


def _warn_if_outside_range(weights: list[np.ndarray], clipping_range: float) -> None:
    largest = max(float(np.max(np.abs(w))) for w in weights if w.size)
    if largest > clipping_range:
        logger.warning(
            "the initial model has weights up to %g, beyond secagg-clipping-range %g: SecAgg+ will clip them",
            largest,
            clipping_range,
        )
