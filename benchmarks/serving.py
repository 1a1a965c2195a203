"""`fedae serve` under load: requests and instances per second, p50 and p99 latency, against the bare
``detector.score`` call on the same batches, so the service's overhead is a ratio.

    uv run python -m benchmarks.serving [--bundle DIR] [--batches 1 256] [--clients 1 8] [--seconds 6]
                                        [--repeats 2]

The service runs as `fedae serve` in its own process; this process is the load: ``--clients`` threads,
each with its own keep-alive connection (httpx), each sending the same pre-encoded batch again and again
for ``--seconds``. The bare call runs here too, between the load phases (service, bare, service, bare,
...), so the shared machine's load hits both alike; each figure is the median over ``--repeats``. Before
measuring, the service's scores for the batch are checked against ``detector.score``.

Without ``--bundle`` a fleet-sized bundle is built without training (207 features, dense autoencoder,
max-standardized score, 95th-percentile threshold, drift reference): scoring costs the same whether or
not the weights were trained. ``--bundle RUN_DIR/bundle`` measures a real run's detector instead. Rows
are drawn around the bundle's own scaler (offset + scale x standard normal), so any bundle works.
"""

from __future__ import annotations

import shared.tfenv  # noqa: F401  (import-time switches before TensorFlow: keep first)

# isort: split

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.simrun import machine, write_result
from fedae.instances import InputSchema, instances_array, parse_json
from fedae.serve import bind_socket
from shared.data.fleet import feature_names, normal_rows
from shared.detector import Detector, describe_rule, fit_threshold, load_bundle, save_bundle
from shared.drift import DriftReference
from shared.models import ModelSpec, build_model, residuals
from shared.preprocess import Scaler
from shared.scoring import ResidualScorer

ROOT = Path(__file__).resolve().parents[1]


def fleet_bundle(folder: Path) -> Path:
    """The default fleet run's detector shape, untrained: 207 features, latent 16, max-standardized."""
    calibration = np.concatenate([normal_rows(0, site, 200) for site in range(5)]).astype(np.float32)
    scaler = Scaler.fit(calibration, "tabular", None, flatten=True)
    spec = ModelSpec("dense", scaler.model_input_shape, 16, "linear", "relu")
    model = build_model(spec)
    x = scaler.transform(calibration)
    scorer = ResidualScorer.fit("max-standardized", residuals(model, spec, x))
    scores = scorer.score(residuals(model, spec, x))
    names = feature_names()
    detector = Detector(
        model,
        spec,
        scaler,
        scorer,
        fit_threshold(scores, "percentile", 95.0),
        "percentile",
        {
            "input_schema": {"kind": "tabular", "shape": [len(names)], "feature_names": names},
            "threshold_rule": describe_rule("percentile", 95.0, 3.0),
            "privacy": {"note": "untrained benchmark bundle"},
            "training_run": {"scenario": "fleet", "rounds": 0},
        },
        DriftReference.from_scores(scores),
    )
    return save_bundle(detector, folder)


def start_service(bundle: Path, max_instances: int) -> tuple[subprocess.Popen, str]:
    with bind_socket("127.0.0.1", 0) as probe:  # a free port; released before the service binds it
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "fedae", "serve", str(bundle), "--port", str(port)]
    command += ["--max-instances", str(max_instances)]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.25)
    process.kill()
    raise RuntimeError(f"fedae serve did not start: {process.communicate()[1][-2000:]}")


def load_phase(url: str, body: bytes, clients: int, seconds: float) -> dict[str, float]:
    """``clients`` threads posting ``body`` for ``seconds``: requests/s and latency percentiles (ms)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: list[str] = []
    start_together = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=60, headers={"content-type": "application/json"}) as http:
            http.post("/v1/score", content=body).raise_for_status()  # connect and warm outside the timing
            start_together.wait()
            stop = time.perf_counter() + seconds
            while (now := time.perf_counter()) < stop:
                response = http.post("/v1/score", content=body)
                latencies[index].append(time.perf_counter() - now)
                if response.status_code != 200:
                    failures.append(response.text[:200])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    start_together.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[0]}")
    merged = np.array([value for values in latencies for value in values])
    return {
        "requests": len(merged),
        "requests_per_s": len(merged) / wall,
        "p50_ms": float(np.percentile(merged, 50) * 1e3),
        "p99_ms": float(np.percentile(merged, 99) * 1e3),
    }


def bare_phase(detector: Detector, x: np.ndarray, body: bytes, seconds: float) -> dict[str, float]:
    """``detector.score`` on the same batch, one call after another, in this process; and, for where the
    service's time goes, its parsing and checking of the same body (``fedae.instances``) alone."""
    detector.score(x)
    schema = InputSchema.from_detector(detector)
    times, checks = [], []
    stop = time.perf_counter() + seconds
    while (now := time.perf_counter()) < stop:
        detector.score(x)
        times.append(time.perf_counter() - now)
        if len(checks) < 50:
            started = time.perf_counter()
            instances_array(parse_json(body), schema, len(x))
            checks.append(time.perf_counter() - started)
    return {
        "calls": len(times),
        "p50_ms": float(np.median(times) * 1e3),
        "parse_check_p50_ms": float(np.median(checks) * 1e3),
    }


