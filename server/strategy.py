"""Flower strategy from the config, and a recorder of what each client reported in each round."""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from server import client_dp
from shared.config import FedaeConfig, clients_per_round
from shared.privacy import REFUSAL_CODES
from shared.setup import UNIT_WEIGHT

logger = logging.getLogger("fedae.server")


@dataclass
class RoundRecorder:
    """Per-round, per-client metrics, captured as Flower aggregates them."""

    train: dict[int, dict[int, dict[str, float]]] = field(default_factory=lambda: defaultdict(dict))
    evaluate: dict[int, dict[int, dict[str, float]]] = field(default_factory=lambda: defaultdict(dict))
    # Flower calls evaluate_fn(r) at the end of round r (and r = 0 before training), so the
    # aggregations that follow belong to round r + 1.
    current_round: int = 1
    # When the current round began and when its train / evaluate replies were all in (perf_counter):
    # where a round's wall time goes, for summary.json and benchmarks/simulation_scale.py.
    round_started: float = field(default_factory=time.perf_counter)
    phase_ended: dict[str, float] = field(default_factory=dict)

    def _capture(
        self, store: dict[int, dict[int, dict[str, float]]], contents: list[RecordDict], weight_key: str
    ) -> MetricRecord:
        rows = []
        for content in contents:
            metrics = dict(content["metrics"])
            rows.append(metrics)
            self.record(store, self.current_round, metrics)
        total = sum(float(m[weight_key]) for m in rows) or 1.0
        summary: dict[str, float] = {}
        for key in {k for m in rows for k in m} - {
            "client-id",
            weight_key,
            "epsilon",
            "steps",
            "sampling-probability",
            "noise-multiplier",
            "fit-seconds",
            "handler-seconds",
            UNIT_WEIGHT,
        }:
            values = [(float(m[key]), float(m[weight_key])) for m in rows if key in m]
            summary[key] = sum(v * w for v, w in values) / (sum(w for _, w in values) or total)
        epsilons = [float(m["epsilon"]) for m in rows if "epsilon" in m]
        if epsilons:
            # The worst client's cumulative epsilon, never an average: averaging privacy loss is meaningless.
            summary["max-epsilon"] = max(epsilons)
        summary[weight_key] = total
        return MetricRecord(summary)

    @staticmethod
    def record(store: dict[int, dict[int, dict[str, float]]], server_round: int, metrics: dict) -> None:
        """Keep one client's reply (it names itself with ``client-id``) under ``server_round``."""
        store[server_round][int(metrics["client-id"])] = {k: float(v) for k, v in metrics.items()}

    def aggregate_train(self, contents: list[RecordDict], weight_key: str) -> MetricRecord:
        self.phase_ended["train"] = time.perf_counter()
        return self._capture(self.train, contents, weight_key)

    def aggregate_evaluate(self, contents: list[RecordDict], weight_key: str) -> MetricRecord:
        self.phase_ended["evaluate"] = time.perf_counter()
        return self._capture(self.evaluate, contents, weight_key)

    def round_timing(self, server_round: int) -> dict[str, float | None]:
        """Seconds of the round so far: whole, until all train replies, then evaluate, then the server's
        own work; and the clients' summed fit and handler times (one worker runs them one by one).

        Under SecAgg+ "train" ends with the last masked-vector reply, so the unmasking stage and the
        server's calibration loss fall in "evaluate" (the legacy workflow evaluates centrally first)."""
        now = time.perf_counter()
        train_end, eval_end = self.phase_ended.get("train"), self.phase_ended.get("evaluate")
        replies = self.train.get(server_round, {}).values()

        def total(key: str) -> float | None:
            values = [m[key] for m in replies if key in m]
            return round(sum(values), 4) if values else None

        def span(start: float | None, end: float | None) -> float | None:
            return round(end - start, 4) if start is not None and end is not None else None

        return {
            "round": span(self.round_started, now),
            "train": span(self.round_started, train_end),
            "evaluate": span(train_end, eval_end),
            "server": span(eval_end or train_end, now),
            "clients_fit_sum": total("fit-seconds"),
            "clients_handler_sum": total("handler-seconds"),
        }

    def end_round(self, server_round: int) -> None:
        self.current_round = server_round + 1
        self.round_started = time.perf_counter()
        self.phase_ended.clear()


