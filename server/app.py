"""The ServerApp: FedAvg (or FedAdam / FedProx), plain or under SecAgg+, then the detector export.

Flower-facing only: the plain rounds here, the SecAgg+ rounds in ``server.secure``, the round table in
``server.rounds``, the federated threshold's query in ``server.threshold``; data, model, threshold and
report in ``shared.pipeline``.
"""

from __future__ import annotations

from shared.tfenv import load_tensorflow  # import-time switches before TensorFlow: keep first

load_tensorflow()  # flwr imports TensorFlow itself; load it first, quietly and with the switches set

# isort: split

import logging
import time

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted

from server import client_dp, resume, threshold
from server.rounds import RoundBook
from server.secure import run_secagg_rounds
from server.strategy import RoundRecorder, TooFewClients, build_strategy
from shared import faults, pipeline
from shared.config import ConfigError, FedaeConfig
from shared.logs import log_to_stderr
from shared.setup import encode_setup

logger = logging.getLogger("fedae.server")


def run_federation(
    grid: Grid,
    config: FedaeConfig,
    compare_baselines: bool = False,
    context: Context | None = None,
    mixins: tuple[type, ...] = (),
) -> dict:
    """Run the rounds, then export the detector. ``compare_baselines`` pools every client's training
    data in this process to train the central reference models: only for simulations. ``context`` is the
    ServerApp's; the SecAgg+ path hands it to Flower's legacy workflow. ``mixins``: a simulated
    adversary's strategy mixins (``simulations/adversary.py``)."""
    started = time.time()
    setup = pipeline.prepare(config)
    config = setup.config  # with the resolved state-dir that clients keep their ledgers in
    book = RoundBook(config, RoundRecorder(), pipeline.initial_weights(setup))
    resumption = resume.open_run(setup)
    if config.secure_aggregation == "secagg+":
        if context is None:
            context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
        outcome = run_secagg_rounds(grid, context, setup, book)
        stopped_early, exhausted, aggregation = outcome.stopped_early, outcome.exhausted, outcome.summary
        client_level: dict = {"enabled": False}  # refused with SecAgg+ at start (shared.config)
    else:
        stopped_early, exhausted, client_level = _run_plain_rounds(grid, setup, book, resumption, mixins)
        aggregation = {"secure_aggregation": "none"}

    if book.best_round == 0 and stopped_early is not None:
        raise RuntimeError(f"no round trained before the run stopped ({stopped_early}); nothing exported")
    if book.best_round == 0:
        raise RuntimeError(
            "no round produced a finite calibration loss (training diverged); nothing exported. "
            "Lower learning-rate or l2-norm-clip"
        )
    logger.info("training done; fitting the threshold and exporting the detector to %s", setup.out_dir)
    scorer = pipeline.fit_scorer(setup, book.best_weights)
    release = None
    if config.threshold_rule == "federated-percentile":
        # The SecAgg+ path's clients file their events under Flower's run id (no run key is sent there).
        run_key = resumption.run_key if config.secure_aggregation == "none" else ""
        release = threshold.federated_threshold_release(grid, setup, book.best_weights, scorer, run_key)
        if config.secure_aggregation != "none":
            aggregation["not_hidden"] += (
                "; the federated threshold's noisy histograms travel as plain messages (each is a "
                "Gaussian mechanism of its own, accounted in its client's ledger)"
            )
    budget = {
        "target_epsilon": config.target_epsilon or None,
        "exhausted_clients": exhausted,
        "stopped_early": stopped_early,
    }
    record = book.privacy_record()
    record.client_level = client_level
    return pipeline.finish(
        setup,
        book.best_weights,
        book.rows,
        record,
        started,
        compare=compare_baselines,
        best_round=book.best_round,
        budget=budget,
        aggregation=aggregation,
        scorer=scorer,
        threshold_release=release,
    )


def _run_plain_rounds(
    grid: Grid,
    setup: pipeline.RunSetup,
    book: RoundBook,
    resumption: resume.Resumption,
    mixins: tuple[type, ...] = (),
) -> tuple[str | None, list[int], dict]:
    """Flower's message-API strategy, from round 1 or from the checkpoint's next round; returns why the
    run stopped early (or None), the exhausted clients, and the client-level DP figures."""
    config = setup.config
    strategy = build_strategy(config, book.recorder, setup.num_clients, mixins)
    start_weights = resume.restore(resumption, book, strategy)
    strategy.on_release = lambda: resume.save_accountant(resumption, strategy)  # type: ignore[attr-defined]
    done = resumption.completed_round

    def evaluate(flower_round: int, arrays: ArrayRecord) -> MetricRecord:
        # The message API evaluates centrally after the round's training and held-out evaluation.
        server_round = flower_round + done
        weights = arrays.to_numpy_ndarrays()
        loss = pipeline.calibration_loss(setup, weights)
        book.close_round(server_round if flower_round else 0, weights, loss)
        book.recorder.end_round(server_round)
        if flower_round or not done:
            # Round 0 too: a server that dies in round 1 must come back under the same run key, or its
            # clients could not tell that round from a new one. Durability tests die here: before the
            # checkpoint (clients trained the round, the server lost it) or after it.
            faults.fault_point("server-exit-before-checkpoint", server_round)
            resume.save(resumption, book, strategy, config, server_round, weights)
            faults.fault_point("server-exit", server_round)
        return MetricRecord({"calibration-loss": loss})

    setup_record = ConfigRecord(encode_setup(config, setup.spec, setup.scaler, resumption.run_key))
    stopped_early = None
    try:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(start_weights),
            num_rounds=max(0, config.num_server_rounds - done),
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
    client_level = client_dp.client_level_section(strategy, config, setup.num_clients)
    if config.client_dp_enabled:
        logger.info("client-level epsilon %.4f: %s", client_level["epsilon"], client_level["statement"])
    return stopped_early, strategy.exhausted_clients(), client_level


def build_server_app(
    config: FedaeConfig | None = None, compare_baselines: bool = False, mixins: tuple[type, ...] = ()
) -> ServerApp:
    """A ServerApp running ``config``, or the run config Flower passes (``flwr run .``) when None.

    ``compare_baselines`` (``fedae simulate`` only) trains the report's central reference models on
    the pooled client data; a deployed coordinator never reads client data, so it is off by default.
    ``mixins``: a simulated adversary's (``fedae simulate`` only, as is any ``attack``).
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        log_to_stderr()
        run_config = config or FedaeConfig.from_run_config(context.run_config)
        if config is None and run_config.attack != "none":
            # `flwr run` / `fedae run`: real sites run their own code; a poisoning run config would only
            # make honest fedae clients attack, which is a simulation's job.
            raise ConfigError(
                f"attack {run_config.attack!r} is a simulation harness; run it with fedae simulate"
            )
        run_federation(grid, run_config, compare_baselines, context, mixins)

    return server_app


app = build_server_app()
