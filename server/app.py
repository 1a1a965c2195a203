"""The ServerApp: FedAvg (or FedAdam / FedProx) over the clients, then the detector export.

Flower-facing only: strategy, round bookkeeping and progress logging here; data, model, threshold and
report in ``shared.pipeline``.
"""

from __future__ import annotations

from shared.tfenv import load_tensorflow  # import-time switches before TensorFlow: keep first

load_tensorflow()  # flwr imports TensorFlow itself; load it first, quietly and with the switches set

# isort: split

import logging
import math
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted

from server import client_dp
from server.strategy import RoundRecorder, TooFewClients, build_strategy
from shared import pipeline
from shared.config import FedaeConfig
from shared.setup import encode_setup

logger = logging.getLogger("fedae.server")


def run_federation(grid: Grid, config: FedaeConfig, compare_baselines: bool = False) -> dict:
    """Run the rounds, then export the detector. ``compare_baselines`` pools every client's training
    data in this process to train the central reference models: only for simulations."""
    started = time.time()
    setup = pipeline.prepare(config)
    config = setup.config  # with the resolved state-dir that clients keep their ledgers in
    recorder = RoundRecorder()
    strategy = build_strategy(config, recorder, setup.num_clients)
    rounds: list[dict] = []
    best = {"loss": float("inf"), "round": 0, "weights": pipeline.initial_weights(setup)}
    latest_epsilon: dict[int, float] = {}  # each client's latest cumulative epsilon

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        weights = arrays.to_numpy_ndarrays()
        loss = pipeline.calibration_loss(setup, weights)
        recorder.end_round(server_round)
        train = recorder.train.get(server_round, {})
        if server_round > 0 and not train:
            # Nobody trained (every client refused: budget spent): no new model, no round to record.
            logger.warning("round %d/%d: no client trained", server_round, config.num_server_rounds)
        if server_round > 0 and train:
            held_out = recorder.evaluate.get(server_round, {})
            latest_epsilon.update({cid: m["epsilon"] for cid, m in train.items() if "epsilon" in m})
            epsilons = list(latest_epsilon.values())
            row = {
                "round": server_round,
                "clients": sorted(train),
                "train_loss": _weighted(train, "train-loss"),
                "eval_loss": _weighted(held_out, "eval-loss"),
                "calibration_loss": loss,
                "max_epsilon": max(epsilons) if epsilons else None,
            }
            rounds.append(row)
            logger.info(
                "round %d/%d: %d clients, train loss %.4f, held-out loss %.4f, calibration loss %.4f%s",
                server_round,
                config.num_server_rounds,
                len(train),
                row["train_loss"],
                row["eval_loss"],
                loss,
                f", worst client's cumulative epsilon {row['max_epsilon']:.3f} (delta {config.delta:g})"
                if epsilons
                else ", no DP",
            )
            if math.isfinite(loss) and loss < best["loss"]:
                best.update(loss=loss, round=server_round, weights=weights)
        return MetricRecord({"calibration-loss": loss})

    setup_record = ConfigRecord(encode_setup(config, setup.spec, setup.scaler))
    stopped_early = None
    try:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(best["weights"]),
            num_rounds=config.num_server_rounds,
            train_config=setup_record,
            evaluate_config=setup_record,
            evaluate_fn=evaluate,
        )
    except TooFewClients as reason:
        stopped_early = str(reason)
        logger.warning("%s", reason)
    except PrivacyBudgetExhausted as reason:
        stopped_early = (
            f"client-level budget: the next round would pass client-dp-target-epsilon "
            f"{config.client_dp_target_epsilon:g} ({reason})"
        )
        logger.warning("ending the run early: %s", stopped_early)
    record = privacy_record(recorder)
    record.client_level = client_dp.client_level_section(strategy, config, setup.num_clients)
    if config.client_dp_enabled:
        logger.info(
            "client-level epsilon %.4f: %s", record.client_level["epsilon"], record.client_level["statement"]
        )
    if best["round"] == 0 and stopped_early is not None:
        raise RuntimeError(f"no round trained before the run stopped ({stopped_early}); nothing exported")
    if best["round"] == 0:
        raise RuntimeError(
            "no round produced a finite calibration loss (training diverged); nothing exported. "
            "Lower learning-rate or l2-norm-clip"
        )
    logger.info("training done; fitting the threshold and exporting the detector to %s", setup.out_dir)
    budget = {
        "target_epsilon": config.target_epsilon or None,
        "exhausted_clients": strategy.exhausted_clients(),
        "stopped_early": stopped_early,
    }
    return pipeline.finish(
        setup,
        best["weights"],
        rounds,
        record,
        started,
        compare=compare_baselines,
        best_round=best["round"],
        budget=budget,
    )


def privacy_record(recorder: RoundRecorder) -> pipeline.PrivacyRecord:
    """Each client's figures from what it reported, round by round (later rounds win for "latest")."""
    record = pipeline.PrivacyRecord()
    for server_round in sorted(recorder.train):
        for cid, metrics in recorder.train[server_round].items():
            record.per_client[cid] = metrics.get("epsilon")
            if "epsilon" in metrics:
                record.per_client_rounds.setdefault(cid, {})[server_round] = metrics["epsilon"]
            if "noise-multiplier" in metrics:
                record.per_client_sigma[cid] = metrics["noise-multiplier"]
    return record


def _weighted(per_client: dict[int, dict[str, float]], key: str) -> float:
    pairs = [(m[key], m["num-examples"]) for m in per_client.values() if key in m]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else float("nan")


def build_server_app(config: FedaeConfig | None = None, compare_baselines: bool = False) -> ServerApp:
    """A ServerApp running ``config``, or the run config Flower passes (``flwr run .``) when None.

    ``compare_baselines`` (``fedae simulate`` only) trains the report's central reference models on
    the pooled client data; a deployed coordinator never reads client data, so it is off by default.
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, config or FedaeConfig.from_run_config(context.run_config), compare_baselines)

    return server_app


app = build_server_app()
