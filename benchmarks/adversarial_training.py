"""PGD adversarial training inside DP-SGD: clean and robust ROC-AUC, paired by seed (issue 6).

For each seed, one federation per ``adversarial-training-epsilon`` that differ in nothing else: the same
initial weights, and each client's fit seeded from (seed, round, client), so the Poisson batches and the
DP noise are the same too. A federation here is the simulation's FedAvg without Flower: every client
trains each round from the global model with fedae's ``LocalTrainer`` (the code a client runs), the
models are averaged weighted by example count, and the round with the lowest calibration loss is kept
(as ``server/rounds.py`` does). Then the run's detector (``shared.pipeline.fit_and_score``) and its
robustness evaluation (``shared.robustness.evaluate``), whose ``two-sided`` rows give the robust AUC.

Why not ``fedae simulate``: its initial weights and DP noise are drawn fresh each run, as they must be
in use, and single runs of one setting spread widely (the seeds' ranges in docs/ROBUSTNESS.md); only a
paired comparison separates the method from the draw. The fixed seeds here are for measuring only: DP
noise an attacker can regenerate protects nothing.

    uv run python -m benchmarks.adversarial_training [--scenario digits] [--run-config "key=value ..."]
        [--epsilons 0 0.05] [--seeds 0 1 2] [--rounds 10] [--timing-repeats 20]

The table's fit time ratio is the federations' total local-fit seconds, one pass each on a shared machine;
``--timing-repeats`` measures it properly, alternating the fits.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from shared.tfenv import configure_tensorflow, load_tensorflow

tf = load_tensorflow()  # the import-time switches before TensorFlow and tensorflow-privacy: keep first

# isort: split

import numpy as np
from sklearn.metrics import roc_auc_score

from benchmarks.simrun import machine, write_result
from shared import robustness
from shared.attacks import evasion
from shared.config import ConfigError, FedaeConfig, parse_epsilons, parse_key_values
from shared.data.sources import load_client_data, load_server_data
from shared.pipeline import fit_and_score
from shared.task import make_scaler, model_spec, train_settings
from shared.training import LocalTrainer
from simulations import scenarios


def federate(
    trainer: LocalTrainer,
    clients: list[np.ndarray],
    x_calibration: np.ndarray,
    config: FedaeConfig,
    seed: int,
) -> tuple[list[np.ndarray], float]:
    """FedAvg over ``clients`` from the trainer's current weights; the best round's weights and the
    seconds the local fits took."""
    sigma = float(config.noise_multiplier) if config.dp_enabled else 0.0
    weights, best, best_loss, fit_seconds = trainer.get_weights(), trainer.get_weights(), float("inf"), 0.0
    for server_round in range(1, config.num_server_rounds + 1):
        updates = []
        for client, x in enumerate(clients):
            trainer.set_weights(weights)
            started = time.perf_counter()
            fit_seed = int(np.random.SeedSequence([seed, server_round, client]).generate_state(1)[0])
            trainer.fit(x, epochs=config.local_epochs, noise_multiplier=sigma, seed=fit_seed)
            fit_seconds += time.perf_counter() - started
            updates.append((trainer.get_weights(), len(x)))
        total = sum(n for _, n in updates)
        weights = [sum(w[k] * (n / total) for w, n in updates) for k in range(len(weights))]
        trainer.set_weights(weights)
        loss = trainer.mean_loss(x_calibration)
        if loss < best_loss:
            best, best_loss = weights, loss
    return best, fit_seconds


def measure(config: FedaeConfig, epsilons: list[float], seeds: list[int]) -> list[dict[str, Any]]:
    """One row per (seed, epsilon): clean and attacked AUCs on the robustness sample, fit seconds."""
    if config.auto_noise or config.strategy != "fedavg":
        raise ConfigError("this benchmark runs FedAvg with a fixed noise-multiplier")
    server = load_server_data(config)
    scaler = make_scaler(config, server.spec, server.x_calibration)
    clients = [scaler.transform(load_client_data(config, c).x_train) for c in range(config.num_clients)]
    x_calibration, x_test = scaler.transform(server.x_calibration), scaler.transform(server.x_test)
    low, high = evasion.input_range(server.spec.kind, x_calibration)
    spec = model_spec(config, server.spec, scaler)
    trainers = {
        epsilon: LocalTrainer(
            spec, train_settings(config.replace(adversarial_training_epsilon=epsilon), server.spec)
        )
        for epsilon in epsilons
    }
    rows = []
    for seed in seeds:
        tf.keras.utils.set_random_seed(seed)
        initial = LocalTrainer(spec, trainers[epsilons[0]].settings).get_weights()
        for epsilon, trainer in trainers.items():
            trainer.set_weights(initial)
            best, fit_seconds = federate(trainer, clients, x_calibration, config, seed)
            trainer.set_weights(best)
            scorer, threshold, scores = fit_and_score(config, trainer.model, spec, x_calibration, x_test)
            target = evasion.Target(trainer.model, spec, scorer, threshold, low, high)
            section = robustness.evaluate(target, x_test, server.y_test, config, server.spec.kind)
            attacked = {
                f"{r['attack']} {r['direction']} {r['norm']} {r['epsilon']:g}": r["auc"]
                for r in section["evasion"]
            }
            rows.append(
                {
                    "seed": seed,
                    "epsilon": epsilon,
                    "test_auc": float(roc_auc_score(server.y_test, scores)),
                    "clean_auc": section["clean"]["auc"],
                    "attacked_auc": attacked,
                    "fit_seconds": fit_seconds,
                }
            )
    return rows


def fit_time_ratios(config: FedaeConfig, epsilons: list[float], repeats: int) -> dict[float, float]:
    """Median seconds of one client's local fit (a round's training) with each training epsilon over
    the median without, the fits alternating so that all see the same machine load."""
    server = load_server_data(config)
    scaler = make_scaler(config, server.spec, server.x_calibration)
    x = scaler.transform(load_client_data(config, 0).x_train)
    spec = model_spec(config, server.spec, scaler)
    sigma = float(config.noise_multiplier) if config.dp_enabled else 0.0
    trainers = {
        epsilon: LocalTrainer(
            spec, train_settings(config.replace(adversarial_training_epsilon=epsilon), server.spec)
        )
        for epsilon in epsilons
    }
    seconds: dict[float, list[float]] = {epsilon: [] for epsilon in epsilons}
    for repeat in range(repeats + 1):
        for epsilon, trainer in trainers.items():
            started = time.perf_counter()
            trainer.fit(x, epochs=config.local_epochs, noise_multiplier=sigma, seed=repeat)
            if repeat:  # the first fit traces and compiles
                seconds[epsilon].append(time.perf_counter() - started)
    base = statistics.median(seconds[epsilons[0]])
    return {epsilon: statistics.median(times) / base for epsilon, times in seconds.items()}


def summarise(rows: list[dict[str, Any]], budgets: list[float], bar: float = 0.05) -> list[str]:
    """A markdown table: mean and range over seeds per training epsilon, and issue 6's bar (at L-infinity
    ``bar``) against training epsilon 0."""
    epsilons = sorted({r["epsilon"] for r in rows})
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["seed"], r["epsilon"]): r for r in rows}
    base = epsilons[0]

    def cell(values: list[float]) -> str:
        return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"

    pgd = [f"pgd two-sided linf {b:g}" for b in budgets]
    at_bar = f"pgd two-sided linf {bar:g}"
    lines = [
        f"| training epsilon | clean AUC | {' | '.join(k.replace('pgd ', 'PGD ') for k in pgd)} "
        f"| recovered at {bar:g} | clean cost | fit time ratio |",
        "| --- " * (5 + len(pgd)) + "|",
    ]
    for epsilon in epsilons:
        clean = [by[s, epsilon]["clean_auc"] for s in seeds]
        attacked = [[by[s, epsilon]["attacked_auc"][k] for s in seeds] for k in pgd]
        # The bar, paired by seed: the share of the AUC that PGD takes from the plain model that this one
        # wins back, and what it costs on clean rows.
        lost = [by[s, base]["clean_auc"] - by[s, base]["attacked_auc"][at_bar] for s in seeds]
        won = [by[s, epsilon]["attacked_auc"][at_bar] - by[s, base]["attacked_auc"][at_bar] for s in seeds]
        cost = [by[s, base]["clean_auc"] - by[s, epsilon]["clean_auc"] for s in seeds]
        ratio = sum(by[s, epsilon]["fit_seconds"] for s in seeds) / sum(
            by[s, base]["fit_seconds"] for s in seeds
        )
        lines.append(
            f"| {epsilon:g} | {cell(clean)} | {' | '.join(cell(a) for a in attacked)} "
            f"| {sum(won) / max(sum(lost), 1e-12):.0%} | {statistics.mean(cost):+.3f} | {ratio:.2f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="digits")
    parser.add_argument("--run-config", default="", help="overrides, as for fedae simulate")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="none: timing only")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--timing-repeats", type=int, default=0, help="also time N alternating local fits")
    parser.add_argument("--bar", type=float, default=0.05, help="the L-infinity budget issue 6's bar is at")
    parser.add_argument("--name", default="adversarial_training", help="benchmarks/results/NAME.json")
    args = parser.parse_args()
    config = FedaeConfig().with_overrides(
        {
            **scenarios.overrides(args.scenario),
            # Only the PGD L-infinity rows are read: nothing else, unless the run config asks for it.
            "robustness-queries": 0,
            "robustness-linf-epsilons": "0.05,0.1",
            "robustness-l2-epsilons": "",
            **parse_key_values(args.run_config),
        }
    )
    if args.rounds:
        config = config.replace(num_server_rounds=args.rounds)
    device = configure_tensorflow(None)
    print(f"machine: {machine()}, device: {device}")
    dp = f"sigma {float(config.noise_multiplier):g} C {config.l2_norm_clip:g}" if config.dp_enabled else "off"
    print(
        f"{args.scenario}, {config.model}, normal classes {config.normal_class_list}, {config.num_clients} "
        f"clients x {config.num_server_rounds} rounds x {config.local_epochs} epochs, DP {dp}, adversarial "
        f"steps {config.adversarial_training_steps}, target {config.adversarial_training_target}, "
        f"seeds {args.seeds}"
    )
    if 0.0 not in args.epsilons:
        args.epsilons = [0.0, *args.epsilons]  # the bar is stated against the plain model
    budgets = parse_epsilons(config.robustness_linf_epsilons, "robustness-linf-epsilons")
    if args.bar not in budgets:
        raise ConfigError(f"--bar {args.bar:g} is not among robustness-linf-epsilons {budgets}")
    rows = measure(config, sorted(args.epsilons), args.seeds) if args.seeds else []
    if rows:
        print("\n".join(summarise(rows, budgets, args.bar)))
    result: dict[str, Any] = {"machine": machine(), "run_config": config.to_run_config(), "rows": rows}
    if args.timing_repeats:
        ratios = fit_time_ratios(config, sorted(args.epsilons), args.timing_repeats)
        result["fit_time_ratio"] = {f"{e:g}": r for e, r in ratios.items()}
        print(
            f"one client's local fit, median of {args.timing_repeats} alternating: "
            + ", ".join(f"epsilon {e:g} {r:.2f}x" for e, r in ratios.items())
        )
    path = write_result(args.name, result)
    print(f"rows: {path}")


if __name__ == "__main__":
    main()
