"""Scale (issue 4, goal 3): a simulated federation of 100 and of 1,000 clients with the same total data,
10 % of the clients sampled per round; per-round wall time and the peak memory of the whole simulation.

The fleet scenario gives each site ``total-rows / clients`` rows, so both runs hold the same data; each
client generates its rows only when it is first sampled (``shared.data.sources``), and the coordinator's
calibration and test vehicles come from at most 20 sites however many join. Each run is a fresh
``fedae simulate`` process (benchmarks/simrun.py samples its process tree's memory).

    uv run python -m benchmarks.simulation_scale [--clients 100 1000] [--total-rows 200000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.simrun import GIB, machine, simulate, write_result

FEATURES = 207  # fleet telemetry channels (shared/data/fleet.py)


def measure(
    clients: int, total_rows: int, rounds: int, fraction: float, batch: int, cpus: int | None
) -> dict[str, Any]:
    rows = total_rows // clients
    run_config = (
        f"rows-per-site={rows} fraction-train={fraction} fraction-evaluate={fraction} batch-size={batch}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        run = simulate(Path(tmp) / "run", clients, rounds, run_config, cpus_per_client=cpus)
    steady = run.rounds()

    def median(key: str) -> float:
        return statistics.median(r["timing_s"][key] for r in steady)

    return {
        "clients": clients,
        "rows_per_client": rows,
        "clients_per_round": statistics.median(len(r["clients"]) for r in steady),
        "data_mib": clients * rows * FEATURES * 4 / 2**20,
        "peak_rss_gib": run.memory.rss / GIB,
        "peak_pss_gib": run.memory.pss / GIB,
        "processes": run.memory.processes,
        "pss_gib_by_process": {k: round(v / GIB, 3) for k, v in sorted(run.memory.by_process.items())},
        "first_round_s": run.summary["rounds"][0]["timing_s"]["round"],
        "round_s": median("round"),
        "train_s": median("train"),
        "evaluate_s": median("evaluate"),
        "fits_s": median("clients_fit_sum"),
        "handlers_s": median("clients_handler_sum"),
        "run_s": run.wall_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--total-rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cpus-per-client", type=int, help="default: fedae's (one worker per core)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(
        f"fleet, {args.total_rows} rows in all, {args.fraction:.0%} of clients per round, "
        f"batch {args.batch}, {args.rounds} rounds; steady state = median of rounds 2..{args.rounds}"
    )
    header = (
        f"{'clients':>7} {'rows/client':>11} {'per round':>9} {'data MiB':>8} {'peak RSS GiB':>12} "
        f"{'peak PSS GiB':>12} {'round 1 s':>9} {'round s':>7} {'train s':>7} {'fits s':>6} "
        f"{'handlers s':>10}"
    )
    print(header)
    results = []
    for clients in args.clients:
        r = measure(clients, args.total_rows, args.rounds, args.fraction, args.batch, args.cpus_per_client)
        results.append(r)
        print(
            f"{r['clients']:>7} {r['rows_per_client']:>11} {r['clients_per_round']:>9.0f} "
            f"{r['data_mib']:>8.0f} "
            f"{r['peak_rss_gib']:>12.2f} {r['peak_pss_gib']:>12.2f} {r['first_round_s']:>9.1f} "
            f"{r['round_s']:>7.2f} {r['train_s']:>7.2f} {r['fits_s']:>6.2f} {r['handlers_s']:>10.2f}"
        )
    for r in results:
        print(f"{r['clients']} clients, PSS GiB at the peak by process: {r['pss_gib_by_process']}")
    small, large = results[0], results[-1]
    ratios = {
        "memory": large["peak_rss_gib"] / small["peak_rss_gib"],
        "round_time": large["round_s"] / small["round_s"],
    }
    name = "simulation_scale" + (f"_cpus{args.cpus_per_client}" if args.cpus_per_client else "")
    path = write_result(name, {"machine": machine(), "args": vars(args), "runs": results, **ratios})
    print(f"result: {path}")
    print(
        f"{large['clients']} vs {small['clients']} clients, same data: peak memory (RSS) ratio "
        f"{ratios['memory']:.2f} (largest {large['peak_rss_gib']:.2f} GiB, goal <= 4), per-round wall time "
        f"ratio {ratios['round_time']:.2f}"
    )


if __name__ == "__main__":
    main()
