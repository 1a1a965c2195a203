"""The server's checks on each returned model, alone and inside the strategy that aggregates."""

from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from server.strategy import RoundRecorder, build_strategy
from shared.config import FedaeConfig
from shared.updates import check_update

GLOBAL = [np.ones((3, 2), np.float32), np.zeros(2, np.float32)]


def _moved(delta: float) -> list[np.ndarray]:
    return [w + np.float32(delta) for w in GLOBAL]


def test_an_honest_update_is_accepted_with_its_exact_norm() -> None:
    check = check_update(GLOBAL, _moved(0.5), max_norm=10.0)
    assert check.accepted
    assert check.norm == pytest.approx(0.5 * np.sqrt(8))  # 8 weights, each moved by 0.5


@pytest.mark.parametrize(
    ("update", "needle"),
    [
        ([GLOBAL[0]], "1 weight arrays, the model has 2"),
        ([GLOBAL[0], np.zeros(3, np.float32)], "array 1 has shape (3,), the model's is (2,)"),
        ([GLOBAL[0], np.zeros(2, np.float64)], "array 1 has dtype float64"),
        ([GLOBAL[0], np.array([0.0, np.nan], np.float32)], "array 1 holds 1 non-finite value(s)"),
        ([np.full((3, 2), np.inf, np.float32), GLOBAL[1]], "array 0 holds 6 non-finite value(s)"),
        (_moved(5.0), "update norm 14.14 is above max-update-norm 10"),
    ],
)
def test_a_bad_update_is_rejected_with_the_reason(update: list[np.ndarray], needle: str) -> None:
    check = check_update(GLOBAL, update, max_norm=10.0)
    assert not check.accepted
    assert needle in str(check.reason)


def test_no_bound_still_refuses_non_finite_values() -> None:
    assert check_update(GLOBAL, _moved(1e6), max_norm=0.0).accepted
    assert not check_update(GLOBAL, [GLOBAL[0], np.array([np.nan, 0], np.float32)], 0.0).accepted


class _Reply:
    """The parts of a Flower reply the guard reads: who sent it, what it answers, arrays and metrics."""

    def __init__(self, node: int, weights=None, client: int | None = None, code: int | None = None) -> None:
        self.metadata = SimpleNamespace(src_node_id=node, reply_to_message_id=f"msg-{node}")
        self.error = SimpleNamespace(code=code, reason="site 'b': data.csv: file does not exist")
        self.content = None
        if weights is not None:
            metrics = {"client-id": client, "num-examples": 100, "train-loss": 0.1}
            self.content = RecordDict({"arrays": ArrayRecord(weights), "metrics": MetricRecord(metrics)})

    def has_error(self) -> bool:
        return self.error.code is not None


def _guarded(max_update_norm: float = 10.0, min_clients: int = 2) -> tuple[object, RoundRecorder]:
    recorder = RoundRecorder()
    config = FedaeConfig(max_update_norm=max_update_norm, min_available_clients=min_clients)
    strategy = build_strategy(config, recorder, 5)
    strategy._sent_arrays = GLOBAL  # as configure_train leaves it
    return strategy, recorder


def test_the_aggregate_leaves_out_rejected_updates_and_names_their_clients() -> None:
    strategy, recorder = _guarded()
    nan = [GLOBAL[0], np.array([np.nan, 0], np.float32)]
    replies = [
        _Reply(10, _moved(0.1), client=0),
        _Reply(11, _moved(0.3), client=1),
        _Reply(12, nan, client=2),
        _Reply(13, [GLOBAL[0]], client=3),
        _Reply(14, _moved(100.0), client=4),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    mean = arrays.to_numpy_ndarrays()
    np.testing.assert_allclose(mean[0], GLOBAL[0] + 0.2, rtol=1e-6)  # clients 0 and 1 only
    assert sorted(recorder.rejected[1]) == [2, 3, 4]
    assert "non-finite" in recorder.rejected[1][2] and "max-update-norm" in recorder.rejected[1][4]
    # Rejected clients trained and spent privacy: they stay on record, with their update's norm.
    assert sorted(recorder.train[1]) == [0, 1, 2, 3, 4]
    assert recorder.train[1][4]["update-norm"] == pytest.approx(100.0 * np.sqrt(8), rel=1e-6)


def test_fewer_accepted_updates_than_the_minimum_leave_the_model_as_it_was() -> None:
    strategy, recorder = _guarded(min_clients=2)
    arrays, _ = strategy.aggregate_train(1, [_Reply(10, _moved(0.1), 0), _Reply(11, _moved(50.0), 1)])
    assert arrays is None
    assert "1 update(s) accepted, fewer than min-available-clients 2" in recorder.withheld[1]


def test_a_failed_reply_is_logged_with_its_node_and_client() -> None:
    strategy, recorder = _guarded()
    strategy.aggregate_train(1, [_Reply(10, _moved(0.1), 0), _Reply(11, _moved(0.1), 1)])
    # Round 2: node 11 answers with its data error; a node the SuperLink reports unavailable is named
    # through the message its error answers.
    strategy._sent = [SimpleNamespace(metadata=SimpleNamespace(message_id="msg-10", dst_node_id=10))]
    unavailable = _Reply(0, code=3)  # from the SuperLink itself (node id 0)
    unavailable.metadata.reply_to_message_id = "msg-10"
    strategy.aggregate_train(2, [_Reply(11, code=4210), unavailable, _Reply(12, _moved(0.1), 2)])
    failed = recorder.failed[2]
    assert [(f["node"], f["client"], f["code"]) for f in failed] == [(11, 1, 4210), (10, 0, 3)]
    assert "file does not exist" in failed[0]["reason"]


def test_a_malformed_reply_is_rejected_not_raised() -> None:
    strategy, recorder = _guarded(min_clients=1)
    broken = _Reply(12, _moved(0.1), client=2)
    del broken.content["arrays"]
    arrays, _ = strategy.aggregate_train(1, [_Reply(10, _moved(0.1), 0), broken])
    assert arrays is not None  # client 0's update, alone
    assert recorder.failed[1][0]["node"] == 12 and "malformed reply" in recorder.failed[1][0]["reason"]


def test_a_client_id_used_by_two_nodes_in_one_round_is_rejected_the_second_time() -> None:
    strategy, recorder = _guarded(min_clients=1)
    strategy.aggregate_train(1, [_Reply(10, _moved(0.1), client=0), _Reply(11, _moved(0.1), client=0)])
    assert recorder.rejected[1] == {} and sorted(recorder.train[1]) == [0]
    (failure,) = recorder.failed[1]
    assert (
        failure["node"] == 11 and failure["reason"] == "client-id 0 already replied from node 10 this round"
    )


def test_a_round_that_aggregated_nothing_is_recorded_but_never_the_best() -> None:
    from server.rounds import RoundBook

    strategy, recorder = _guarded(min_clients=2)
    book = RoundBook(FedaeConfig(), recorder, GLOBAL)
    strategy.aggregate_train(1, [_Reply(10, _moved(0.1), 0), _Reply(11, code=4210)])  # 1 < 2 accepted
    book.close_round(1, GLOBAL, loss=0.5)
    strategy.aggregate_train(2, [_Reply(10, code=4210)])  # nobody trained; the failure is still told
    book.close_round(2, GLOBAL, loss=0.5)
    assert [r["round"] for r in book.rows] == [1, 2] and book.best_round == 0
    assert book.rows[0]["not_aggregated"] and book.rows[1]["failed"][0]["code"] == 4210
