"""Anomaly scores from reconstruction residuals (pure NumPy: testable without TensorFlow).

Three rules, chosen by ``anomaly-score``:

- ``mse``: mean squared residual over features, the seed's score. Features the model reconstructs
  poorly even on normal data dominate it.
- ``standardized``: each feature's squared residual divided by that feature's mean squared residual on
  the coordinator's normal calibration data, then averaged: a diagonal Mahalanobis distance of the
  residual, so a channel that is normally reconstructed to within millivolts counts as much as a noisy
  one.
- ``max-standardized``: the largest standardized term: one sensor going wrong (stuck, spiking, one
  degrading cell) is not diluted by two hundred healthy channels.

The per-feature scales come from calibration data only (no client data) and are saved in the bundle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCORE_RULES = ("mse", "standardized", "max-standardized")
# Scales are floored at this fraction of the mean scale: a feature reconstructed perfectly on every
# calibration row (an always-blank image border) must not turn any later deviation into infinity.
SCALE_FLOOR = 1e-6


@dataclass(frozen=True)
class ResidualScorer:
    rule: str
    scale: np.ndarray | None  # per-feature mean squared calibration residual (flattened); None for mse

    def __post_init__(self) -> None:
        if self.rule not in SCORE_RULES:
            raise ValueError(f"anomaly score must be one of {', '.join(SCORE_RULES)}, got {self.rule!r}")
        if self.rule != "mse" and (
            self.scale is None or not (np.isfinite(self.scale).all() and (self.scale > 0).all())
        ):
            raise ValueError(f"rule {self.rule!r} needs positive, finite per-feature scales")

    @classmethod
    def fit(cls, rule: str, calibration_residuals: np.ndarray) -> ResidualScorer:
        """Fit the per-feature scales on residuals of normal calibration rows."""
        if rule == "mse":
            return cls(rule, None)
        flat = _flat(calibration_residuals)
        if len(flat) == 0:
            raise ValueError("fitting a standardized score needs at least one calibration residual")
        scale = np.mean(np.square(flat, dtype=np.float64), axis=0)
        scale = np.maximum(scale, SCALE_FLOOR * scale.mean() + 1e-12)
        return cls(rule, scale.astype(np.float64))

    def score(self, residuals: np.ndarray) -> np.ndarray:
        squared = np.square(_flat(residuals), dtype=np.float64)
        if self.rule == "mse":
            return squared.mean(axis=1)
        assert self.scale is not None  # checked in __post_init__
        if squared.shape[1] != self.scale.size:
            raise ValueError(f"residuals have {squared.shape[1]} features, the scorer {self.scale.size}")
        standardized = squared / self.scale
        return standardized.max(axis=1) if self.rule == "max-standardized" else standardized.mean(axis=1)

    def describe(self) -> str:
        return {
            "mse": "mean squared reconstruction error",
            "standardized": "mean over features of squared residual / its mean on normal calibration rows",
            "max-standardized": "largest over features of squared residual / its mean on normal calibration",
        }[self.rule]

    def to_dict(self) -> dict[str, object]:
        return {"rule": self.rule, "scale": None if self.scale is None else self.scale.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ResidualScorer:
        scale = data.get("scale")
        return cls(str(data["rule"]), None if scale is None else np.asarray(scale, dtype=np.float64))


def _flat(residuals: np.ndarray) -> np.ndarray:
    residuals = np.asarray(residuals)
    return residuals.reshape(len(residuals), -1)
