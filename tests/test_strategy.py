"""Strategy choice from the config, per-client metric capture, and FedProx's proximal term."""

import numpy as np
import pytest
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from server.strategy import ExcludeExhausted, RoundRecorder, build_strategy
from shared.config import FedaeConfig
from shared.models import ModelSpec
from shared.training import LocalTrainer, TrainSettings


@pytest.mark.parametrize(("name", "cls"), [("fedavg", FedAvg), ("fedadam", FedAdam), ("fedprox", FedProx)])
def test_strategy_from_config(name: str, cls: type) -> None:
    strategy = build_strategy(FedaeConfig(strategy=name, min_available_clients=3), RoundRecorder(), 5)
    assert isinstance(strategy, cls) and isinstance(strategy, ExcludeExhausted)
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
