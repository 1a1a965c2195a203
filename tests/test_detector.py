"""Thresholds, metrics, and the bundle: saved, loaded in safe mode, scoring identically."""

import json
import re

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
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    manifest["format"] = 99  # a bundle from a later fedae
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format 99 is not supported"):
        load_bundle(tmp_path / "b")
    (tmp_path / "b" / "threshold.json").unlink()
    with pytest.raises(ValueError, match=r"missing threshold\.json"):
        load_bundle(tmp_path / "b")


def _tiny_bundle(folder, rng) -> Detector:
    x = rng.normal(size=(10, 5)).astype(np.float32)
    scaler = Scaler.fit(x, "tabular", None, flatten=True)
    spec = ModelSpec("dense", (5,), 2, "linear")
    detector = Detector(build_model(spec), spec, scaler, ResidualScorer("mse", None), 1.0, "percentile", {})
    save_bundle(detector, folder)
    return detector


def test_the_manifest_vouches_for_every_file_with_its_sha256_and_the_writers_versions(tmp_path, rng) -> None:
    import hashlib
    import importlib.metadata

    import tensorflow as tf

    _tiny_bundle(tmp_path / "b", rng)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    on_disk = sorted(p.name for p in (tmp_path / "b").iterdir() if p.name != "manifest.json")
    assert (
        sorted(manifest["files"])
        == on_disk
        == ["metadata.json", "model.keras", "preprocessing.json", "threshold.json"]
    )
    for name, entry in manifest["files"].items():
        data = (tmp_path / "b" / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert manifest["versions"]["tensorflow"] == tf.__version__
    assert manifest["versions"]["flwr"] == importlib.metadata.version("flwr")
    assert manifest["format"] == 2 and manifest["created"].endswith("+00:00")


@pytest.mark.parametrize(
    "change",
    [
        "model",
        "threshold",
        "extra",
        "missing-listed",
        "outside",
        "nested-manifest",
        "symlink",
        "malformed",
        "size",
    ],
)
def test_a_tampered_bundle_is_refused_naming_the_file(tmp_path, rng, change: str) -> None:
    import hashlib

    _tiny_bundle(tmp_path / "b", rng)
    folder = tmp_path / "b"
    if change == "model":  # one byte of the weights' archive
        data = bytearray((folder / "model.keras").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / "model.keras").write_bytes(bytes(data))
        needle = r"model\.keras: content differs"
    elif change == "threshold":  # a raised threshold hides anomalies: the most useful lie
        threshold = json.loads((folder / "threshold.json").read_text())
        threshold["threshold"] = 1e9
        (folder / "threshold.json").write_text(json.dumps(threshold))
        needle = r"threshold\.json: (content differs|\d+ bytes, the manifest says)"
    elif change == "extra":
        (folder / "custom_layer.py").write_text("import os")
        needle = r"custom_layer\.py: not in the manifest"
    elif change == "missing-listed":
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"]["calibration.npz"] = {"sha256": "0" * 64, "bytes": 1}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        needle = r"calibration\.npz: listed but missing"
    elif change == "outside":  # names in the manifest never become paths: nothing outside is read
        outside = tmp_path / "outside.txt"
        outside.write_text("host file")
        digest = hashlib.sha256(outside.read_bytes()).hexdigest()
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"]["../outside.txt"] = {"sha256": digest, "bytes": outside.stat().st_size}
        manifest["files"]["/etc/hostname"] = {"sha256": "0" * 64, "bytes": 1}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        needle = r"\.\./outside\.txt: listed but missing.*/etc/hostname: listed but missing"
    elif change == "nested-manifest":
        (folder / "sub").mkdir()
        (folder / "sub" / "manifest.json").write_text("{}")
        needle = r"sub/manifest\.json: not in the manifest"  # folders are walked: nothing hides in one
    elif change == "symlink":
        (folder / "data").symlink_to(tmp_path)
        needle = "data: not a plain file"
    elif change == "malformed":
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"]["threshold.json"] = {"sha256": 7, "bytes": "x"}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        needle = r"threshold\.json: malformed manifest entry"
    else:
        with (folder / "preprocessing.json").open("a") as handle:
            handle.write(" ")
        needle = r"preprocessing\.json: \d+ bytes, the manifest says \d+"
    with pytest.raises(ValueError, match=needle):
        load_bundle(folder)


def test_a_bundle_without_a_readable_manifest_is_refused(tmp_path, rng) -> None:
    _tiny_bundle(tmp_path / "b", rng)
    (tmp_path / "b" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable bundle manifest"):
        load_bundle(tmp_path / "b")
    (tmp_path / "b" / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"missing manifest\.json"):
        load_bundle(tmp_path / "b")
    # A format-1 bundle (written before manifests) is told to re-export, not called tampered.
    meta = json.loads((tmp_path / "b" / "metadata.json").read_text())
    (tmp_path / "b" / "metadata.json").write_text(json.dumps([meta]))
    with pytest.raises(ValueError, match=r"not a readable bundle metadata file \(a JSON list"):
        load_bundle(tmp_path / "b")
    (tmp_path / "b" / "metadata.json").write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(ValueError, match=r"format 1 is not supported.*export the run's bundle again"):
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


def test_a_bundle_is_not_written_beside_foreign_files_and_replaces_its_own(tmp_path, rng) -> None:
    detector = _tiny_bundle(tmp_path / "b", rng)
    save_bundle(detector, tmp_path / "b")  # over an earlier bundle: its own files are replaced
    assert load_bundle(tmp_path / "b").threshold == 1.0
    (tmp_path / "b" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"beside other files: notes\.txt"):
        save_bundle(detector, tmp_path / "b")
    assert (tmp_path / "b" / "notes.txt").read_text() == "keep me"


def test_bundle_carries_its_drift_reference_and_drops_a_stale_one(tmp_path, rng) -> None:
    from shared.drift import DriftReference

    x = rng.normal(size=(30, 6)).astype(np.float32)
    scaler = Scaler.fit(x, "tabular", None, flatten=True)
    spec = ModelSpec("dense", scaler.model_input_shape, 2, "linear")
    reference = DriftReference.from_scores(rng.gamma(2.0, size=500))
    detector = Detector(
        build_model(spec), spec, scaler, ResidualScorer("mse", None), 1.0, "percentile", {}, reference
    )
    save_bundle(detector, tmp_path / "b")
    first = load_bundle(tmp_path / "b")
    assert first.drift_reference == reference
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", first.bundle_id)
    # The same folder re-exported without a reference: the old drift.json must not survive, since it
    # described the earlier model's scores (and an unlisted file would make the bundle unloadable).
    detector.drift_reference = None
    save_bundle(detector, tmp_path / "b")
    assert not (tmp_path / "b" / "drift.json").exists()
    second = load_bundle(tmp_path / "b")
    assert second.drift_reference is None
    assert second.bundle_id != first.bundle_id  # another bundle, another id


def test_bundle_with_a_malformed_drift_reference_is_refused_naming_the_file(tmp_path, rng) -> None:
    from shared.detector import write_manifest

    x = rng.normal(size=(30, 6)).astype(np.float32)
    scaler = Scaler.fit(x, "tabular", None, flatten=True)
    spec = ModelSpec("dense", scaler.model_input_shape, 2, "linear")
    folder = save_bundle(
        Detector(build_model(spec), spec, scaler, ResidualScorer("mse", None), 1.0, "percentile", {}),
        tmp_path / "b",
    )
    (folder / "drift.json").write_text('{"inner_edges": [2, 1]}')
    names = ["model.keras", "preprocessing.json", "threshold.json", "metadata.json", "drift.json"]
    write_manifest(folder, names)  # a consistent manifest: the content itself is what is wrong
    with pytest.raises(ValueError, match=r"drift\.json"):
        load_bundle(folder)
