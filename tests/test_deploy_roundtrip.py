"""A tiny run's bundle scores one file the same through every way it can be deployed.

A real two-client federation (Flower's Simulation Engine) exports the bundle with a SavedModel and a
TFLite float16 file; the same test rows are then scored by the Keras detector, the SavedModel, the HTTP
service (a real uvicorn server hit by a real client) and `fedae detect` on a CSV file on disk.
"""

import httpx
import numpy as np
import pandas as pd
import pytest
from live_server import LiveServer

from shared.config import FedaeConfig
from shared.data.sources import load_server_data
from shared.detector import load_bundle
from shared.export import SIGNATURE, tflite_scores
from shared.models import tf
from simulations import scenarios
from simulations.runner import simulate

pytestmark = pytest.mark.slow

# float32 rounding, and the service's JSON round trip of float32 scores (repr of a Python float)
SAME = {"rtol": 1e-5, "atol": 1e-8}
# TFLite float16 stores weights in half precision: the stated tolerance (docs/DETECTOR.md measures the
# default fleet run at a median of 6.6e-3).
FLOAT16_MEDIAN_RTOL = 2e-2
FLOAT16_FLAG_AGREEMENT = 0.97


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("roundtrip") / "run"
    config = (
        FedaeConfig()
        .with_overrides(scenarios.overrides("wdbc"))
        .replace(
            out_dir=str(out),
            num_clients=2,
            num_server_rounds=2,
            robustness_rows=0,
            bundle_exports="savedmodel,tflite-float16",
        )
    )
    simulate(config)
    server = load_server_data(config)
    return out / "bundle", server.x_test.astype(np.float32), server.spec.feature_names


def test_keras_savedmodel_http_and_batch_file_score_identically(run, tmp_path) -> None:
    bundle, x, names = run
    detector = load_bundle(bundle)
    keras_scores, keras_flags = detector.predict(x)

    serving = tf.saved_model.load(str(bundle / "saved_model")).signatures[SIGNATURE]
    out = serving(x=tf.constant(x))
    np.testing.assert_allclose(out["score"].numpy(), keras_scores, **SAME)

    from fedae.serve import create_app

    server = LiveServer(create_app(detector, max_instances=len(x)))
    try:
        response = httpx.post(f"{server.url}/v1/score", json={"instances": x.tolist()}, timeout=60)
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    body = response.json()
    np.testing.assert_allclose(body["scores"], keras_scores, **SAME)
    np.testing.assert_array_equal(body["anomaly"], keras_flags)
    assert body["model_version"] == detector.bundle_id

    frame = pd.DataFrame(x, columns=list(names))
    frame.insert(0, "id", [f"row-{i}" for i in range(len(x))])
    frame.to_csv(tmp_path / "rows.csv", index=False)
    from fedae.cli import main

    assert (
        main(["detect", str(bundle), str(tmp_path / "rows.csv"), "--out", str(tmp_path / "scored.csv")]) == 0
    )
    scored = pd.read_csv(tmp_path / "scored.csv")
    assert list(scored["id"]) == list(frame["id"])
    # CSV holds the float32 input to about 7 digits, so the batch path is compared a little looser.
    np.testing.assert_allclose(scored["score"], keras_scores, rtol=1e-4)
    np.testing.assert_array_equal(scored["anomaly"], keras_flags)


def test_tflite_float16_agrees_within_the_stated_tolerance(run) -> None:
    bundle, x, _ = run
    detector = load_bundle(bundle)
    reference = detector.score(x)
    scores, flags = tflite_scores(bundle / "model_float16.tflite", x)
    relative = np.abs(scores - reference) / np.abs(reference)
    assert np.median(relative) < FLOAT16_MEDIAN_RTOL
    assert np.mean(flags == (reference > detector.threshold)) >= FLOAT16_FLAG_AGREEMENT
