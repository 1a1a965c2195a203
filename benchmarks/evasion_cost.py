"""Cost of the robustness evaluation's attacks: fedae's PGD and SPSA against the eager implementation
they replaced, side by side on the same detector and rows.

    uv run python -m benchmarks.evasion_cost [--rows 400] [--features 207] [--repeats 3]

The baseline below is the earlier implementation, kept here only to be measured against: eager
TensorFlow, one pass for the gradient and a second for the iterate's score at every PGD step, and one
score call per SPSA probe. The current one (shared/attacks/evasion.py) compiles the score and its
gradient into one pass and sends a step's probes as one batch. Both must reach the same points; the
benchmark checks that their success is the same before it reports a ratio.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from shared.attacks import evasion
from shared.detector import fit_threshold
from shared.models import ModelSpec, residuals
from shared.scoring import ResidualScorer
from shared.training import LocalTrainer, TrainSettings

tf = evasion.tf
RESULT = Path(__file__).parent / "results" / "evasion_cost.json"


def _detector(rows: int, features: int) -> tuple[evasion.Target, np.ndarray]:
    """A dense autoencoder on correlated Gaussian rows (the default fleet model's shape), its
    max-standardized score and 95th-percentile threshold, and ``rows`` rows to attack."""
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(8, features)) / np.sqrt(8)

    def normal(n: int) -> np.ndarray:
        return (rng.normal(size=(n, 8)) @ mixing + 0.1 * rng.normal(size=(n, features))).astype(np.float32)

    spec = ModelSpec("dense", (features,), 16, "linear", "relu")
    trainer = LocalTrainer(spec, TrainSettings(64, 0.005, 0.0))
    trainer.fit(normal(4000), epochs=5, seed=0)
    calibration = normal(1000)
    scorer = ResidualScorer.fit("max-standardized", residuals(trainer.model, spec, calibration))
    threshold = fit_threshold(scorer.score(residuals(trainer.model, spec, calibration)), "percentile")
    low, high = evasion.input_range("tabular", calibration)
    return evasion.Target(trainer.model, spec, scorer, threshold, low, high), normal(rows)


def _eager_score(target: evasion.Target, x: np.ndarray) -> np.ndarray:
    return target.score_tensor(tf.convert_to_tensor(x)).numpy().astype(np.float64)


def _eager_gradient(target: evasion.Target, x: np.ndarray) -> np.ndarray:
    x_tensor = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x_tensor)
        total = tf.reduce_sum(target.score_tensor(x_tensor))
    return tape.gradient(total, x_tensor).numpy()


def eager_pgd(target: evasion.Target, x: np.ndarray, epsilon: float, steps: int = 40, restarts: int = 2):
    """The earlier PGD (false-alarm direction, L-infinity): gradient pass, step, then a score pass."""
    rng = np.random.default_rng(0)
    best, best_score = x.copy(), _eager_score(target, x)
    sizes = epsilon * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * np.arange(steps) / max(steps - 1, 1))))
    for restart in range(restarts):
        current = x if restart == 0 else evasion.random_perturbation(target, x, epsilon, "linf", rng)
        for size in sizes:
            step = size * np.sign(_eager_gradient(target, current))
            current = evasion.project(target, x, current + step, "linf", epsilon)
            score = _eager_score(target, current)
            better = score > best_score
            best, best_score = np.where(better[:, None], current, best), np.where(better, score, best_score)
    return best


def eager_spsa(target: evasion.Target, x: np.ndarray, epsilon: float, budget: int = 500, samples: int = 16):
    """The earlier SPSA (false-alarm direction): two score calls per probe."""
    rng, probe, step_size = np.random.default_rng(0), 0.01, epsilon / 10
    current, best, best_score, used = x.copy(), x.copy(), _eager_score(target, x), 1
    while used + 2 * samples + 1 <= budget:
        estimate = np.zeros_like(current, dtype=np.float64)
        for _ in range(samples):
            flips = rng.choice(np.array([-1.0, 1.0], np.float32), size=current.shape)
            up = _eager_score(
                target, evasion.project(target, x, current + probe * flips, "linf", epsilon + probe)
            )
            down = _eager_score(
                target, evasion.project(target, x, current - probe * flips, "linf", epsilon + probe)
            )
            estimate += ((up - down) / (2 * probe))[:, None] * flips
        current = evasion.project(target, x, current + step_size * np.sign(estimate), "linf", epsilon)
        used += 2 * samples + 1
        score = _eager_score(target, current)
        better = score > best_score
        best, best_score = np.where(better[:, None], current, best), np.where(better, score, best_score)
    return best


def _alarm_rate(target: evasion.Target, x: np.ndarray) -> float:
    return float(np.mean(target.score(x) > target.threshold))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--features", type=int, default=207)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    target, x = _detector(args.rows, args.features)
    runs = {
        "pgd": (
            lambda: eager_pgd(target, x, 0.05),
            lambda: evasion.pgd(target, x, 0.05, "linf", "false-alarm"),
        ),
        "spsa": (
            lambda: eager_spsa(target, x, 0.05),
            lambda: evasion.spsa(target, x, 0.05, "false-alarm", query_budget=500)[0],
        ),
    }
    result: dict[str, dict[str, float]] = {}
    for name, (eager, current) in runs.items():
        current()  # compile outside the timing, as every evaluation after its first attack does
        timings: dict[str, list[float]] = {"eager": [], "current": []}
        rates = {}
        for _ in range(args.repeats):  # alternating, so load on this shared machine hits both alike
            for label, attack in (("eager", eager), ("current", current)):
                started = time.perf_counter()
                reached = attack()
                timings[label].append(time.perf_counter() - started)
                rates[label] = _alarm_rate(target, reached)
        eager_s, current_s = min(timings["eager"]), min(timings["current"])
        result[name] = {
            "eager_s": round(eager_s, 3),
            "current_s": round(current_s, 3),
            "ratio": round(eager_s / current_s, 2),
            "false_alarm_rate_eager": rates["eager"],
            "false_alarm_rate_current": rates["current"],
        }
        print(
            f"{name}: eager {eager_s:.2f} s, current {current_s:.2f} s; false alarms reached "
            f"{rates['eager']:.3f} vs {rates['current']:.3f}"
        )
    RESULT.parent.mkdir(exist_ok=True)
    RESULT.write_text(json.dumps({"rows": args.rows, "features": args.features, **result}, indent=2))
    print(f"speed-up, eager / current: PGD {result['pgd']['ratio']}x, SPSA {result['spsa']['ratio']}x")


if __name__ == "__main__":
    main()
