"""Per-client-round wall time inside Flower's Simulation Engine over the local fit alone (issue 4,
goal 2), for fedae's reused trainer with one or two simulation workers, and for Flower's TensorFlow
quickstart pattern (new Keras session, model and traced functions in every call), in one run.

Each variant is a fresh ``fedae simulate`` process (benchmarks/simrun.py) of the default fleet
federation; the figures are medians over rounds 2..R (round 1 starts the workers and traces). Per round:

- ``train s``: from the round's start until every train reply is in (Flower messaging, Ray, the
  ClientApp: decode, ledger charge and accounting, data, fit, reply);
- ``fits s``: the clients' local fits, summed (``fit-seconds`` each client reports);
- per-client-round / fit = ``train s * workers / fits s``: the worker time a client round takes over
  its fit (with one worker the clients run one after another, so this is ``train s / fits s``).

    uv run python -m benchmarks.round_overhead [--rounds 5] [--clients 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from benchmarks.simrun import GIB, machine, simulate, write_result

VARIANTS = {
    # name: (cpus per client, extra environment)
    "reused, 1 worker x 2 threads": (2, {}),
    "reused, 2 workers x 1 thread": (1, {}),
    "quickstart, 1 worker x 2 threads": (2, {"FEDAE_REBUILD_TRAINER": "1"}),
}


def measure(name: str, clients: int, rounds: int) -> dict[str, float | str]:
    cpus, env = VARIANTS[name]
    workers = max(1, (os.cpu_count() or 1) // cpus)
    with tempfile.TemporaryDirectory() as tmp:
        run = simulate(Path(tmp) / "run", clients, rounds, "", cpus_per_client=cpus, extra_env=env)
    steady = run.rounds()

    def median(key: str) -> float:
        return statistics.median(r["timing_s"][key] for r in steady)

    train, fits = median("train"), median("clients_fit_sum")
    return {
        "variant": name,
        "workers": workers,
        "round_s": median("round"),
        "train_s": train,
        "evaluate_s": median("evaluate"),
        "fits_s": fits,
        "handlers_s": median("clients_handler_sum"),
        "client_rounds_per_s": clients / train,
        "round_over_fit": train * workers / fits,
        "handler_over_fit": median("clients_handler_sum") / fits,
        "peak_rss_gib": run.memory.rss / GIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"fleet, {args.clients} clients, DP-SGD, medians of rounds 2..{args.rounds}")
    print(
        f"{'variant':<34} {'round s':>7} {'train s':>7} {'fits s':>6} {'handlers s':>10} "
        f"{'client rounds/s':>15} {'round/fit':>9} {'handler/fit':>11} {'peak RSS GiB':>12}"
    )
    results = {}
    for name in args.variants:
        r = measure(name, args.clients, args.rounds)
        results[name] = r
        print(
            f"{name:<34} {r['round_s']:>7.2f} {r['train_s']:>7.2f} {r['fits_s']:>6.2f} "
            f"{r['handlers_s']:>10.2f} {r['client_rounds_per_s']:>15.2f} {r['round_over_fit']:>9.2f} "
            f"{r['handler_over_fit']:>11.2f} {r['peak_rss_gib']:>12.2f}"
        )
    one = results.get("reused, 1 worker x 2 threads") or next(iter(results.values()))
    two = results.get("reused, 2 workers x 1 thread")
    quick = results.get("quickstart, 1 worker x 2 threads")
    speedup = quick["train_s"] / one["train_s"] if quick else float("nan")
    throughput = two["client_rounds_per_s"] / one["client_rounds_per_s"] if two else float("nan")
    path = write_result("round_overhead", {"machine": machine(), "args": vars(args), **results})
    print(f"result: {path}")
    print(
        f"per-client round / local fit: {one['round_over_fit']:.2f} in the engine, "
        f"{one['handler_over_fit']:.2f} in the ClientApp (goal <= 1.3); client rounds per second, "
        f"2 workers / 1: {throughput:.2f}; "
        f"quickstart pattern's train phase / fedae's: {speedup:.2f}"
    )


if __name__ == "__main__":
    main()
