"""Flower strategy from the config, and a recorder of what each client reported in each round."""

from __future__ import annotations

import logging
import math
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from server import client_dp
from shared.config import FedaeConfig, clients_per_round, rule_minimum
from shared.privacy import REFUSAL_CODES
from shared.setup import UNIT_WEIGHT
from shared.updates import check_update, clip_update

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
    # Per round: client id -> why its update was not aggregated (it trained and spent privacy all the
    # same); and the train messages that came back as errors: {"node", "client", "code", "reason"}.
    rejected: dict[int, dict[int, str]] = field(default_factory=lambda: defaultdict(dict))
    failed: dict[int, list[dict]] = field(default_factory=lambda: defaultdict(list))
    withheld: dict[int, str] = field(default_factory=dict)  # round -> why nothing was aggregated
    clipped: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))  # clip-update-norm
    aggregated: dict[int, list[int]] = field(default_factory=dict)  # round -> the clients the rule used

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
            "update-norm",
            UNIT_WEIGHT,
        }:
            # Non-finite values mean "not measured here" (a client without labels sends auc NaN).
            values = [
                (float(m[key]), float(m[weight_key])) for m in rows if key in m and math.isfinite(m[key])
            ]
            if values:
                summary[key] = sum(v * w for v, w in values) / (sum(w for _, w in values) or total)
        epsilons = [float(m["epsilon"]) for m in rows if "epsilon" in m]
        if epsilons:
            # The worst client's cumulative epsilon, never an average: averaging privacy loss is meaningless.
            summary["max-epsilon"] = max(epsilons)
        summary[weight_key] = total
        return MetricRecord(summary)

    @staticmethod
    def record(store: dict[int, dict[int, dict[str, float]]], server_round: int, metrics: dict) -> None:
        """Keep one client's reply (it names itself with ``client-id``) under ``server_round``, beside what
        the server added to it (its update's norm)."""
        kept = store[server_round].setdefault(int(metrics["client-id"]), {})
        kept.update({k: float(v) for k, v in metrics.items()})

    def aggregate_train(self, contents: list[RecordDict], weight_key: str) -> MetricRecord:
        self.phase_ended["train"] = time.perf_counter()
        # Flower's Krum, MultiKrum and Bulyan pass only the updates they selected: whose were aggregated.
        self.aggregated[self.current_round] = sorted(int(c["metrics"]["client-id"]) for c in contents)
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


def _base_strategy(config: FedaeConfig, sampled: int) -> tuple[type[Strategy], dict[str, object]]:
    """Flower's strategy class for ``strategy`` and its own arguments; ``sampled``: clients per round."""
    f = config.num_malicious_nodes
    return {
        "fedavg": (FedAvg, {}),
        "fedadam": (FedAdam, {"eta": config.server_learning_rate, "eta_l": config.learning_rate}),
        "fedprox": (FedProx, {"proximal_mu": config.proximal_mu}),
        "fedmedian": (FedMedian, {}),
        "fedtrimmedavg": (FedTrimmedAvg, {"beta": config.trim_beta}),
        "krum": (Krum, {"num_malicious_nodes": f}),
        "multikrum": (
            MultiKrum,
            {"num_malicious_nodes": f, "num_nodes_to_select": config.multikrum_select or sampled - f},
        ),
        "bulyan": (Bulyan, {"num_malicious_nodes": f}),
    }[config.strategy]


