"""The run's round table and best model, filled the same way by the plain and the SecAgg+ paths."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from server.strategy import RoundRecorder
from shared.config import FedaeConfig
from shared.pipeline import PrivacyRecord

logger = logging.getLogger("fedae.server")


@dataclass
class RoundBook:
    """Rows of ``summary.json``'s ``rounds``, the best round by calibration loss, and each client's latest
    cumulative epsilon, from what the recorder captured in each round."""

    config: FedaeConfig
    recorder: RoundRecorder
    best_weights: list[np.ndarray]
    best_loss: float = float("inf")
    best_round: int = 0
    rows: list[dict] = field(default_factory=list)
    latest_epsilon: dict[int, float] = field(default_factory=dict)

    def close_round(self, server_round: int, weights: list[np.ndarray], loss: float) -> None:
        """Record round ``server_round`` once its training and held-out evaluation are captured;
        ``loss`` is the calibration loss of its global model ``weights``."""
        if server_round == 0:
            return  # the initial model: no round to record
        config = self.config
        train = self.recorder.train.get(server_round, {})
        if not train:
            logger.warning("round %d/%d: no client trained", server_round, config.num_server_rounds)
            if not self.recorder.failed.get(server_round):
                # Every client refused (budget spent): no new model, nothing to record. A round whose
                # replies failed (data errors, nodes gone) is recorded, so the summary says who and why.
                return
        held_out = self.recorder.evaluate.get(server_round, {})
        self.latest_epsilon.update({cid: m["epsilon"] for cid, m in train.items() if "epsilon" in m})
        epsilons = list(self.latest_epsilon.values())
        rejected = self.recorder.rejected.get(server_round, {})
        withheld = self.recorder.withheld.get(server_round)
        norms = [m["update-norm"] for m in train.values() if "update-norm" in m]
        row = {
            "round": server_round,
            # Whose updates were aggregated; clients whose update was rejected trained (and spent
            # privacy) all the same, and are listed with the reason; failed replies name their node.
            "clients": []
            if withheld
            else self.recorder.aggregated.get(server_round, sorted(set(train) - set(rejected))),
            "trained": sorted(train),
            "not_aggregated": withheld,
            "rejected": {str(c): reason for c, reason in sorted(rejected.items())},
            "failed": list(self.recorder.failed.get(server_round, [])),
            "max_update_norm": max(norms) if norms else None,
            # Clients whose update clip-update-norm scaled down before aggregation.
            "clipped": sorted(self.recorder.clipped.get(server_round, [])),
            "train_loss": _weighted(train, "train-loss"),
            "eval_loss": _weighted(held_out, "eval-loss"),
            "calibration_loss": loss,
            "max_epsilon": max(epsilons) if epsilons else None,
            "timing_s": self.recorder.round_timing(server_round),
        }
        self.rows.append(row)
        logger.info(
            "round %d/%d: %d clients aggregated, train loss %.4f, held-out loss %.4f, calibration %.4f%s",
            server_round,
            config.num_server_rounds,
            len(row["clients"]),
            row["train_loss"],
            row["eval_loss"],
            loss,
            f", worst client's cumulative epsilon {row['max_epsilon']:.3f} (delta {config.delta:g})"
            if epsilons
            else ", no DP",
        )
        # Only a round that aggregated made a new model: a withheld or failed round's is the previous one
        # (round 1's would be the untrained initial model).
        if row["clients"] and math.isfinite(loss) and loss < self.best_loss:
            self.best_loss, self.best_round, self.best_weights = loss, server_round, weights

    def state(self) -> dict:
        """Everything but the weights, as JSON values, for the per-round checkpoint."""
        recorder = self.recorder
        return {
            "best_loss": self.best_loss,
            "best_round": self.best_round,
            "rows": self.rows,
            "latest_epsilon": _str_keys(self.latest_epsilon),
            "train": {str(r): _str_keys(clients) for r, clients in recorder.train.items()},
            "evaluate": {str(r): _str_keys(clients) for r, clients in recorder.evaluate.items()},
            "rejected": {str(r): _str_keys(clients) for r, clients in recorder.rejected.items()},
            "failed": {str(r): failures for r, failures in recorder.failed.items()},
            "withheld": _str_keys(recorder.withheld),
        }

    def restore(self, state: dict, best_weights: list[np.ndarray]) -> None:
        """Take up where a checkpointed run left off (``state`` from ``RoundBook.state``)."""
        recorder = self.recorder
        self.best_loss, self.best_round = float(state["best_loss"]), int(state["best_round"])
        self.best_weights, self.rows = best_weights, list(state["rows"])
        self.latest_epsilon = _int_keys(state["latest_epsilon"])
        for name in ("train", "evaluate", "rejected"):
            store = getattr(recorder, name)
            for server_round, clients in state[name].items():
                store[int(server_round)] = _int_keys(clients)
        for server_round, failures in state["failed"].items():
            recorder.failed[int(server_round)] = list(failures)
        recorder.withheld.update(_int_keys(state["withheld"]))

    def privacy_record(self) -> PrivacyRecord:
        """Each client's figures as it reported them, round by round; its latest epsilon is its
        cumulative one (later rounds overwrite earlier)."""
        record = PrivacyRecord()
        for server_round in sorted(self.recorder.train):
            for cid, metrics in self.recorder.train[server_round].items():
                record.per_client[cid] = metrics.get("epsilon")
                if "epsilon" in metrics:
                    record.per_client_rounds.setdefault(cid, {})[server_round] = metrics["epsilon"]
                if "noise-multiplier" in metrics:
                    record.per_client_sigma[cid] = metrics["noise-multiplier"]
        return record


def _str_keys(mapping: dict) -> dict:
    return {str(k): v for k, v in mapping.items()}


def _int_keys(mapping: dict) -> dict:
    return {int(k): v for k, v in mapping.items()}


def _weighted(per_client: dict[int, dict[str, float]], key: str) -> float:
    pairs = [(m[key], m["num-examples"]) for m in per_client.values() if key in m]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else float("nan")
