"""Input scaling fitted on the coordinator's calibration data only, so no client statistic is shared.

Tabular features are standardised with the calibration set's mean and standard deviation; images are
scaled to [0, 1] by their publicly known value range (pixel range) when there is one. The parameters
travel to clients with the model and are saved in the bundle, so training and scoring use one scaler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Scaler:
    """``(x - offset) / scale`` element-wise, then reshaped to the model's input layout."""

    offset: np.ndarray
    scale: np.ndarray
    input_shape: tuple[int, ...]  # raw example shape
    flatten: bool  # dense / variational models take vectors

    @classmethod
    def fit(
        cls, x_calibration: np.ndarray, kind: str, value_range: tuple[float, float] | None, flatten: bool
    ) -> Scaler:
        shape = tuple(x_calibration.shape[1:])
        if kind == "image":
            low, high = (
                value_range if value_range else (float(x_calibration.min()), float(x_calibration.max()))
            )
            if high <= low:
                raise ValueError(f"image value range must be increasing, got ({low}, {high})")
            offset = np.full(shape, low, dtype=np.float32)
            scale = np.full(shape, high - low, dtype=np.float32)
        else:
            offset = x_calibration.mean(axis=0).astype(np.float32)
            std = x_calibration.std(axis=0).astype(np.float32)
            # A constant calibration column would divide by zero; scale it by 1 instead.
            scale = np.where(std > 1e-6 * (1.0 + np.abs(offset)), std, 1.0).astype(np.float32)
        return cls(offset, scale, shape, flatten)

    def transform(self, x: np.ndarray) -> np.ndarray:
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected examples of shape {self.input_shape}, got {tuple(x.shape[1:])}")
        z = ((x - self.offset) / self.scale).astype(np.float32)
        return z.reshape(len(z), -1) if self.flatten else z

    @property
    def model_input_shape(self) -> tuple[int, ...]:
        return (int(np.prod(self.input_shape)),) if self.flatten else self.input_shape

    def to_dict(self) -> dict[str, object]:
        return {
            "offset": self.offset.ravel().tolist(),
            "scale": self.scale.ravel().tolist(),
            "input_shape": list(self.input_shape),
            "flatten": self.flatten,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Scaler:
        shape = tuple(int(v) for v in data["input_shape"])  # type: ignore[union-attr]
        offset = np.asarray(data["offset"], dtype=np.float32).reshape(shape)
        scale = np.asarray(data["scale"], dtype=np.float32).reshape(shape)
        if not (np.isfinite(offset).all() and np.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("scaler parameters must be finite with positive scales")
        return cls(offset, scale, shape, bool(data["flatten"]))
