"""Checks on one client's returned model before the server aggregates it: plain numpy, no Flower.

A client update that is malformed (a missing or reshaped layer, another dtype), not finite, or far from
the model the server sent would spoil the aggregate for everyone: one NaN makes the FedAvg mean NaN,
and one huge update moves it anywhere (a scaled "model replacement"). The server rejects such an update
with a reason that names the client, and the round goes on with the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class UpdateCheck:
    """The verdict on one update: ``reason`` is None when it may be aggregated."""

    reason: str | None
    norm: float | None  # L2 norm of (update - global) over all weights; None where it cannot be formed

    @property
    def accepted(self) -> bool:
        return self.reason is None


def check_update(
    global_weights: Sequence[np.ndarray], update: Sequence[np.ndarray], max_norm: float
) -> UpdateCheck:
    """Compare a client's returned weights with the global ``global_weights`` it was sent.

    ``max_norm``: the largest accepted L2 distance between the two (0: no bound). The first problem
    found is the reason, naming the array (by position, as Flower's ArrayRecord orders them).
    """
    if len(update) != len(global_weights):
        return UpdateCheck(f"{len(update)} weight arrays, the model has {len(global_weights)}", None)
    squared = 0.0
    for index, (sent, returned) in enumerate(zip(global_weights, update, strict=True)):
        if returned.shape != sent.shape:
            return UpdateCheck(f"array {index} has shape {returned.shape}, the model's is {sent.shape}", None)
        if returned.dtype != sent.dtype:
            return UpdateCheck(f"array {index} has dtype {returned.dtype}, the model's is {sent.dtype}", None)
        bad = ~np.isfinite(returned)
        if bad.any():
            return UpdateCheck(
                f"array {index} holds {int(bad.sum())} non-finite value(s) (NaN or infinity)", None
            )
        # float64 for the sum: float32 squares of many weights lose the small ones.
        squared += float(np.sum(np.square(returned.astype(np.float64) - sent.astype(np.float64))))
    norm = float(np.sqrt(squared))
    if max_norm > 0 and norm > max_norm:
        return UpdateCheck(f"update norm {norm:.4g} is above max-update-norm {max_norm:g}", norm)
    return UpdateCheck(None, norm)


def deltas(global_weights: Sequence[np.ndarray], update: Sequence[np.ndarray]) -> list[np.ndarray]:
    """What a client's returned model changed: ``update - global_weights`` per array, in float64."""
    return [u.astype(np.float64) - g.astype(np.float64) for g, u in zip(global_weights, update, strict=True)]


def apply_deltas(global_weights: Sequence[np.ndarray], changes: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``global_weights`` plus ``changes``, in the model's own dtypes (the server checks them)."""
    return [(g.astype(np.float64) + d).astype(g.dtype) for g, d in zip(global_weights, changes, strict=True)]


def clip_update(
    global_weights: Sequence[np.ndarray], update: Sequence[np.ndarray], norm: float, bound: float
) -> list[np.ndarray]:
    """``update`` moved back towards ``global_weights`` so that its distance from them (``norm``, as
    ``check_update`` measured it) is ``bound``."""
    if not (bound > 0 and norm > 0):
        raise ValueError(f"bound and norm must be positive, got {bound} and {norm}")
    factor = min(1.0, bound / norm)
    return apply_deltas(global_weights, [factor * d for d in deltas(global_weights, update)])
