"""Wall time of one client round over the time of its local fit alone (issue 4, goal 2), and fedae's
reused trainer against Flower's TensorFlow-quickstart pattern, side by side in one process.

A client round here is ``shared.task.train_client`` as the ClientApp calls it: data from the process
cache, the privacy ledger charge (SQLite transaction plus accounting over the ledger), set weights,
DP-SGD fit, epsilon. The quickstart pattern rebuilds everything in each call, as Flower's TensorFlow
quickstart does: clear the Keras session, build and compile the model (here: a new trainer, whose
tf.functions then trace again), set the weights, fit.

    uv run python benchmarks/client_round_overhead.py [--scenario fleet] [--clients 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

from shared.tfenv import configure_tensorflow, load_tensorflow

tf = load_tensorflow()  # the import-time switches before TensorFlow and tensorflow-privacy: keep first

# isort: split

from shared import task
from shared.config import FedaeConfig
from shared.ledger import PrivacyLedger, ledger_path
from shared.pipeline import prepare
from shared.training import LocalTrainer


def timed_fits(trainer: LocalTrainer, sink: list[float]) -> None:
    """Record the duration of every ``fit`` call on ``trainer``."""
    fit = trainer.fit

    def timed(*args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return fit(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - start)

    trainer.fit = timed  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="fleet")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = configure_tensorflow(None)
    with tempfile.TemporaryDirectory() as state:
        config = FedaeConfig(
            scenario=args.scenario,
            num_clients=args.clients,
            target_epsilon=0.0,
            out_dir=state,
            state_dir=state,
        )
        setup = prepare(config)
        weights = task.trainer_for(config, setup.spec, setup.scaler).get_weights()
        for client in range(args.clients):
            task.client_data(config, client)  # load (generate) once, as a worker does before round 1
        reused, quickstart, fits = [], [], []
        timed_fits(task.trainer_for(config, setup.spec, setup.scaler), fits)
        for server_round in range(1, args.rounds + 1):
            for client in range(args.clients):
                with PrivacyLedger(ledger_path(state, client)) as ledger:
                    start = time.perf_counter()
                    task.train_client(
                        config, setup.spec, setup.scaler, weights, client, server_round, ledger, "r"
                    )
                    reused.append(time.perf_counter() - start)
                # The quickstart pattern: everything rebuilt for this call.
                data = task.client_data(config, client)
                start = time.perf_counter()
                tf.keras.backend.clear_session()
                fresh = LocalTrainer(
                    task.model_spec(config, setup.spec, setup.scaler), task.train_settings(config, setup.spec)
                )
                fresh.set_weights(weights)
                fresh.fit(
                    setup.scaler.transform(data.x_train), epochs=config.local_epochs, noise_multiplier=1.5
                )
                quickstart.append(time.perf_counter() - start)
        # The first reused call traces the trainer's functions; later rounds are the steady state.
        round_s, fit_s, fresh_s = (statistics.median(v) for v in (reused[1:], fits[1:], quickstart))
        print(f"machine: {platform.processor() or platform.machine()}, device: {device}")
        print(f"{args.scenario}: {args.clients} clients x {args.rounds} rounds, one DP-SGD epoch per round")
        print(f"reused trainer, client round (median after the first): {round_s:.3f} s")
        print(f"  of which the local fit: {fit_s:.3f} s; round / fit = {round_s / fit_s:.2f}")
        print(
            f"quickstart pattern, client round (median): {fresh_s:.3f} s; quickstart / reused = "
            f"{fresh_s / round_s:.2f}"
        )


if __name__ == "__main__":
    main()