def build_strategy(
    config: FedaeConfig, recorder: RoundRecorder, num_clients: int, mixins: tuple[type, ...] = ()
) -> Strategy:
    """The configured Flower strategy, extended to drop clients whose privacy budget is spent, and
    wrapped in Flower's client-level DP wrapper when ``client-dp`` is on. ``mixins`` go first in the
    class's bases: a simulation's colluding adversary (``simulations/adversary.py``) sees the replies
    before the server's checks do, as it would on the wire."""
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
    base, extra = _base_strategy(config, clients_per_round(config, num_clients))
    mixin = {
        "min_clients": minimum,
        "recorder": recorder,
        "max_update_norm": config.max_update_norm,
        "clip_update_norm": config.clip_update_norm,
        "all_or_nothing": config.client_dp_enabled,
        "rule_name": config.strategy,
        "rule_minimum": rule_minimum(config),
    }
    if not config.client_dp_enabled:
        cls = type(f"BudgetAware{base.__name__}", (*mixins, RoundGuard, base), mixin)
        return cls(**common, **extra)
    # Flower's accounted wrappers need the inner strategy's own FedAvg aggregation, equally weighted:
    # the budget filter goes around the wrapper instead, and every client reports weight 1. A fraction
    # this small makes Flower sample exactly min-train-nodes (= the m the noise is calibrated to),
    # however many nodes are connected.
    common["fraction_train"] = 1e-9
    inner = base(**common, **extra, weighted_by_key=UNIT_WEIGHT)
    wrapper = client_dp.wrapper_class(config)
    cls = type(f"BudgetAware{wrapper.__name__}", (*mixins, RoundGuard, wrapper), mixin)
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


