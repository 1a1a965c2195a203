"""A client's last update of each run, kept beside its privacy ledger, so a round asked for again is
answered again without a second training.

When the server restarts in the middle of a round (``shared/checkpoint.py``) it asks for that round
again, under the same run key and with the same global model. A client that trained it already sends
the update it kept: the same output again is post-processing of a release its ledger already paid for,
so nothing new is charged. Training again would release a second, different update of the same data,
which must be charged again; that happens only when no kept update matches (the client died between its
charge and keeping the update).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.checkpoint import atomic_savez

REPLIES_DIR = "replies"
_META = "__meta__"


def weights_digest(weights: Sequence[np.ndarray]) -> str:
    """SHA-256 over every array's dtype, shape and bytes: the same model gives the same digest."""
    digest = hashlib.sha256()
    for array in weights:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class KeptReply:
    weights: list[np.ndarray]
    num_examples: int
    train_loss: float


class ReplyStore:
    """One file per run key, holding the client's latest round of that run (older rounds are never asked
    again: the server's checkpoint is past them)."""

    def __init__(self, ledger_file: Path) -> None:
        self.folder = Path(ledger_file).parent / REPLIES_DIR

    def _path(self, run_key: str) -> Path:
        return self.folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', run_key)}.npz"

    def keep(
        self,
        run_key: str,
        server_round: int,
        received: str,
        weights: Sequence[np.ndarray],
        num_examples: int,
        train_loss: float,
    ) -> None:
        """Keep this round's update (``received``: the digest of the global model it was trained from)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "round": server_round,
            "received": received,
            "num_examples": num_examples,
            "train_loss": train_loss,
        }
        arrays = {f"w{i}": w for i, w in enumerate(weights)}
        atomic_savez(self._path(run_key), {**arrays, _META: np.array(json.dumps(meta))})

    def find(self, run_key: str, server_round: int, received: str) -> KeptReply | None:
        """The kept update of ``server_round`` trained from the same global model, or None."""
        path = self._path(run_key)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as archive:
                meta = json.loads(str(archive[_META]))
                if meta["round"] != server_round or meta["received"] != received:
                    return None
                count = len([k for k in archive.files if k != _META])
                weights = [archive[f"w{i}"] for i in range(count)]
        except (OSError, ValueError, KeyError):
            return None  # an unreadable kept update is as good as none: the round is trained (and charged)
        return KeptReply(weights, int(meta["num_examples"]), float(meta["train_loss"]))
