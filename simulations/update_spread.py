"""Why a coordinate-wise rule cannot undo a sign flip here: each rule's step along the honest mean.

The poisoning matrix measures the end of a federation; this measures the mechanism, round by round.
Honest clients train from the same global model (fedae's ``LocalTrainer``, DP-SGD as configured); the
attackers among them send their update times ``-scale``; each rule aggregates what was sent. Per rule it
reports the *step*: how far the aggregate moves along the true update direction, as a share of how far
the clean FedAvg step moves (1: the clean step; 0.6: FedAvg when 3 of 15 flip at scale 1), and the
relative error ``|aggregate - clean| / |clean|``. Beside them, how noisy the honest updates are: the
median over weights of the honest spread (standard deviation across clients) over the clean mean's size.
The global model follows the clean FedAvg trajectory (``--rounds`` says where to measure).

A coordinate-wise median or trimmed mean removes the attackers only where they lie outside the honest
values. Where the honest spread s is large against the mean mu (DP-SGD noise, sites that differ), the
flipped values (spread by s around -mu) lie among the honest ones, and the rule's estimate of the mixture
lands near 0.8 mu - 0.2 mu, FedAvg's step under the same flip.

The step is measured along an independent direction: the same clients trained again from the same
model with other seeds (other DP noise and batches). Along the noisy clean mean itself a rule's step
would be its response to the noise, whatever the signal. ``agreement`` is the cosine of the two clean
steps: near 1 the round's mean update is mostly signal, near 0 mostly noise.

The rules here are numpy's median and a trimmed mean with Flower's trim count (``int(beta * n)`` from
each end, raised to the number of attackers as the matrix does), the arithmetic of Flower's FedMedian
and FedTrimmedAvg, on one flat vector per client; the weights are equal (every site holds the same
number of rows in the matrix's setting).

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

from shared.attacks.poisoning import malicious_clients
from shared.config import ConfigError, FedaeConfig, parse_key_values


def flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(a).astype(np.float64) for a in arrays])


def trimmed_mean(values: np.ndarray, trim: int) -> np.ndarray:
    """Per column, the mean after cutting ``trim`` values at each end: Flower's FedTrimmedAvg arithmetic.
    With the integer count, not scipy's proportion, which can round ``trim / n * n`` down by one."""
    return np.sort(values, axis=0)[trim : len(values) - trim].mean(axis=0)


def rule_steps(
    honest: np.ndarray,
    attackers: frozenset[int],
    scale: float,
    trim: int,
    direction: np.ndarray | None = None,
) -> dict[str, Any]:
    """Each rule's step and relative error, for ``honest`` updates (one row per client) of which the rows
    in ``attackers`` are sent as ``-scale`` times themselves.

    The step is the aggregate's projection on ``direction`` as a share of the clean mean's projection.
    ``direction`` should be an independent estimate of the true mean update (the mean of the same
    clients' updates trained again with other noise): projected on the noisy clean mean itself, a rule's
    step is about its response to the noise, whatever the signal (Stein's lemma), and tells nothing."""
    if honest.ndim != 2 or len(honest) < 2 * trim + 1:
        raise ValueError(f"need one update per row and more than 2 x trim={trim} rows, got {honest.shape}")
    clean = honest.mean(axis=0)
    direction = clean if direction is None else np.asarray(direction, dtype=np.float64)
    if direction.shape != clean.shape:
        raise ValueError(f"direction has shape {direction.shape}, the updates {clean.shape}")
    along = float(clean @ direction)
    norm = float(np.linalg.norm(clean))
    if along == 0.0 or norm == 0.0:
        raise ValueError("the clean step has no component along the direction: no step to measure")
    sent = honest.copy()
    sent[sorted(attackers)] *= -scale
    aggregates = {
        "fedavg": sent.mean(axis=0),
        "fedmedian": np.median(sent, axis=0),
        "fedtrimmedavg": trimmed_mean(sent, trim),
        "fedmedian, no attack": np.median(honest, axis=0),
        "fedtrimmedavg, no attack": trimmed_mean(honest, trim),
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
        # Cosine of the clean step with the independent one: near 0, a round's mean update is noise.
        "agreement": float(along / (norm * np.linalg.norm(direction))),
        "rules": {
            name: {"step": float(agg @ direction / along), "error": float(np.linalg.norm(agg - clean) / norm)}
            for name, agg in aggregates.items()
        },
    }


def measure(config: FedaeConfig, rounds: list[int], fraction: float, scale: float) -> list[dict[str, Any]]:
    """Honest FedAvg rounds from fresh weights; at each round in ``rounds``, ``rule_steps`` on that
    round's honest updates, against the direction of the same clients trained again with other seeds."""
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
    trim = covering_trim(config, setup.num_clients, len(attackers))
    sigma = float(config.noise_multiplier) if config.dp_enabled else 0.0
    weights, rows = trainer.get_weights(), []

    def train_all(server_round: int, draw: int) -> list[list[np.ndarray]]:
        updates = []
        for client, x in enumerate(clients):
            trainer.set_weights(weights)
            seed = int(np.random.SeedSequence([config.seed, server_round, client, draw]).generate_state(1)[0])
            trainer.fit(x, epochs=config.local_epochs, noise_multiplier=sigma, seed=seed)
            updates.append(deltas(weights, trainer.get_weights()))
        return updates

    for server_round in range(1, max(rounds) + 1):
        updates = train_all(server_round, 0)
        if server_round in rounds:
            honest = np.stack([flat(u) for u in updates])
            direction = np.mean([flat(u) for u in train_all(server_round, 1)], axis=0)
            rows.append({"round": server_round, **rule_steps(honest, attackers, scale, trim, direction)})
        mean = [np.mean([u[k] for u in updates], axis=0) for k in range(len(weights))]
        weights = apply_deltas(weights, mean)  # the clean trajectory: attackers never steer it here
    return rows


def covering_trim(config: FedaeConfig, num_clients: int, num_attackers: int) -> int:
    """Flower's trim count for ``trim-beta``, raised to the number of attackers as the matrix does."""
    return max(int(config.trim_beta * num_clients), num_attackers)


def table(rows: list[dict[str, Any]]) -> list[str]:
    names = list(rows[0]["rules"])
    lines = [
        "| round | spread / mean (median) | coordinates spread > mean | agreement | "
        + " | ".join(f"{n} step (error)" for n in names)
        + " |",
        "| --- " * (4 + len(names)) + "|",
    ]
    for r in rows:
        cells = [f"{r['rules'][n]['step']:.2f} ({r['rules'][n]['error']:.2f})" for n in names]
        lines.append(
            f"| {r['round']} | {r['spread_over_mean']:.1f} | {r['share_spread_above_mean']:.0%} | "
            f"{r['agreement']:.2f} | " + " | ".join(cells) + " |"
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
        attackers = malicious_clients(config.num_clients, args.fraction, config.seed)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = measure(config, sorted(set(args.rounds)), args.fraction, args.scale)
    print("\n".join(table(rows)))
    if args.out:
        measured = {
            "fraction": args.fraction,
            "scale": args.scale,
            "attackers": sorted(attackers),
            "trim": covering_trim(config, config.num_clients, len(attackers)),
        }
        record = {"measured": measured, "run_config": config.to_run_config(), "rows": rows}
        args.out.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
