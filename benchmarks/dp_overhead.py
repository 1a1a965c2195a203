"""DP-SGD epoch time over non-private epoch time, same model, data and batch size (issue 4, goal 1).

Both trainers are fedae's own ``LocalTrainer`` (the code a client runs): the plain one takes shuffled
batches of ``--batch`` rows, the DP one Poisson batches of expected size ``--batch`` with per-example
clipping and noise. Each is built and traced first (not timed); then epochs alternate plain, DP, plain,
DP, ... so that both see the same machine load, and the ratio of the medians is printed. This machine is
shared and noisy: read the ratio, not the seconds.

    uv run python -m benchmarks.dp_overhead [--models dense conv vae conv-exact] [--rows 2048] [--batch 64]
        [--two-pass]

``KIND-exact`` forces exact per-example gradients, ``KIND-fast`` the registered fast norms (tensorflow-
privacy's, plus ``shared.conv_norms`` for convolutions; book-kept for models of Dense layers); a bare kind
takes the trainer's default. ``--two-pass`` also times, alternating with the others, the fast norms'
second forward and backward pass instead of book-keeping (``shared.bookkeeping``) where a model uses it.
"""

from __future__ import annotations

import argparse
import statistics
import time

from shared.tfenv import configure_tensorflow, load_tensorflow

load_tensorflow()  # the import-time switches before TensorFlow and tensorflow-privacy: keep first

# isort: split

import numpy as np

from benchmarks.simrun import machine, write_result
from shared.models import ModelSpec
from shared.training import LocalTrainer, TrainSettings

# The seed's models: a 784-wide dense autoencoder (784-256-64-16), the 28x28 conv autoencoder, a VAE.
SPECS = {
    "dense": ModelSpec("dense", (784,), 16, "sigmoid"),
    "conv": ModelSpec("conv", (28, 28, 1), 16, "sigmoid"),
    "vae": ModelSpec("vae", (784,), 16, "sigmoid"),
}


def epoch_seconds(trainer: LocalTrainer, x: np.ndarray, noise: float, seed: int) -> float:
    start = time.perf_counter()
    trainer.fit(x, epochs=1, noise_multiplier=noise, seed=seed)
    return time.perf_counter() - start


def norms_label(trainer: LocalTrainer) -> str:
    if trainer.bookkeeping:
        return "book-keeping (1 pass)"
    return "fast (ghost) clipping" if trainer.fast_clipping else "per-example gradients"


def measure(kind: str, rows: int, batch: int, repeats: int, two_pass: bool) -> list[dict[str, float | str]]:
    # "-exact": per-example gradients; "-fast": registered fast norms; bare: the trainer's default.
    fast = {"exact": False, "fast": True}.get(kind.rpartition("-")[2]) if "-" in kind else None
    spec = SPECS[kind.partition("-")[0]]
    rng = np.random.default_rng(0)
    x = rng.random((rows, *spec.input_shape), dtype=np.float32)
    plain = LocalTrainer(spec, TrainSettings(batch, 1e-3, 0.0))
    private = {kind: LocalTrainer(spec, TrainSettings(batch, 1e-3, 1.0), fast_norms=fast)}
    if two_pass and private[kind].bookkeeping:
        private[f"{kind}-2pass"] = LocalTrainer(
            spec, TrainSettings(batch, 1e-3, 1.0), fast_norms=fast, bookkeeping_clipping=False
        )
    epoch_seconds(plain, x, 0.0, 0)  # build, trace and compile: not timed
    for trainer in private.values():
        epoch_seconds(trainer, x, 1.0, 0)
    plain_times: list[float] = []
    dp_times: dict[str, list[float]] = {name: [] for name in private}
    for i in range(repeats):
        plain_times.append(epoch_seconds(plain, x, 0.0, i + 1))
        for name, trainer in private.items():
            dp_times[name].append(epoch_seconds(trainer, x, 1.0, i + 1))
    plain_s = statistics.median(plain_times)
    return [
        {
            "model": name,
            "norms": norms_label(trainer),
            "plain_s": plain_s,
            "dp_s": statistics.median(dp_times[name]),
            "ratio": statistics.median(dp_times[name]) / plain_s,
        }
        for name, trainer in private.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    kinds = [*SPECS, *(f"{k}-{path}" for k in SPECS for path in ("exact", "fast"))]
    parser.add_argument(
        "--models", nargs="+", default=["dense", "vae", "conv-fast", "conv-exact"], choices=kinds
    )
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--two-pass", action="store_true", help="also time the fast norms' second pass")
    args = parser.parse_args()
    device = configure_tensorflow(None)
    print(f"machine: {machine()}, device: {device}")
    print(f"{args.rows} rows, batch {args.batch}, median of {args.repeats} alternating epochs each")
    print(f"{'model':<10} {'DP norms':<24} {'plain s/epoch':>13} {'DP s/epoch':>11} {'DP / plain':>10}")
    results = []
    for kind in args.models:
        for r in measure(kind, args.rows, args.batch, args.repeats, args.two_pass):
            results.append(r)
            print(
                f"{r['model']:<10} {r['norms']:<24} {r['plain_s']:>13.3f} {r['dp_s']:>11.3f} "
                f"{r['ratio']:>10.2f}"
            )
    path = write_result(
        f"dp_overhead_batch{args.batch}", {"machine": machine(), "args": vars(args), "runs": results}
    )
    print(f"result: {path}")
    print("DP-SGD / plain epoch time: " + ", ".join(f"{r['model']} {r['ratio']:.2f}" for r in results))


if __name__ == "__main__":
    main()
