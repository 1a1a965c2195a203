"""Strategy choice from the config, per-client metric capture, and FedProx's proximal term."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from server.strategy import RoundGuard, RoundRecorder, build_strategy
from shared.config import FedaeConfig
from shared.models import ModelSpec
from shared.training import LocalTrainer, TrainSettings


@pytest.mark.parametrize(("name", "cls"), [("fedavg", FedAvg), ("fedadam", FedAdam), ("fedprox", FedProx)])
def test_strategy_from_config(name: str, cls: type) -> None:
    strategy = build_strategy(FedaeConfig(strategy=name, min_available_clients=3), RoundRecorder(), 5)
    assert isinstance(strategy, cls) and isinstance(strategy, RoundGuard)
    assert strategy.min_available_nodes == 3
    if name == "fedprox":
        assert strategy.proximal_mu == FedaeConfig().proximal_mu


def test_recorder_keeps_per_client_figures_and_reports_the_worst_epsilon() -> None:
    recorder = RoundRecorder()
    replies = [
        RecordDict(
            {"metrics": MetricRecord({"client-id": c, "num-examples": n, "train-loss": loss, "epsilon": eps})}
        )
        for c, n, loss, eps in [(0, 100, 1.0, 2.0), (1, 300, 3.0, 2.5)]
    ]
    summary = recorder.aggregate_train(replies, "num-examples")
    assert summary["train-loss"] == pytest.approx((100 * 1.0 + 300 * 3.0) / 400)
    assert summary["max-epsilon"] == 2.5  # never an average of epsilons
    assert recorder.train[1][1]["epsilon"] == 2.5
    recorder.end_round(1)
    recorder.aggregate_train(replies[:1], "num-examples")
    assert set(recorder.train[2]) == {0}


def test_fedprox_term_pulls_local_weights_towards_the_global_model(rng) -> None:
    spec = ModelSpec("dense", (6,), 2, "linear")
    x = rng.normal(size=(64, 6)).astype(np.float32)

    def drift(mu: float) -> float:
        trainer = LocalTrainer(spec, TrainSettings(16, 0.05, 0.0))
        start = trainer.get_weights()
        trainer.fit(x, epochs=5, seed=0, proximal_mu=mu)
        return float(sum(np.sum((a - b) ** 2) for a, b in zip(trainer.get_weights(), start, strict=True)))

    assert drift(50.0) < 0.5 * drift(0.0)


class _Reply:
    """The parts of a Flower reply Message the strategies read."""

    def __init__(self, node: int, metrics: dict | None = None, code: int | None = None) -> None:
        from types import SimpleNamespace

        self.metadata = SimpleNamespace(src_node_id=node, reply_to_message_id="")
        self.error = SimpleNamespace(code=code, reason=f"refused: client-id={node}")
        self.content = None
        if metrics:
            arrays = ArrayRecord([np.zeros(2, np.float32)])
            self.content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})

    def has_error(self) -> bool:
        return self.error.code is not None


def test_client_level_dp_records_who_trained_even_when_a_refusal_voids_the_round() -> None:
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    from shared.privacy import BUDGET_EXHAUSTED

    recorder = RoundRecorder()
    config = FedaeConfig(client_dp="server-fixed", client_dp_noise_multiplier=1.0)
    strategy = build_strategy(config, recorder, 2)
    assert isinstance(strategy, DifferentialPrivacyServerSideFixedClipping)
    assert strategy.num_sampled_clients == 2 and strategy.strategy.weighted_by_key == "dp-weight"
    strategy._pending_events[1] = None  # as configure_train leaves it
    strategy._sent_arrays = [np.zeros(2, np.float32)]
    trained = {"client-id": 0, "num-examples": 10, "dp-weight": 1.0, "train-loss": 0.5, "epsilon": 1.2}
    arrays, _ = strategy.aggregate_train(1, [_Reply(7, trained), _Reply(8, code=BUDGET_EXHAUSTED)])
    assert arrays is None  # Flower's wrapper releases nothing from a round with an error reply
    assert recorder.train[1][0]["epsilon"] == 1.2  # but client 0 trained and paid: it is on record
    assert strategy.exhausted == {8: "refused: client-id=8"}


def test_client_level_dp_samples_exactly_the_calibrated_number_of_clients() -> None:
    config = FedaeConfig(client_dp="client-fixed", fraction_train=0.5, min_available_clients=2)
    strategy = build_strategy(config, RoundRecorder(), 6)
    # int(6 * 0.5) = 3 clients: the noise is calibrated to 3, and Flower must sample exactly 3 even if
    # more nodes connect than the run was set up for.
    assert strategy.num_sampled_clients == 3 and strategy.strategy.min_train_nodes == 3
    assert int(100 * strategy.strategy.fraction_train) == 0