def build_strategy(config: FedaeConfig, recorder: RoundRecorder, num_clients: int) -> Strategy:
    """The configured Flower strategy, extended to drop clients whose privacy budget is spent, and
    wrapped in Flower's client-level DP wrapper when ``client-dp`` is on."""
    minimum = min(config.min_available_clients, num_clients)
    if config.client_dp_enabled:
        # The noise is calibrated to a fixed number of clients per round: sample exactly that many.
        minimum = clients_per_round(config, num_clients)
    common = dict(
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=minimum,
        min_evaluate_nodes=minimum if config.fraction_evaluate > 0 else 0,
        min_available_nodes=minimum,
        train_metrics_aggr_fn=recorder.aggregate_train,
        evaluate_metrics_aggr_fn=recorder.aggregate_evaluate,
    )
    base, extra = FedAvg, {}
    if config.strategy == "fedadam":
        base, extra = FedAdam, {"eta": config.server_learning_rate, "eta_l": config.learning_rate}
    elif config.strategy == "fedprox":
        base, extra = FedProx, {"proximal_mu": config.proximal_mu}
    mixin = {"min_clients": minimum, "recorder": recorder}
    if not config.client_dp_enabled:
        cls = type(f"BudgetAware{base.__name__}", (ExcludeExhausted, base), mixin)
        return cls(**common, **extra)
    # Flower's accounted wrappers need the inner strategy's own FedAvg aggregation, equally weighted:
    # the budget filter goes around the wrapper instead, and every client reports weight 1. A fraction
    # this small makes Flower sample exactly min-train-nodes (= the m the noise is calibrated to),
    # however many nodes are connected.
    common["fraction_train"] = 1e-9
    inner = base(**common, **extra, weighted_by_key=UNIT_WEIGHT)
    wrapper = client_dp.wrapper_class(config)
    cls = type(f"BudgetAware{wrapper.__name__}", (ExcludeExhausted, wrapper), mixin)
    return cls(inner, **client_dp.wrapper_arguments(config, num_clients))


class TooFewClients(RuntimeError):
    """Fewer clients with privacy budget left than the run needs: it ends after the last full round."""


class _GridWithout:
    """A Flower Grid seen without some nodes: the strategy samples ``fraction-train`` of the rest."""

    def __init__(self, grid: Grid, excluded: set[int]) -> None:
        self._grid, self._excluded = grid, excluded

    def get_node_ids(self) -> list[int]:
        return [n for n in self._grid.get_node_ids() if n not in self._excluded]

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)


class ExcludeExhausted:
    """Strategy mixin: clients that replied "budget exhausted" get no further train or evaluate messages.

    Placed before a Flower strategy in the class bases, it filters the messages the strategy configures
    and reads the error replies before the strategy aggregates the rest.
    """

    min_clients: int = 1
    recorder: RoundRecorder | None = None

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.exhausted: dict[int, str] = {}  # node id -> the client's reason

    def _open(self, messages: Iterable[Message]) -> list[Message]:
        return [m for m in messages if m.metadata.dst_node_id not in self.exhausted]

    def _grid(self, grid: Grid) -> Grid:
        """The grid as the strategy should see it: nodes out of budget are not there to be sampled."""
        return _GridWithout(grid, set(self.exhausted))  # type: ignore[return-value]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        remaining = [n for n in grid.get_node_ids() if n not in self.exhausted]
        if len(remaining) < self.min_clients:
            raise TooFewClients(
                f"{len(remaining)} client(s) with privacy budget left, fewer than "
                f"min-available-clients {self.min_clients}; ending the run before round "
                f"{server_round}"
            )
        return self._open(super().configure_train(server_round, arrays, config, self._grid(grid)))  # type: ignore[misc]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        open_grid = self._grid(grid)
        if len(open_grid.get_node_ids()) < self.min_clients:
            # Flower's sampler would wait for nodes that will never come back; evaluate nobody instead.
            return []
        return self._open(super().configure_evaluate(server_round, arrays, config, open_grid))  # type: ignore[misc]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[object, object]:
        replies = list(replies)
        for reply in replies:
            if reply.has_error() and reply.error.code in REFUSAL_CODES:
                self.exhausted[reply.metadata.src_node_id] = reply.error.reason
                logger.warning("round %d: %s; excluded from later rounds", server_round, reply.error.reason)
            elif not reply.has_error() and self.recorder is not None:
                # Record who trained (and spent privacy) even when the strategy then declines to
                # aggregate: Flower's DP wrappers skip a round with any error reply, metrics included.
                self.recorder.record(self.recorder.train, server_round, dict(reply.content["metrics"]))
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]

    def exhausted_clients(self) -> list[int]:
        """Client ids (from the clients' own messages) that ran out of budget."""
        return client_ids(self.exhausted.values())


def client_ids(reasons: Iterable[str]) -> list[int]:
    """The client ids that "budget exhausted" replies name (``client-id=N``), sorted."""
    ids = [re.search(r"client-id=(\d+)", reason) for reason in reasons]
    return sorted(int(m.group(1)) for m in ids if m)
