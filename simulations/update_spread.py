"""Why a coordinate-wise rule cannot undo a sign flip here: each rule's step along the honest mean.

The poisoning matrix measures the end of a federation; this measures the mechanism in one round. Honest
clients train from the same global model (fedae's ``LocalTrainer``, DP-SGD as configured); the attackers
among them send their update times ``-scale``; each rule aggregates what was sent. Per rule it reports
the *step*: the aggregate's projection on the mean of all honest updates (the clean FedAvg step), as a
share of it (1: the clean step; 0.6: FedAvg when 3 of 15 flip at scale 1), and the relative error
``|aggregate - clean| / |clean|``. Beside them, how noisy the honest updates are: the median over
coordinates of the honest spread (standard deviation across clients) over the honest mean's size.

A coordinate-wise median or trimmed mean removes the attackers only where they lie outside the honest
values. Where the honest spread s is large against the mean mu (DP-SGD noise, sites that differ), the
flipped values (spread by s around -mu) lie among the honest ones, and the rule's estimate of the mixture
lands near 0.8 mu - 0.2 mu, FedAvg's step under the same flip.

The rules here are numpy's median and scipy's trimmed mean with Flower's trim count (``int(beta * n)``
from each end), the same arithmetic as Flower's FedMedian and FedTrimmedAvg, on one flat vector per
client; the weights are equal (every site holds the same number of rows in the matrix's setting).

    uv run python -m simulations.update_spread [--run-config "key=value ..."] [--rounds 1 5 10]
        [--fraction 0.2] [--scale 1] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import trim_mean

from shared.attacks.poisoning import malicious_clients
from shared.config import ConfigError, FedaeConfig, parse_key_values


def flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(a).astype(np.float64) for a in arrays])


def rule_steps(honest: np.ndarray, attackers: frozenset[int], scale: float, trim: int) -> dict[str, Any]:
    """Each rule's step along the clean mean and its relative error, for ``honest`` updates (one row per
    client) of which the rows in ``attackers`` are sent as ``-scale`` times themselves."""
    if honest.ndim != 2 or len(honest) < 2 * trim + 1:
        raise ValueError(f"need one update per row and more than 2 x trim={trim} rows, got {honest.shape}")
    clean = honest.mean(axis=0)
    norm2 = float(clean @ clean)
    if norm2 == 0.0:
        raise ValueError("the honest updates average to zero: no step to measure against")
    sent = honest.copy()
    sent[sorted(attackers)] *= -scale
    aggregates = {
        "fedavg": sent.mean(axis=0),
        "fedmedian": np.median(sent, axis=0),
        "fedtrimmedavg": trim_mean(sent, trim / len(sent), axis=0),
        "fedmedian, no attack": np.median(honest, axis=0),
        "fedtrimmedavg, no attack": trim_mean(honest, trim / len(honest), axis=0),
    }
    good = [i for i in range(len(honest)) if i not in attackers]
    spread = honest[good].std(axis=0, ddof=1)
    # Weights no client moved (a dead ReLU unit's) carry neither signal nor spread: left out.
    moving = (spread > 0) | (clean != 0)
    spread, size = spread[moving], np.abs(clean[moving])
    with np.errstate(divide="ignore"):
        ratio = spread / size
    return {
        "spread_over_mean": float(np.median(ratio)),
        "share_spread_above_mean": float(np.mean(spread > size)),
        "rules": {
            name: {
                "step": float(agg @ clean / norm2),
                "error": float(np.linalg.norm(agg - clean) / np.sqrt(norm2)),
            }
            for name, agg in aggregates.items()
        },
    }


def measure(config: FedaeConfig, rounds: list[int], fraction: float, scale: float) -> list[dict[str, Any]]:
    """Honest FedAvg rounds from fresh weights; at each round in ``rounds``, ``rule_steps`` on that
    round's honest updates."""
    from shared.tfenv import load_tensorflow

    load_tensorflow()  # the import-time switches before TensorFlow and tensorflow-privacy
    from shared import pipeline
    from shared.data.sources import load_client_data
    from shared.task import trainer_for
    from shared.updates import apply_deltas, deltas

    setup = pipeline.prepare(config)
    trainer = trainer_for(config, setup.spec, setup.scaler)
    clients = [setup.scaler.transform(load_client_data(config, c).x_train) for c in range(setup.num_clients)]
    attackers = malicious_clients(setup.num_clients, fraction, config.seed)
    trim = int(config.trim_beta * setup.num_clients)
    sigma = float(config.noise_multiplier) if config.dp_enabled else 0.0
    weights, rows = trainer.get_weights(), []
    for server_round in range(1, max(rounds) + 1):
        updates = []
        for client, x in enumerate(clients):
            trainer.set_weights(weights)
            seed = int(np.random.SeedSequence([config.seed, server_round, client]).generate_state(1)[0])
            trainer.fit(x, epochs=config.local_epochs, noise_multiplier=sigma, seed=seed)
            updates.append(deltas(weights, trainer.get_weights()))
        if server_round in rounds:
            honest = np.stack([flat(u) for u in updates])
            rows.append({"round": server_round, **rule_steps(honest, attackers, scale, trim)})
        mean = [np.mean([u[k] for u in updates], axis=0) for k in range(len(weights))]
        weights = apply_deltas(weights, mean)  # the clean trajectory: attackers never steer it here
    return rows


def table(rows: list[dict[str, Any]]) -> list[str]:
    names = list(rows[0]["rules"])
    lines = [
        "| round | spread / mean (median) | coordinates spread > mean | "
        + " | ".join(f"{n} step (error)" for n in names)
        + " |",
        "| --- " * (3 + len(names)) + "|",
    ]
    for r in rows:
        cells = [f"{r['rules'][n]['step']:.2f} ({r['rules'][n]['error']:.2f})" for n in names]
        lines.append(
            f"| {r['round']} | {r['spread_over_mean']:.1f} | {r['share_spread_above_mean']:.0%} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    from simulations.poisoning_matrix import BASE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", default="", help="overrides of the poisoning matrix's base settings")
    parser.add_argument("--rounds", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--fraction", type=float, default=0.2, help="share of clients that flip")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="they send -scale x their update (negative: the scale attack)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    try:
        config = FedaeConfig().with_overrides({**BASE, **parse_key_values(args.run_config)})
        if min(args.rounds) < 1:
            raise ConfigError(f"--rounds must be 1 or more, got {args.rounds}")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = measure(config, sorted(set(args.rounds)), args.fraction, args.scale)
    print("\n".join(table(rows)))
    if args.out:
        args.out.write_text(json.dumps({"run_config": config.to_run_config(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
