"""What a bundle's detector scores: a table row's feature names or an image's shape.

Shared by the HTTP service's request checks (``fedae/instances.py``) and batch scoring
(``shared/batch_scoring.py``). Only the standard library: importing it loads nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class InputSchema:
    """What one instance must look like: the raw example shape and, for tables, the feature names."""

    kind: str  # "tabular" | "image"
    shape: tuple[int, ...]
    feature_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.shape or any(size < 1 for size in self.shape):
            raise ValueError(f"an input shape needs at least one positive size, got {self.shape}")
        if self.feature_names and (len(self.shape) != 1 or len(self.feature_names) != self.shape[0]):
            raise ValueError(
                f"{len(self.feature_names)} feature names do not fit the input shape {list(self.shape)}"
            )

    @classmethod
    def from_detector(cls, detector: Any) -> InputSchema:
        """The scaler's raw shape (what ``detector.score`` takes) and the bundle's feature names."""
        schema = detector.metadata.get("input_schema") or {}
        shape = tuple(int(size) for size in detector.scaler.input_shape)
        names = tuple(str(name) for name in schema.get("feature_names") or ())
        kind = str(schema.get("kind") or ("tabular" if len(shape) == 1 else "image"))
        return cls(kind, shape, names)

    @property
    def is_image(self) -> bool:
        return self.kind == "image"
