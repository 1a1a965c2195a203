"""Run ``fedae simulate`` in a child process and sample the memory of its whole process tree.

The simulation benchmarks (``round_overhead``, ``simulation_scale``) share this: each run is a fresh
process, so one run's caches and compiled functions never flatter the next, and the memory figure covers
everything the simulation starts (the driver with the ServerApp, Ray's own processes, the simulation
workers with their TensorFlow).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

GIB = 1024**3


@dataclass
class MemoryPeak:
    """Peaks over the run, summed over the process tree at each sample.

    RSS counts shared pages (TensorFlow's libraries, mapped once per process) in every process, so its
    sum overstates; PSS splits each shared page between the processes that map it, so its sum is what
    the tree really occupies. Both are reported; the goal is judged on RSS, the stricter one."""

    rss: int = 0
    pss: int = 0
    processes: int = 0
    samples: int = 0
    # PSS by process name at the sample with the largest total PSS: where the memory is.
    by_process: dict[str, int] = field(default_factory=dict)

    def sample(self, root: psutil.Process) -> None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        rss = pss = 0
        by_process: dict[str, int] = {}
        for proc in tree:
            try:
                info, name = proc.memory_full_info(), proc.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
            by_process[name] = by_process.get(name, 0) + getattr(info, "pss", info.rss)
        if pss > self.pss:
            self.by_process = by_process
        self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
        self.processes = max(self.processes, len(tree))
        self.samples += 1


@dataclass
class SimRun:
    summary: dict[str, Any]
    memory: MemoryPeak
    wall_s: float
    env: dict[str, str] = field(default_factory=dict)

    def rounds(self, skip_first: bool = True) -> list[dict[str, Any]]:
        """Round rows with timings; the first round pays worker start-up and tracing, so it is left out
        of steady-state figures unless asked for."""
        rows = [r for r in self.summary["rounds"] if r.get("timing_s")]
        return rows[1:] if skip_first and len(rows) > 1 else rows


def simulate(
    out_dir: Path,
    clients: int,
    rounds: int,
    run_config: str,
    cpus_per_client: int | None = None,
    extra_env: dict[str, str] | None = None,
    interval_s: float = 0.5,
) -> SimRun:
    """``fedae simulate`` with these settings (no baseline models), sampled every ``interval_s``;
    ``cpus_per_client`` None keeps fedae's default worker count."""
    cmd = [
        sys.executable,
        "-m",
        "fedae",
        "simulate",
        "--clients",
        str(clients),
        "--rounds",
        str(rounds),
        "--run-config",
        run_config,
        *(["--cpus-per-client", str(cpus_per_client)] if cpus_per_client else []),
        "--no-baselines",
        "--out",
        str(out_dir),
    ]
    env = {**os.environ, **(extra_env or {})}
    peak = MemoryPeak()
    started = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(child.pid)
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak.sample(root)
            done.wait(interval_s)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    output, _ = child.communicate()
    done.set()
    watcher.join()
    wall = time.perf_counter() - started
    if child.returncode != 0:
        raise RuntimeError(f"simulation failed ({child.returncode}):\n{output[-3000:]}")
    summary = json.loads((out_dir / "summary.json").read_text())
    return SimRun(summary, peak, wall, dict(extra_env or {}))


def machine() -> str:
    """Cores, CPU model and memory, for the first line of every benchmark's output."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        cpu = models[0] if models else cpu
    return f"{os.cpu_count()} cores ({cpu}), {psutil.virtual_memory().total / GIB:.0f} GiB RAM"


def write_result(name: str, result: dict[str, Any]) -> Path:
    path = Path(__file__).parent / "results" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path
