"""Thresholds, metrics, and the bundle: saved, loaded in safe mode, scoring identically."""

import json

import numpy as np
import pytest

from shared.detector import Detector, detection_metrics, fit_threshold, load_bundle, save_bundle
from shared.models import ModelSpec, build_model
from shared.preprocess import Scaler
from shared.scoring import ResidualScorer


def test_percentile_and_mean_k_sigma_thresholds() -> None:
    errors = np.arange(1, 101, dtype=float)
    assert fit_threshold(errors, "percentile", 95.0) == pytest.approx(np.percentile(errors, 95))
    assert fit_threshold(errors, "mean-k-sigma", k=2.0) == pytest.approx(errors.mean() + 2 * errors.std())
    with pytest.raises(ValueError, match="finite"):
        fit_threshold(np.array([1.0, np.nan]), "percentile")
    with pytest.raises(ValueError, match="threshold rule"):
        fit_threshold(errors, "median")


def test_detection_metrics_at_the_threshold() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.25])
    labels = np.array([0, 0, 0, 1, 1, 1])
    metrics = detection_metrics(scores, labels, threshold=0.5)
    assert metrics["precision"] == 1.0
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["false_alarm_rate"] == 0.0
    assert metrics["test_auc"] == pytest.approx(8 / 9)


@pytest.mark.parametrize(
    ("kind", "rule"), [("dense", "mse"), ("vae", "standardized"), ("conv", "max-standardized")]
)
def test_bundle_round_trip_scores_identically(tmp_path, rng, kind: str, rule: str) -> None:
    shape = (8, 8, 1)
    x = rng.random((20, *shape)).astype(np.float32) * 16
    scaler = Scaler.fit(x, "image", (0.0, 16.0), flatten=kind != "conv")
    spec = ModelSpec(kind, scaler.model_input_shape, 4, "sigmoid")
    residual_scale = np.linspace(0.5, 2.0, 64)
    detector = Detector(
        build_model(spec),
        spec,
        scaler,
        ResidualScorer(rule, residual_scale),
        0.05,
        "percentile",
        {"privacy": {"dp": True}},
    )
    save_bundle(detector, tmp_path / "bundle")
    loaded = load_bundle(tmp_path / "bundle")
    np.testing.assert_allclose(loaded.score(x), detector.score(x), rtol=1e-6)
    assert loaded.threshold == 0.05 and loaded.metadata["privacy"] == {"dp": True}
    assert loaded.scorer.rule == rule
    flags = loaded.predict(x)[1]
    np.testing.assert_array_equal(flags, (detector.score(x) > 0.05).astype(int))


def test_incomplete_or_foreign_bundles_are_refused(tmp_path, rng) -> None:
    x = rng.normal(size=(10, 5)).astype(np.float32)
    scaler = Scaler.fit(x, "tabular", None, flatten=True)
    spec = ModelSpec("dense", (5,), 2, "linear")
    save_bundle(
        Detector(build_model(spec), spec, scaler, ResidualScorer("mse", None), 1.0, "percentile", {}),
        tmp_path / "b",
    )
    meta = json.loads((tmp_path / "b" / "metadata.json").read_text())
    meta["format"] = 99
    (tmp_path / "b" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format 99 is not supported"):
        load_bundle(tmp_path / "b")
    (tmp_path / "b" / "threshold.json").unlink()
    with pytest.raises(ValueError, match=r"missing threshold\.json"):
        load_bundle(tmp_path / "b")


def test_scaler_round_trip_and_shape_check(rng) -> None:
    x = rng.normal(5.0, 2.0, size=(500, 3)).astype(np.float32)
    x[:, 2] = 7.0  # a constant column must not divide by zero
    scaler = Scaler.fit(x, "tabular", None, flatten=True)
    z = scaler.transform(x)
    np.testing.assert_allclose(z[:, :2].mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z[:, :2].std(axis=0), 1.0, atol=1e-3)
    assert np.isfinite(z).all()
    again = Scaler.from_dict(scaler.to_dict())
    np.testing.assert_array_equal(again.transform(x), z)
    with pytest.raises(ValueError, match="expected examples of shape"):
        scaler.transform(x[:, :2])
