"""DP-SGD epoch time over non-private epoch time, same model, data and batch size (issue 4, goal 1).

Both trainers are fedae's own ``LocalTrainer`` (the code a client runs): the plain one takes shuffled
batches of ``--batch`` rows, the DP one Poisson batches of expected size ``--batch`` with per-example
clipping and noise. Each is built and traced first (not timed); then epochs alternate plain, DP, plain,
DP, ... so that both see the same machine load, and the ratio of the medians is printed. This machine is
shared and noisy: read the ratio, not the seconds.

    uv run python -m benchmarks.dp_overhead [--models dense conv vae conv-exact] [--rows 2048] [--batch 64]

``KIND-exact`` forces exact per-example gradients, ``KIND-fast`` the registered fast norms (tensorflow-
privacy's, plus ``shared.conv_norms`` for convolutions); a bare kind takes the trainer's default.
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


def measure(kind: str, rows: int, batch: int, repeats: int) -> dict[str, float | bool | str]:
    # "-exact": per-example gradients; "-fast": registered fast norms; bare: the trainer's default.
    fast = {"exact": False, "fast": True}.get(kind.rpartition("-")[2]) if "-" in kind else None
    spec = SPECS[kind.partition("-")[0]]
    rng = np.random.default_rng(0)
    x = rng.random((rows, *spec.input_shape), dtype=np.float32)
    plain = LocalTrainer(spec, TrainSettings(batch, 1e-3, 0.0))
    private = LocalTrainer(spec, TrainSettings(batch, 1e-3, 1.0), fast_norms=fast)
    epoch_seconds(plain, x, 0.0, 0)  # build, trace and compile: not timed
    epoch_seconds(private, x, 1.0, 0)
    plain_times, dp_times = [], []
    for i in range(repeats):
        plain_times.append(epoch_seconds(plain, x, 0.0, i + 1))
        dp_times.append(epoch_seconds(private, x, 1.0, i + 1))
    plain_s, dp_s = statistics.median(plain_times), statistics.median(dp_times)
    return {
        "model": kind,
        "norms": "fast (ghost) clipping" if private.fast_clipping else "per-example gradients",
        "plain_s": plain_s,
        "dp_s": dp_s,
        "ratio": dp_s / plain_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    kinds = [*SPECS, *(f"{k}-{path}" for k in SPECS for path in ("exact", "fast"))]
    parser.add_argument(
        "--models", nargs="+", default=["dense", "vae", "conv-fast", "conv-exact"], choices=kinds
    )
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = configure_tensorflow(None)
    print(f"machine: {machine()}, device: {device}")
    print(f"{args.rows} rows, batch {args.batch}, median of {args.repeats} alternating epochs each")
    print(f"{'model':<10} {'DP norms':<24} {'plain s/epoch':>13} {'DP s/epoch':>11} {'DP / plain':>10}")
    results = []
    for kind in args.models:
        r = measure(kind, args.rows, args.batch, args.repeats)
        results.append(r)
        print(
            f"{r['model']:<6} {r['norms']:<24} {r['plain_s']:>13.3f} {r['dp_s']:>11.3f} {r['ratio']:>10.2f}"
        )
    path = write_result(
        f"dp_overhead_batch{args.batch}", {"machine": machine(), "args": vars(args), "runs": results}
    )
    print(f"result: {path}")
    print("DP-SGD / plain epoch time: " + ", ".join(f"{r['model']} {r['ratio']:.2f}" for r in results))


if __name__ == "__main__":
    main()
