"""Run a whole federation in one process with Flower's Simulation Engine (Ray).

Worker count: Flower gives each simulated client 2 CPUs by default, which on a 2-core machine means one
client trains at a time. fedae instead starts one worker per core, each with a one-thread TensorFlow:
measured on 2 cores (benchmarks/round_overhead.py, docs/BENCHMARKS.md), two one-thread workers run
1.3-1.7x the client rounds per second of one two-thread worker, because TensorFlow's intra-op threads
barely speed up steps this small. Each worker costs about 1.1 GiB (its own TensorFlow, model and compiled
functions), so memory caps the count (``WORKER_MEMORY_GIB`` each, beside 2 GiB for the driver and Ray),
and with a GPU the fractional ``num_gpus`` share does (four clients per GPU by default).
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

from shared.config import FedaeConfig
from shared.data.sources import client_train_rows, load_client_data, load_server_data, num_clients_for
from shared.privacy import check_delta

logger = logging.getLogger("fedae")


def validate_inputs(config: FedaeConfig) -> int:
    """Check every part of the data before Flower starts, so bad input fails fast and clearly.

    Site files are read (and kept for the run); generated fleet sites are counted, not generated.

    Returns the number of clients. Raises ``DataError`` / ``ConfigError`` naming the problem.
    """
    from shared.config import ConfigError, check_combinations

    server = load_server_data(config)
    num_clients = num_clients_for(config)
    if num_clients < 1:
        raise ConfigError("a federation needs at least one client")
    check_combinations(config, num_clients)  # again, now that site files have been counted
    for client_id in range(num_clients):
        # Counted, not generated, where the source allows (fleet sites): data stays lazy until sampled.
        rows = client_train_rows(config, client_id)
        if rows < config.batch_size:
            raise ConfigError(
                f"client {client_id} has {rows} training rows, fewer than "
                f"batch-size {config.batch_size}; lower batch-size or add data"
            )
        if config.secure_aggregation != "none" and rows > config.secagg_max_weight:
            raise ConfigError(
                f"client {client_id} has {rows} training rows, more than secagg-max-weight "
                f"{config.secagg_max_weight:g}: SecAgg+ scales each model by n / max-weight before "
                "quantising it, so this client's weights would be clipped; raise secagg-max-weight to at "
                "least the largest client's row count"
            )
        if config.scenario == "files":  # the only source whose parts come from different files
            shape = load_client_data(config, client_id).x_train.shape[1:]
            if shape != server.x_test.shape[1:]:
                raise ConfigError(
                    f"client {client_id}'s rows have shape {shape}, the test data {server.x_test.shape[1:]}"
                )
        if config.dp_enabled:
            try:
                check_delta(config.delta, rows)
            except ValueError as err:
                raise ConfigError(f"client {client_id}: {err}") from err
    return num_clients


def backend_config(cpus_per_client: int, gpus_per_client: float) -> dict[str, Any]:
    return {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client},
        "init_args": {"logging_level": "ERROR", "log_to_driver": False},
    }


def simulate(
    config: FedaeConfig,
    cpus_per_client: int | None = None,
    gpus_per_client: float | None = None,
    verbose: bool = False,
    compare_baselines: bool = True,
) -> dict[str, Any]:
    """Run the federation described by ``config`` and return its summary (also in RUN_DIR/summary.json).

    ``compare_baselines`` trains the central reference models on every client's data pooled in this
    process after the rounds: worth it for a report, not for a sweep over many clients."""
    from shared.tfenv import load_tensorflow

    load_tensorflow()  # before flwr, which imports TensorFlow itself
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import build_server_app
    from shared.pipeline import default_out_dir
    from simulations.adversary import adversary_mixins

    if not verbose:
        # fedae prints its own progress line per round; Flower's per-round lines and its deprecation
        # notice for run_simulation are for --verbose. Set after importing flwr, which resets its level.
        logging.getLogger("flwr").setLevel(logging.ERROR)
    num_clients = validate_inputs(config)
    if not config.out_dir:
        config = config.replace(out_dir=str(default_out_dir(config)))
    out_dir = Path(config.out_dir).resolve()
    config = config.replace(out_dir=str(out_dir))
    gpus = gpus_per_client if gpus_per_client is not None else _default_gpu_share()
    cpus = cpus_per_client or default_cpus_per_client(gpus)
    # Workers inherit the environment: their TensorFlow uses the cores Ray gives the worker.
    os.environ["FEDAE_TF_THREADS"] = str(cpus)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logger.info(
        "simulating %d clients x %d rounds (%s, %s model, %s); outputs in %s",
        num_clients,
        config.num_server_rounds,
        config.scenario,
        config.model,
        f"DP-SGD sigma={config.noise_multiplier} C={config.l2_norm_clip:g} {config.sampling}"
        + (f", client-level DP {config.client_dp}" if config.client_dp_enabled else "")
        if config.dp_enabled
        else "no DP",
        out_dir,
    )
    summary_path = out_dir / "summary.json"
    if summary_path.exists():
        summary_path.unlink()  # a stale summary must never pass for this run's result
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=build_server_app(
                config, compare_baselines=compare_baselines, mixins=adversary_mixins(config, num_clients)
            ),
            client_app=client_app,
            num_supernodes=num_clients,
            backend_config=backend_config(cpus, gpus),
            verbose_logging=verbose,
        )
    if not summary_path.exists():
        raise RuntimeError(
            "the simulation ended without writing summary.json; rerun with --verbose for Flower's log"
        )
    return json.loads(summary_path.read_text())


# One worker measured 1.1 GiB RSS (docs/BENCHMARKS.md), plus up to FEDAE_CLIENT_DATA_CACHE_MB (256 MiB)
# of cached client data.
WORKER_MEMORY_GIB = 1.5


def default_cpus_per_client(
    gpus_per_client: float, cores: int | None = None, memory_gib: float | None = None
) -> int:
    """CPUs per simulation worker: one worker per core, fewer workers where memory or the GPU share
    allows fewer (each then gets more cores for its TensorFlow threads)."""
    cores = cores or os.cpu_count() or 1
    if memory_gib is None:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    workers = min(cores, max(1, int((memory_gib - 2.0) / WORKER_MEMORY_GIB)))
    if gpus_per_client > 0:
        workers = min(workers, max(1, int(_visible_gpus() / gpus_per_client)))
    # Rounded up: Ray starts cores // cpus workers, which must not exceed the count chosen here.
    return math.ceil(cores / workers)


def _visible_gpus() -> int:
    from shared.tfenv import load_tensorflow

    return len(load_tensorflow().config.list_physical_devices("GPU"))


def _default_gpu_share() -> float:
    """Let up to four simulated clients share each visible GPU; none on a CPU-only machine."""
    return 0.25 if _visible_gpus() else 0.0
