"""The anomaly detector: residual scores, thresholds, metrics, and the exported bundle.

A bundle is one folder that needs nothing else to score data: ``model.keras`` (Keras 2 format, loaded
in safe mode), ``preprocessing.json`` (the scaler), ``threshold.json`` (threshold and score rule with
its per-feature scales) and ``metadata.json`` (input schema, model kind, privacy figures, training run),
and ``manifest.json``: the SHA-256 and size of every other file, the creation time and the fedae,
TensorFlow, tf-keras and Flower versions that wrote it. Loading checks every file against the manifest
before it reads the model, and refuses a bundle with a changed, missing or unlisted file.

The checksums catch a corrupted copy and a file swapped in the bundle; someone who can rewrite the
manifest too is not stopped by them (that needs a signature, which a deployment can add around the
bundle).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_score, recall_score, roc_auc_score

from shared.preprocess import Scaler
from shared.scoring import ResidualScorer

BUNDLE_FORMAT = 2  # 2: manifest.json with checksums and versions
MANIFEST = "manifest.json"
BUNDLE_FILES = ("model.keras", "preprocessing.json", "threshold.json", "metadata.json", MANIFEST)
_VERSIONED = ("fedae", "tensorflow", "tf-keras", "flwr")  # read from the installed distributions


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
    write_manifest(folder)  # last: it vouches for every file written before it
    return folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _bundle_files(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_manifest(folder: str | Path) -> dict[str, Any]:
    """Write ``manifest.json``: every file's SHA-256 and size, the creation time (UTC) and the versions
    of the software that wrote the bundle."""
    folder = Path(folder)
    manifest = {
        "format": BUNDLE_FORMAT,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {name: _version(name) for name in _VERSIONED},
        "files": {
            name: {"sha256": _sha256(folder / name), "bytes": (folder / name).stat().st_size}
            for name in _bundle_files(folder)
        },
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def verify_bundle(folder: str | Path) -> dict[str, Any]:
    """The bundle's manifest, once every file matches it; ValueError naming each file that does not
    (changed, missing, or not listed)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        listed = manifest["files"]
        if not isinstance(listed, dict):
            raise TypeError(f"'files' is a {type(listed).__name__}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{folder / MANIFEST}: not a readable bundle manifest ({err})") from err
    problems = []
    for name, entry in sorted(listed.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: listed but missing")
        elif not isinstance(entry, dict) or _sha256(path) != entry.get("sha256"):
            problems.append(f"{name}: content differs from its SHA-256 in the manifest")
    problems += [f"{name}: not in the manifest" for name in _bundle_files(folder) if name not in listed]
    if problems:
        raise ValueError(
            f"{folder}: refusing a bundle that does not match its manifest: " + "; ".join(problems)
        )
    return manifest


def load_bundle(folder: str | Path) -> Detector:
    """Load a bundle folder; Keras loads the model in safe mode (no code from the bundle runs)."""

    from shared.models import ModelSpec, Reparameterize, tf  # noqa: F401  (registers the VAE layer)

    folder = Path(folder)
    missing = [n for n in BUNDLE_FILES if not (folder / n).is_file()]
    if missing and missing != [MANIFEST]:
        raise ValueError(f"{folder} is not a fedae bundle: missing {', '.join(missing)}")
    # The format before the manifest: a bundle from another fedae version is told so, not called tampered.
    found = json.loads((folder / "metadata.json").read_text()).get("format")
    if found != BUNDLE_FORMAT:
        raise ValueError(
            f"{folder}: bundle format {found!r} is not supported (this fedae reads format {BUNDLE_FORMAT}; "
            "export the run's bundle again with it)"
        )
    if missing:
        raise ValueError(f"{folder}: missing {MANIFEST}: the bundle's files cannot be checked, refusing it")
    verify_bundle(folder)  # before any file is used: the model is only loaded from checked bytes
    metadata = json.loads((folder / "metadata.json").read_text())
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
