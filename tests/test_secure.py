"""SecAgg+ glue: Flower's real protocol between the server workflow and client mod, run in one process.

The clients here return known weights instead of training, so the unmasked aggregate can be compared with
the weighted mean it should be; the end-to-end run with DP-SGD is in ``test_simulation.py``.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

from client.secure import clipped_count, fit_reply, read_instructions, secaggplus_when_asked
from server.secure import RoundWatch, secagg_workflow
from server.strategy import RoundRecorder
from shared.config import FedaeConfig
from shared.privacy import BUDGET_EXHAUSTED
from shared.setup import SECAGG_CLIPPED

NODES = {101: 0, 202: 1, 303: 2}  # node id -> client id


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """Messages take their run and sender from the process's task identity, which a SuperLink sets."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class InProcessGrid:
    """Delivers each message to a ClientApp in this process, each node with its own context, as a
    SuperNode would (a copy per recipient: the protocol mutates the records it receives)."""

    def __init__(self, app: ClientApp) -> None:
        self.app = app
        self.run = SimpleNamespace(run_id=1)
        self.contexts = {
            nid: Context(
                run_id=1, node_id=nid, node_config={"partition-id": cid}, state=RecordDict(), run_config={}
            )
            for nid, cid in NODES.items()
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        return [
            self.app(copy.deepcopy(msg), self.contexts[msg.metadata.dst_node_id]) for msg in list(messages)
        ]


def client_app(weights: dict[int, list[np.ndarray]], sizes: dict[int, int], refuse: set[int]) -> ClientApp:
    app = ClientApp()

    @app.train(mods=[secaggplus_when_asked])
    def train(msg: Message, context: Context) -> Message:
        cid = int(context.node_config["partition-id"])
        received, config = read_instructions(msg)
        assert config["server-round"] == 1 and len(received) == len(weights[cid])
        if cid in refuse:
            reason = f"client-id={cid}: privacy budget exhausted"
            return Message(error=Error(code=BUDGET_EXHAUSTED, reason=reason), reply_to=msg)
        metrics = {"client-id": cid, "num-examples": sizes[cid], "epsilon": 1.0 + cid, SECAGG_CLIPPED: 0}
        return Message(content=fit_reply(weights[cid], sizes[cid], metrics), reply_to=msg)

    return app


def run_one_secure_round(
    weights: dict[int, list[np.ndarray]], sizes: dict[int, int], refuse: set[int] = frozenset()
) -> tuple[list[np.ndarray], RoundWatch]:
    config = FedaeConfig(secure_aggregation="secagg+", num_clients=3)
    grid = InProcessGrid(client_app(weights, sizes, set(refuse)))
    watch = RoundWatch(grid, RoundRecorder())  # type: ignore[arg-type]
    strategy = FedAvg(
        fraction_evaluate=0.0,
        min_fit_clients=3,
        min_available_clients=3,
        on_fit_config_fn=lambda server_round: {"server-round": server_round},
        initial_parameters=ndarrays_to_parameters([np.zeros_like(w) for w in weights[0]]),
        fit_metrics_aggregation_fn=lambda results: {},
    )
    context = LegacyContext(
        context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
    )
    secagg_workflow(config)(watch, context)  # type: ignore[arg-type]
    record = context.state.array_records[MAIN_PARAMS_RECORD]
    return parameters_to_ndarrays(compat.arrayrecord_to_parameters(record, keep_input=True)), watch


def weighted_mean(weights: dict[int, list[np.ndarray]], sizes: dict[int, int], clients) -> list[np.ndarray]:
    total = sum(sizes[c] for c in clients)
    return [sum(weights[c][i] * sizes[c] for c in clients) / total for i in range(len(weights[0]))]


def quantisation_tolerance(sizes: dict[int, int], clients) -> float:
    config = FedaeConfig()  # the defaults run_one_secure_round uses
    # Each client's weighted weights (w * n / max-weight) are rounded to a grid of step
    # 2 * clipping-range / 2**22; the sum of those errors is divided by the sum of the weights.
    step = 2 * config.secagg_clipping_range / 2**22
    return len(clients) * step / sum(sizes[c] / config.secagg_max_weight for c in clients)


@pytest.fixture
def known_updates(rng) -> tuple[dict[int, list[np.ndarray]], dict[int, int]]:
    shapes = [(6, 4), (4,), (4, 6), (6,)]
    weights = {c: [rng.uniform(-1, 1, size=s).astype(np.float32) for s in shapes] for c in NODES.values()}
    return weights, {0: 40, 1: 100, 2: 160}


def test_secagg_aggregate_is_the_weighted_mean_within_quantisation(known_updates) -> None:
    # Prepare
    weights, sizes = known_updates

    # Execute
    aggregate, watch = run_one_secure_round(weights, sizes)

    # Assert
    expected = weighted_mean(weights, sizes, [0, 1, 2])
    tolerance = quantisation_tolerance(sizes, [0, 1, 2])
    for got, want in zip(aggregate, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance)
    assert tolerance < 1e-3  # far below the weights themselves (uniform in [-1, 1])
    # The clients' metrics came in the clear with the masked vectors: the epsilon figure is theirs.
    assert {cid: m["epsilon"] for cid, m in watch._recorder.train[1].items()} == {0: 1.0, 1: 2.0, 2: 3.0}
    assert not watch.exhausted and not watch.errors


def test_a_client_out_of_budget_drops_out_and_the_others_are_still_averaged(known_updates) -> None:
    weights, sizes = known_updates

    aggregate, watch = run_one_secure_round(weights, sizes, refuse={2})

    # SecAgg+ removed the refusing client's masks with its neighbours' shares; its update is not in the sum.
    expected = weighted_mean(weights, sizes, [0, 1])
    for got, want in zip(aggregate, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=quantisation_tolerance(sizes, [0, 1]))
    assert list(watch.exhausted) == [303] and "client-id=2" in watch.exhausted[303]
    assert set(watch._recorder.train[1]) == {0, 1}
    assert 303 not in watch.get_node_ids()  # not sampled again


def test_plain_messages_pass_through_the_mod_untouched() -> None:
    calls = []

    def handler(msg: Message, context: Context) -> Message:
        calls.append(msg)
        return Message(content=RecordDict(), reply_to=msg)

    msg = Message(content=RecordDict(), dst_node_id=1, message_type="train")
    secaggplus_when_asked(msg, Context(1, 1, {}, RecordDict(), {}), handler)
    assert calls == [msg]


def test_clipped_count_applies_the_weighting_before_the_range() -> None:
    config = FedaeConfig(secagg_clipping_range=1.0, secagg_max_weight=100.0)
    weights = [np.array([0.5, 1.5, -3.0], dtype=np.float32)]
    assert clipped_count(weights, 100, config) == 2  # scale 1: 1.5 and -3.0 are outside [-1, 1]
    assert clipped_count(weights, 50, config) == 1  # scale 0.5: only -3.0 (-1.5) is


def test_a_simulation_refuses_clients_with_more_rows_than_secagg_max_weight() -> None:
    from shared.config import ConfigError
    from simulations import scenarios
    from simulations.runner import validate_inputs

    base = FedaeConfig().with_overrides(scenarios.overrides("wdbc"))
    config = base.replace(num_clients=3, secure_aggregation="secagg+", secagg_max_weight=10.0)
    with pytest.raises(ConfigError, match=r"client 0 has \d+ training rows, more than secagg-max-weight 10"):
        validate_inputs(config)
    assert validate_inputs(config.replace(secagg_max_weight=1000.0)) == 3
