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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        np.savez(handle, **flat, **{_STATE_KEY: np.array(json.dumps(header))})
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself must survive a power cut
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
            f"{path}: the run's checkpoint cannot be read ({err}); move it away to start a new run in "
            "another out-dir"
        ) from err
    if header.get("version") != FORMAT_VERSION:
        raise ConfigError(
            f"{path}: checkpoint format {header.get('version')}, this fedae reads {FORMAT_VERSION}"
        )
    return Checkpoint(
        header["run_key"], int(header["completed_round"]), header["run_config"], arrays, header["state"]
    )


def check_resumable(checkpoint: Checkpoint, config: FedaeConfig, path: Path) -> None:
    """Refuse to resume a checkpoint under a different configuration (other than the round count)."""
    current = {k: v for k, v in config.to_run_config().items() if k not in RESUMABLE_CHANGES}
    saved = {k: v for k, v in checkpoint.run_config.items() if k not in RESUMABLE_CHANGES}
    differing = sorted(k for k in set(current) | set(saved) if current.get(k) != saved.get(k))
    if differing:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differing)
        raise ConfigError(
            f"{path} holds round {checkpoint.completed_round} of a run with other settings ({shown}); "
            "resume with the same run config (num-server-rounds may grow), or use a new out-dir"
        )
