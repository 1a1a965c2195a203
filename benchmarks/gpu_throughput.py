"""Training throughput, examples per second, on GPU vs CPU for each model kind (issue 4, goal 4), with
and without DP-SGD, measured side by side in one run.

Each (kind, device) pair gets its own ``LocalTrainer`` built and run under ``tf.device``; the first
epoch builds and traces (not timed), then plain and DP epochs alternate and the medians are kept. On a
machine without a GPU only the CPU rows are measured and the last line says so: CI has no GPU, so the
GPU figures in docs/BENCHMARKS.md come from a GPU machine, named there.

    uv run python -m benchmarks.gpu_throughput [--models dense conv vae] [--rows 4096] [--batch 64]
"""

from __future__ import annotations

import argparse
import statistics

from shared.tfenv import configure_tensorflow, load_tensorflow

tf = load_tensorflow()  # the import-time switches before TensorFlow and tensorflow-privacy: keep first

# isort: split

import numpy as np

from benchmarks.dp_overhead import SPECS, epoch_seconds
from benchmarks.simrun import machine, write_result
from shared.training import LocalTrainer, TrainSettings


def examples_per_second(
    device: str, kind: str, rows: int, batch: int, repeats: int
) -> dict[str, float | str]:
    spec = SPECS[kind]
    x = np.random.default_rng(0).random((rows, *spec.input_shape), dtype=np.float32)
    with tf.device(device):
        plain = LocalTrainer(spec, TrainSettings(batch, 1e-3, 0.0))
        private = LocalTrainer(spec, TrainSettings(batch, 1e-3, 1.0))
        epoch_seconds(plain, x, 0.0, 0)  # build, trace and compile: not timed
        epoch_seconds(private, x, 1.0, 0)
        times: dict[str, list[float]] = {"plain": [], "dp": []}
        for i in range(repeats):
            times["plain"].append(epoch_seconds(plain, x, 0.0, i + 1))
            times["dp"].append(epoch_seconds(private, x, 1.0, i + 1))
    plain_s, dp_s = statistics.median(times["plain"]), statistics.median(times["dp"])
    return {"device": device, "model": kind, "plain_eps": rows / plain_s, "dp_eps": rows / dp_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SPECS), choices=list(SPECS))
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = configure_tensorflow(None)  # memory growth on every GPU, before any tensor exists
    gpus = tf.config.list_physical_devices("GPU")
    devices = ["/CPU:0", *(["/GPU:0"] if gpus else [])]
    print(f"machine: {machine()}; TensorFlow {tf.__version__}, default device {device}")
    print(f"{args.rows} rows, batch {args.batch}, median of {args.repeats} epochs; examples per second")
    print(f"{'model':<6} {'device':<7} {'plain ex/s':>11} {'DP ex/s':>9} {'DP / plain time':>15}")
    rows = []
    for kind in args.models:
        for dev in devices:
            r = examples_per_second(dev, kind, args.rows, args.batch, args.repeats)
            rows.append(r)
            print(
                f"{kind:<6} {dev.strip('/').split(':')[0]:<7} {r['plain_eps']:>11.0f} {r['dp_eps']:>9.0f} "
                f"{r['plain_eps'] / r['dp_eps']:>15.2f}"
            )
    speedups = {}
    if gpus:
        for kind in args.models:
            cpu, gpu = (r for r in rows if r["model"] == kind)
            speedups[kind] = gpu["dp_eps"] / cpu["dp_eps"]
    gpu_name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else None
    path = write_result(
        "gpu_throughput", {"machine": machine(), "gpu": gpu_name, "args": vars(args), "runs": rows}
    )
    print(f"result: {path}")
    if speedups:
        print(
            f"DP-SGD examples/s, GPU ({gpu_name}) / CPU: "
            + ", ".join(f"{kind} {s:.1f}x" for kind, s in speedups.items())
        )
    else:
        print("no GPU on this machine: CPU figures only (GPU / CPU ratio not measured)")


if __name__ == "__main__":
    main()