class RoundGuard:
    """Strategy mixin that guards each round: clients that replied "budget exhausted" get no further
    train or evaluate messages; every returned model is checked (``shared.updates``) and a bad one is
    left out of the aggregate; failed replies (a site's data error, a node that went away) are logged
    with the client they were for.

    Placed before a Flower strategy in the class bases, it filters the messages the strategy configures
    and reads the replies before the strategy aggregates the rest.
    """

    min_clients: int = 1
    recorder: RoundRecorder | None = None
    max_update_norm: float = 0.0
    clip_update_norm: float = 0.0  # norm bounding: longer updates are scaled down to this, 0: off
    # The aggregation rule's name and the fewest accepted updates it is defined for (Krum: 2f + 3,
    # Bulyan: 4f + 3; others: 1).
    rule_name: str = "fedavg"
    rule_minimum: int = 1
    # Client-level DP calibrates its noise to every sampled client's update: with one left out the
    # round's release would not have the stated guarantee, so nothing is aggregated (as Flower's DP
    # wrappers do with an error reply).
    all_or_nothing: bool = False
    # Rounds completed before this start (a resumed run, server/resume.py): Flower's Strategy.start counts
    # from 1, and each round must keep its number (clients charge their ledgers per run and round).
    round_offset: int = 0
    # Called right after each client-level DP release, before the released model leaves the server: the
    # run keeps the accountant's state durable then (server/resume.py), not only at the round's end.
    on_release: Callable[[], None] | None = None
    # Rounds in a row that may aggregate nothing (every update rejected or failed) before the run stops:
    # each such round still costs the clients that trained their privacy, for a model that stays put.
    max_withheld_in_a_row: int = 3

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self.exhausted: dict[int, str] = {}  # node id -> the client's reason
        self._sent_arrays: list[np.ndarray] = []
        # This round's train messages: their ids name the node a SuperLink-made error reply was for.
        self._sent: list[Message] = []
        self._node_client: dict[int, int] = {}  # node id -> the client id it last replied as
        self._round_clients: dict[int, int] = {}  # client id -> the node that replied as it this round
        self.previously_exhausted: list[int] = []  # client ids, from before a resume (node ids change)
        self._withheld_in_a_row: list[str] = []

    def _open(self, messages: Iterable[Message]) -> list[Message]:
        return [m for m in messages if m.metadata.dst_node_id not in self.exhausted]

    def _grid(self, grid: Grid) -> Grid:
        """The grid as the strategy should see it: nodes out of budget are not there to be sampled."""
        return _GridWithout(grid, set(self.exhausted))  # type: ignore[return-value]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        if len(self._withheld_in_a_row) >= self.max_withheld_in_a_row:
            raise TooFewClients(
                f"the last {len(self._withheld_in_a_row)} rounds aggregated nothing "
                f"({self._withheld_in_a_row[-1]}); ending the run before round {server_round} rather than "
                "charge the clients' privacy for rounds that cannot change the model"
            )
        remaining = [n for n in grid.get_node_ids() if n not in self.exhausted]
        # Only a spent budget ends the run: with every client still in budget, fewer connected nodes
        # than the minimum means sites have not joined yet, and Flower's sampler waits for them.
        if self.exhausted and len(remaining) < self.min_clients:
            raise TooFewClients(
                f"{len(remaining)} client(s) with privacy budget left, fewer than "
                f"min-available-clients {self.min_clients}; ending the run before round "
                f"{server_round}"
            )
        self._sent_arrays = arrays.to_numpy_ndarrays()
        self._round_clients = {}
        self._sent = self._open(super().configure_train(server_round, arrays, config, self._grid(grid)))  # type: ignore[misc]
        return self._sent

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        open_grid = self._grid(grid)
        if len(open_grid.get_node_ids()) < self.min_clients:
            # Flower's sampler would wait for nodes that will never come back; evaluate nobody instead.
            return []
        return self._open(super().configure_evaluate(server_round, arrays, config, open_grid))  # type: ignore[misc]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> object:
        return super().aggregate_evaluate(server_round + self.round_offset, replies)  # type: ignore[misc]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[object, object]:
        server_round += self.round_offset
        kept, rejected = [], 0
        for reply in replies:
            if reply.has_error():
                self._note_error(server_round, reply)
                kept.append(reply)  # Flower's strategies skip error replies (its DP wrappers the round)
            elif self._accept(server_round, reply):
                kept.append(reply)
            else:
                rejected += 1
        accepted = sum(not reply.has_error() for reply in kept)
        withheld = None
        if rejected and self.all_or_nothing:
            withheld = (
                f"{rejected} update(s) rejected; client-level DP needs every sampled client's update, so "
                "the round's aggregate is not released"
            )
        elif accepted < self.min_clients:
            withheld = f"{accepted} update(s) accepted, fewer than min-available-clients {self.min_clients}"
        elif accepted < self.rule_minimum:
            # Krum's scores and Bulyan's selection assume this many updates (shared.config._robust_rule
            # checks the sample at start; failures, rejections and spent budgets can shrink a round).
            withheld = (
                f"{accepted} update(s) accepted, fewer than the {self.rule_minimum} that "
                f"strategy {self.rule_name} needs"
            )
        if withheld is not None:
            logger.warning("round %d: %s; the global model stays as it was", server_round, withheld)
            if self.recorder is not None:
                self.recorder.withheld[server_round] = withheld
            self._withheld_in_a_row.append(withheld)
            return None, None
        arrays, metrics = super().aggregate_train(server_round, kept)  # type: ignore[misc]
        if arrays is None:
            # Flower's DP wrappers release nothing from a round with an error reply; its robust rules
            # aggregate nothing from too few replies.
            reason = (
                "an error reply voided the client-level DP release"
                if self.all_or_nothing
                else f"{self.rule_name} aggregated nothing from {accepted} update(s)"
            )
            logger.warning("round %d: %s; the global model stays as it was", server_round, reason)
            if self.recorder is not None:
                self.recorder.withheld[server_round] = reason
            self._withheld_in_a_row.append(reason)
            return None, metrics
        self._withheld_in_a_row.clear()
        if self.on_release is not None and getattr(self, "accountant", None) is not None:
            self.on_release()
        return _like(arrays, self._sent_arrays), metrics

    def _note_error(self, server_round: int, reply: Message) -> None:
        node = self._destination(reply)
        reason = reply.error.reason
        if reply.error.code in REFUSAL_CODES:
            self.exhausted[node] = reason
            logger.warning("round %d: %s; excluded from later rounds", server_round, reason)
            return
        self._failed(server_round, node, int(reply.error.code), reason)

    def _failed(self, server_round: int, node: int, code: int, reason: str) -> None:
        """Log and record a reply that brought no update, with the client the node last replied as."""
        client = self._node_client.get(node)
        who = f"client {client} (node {node})" if client is not None else f"node {node}"
        logger.warning("round %d: %s failed, error %s: %s", server_round, who, code, reason)
        if self.recorder is not None:
            self.recorder.failed[server_round].append(
                {"node": node, "client": client, "code": code, "reason": reason}
            )

    def _destination(self, reply: Message) -> int:
        """The node a reply answers for: Flower's own error replies (node unavailable) come from the
        SuperLink, so the node is found through the message they answer."""
        for sent in self._sent:
            if sent.metadata.message_id == reply.metadata.reply_to_message_id:
                return int(sent.metadata.dst_node_id)
        return int(reply.metadata.src_node_id)

    def _accept(self, server_round: int, reply: Message) -> bool:
        """Record who trained (and spent privacy) even when its update is then left out, or when the
        strategy declines to aggregate: Flower's DP wrappers skip a round with any error reply."""
        node = int(reply.metadata.src_node_id)
        try:
            metrics = dict(reply.content["metrics"])
            client = int(metrics["client-id"])
            returned = reply.content["arrays"].to_numpy_ndarrays()
        except (KeyError, TypeError, ValueError) as err:
            self._failed(server_round, node, 0, f"malformed reply (no model, metrics or client-id: {err!r})")
            return False
        other = self._round_clients.setdefault(client, node)
        if other != node:
            # Two sites configured with one --id: the records are keyed by client id, so the second
            # reply is left out (not recorded) until the operator gives each site its own id.
            reason = f"client-id {client} already replied from node {other} this round"
            self._failed(server_round, node, 0, reason)
            return False
        self._node_client[node] = client
        check = check_update(self._sent_arrays, returned, self.max_update_norm)
        if check.norm is not None:
            metrics["update-norm"] = check.norm
        if self.recorder is not None:
            self.recorder.record(self.recorder.train, server_round, metrics)
        if check.accepted:
            if self.clip_update_norm > 0 and check.norm is not None and check.norm > self.clip_update_norm:
                clipped = clip_update(self._sent_arrays, returned, check.norm, self.clip_update_norm)
                reply.content["arrays"] = with_keys_of(reply.content["arrays"], clipped)
                if self.recorder is not None:
                    self.recorder.clipped[server_round].append(client)
            return True
        logger.warning(
            "round %d: client %d's update rejected (node %d): %s",
            server_round,
            client,
            reply.metadata.src_node_id,
            check.reason,
        )
        if self.recorder is not None:
            self.recorder.rejected[server_round][client] = str(check.reason)
        return False

    def exhausted_clients(self) -> list[int]:
        """Client ids (from the clients' own messages) that ran out of budget, before a resume too."""
        return sorted(set(client_ids(self.exhausted.values())) | set(self.previously_exhausted))


def _like(arrays: ArrayRecord, sent: list[np.ndarray]) -> ArrayRecord:
    """The aggregate in the dtypes of the model that was sent: a server optimiser's float64 step (FedAdam)
    must not turn the global model into float64, which every float32 client update would then fail."""
    return ArrayRecord(
        {
            key: Array(np.asarray(a.numpy(), dtype=ref.dtype))
            for (key, a), ref in zip(arrays.items(), sent, strict=True)
        }
    )


def with_keys_of(record: ArrayRecord, arrays: list[np.ndarray]) -> ArrayRecord:
    """``arrays`` under ``record``'s keys, in its order."""
    return ArrayRecord({key: Array(a) for key, a in zip(record.keys(), arrays, strict=True)})


def client_ids(reasons: Iterable[str]) -> list[int]:
    """The client ids that "budget exhausted" replies name (``client-id=N``), sorted."""
    ids = [re.search(r"client-id=(\d+)", reason) for reason in reasons]
    return sorted(int(m.group(1)) for m in ids if m)
