"""The anomaly detector: residual scores, thresholds, metrics, and the exported bundle.

A bundle is one folder that needs nothing else to score data: ``model.keras`` (Keras 2 format, loaded
in safe mode), ``preprocessing.json`` (the scaler), ``threshold.json`` (threshold and score rule with
its per-feature scales) and ``metadata.json`` (input
schema, model kind, privacy figures, training run).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_score, recall_score, roc_auc_score

from shared.preprocess import Scaler
from shared.scoring import ResidualScorer

BUNDLE_FORMAT = 1


def fit_threshold(errors: np.ndarray, rule: str, percentile: float = 95.0, k: float = 3.0) -> float:
    """Threshold on normal reconstruction errors: a percentile, or mean + k standard deviations."""
    errors = np.asarray(errors, dtype=np.float64)
    if errors.size == 0 or not np.isfinite(errors).all():
        raise ValueError("threshold needs a non-empty set of finite reconstruction errors")
    if rule == "percentile":
        if not 0 < percentile < 100:
            raise ValueError(f"percentile must be in (0, 100), got {percentile}")
        return float(np.percentile(errors, percentile))
    if rule == "mean-k-sigma":
        return float(errors.mean() + k * errors.std())
    raise ValueError(f"threshold rule must be 'percentile' or 'mean-k-sigma', got {rule!r}")


def describe_rule(rule: str, percentile: float, k: float) -> str:
    return (
        f"{percentile:g}th percentile of normal calibration scores"
        if rule == "percentile"
        else f"mean + {k:g} sigma of normal calibration scores"
    )


def detection_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """ROC-AUC and average precision of the scores, precision and recall of ``score > threshold``."""
    labels = np.asarray(labels)
    predicted = (np.asarray(scores) > threshold).astype(int)
    both = len(np.unique(labels)) == 2
    return {
        "test_auc": float(roc_auc_score(labels, scores)) if both else float("nan"),
        "test_average_precision": float(average_precision_score(labels, scores)) if both else float("nan"),
        "threshold": float(threshold),
        "precision": float(precision_score(labels, predicted, zero_division=0)),
        "recall": float(recall_score(labels, predicted, zero_division=0)),
        "false_alarm_rate": float(predicted[labels == 0].mean()) if (labels == 0).any() else float("nan"),
    }


@dataclass
class Detector:
    """A trained autoencoder with its scaler and threshold: raw rows in, scores and flags out."""

    model: Any  # tf.keras.Model
    spec: Any  # shared.models.ModelSpec
    scaler: Scaler
    scorer: ResidualScorer
    threshold: float
    threshold_rule: str
    metadata: dict[str, Any]

    def score(self, x_raw: np.ndarray) -> np.ndarray:
        from shared.models import residuals

        return self.scorer.score(residuals(self.model, self.spec, self.scaler.transform(x_raw)))

    def predict(self, x_raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = self.score(x_raw)
        return scores, (scores > self.threshold).astype(np.int64)


def save_bundle(detector: Detector, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    detector.model.save(folder / "model.keras")
    (folder / "preprocessing.json").write_text(json.dumps(detector.scaler.to_dict()))
    (folder / "threshold.json").write_text(
        json.dumps(
            {
                "threshold": detector.threshold,
                "rule": detector.threshold_rule,
                "score": detector.scorer.describe(),
                "scorer": detector.scorer.to_dict(),
                "anomaly_if": "score > threshold",
            },
            indent=2,
        )
    )
    spec = detector.spec
    metadata = {
        "format": BUNDLE_FORMAT,
        "model": {
            "kind": spec.kind,
            "input_shape": list(spec.input_shape),
            "latent_dim": spec.latent_dim,
            "output_activation": spec.output_activation,
            "activation": spec.activation,
        },
        **detector.metadata,
    }
    (folder / "metadata.json").write_text(json.dumps(metadata, indent=2, default=_json_default))
    return folder


def load_bundle(folder: str | Path) -> Detector:
    """Load a bundle folder; Keras loads the model in safe mode (no code from the bundle runs)."""

    from shared.models import ModelSpec, Reparameterize, tf  # noqa: F401  (registers the VAE layer)

    folder = Path(folder)
    missing = [
        n
        for n in ("model.keras", "preprocessing.json", "threshold.json", "metadata.json")
        if not (folder / n).is_file()
    ]
    if missing:
        raise ValueError(f"{folder} is not a fedae bundle: missing {', '.join(missing)}")
    metadata = json.loads((folder / "metadata.json").read_text())
    if metadata.get("format") != BUNDLE_FORMAT:
        raise ValueError(
            f"{folder}: bundle format {metadata.get('format')!r} is not supported "
            f"(this fedae reads format {BUNDLE_FORMAT})"
        )
    m = metadata["model"]
    spec = ModelSpec(
        m["kind"],
        tuple(m["input_shape"]),
        int(m["latent_dim"]),
        m["output_activation"],
        m.get("activation", "relu"),
    )
    model = tf.keras.models.load_model(folder / "model.keras", compile=False, safe_mode=True)
    threshold = json.loads((folder / "threshold.json").read_text())
    scaler = Scaler.from_dict(json.loads((folder / "preprocessing.json").read_text()))
    scorer = ResidualScorer.from_dict(threshold["scorer"])
    return Detector(model, spec, scaler, scorer, float(threshold["threshold"]), threshold["rule"], metadata)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
