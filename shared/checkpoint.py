"""The server's per-round checkpoint: one file, replaced atomically, from which a run resumes.

A ServerApp (or the SuperLink host) that dies between rounds loses nothing: the next start with the same
``out-dir`` finds ``checkpoint.npz`` and continues with the next round from the last completed one's
weights, round number, strategy state and privacy figures, under the same run key, so that clients see
the rounds they already trained as trained (``shared.replies``) and no round is counted twice.

One ``.npz`` holds the arrays and, as a JSON string, everything else; it is written to a temporary file,
flushed to disk and renamed over the previous one, so a crash mid-write leaves the previous checkpoint.
Plain numpy and JSON, no pickle: a checkpoint is data, never code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from shared.config import ConfigError, FedaeConfig

CHECKPOINT_FILE = "checkpoint.npz"
FORMAT_VERSION = 1
_STATE_KEY = "__state__"
# Keys a resumed run may change: how many rounds in all (to extend a run), and where things are written.
RESUMABLE_CHANGES = ("num-server-rounds", "out-dir")


@dataclass
class Checkpoint:
    run_key: str  # the run's identity across restarts (Flower gives each start a new run id)
    completed_round: int
    run_config: dict[str, Any]
    arrays: dict[str, list[np.ndarray]] = field(default_factory=dict)  # named lists: "global", "best", ...
    state: dict[str, Any] = field(default_factory=dict)  # JSON-able: round table, records, strategy


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically (temporary file, fsync, rename, fsync of the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "version": FORMAT_VERSION,
        "run_key": checkpoint.run_key,
        "completed_round": checkpoint.completed_round,
        "run_config": checkpoint.run_config,
        "array_counts": {name: len(arrays) for name, arrays in checkpoint.arrays.items()},
        "state": checkpoint.state,
    }
    flat = {
        f"{name}/{i}": array for name, arrays in checkpoint.arrays.items() for i, array in enumerate(arrays)
    }
    atomic_savez(path, {**flat, _STATE_KEY: np.array(json.dumps(header))})


def atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` to ``path`` so that a crash leaves either the old file or the new one, never half."""
    atomic_write(path, lambda handle: np.savez(handle, **arrays))


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through ``write`` into a temporary file beside it, flushed to disk, renamed over
    it, and the rename itself flushed: a crash leaves the old file or the new one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def load_checkpoint(path: Path) -> Checkpoint | None:
    """The checkpoint at ``path``, or None when there is none. A file that cannot be read is an error,
    never a reason to start over: the clients' ledgers already hold the rounds it recorded."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            header = json.loads(str(archive[_STATE_KEY]))
            arrays = {
                name: [archive[f"{name}/{i}"] for i in range(count)]
                for name, count in header["array_counts"].items()
            }
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(
            f"{path}: the run's checkpoint cannot be read ({err}); it is left as it is: start a new run "
            "in another out-dir"
        ) from err
    if header.get("version") != FORMAT_VERSION:
        raise ConfigError(
            f"{path}: checkpoint format {header.get('version')}, this fedae reads {FORMAT_VERSION}"
        )
    return Checkpoint(
        header["run_key"], int(header["completed_round"]), header["run_config"], arrays, header["state"]
    )


def check_resumable(checkpoint: Checkpoint, config: FedaeConfig, setup_digest: str, path: Path) -> None:
    """Refuse to resume a checkpoint under a different configuration (other than a larger round count)
    or with other data preparation (``setup_digest``: the schema and scaler the server sends)."""
    if config.num_server_rounds < checkpoint.completed_round:
        raise ConfigError(
            f"{path} holds {checkpoint.completed_round} completed rounds, more than num-server-rounds "
            f"{config.num_server_rounds}; resume with at least that many, or use a new out-dir"
        )
    if checkpoint.state.get("setup_digest") not in (None, setup_digest):
        raise ConfigError(
            f"{path} was written with another data schema or scaler (the server's test or calibration "
            "data changed); resume with the same data, or use a new out-dir"
        )
    current = {k: v for k, v in config.to_run_config().items() if k not in RESUMABLE_CHANGES}
    saved = {k: v for k, v in checkpoint.run_config.items() if k not in RESUMABLE_CHANGES}
    differing = sorted(k for k in set(current) | set(saved) if current.get(k) != saved.get(k))
    if differing:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differing)
        raise ConfigError(
            f"{path} holds round {checkpoint.completed_round} of a run with other settings ({shown}); "
            "resume with the same run config (num-server-rounds may grow), or use a new out-dir"
        )