def check_answers(url: str, detector: Detector, x: np.ndarray) -> None:
    answer = httpx.post(f"{url}/v1/score", json={"instances": x.tolist()}, timeout=60).json()
    np.testing.assert_allclose(answer["scores"], detector.score(x), rtol=1e-5)


def summarise(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = [k for k in runs[0] if k not in ("requests", "calls")]
    return {k: statistics.median(run[k] for run in runs) for k in keys}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a bundle folder (default: build the fleet-sized one)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256], help="instances per request")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent connections")
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each load or bare phase")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        bundle = args.bundle or fleet_bundle(Path(scratch) / "bundle")
        detector = load_bundle(bundle)
        process, url = start_service(bundle, max(args.batches))
        try:
            print(f"machine: {machine()}; bundle {bundle} ({detector.bundle_id}); service at {url}")
            rng = np.random.default_rng(0)
            rows = []
            for batch in args.batches:
                noise = rng.normal(size=(batch, *detector.scaler.input_shape)).astype(np.float32)
                x = (detector.scaler.offset + detector.scaler.scale * noise).astype(np.float32)
                check_answers(url, detector, x)
                body = json.dumps({"instances": x.tolist()}).encode()
                for clients in args.clients:
                    service_runs, bare_runs = [], []
                    for _ in range(args.repeats):  # alternating, so load on this shared machine hits both
                        service_runs.append(load_phase(url, body, clients, args.seconds))
                        bare_runs.append(bare_phase(detector, x, body, args.seconds))
                    service, bare = summarise(service_runs), summarise(bare_runs)
                    row = {
                        "batch": batch,
                        "clients": clients,
                        "body_bytes": len(body),
                        **service,
                        "instances_per_s": service["requests_per_s"] * batch,
                        "bare_p50_ms": bare["p50_ms"],
                        "parse_check_p50_ms": bare["parse_check_p50_ms"],
                        "bare_calls_per_s": 1e3 / bare["p50_ms"],
                        # Time per request the service spends (1 / its throughput) over the bare call's:
                        # what the HTTP layer, JSON and checks add, with queueing taken out.
                        "cost_ratio": 1e3 / service["requests_per_s"] / bare["p50_ms"],
                        "p50_ratio": service["p50_ms"] / bare["p50_ms"],
                        "repeats": {"service": service_runs, "bare": bare_runs},
                    }
                    rows.append(row)
                    print(
                        f"batch {batch:4d}, {clients} client(s): {row['requests_per_s']:8.1f} req/s "
                        f"{row['instances_per_s']:9.0f} inst/s  p50 {row['p50_ms']:7.2f} ms  "
                        f"p99 {row['p99_ms']:7.2f} ms | bare p50 {row['bare_p50_ms']:6.2f} ms, parse+check "
                        f"{row['parse_check_p50_ms']:6.2f} ms | "
                        f"per-request cost x{row['cost_ratio']:.2f}, p50 x{row['p50_ratio']:.2f}",
                        flush=True,
                    )
        finally:
            process.terminate()
            process.communicate(timeout=60)
    header = ["batch", "clients", "req/s", "instances/s", "p50 ms", "p99 ms", "bare p50 ms", "parse+check ms"]
    header.append("cost ratio")
    print("\n| " + " | ".join(header) + " |\n" + "| --- " * len(header) + "|")
    for row in rows:
        cells = [
            row["batch"],
            row["clients"],
            f"{row['requests_per_s']:.1f}",
            f"{row['instances_per_s']:.0f}",
        ]
        keys = ("p50_ms", "p99_ms", "bare_p50_ms", "parse_check_p50_ms", "cost_ratio")
        cells += [f"{row[key]:.2f}" for key in keys]
        print("| " + " | ".join(map(str, cells)) + " |")
    path = write_result(
        "serving",
        {
            "machine": machine(),
            "bundle": str(args.bundle) if args.bundle else "fleet-sized, untrained (built by the benchmark)",
            "bundle_id": detector.bundle_id,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "runs": rows,
        },
    )
    print(f"written: {path}")
    worst = max(rows, key=lambda row: row["cost_ratio"])
    print(
        f"service per-request cost / bare detector.score: x{worst['cost_ratio']:.2f} at worst "
        f"(batch {worst['batch']}, {worst['clients']} client(s))"
    )


if __name__ == "__main__":
    main()
