"""Flower strategy from the config, and a recorder of what each client reported in each round."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from shared.config import FedaeConfig

logger = logging.getLogger("fedae.server")


@dataclass
class RoundRecorder:
    """Per-round, per-client metrics, captured as Flower aggregates them."""

    train: dict[int, dict[int, dict[str, float]]] = field(default_factory=lambda: defaultdict(dict))
    evaluate: dict[int, dict[int, dict[str, float]]] = field(default_factory=lambda: defaultdict(dict))
    # Flower calls evaluate_fn(r) at the end of round r (and r = 0 before training), so the
    # aggregations that follow belong to round r + 1.
    current_round: int = 1

    def _capture(
        self, store: dict[int, dict[int, dict[str, float]]], contents: list[RecordDict], weight_key: str
    ) -> MetricRecord:
        rows = []
        for content in contents:
            metrics = dict(content["metrics"])
            rows.append(metrics)
            store[self.current_round][int(metrics["client-id"])] = {k: float(v) for k, v in metrics.items()}
        total = sum(float(m[weight_key]) for m in rows) or 1.0
        summary: dict[str, float] = {}
        for key in {k for m in rows for k in m} - {
            "client-id",
            weight_key,
            "epsilon",
            "steps",
            "sampling-probability",
        }:
            values = [(float(m[key]), float(m[weight_key])) for m in rows if key in m]
            summary[key] = sum(v * w for v, w in values) / (sum(w for _, w in values) or total)
        epsilons = [float(m["epsilon"]) for m in rows if "epsilon" in m]
        if epsilons:
            # The worst client's cumulative epsilon, never an average: averaging privacy loss is meaningless.
            summary["max-epsilon"] = max(epsilons)
        summary[weight_key] = total
        return MetricRecord(summary)

    def aggregate_train(self, contents: list[RecordDict], weight_key: str) -> MetricRecord:
        return self._capture(self.train, contents, weight_key)

    def aggregate_evaluate(self, contents: list[RecordDict], weight_key: str) -> MetricRecord:
        return self._capture(self.evaluate, contents, weight_key)

    def end_round(self, server_round: int) -> None:
        self.current_round = server_round + 1


def build_strategy(config: FedaeConfig, recorder: RoundRecorder, num_clients: int) -> Strategy:
    minimum = min(config.min_available_clients, num_clients)
    common = dict(
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=minimum,
        min_evaluate_nodes=minimum if config.fraction_evaluate > 0 else 0,
        min_available_nodes=minimum,
        train_metrics_aggr_fn=recorder.aggregate_train,
        evaluate_metrics_aggr_fn=recorder.aggregate_evaluate,
    )
    if config.strategy == "fedadam":
        return FedAdam(**common, eta=config.server_learning_rate, eta_l=config.learning_rate)
    if config.strategy == "fedprox":
        return FedProx(**common, proximal_mu=config.proximal_mu)
    return FedAvg(**common)
