"""`fedae serve`: real uvicorn servers on loopback ports, hit by a real HTTP client (httpx).

Bundles are tiny untrained models built here (scoring does not care whether the weights are good); each
server runs in a background thread of this process, except the CLI tests, which start `fedae serve` as a
user would.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from live_server import LiveServer
from prometheus_client.parser import text_string_to_metric_families

from fedae.serve import create_app
from shared.detector import Detector, load_bundle, save_bundle
from shared.drift import DriftReference
from shared.models import ModelSpec, build_model
from shared.preprocess import Scaler
from shared.scoring import ResidualScorer

ROOT = Path(__file__).resolve().parents[1]
FEATURES = ["cell_v", "cell_t", "pack_current", "soc", "speed", "ambient_t"]
MAX_INSTANCES = 64
MAX_BODY = 64 * 1024


def _normal_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    mixing = np.linspace(0.5, 1.5, len(FEATURES))
    return (rng.normal(size=(n, 1)) * mixing + 0.3 * rng.normal(size=(n, len(FEATURES))) + 3.0).astype(
        np.float32
    )


def _tabular_bundle(folder: Path, *, drift: bool = True) -> Detector:
    rng = np.random.default_rng(7)
    x = _normal_rows(rng, 400)
    scaler = Scaler.fit(x, "tabular", None, flatten=True)
    spec = ModelSpec("dense", (len(FEATURES),), 2, "linear")
    model = build_model(spec)
    scorer = ResidualScorer("mse", None)
    unsaved = Detector(model, spec, scaler, scorer, 0.0, "percentile", {})
    calibration = unsaved.score(x)
    detector = Detector(
        model,
        spec,
        scaler,
        scorer,
        float(np.percentile(calibration, 80)),  # some rows flagged, most not
        "percentile",
        {
            "input_schema": {"kind": "tabular", "shape": [len(FEATURES)], "feature_names": FEATURES},
            "threshold_rule": "80th percentile of normal calibration scores",
            "privacy": {"dp": True, "sample_level": {"max_epsilon": 2.1}, "delta": 1e-5, "odd": math.nan},
            "training_run": {"scenario": "test", "rounds": 3, "clients": 2},
        },
        DriftReference.from_scores(calibration) if drift else None,
    )
    save_bundle(detector, folder)
    return load_bundle(folder)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve") / "bundle"
    _tabular_bundle(folder)
    return folder


@pytest.fixture(scope="module")
def detector(bundle_dir) -> Detector:
    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def server(detector) -> Iterator[LiveServer]:
    live = LiveServer(
        create_app(detector, max_instances=MAX_INSTANCES, max_body_bytes=MAX_BODY, drift_window=500)
    )
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def _post(client: httpx.Client, body: str | bytes, content_type: str = "application/json") -> httpx.Response:
    return client.post("/v1/score", content=body, headers={"content-type": content_type})


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]


def _metrics(client: httpx.Client) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}, parsed by Prometheus's own parser."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


# -- scoring -----------------------------------------------------------------------------------------
def test_a_batch_is_scored_as_the_detector_scores_it(client, detector) -> None:
    # Prepare
    x = np.concatenate(
        [_normal_rows(np.random.default_rng(1), 20), _normal_rows(np.random.default_rng(2), 5) * 3]
    )
    # Execute
    response = client.post("/v1/score", json={"instances": x.tolist()})
    # Assert
    assert response.status_code == 200, response.text
    body = response.json()
    expected = detector.score(x)
    np.testing.assert_allclose(body["scores"], expected, rtol=1e-5)
    assert body["anomaly"] == [int(s > detector.threshold) for s in body["scores"]]
    assert 0 < sum(body["anomaly"]) < len(x)  # the batch has both outcomes, so the flags were tested
    assert body["threshold"] == detector.threshold
    assert body["model_version"] == detector.bundle_id and detector.bundle_id.startswith("sha256:")


def test_records_in_any_key_order_score_like_the_list_form(client) -> None:
    rng = np.random.default_rng(3)
    x = _normal_rows(rng, 8)
    records = []
    for row in x.tolist():
        order = rng.permutation(len(FEATURES))
        records.append({FEATURES[j]: row[j] for j in order})
    as_records = client.post("/v1/score", json={"instances": records})
    as_lists = client.post("/v1/score", json={"instances": x.tolist()})
    assert as_records.status_code == as_lists.status_code == 200
    assert as_records.json() == as_lists.json()


def test_integers_are_numbers_too(client, detector) -> None:
    response = client.post("/v1/score", json={"instances": [[3, 3, 3, 3, 3, 3]]})
    assert response.status_code == 200
    np.testing.assert_allclose(
        response.json()["scores"], detector.score(np.full((1, 6), 3.0, np.float32)), rtol=1e-5
    )


# -- refusals ----------------------------------------------------------------------------------------
ROW = "1, 2, 3, 4, 5, 6"
RECORD = json.dumps(dict(zip(FEATURES, range(6), strict=True)))
INVALID = [
    # (name, body, status, code, words the message must contain)
    (
        "short row",
        '{"instances": [[1, 2, 3]]}',
        422,
        "wrong_shape",
        ["instance 0", "expected 6 values", "got 3"],
    ),
    ("long 2nd row", f'{{"instances": [[{ROW}], [{ROW}, 7]]}}', 422, "wrong_shape", ["instance 1", "got 7"]),
    (
        "nested row",
        '{"instances": [[[1], 2, 3, 4, 5, 6]]}',
        422,
        "wrong_shape",
        ["instance 0", "'cell_v'", "a list"],
    ),
    (
        "scalar instance",
        '{"instances": [5]}',
        422,
        "wrong_shape",
        ["instance 0", "shape [6]", "a number (5)"],
    ),
    (
        "string",
        f'{{"instances": [[{ROW}], [1, "2.5", 3, 4, 5, 6]]}}',
        422,
        "wrong_type",
        ["instance 1", "feature 'cell_t'", "'2.5'"],
    ),
    (
        "boolean",
        '{"instances": [[1, 2, true, 4, 5, 6]]}',
        422,
        "wrong_type",
        ["instance 0", "'pack_current'", "boolean"],
    ),
    (
        "null",
        '{"instances": [[1, 2, 3, 4, 5, null]]}',
        422,
        "wrong_type",
        ["instance 0", "'ambient_t'", "null"],
    ),
    ("NaN", '{"instances": [[1, NaN, 3, 4, 5, 6]]}', 422, "non_finite", ["instance 0", "'cell_t'", "NaN"]),
    (
        "Infinity",
        f'{{"instances": [[{ROW}], [{ROW}], [1, 2, 3, Infinity, 5, 6]]}}',
        422,
        "non_finite",
        ["instance 2", "'soc'", "Infinity"],
    ),
    (
        "-Infinity",
        '{"instances": [[-Infinity, 2, 3, 4, 5, 6]]}',
        422,
        "non_finite",
        ["instance 0", "'cell_v'", "-Infinity"],
    ),
    ("1e400", '{"instances": [[1, 2, 3, 4, 1e400, 6]]}', 422, "non_finite", ["instance 0", "'speed'", "inf"]),
    (
        "beyond float32",
        '{"instances": [[1, 2, 3, 4, 5, -1e39]]}',
        422,
        "non_finite",
        ["'ambient_t'", "float32"],
    ),
    (
        "huge integer",
        '{"instances": [[1, 2, 3, 4, 5, ' + "9" * 400 + "]]}",
        422,
        "non_finite",
        ["'ambient_t'", "float32"],
    ),
    ("5000 digits", '{"instances": [[' + "9" * 5000 + "]]}", 400, "malformed_json", ["digits"]),
    ("empty", '{"instances": []}', 422, "empty_instances", ["empty"]),
    ("not a list", '{"instances": {"cell_v": 1}}', 422, "invalid_request", ["'instances' must be a list"]),
    ("no instances", '{"rows": [[1]]}', 422, "invalid_request", ["'rows'"]),
    ("missing instances", "{}", 422, "invalid_request", ["no 'instances'"]),
    ("array body", f"[[{ROW}]]", 422, "invalid_request", ["JSON object", "a list of 1"]),
    ("malformed", '{"instances": [[1, 2', 400, "malformed_json", ["malformed JSON", "line 1"]),
    ("empty body", "", 400, "malformed_json", ["empty"]),
    ("not utf-8", b'{"instances": [["\xff\xfe"]]}', 400, "malformed_json", ["UTF-8"]),
    ("deep", "[" * 20_000 + "]" * 20_000, 400, "malformed_json", ["nested too deeply"]),
    (
        "duplicate key",
        '{"instances": [{"cell_v": 1, "cell_v": 2}]}',
        422,
        "duplicate_key",
        ["'cell_v'", "twice"],
    ),
    (
        "missing feature",
        '{"instances": [{"cell_v": 1, "cell_t": 2, "pack_current": 3, "soc": 4, "speed": 5}]}',
        422,
        "missing_features",
        ["instance 0", "missing feature(s) 'ambient_t'"],
    ),
    (
        "unknown feature",
        '{"instances": [{"cell_v": 1, "cell_t": 2, "pack_current": 3, "soc": 4, "speed": 5, "ambient_t": 6,'
        ' "vin": 7}]}',
        422,
        "unknown_features",
        ["instance 0", "unknown feature(s) 'vin'"],
    ),
    (
        "record value",
        '{"instances": [{"cell_v": 1, "cell_t": 2, "pack_current": "x", "soc": 4, "speed": 5,'
        ' "ambient_t": 6}]}',
        422,
        "wrong_type",
        ["instance 0", "'pack_current'", "'x'"],
    ),
    (
        "mixed forms",
        f'{{"instances": [{RECORD}, [{ROW}]]}}',
        422,
        "invalid_request",
        ["instance 1", "one form"],
    ),
]


@pytest.mark.parametrize(
    ("name", "body", "status", "code", "words"), INVALID, ids=[case[0] for case in INVALID]
)
def test_invalid_input_is_a_4xx_naming_the_problem(client, name, body, status, code, words) -> None:
    response = _post(client, body)
    assert response.status_code == status, response.text
    error = _error(response)
    assert error["code"] == code
    for word in words:
        assert word in error["message"], (word, error["message"])


def test_too_many_instances_is_413_with_the_limit(client) -> None:
    response = client.post("/v1/score", json={"instances": [[1, 2, 3, 4, 5, 6]] * (MAX_INSTANCES + 1)})
    assert response.status_code == 413
    error = _error(response)
    assert error["code"] == "too_many_instances" and f"at most {MAX_INSTANCES}" in error["message"]
    assert (
        client.post("/v1/score", json={"instances": [[1, 2, 3, 4, 5, 6]] * MAX_INSTANCES}).status_code == 200
    )


def _oversized() -> bytes:
    body = json.dumps({"instances": [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]] * 4000}).encode()
    assert len(body) > MAX_BODY
    return body


def test_a_body_over_the_limit_is_413_by_its_content_length(client) -> None:
    response = _post(client, _oversized())
    assert response.status_code == 413
    error = _error(response)
    assert error["code"] == "body_too_large" and f"at most {MAX_BODY}" in error["message"]


def test_a_chunked_body_over_the_limit_is_413_while_it_is_read(client) -> None:
    body = _oversized()

    def chunks() -> Iterator[bytes]:  # httpx sends a generator chunked, with no Content-Length
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    request = client.build_request(
        "POST", "/v1/score", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in request.headers and request.headers["transfer-encoding"] == "chunked"
    response = client.send(request)
    assert response.status_code == 413
    error = _error(response)
    assert error["code"] == "body_too_large" and f"passed {MAX_BODY} bytes" in error["message"]
    # A chunked body under the limit is read whole and scored.
    small = json.dumps({"instances": [[1, 2, 3, 4, 5, 6]]}).encode()
    request = client.build_request(
        "POST",
        "/v1/score",
        content=iter([small[:10], small[10:]]),
        headers={"content-type": "application/json"},
    )
    assert client.send(request).status_code == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
def test_a_body_that_is_not_declared_json_is_415(client, content_type) -> None:
    response = _post(client, '{"instances": [[1, 2, 3, 4, 5, 6]]}', content_type)
    assert response.status_code == 415
    assert _error(response)["code"] == "unsupported_media_type"
    assert (
        _post(client, '{"instances": [[1, 2, 3, 4, 5, 6]]}', "application/json; charset=utf-8").status_code
        == 200
    )


def test_unknown_paths_and_methods_are_json_4xx(client) -> None:
    missing = client.get("/v2/score")
    assert missing.status_code == 404 and _error(missing)["code"] == "not_found"
    assert "/v1/score" in _error(missing)["message"]
    wrong = client.get("/v1/score")
    assert wrong.status_code == 405 and _error(wrong)["code"] == "method_not_allowed"
    assert "POST" in wrong.headers["allow"]


def test_no_garbage_gets_a_500(client) -> None:
    """A grab-bag of hostile bodies: each is refused with a 4xx, none reaches an internal error."""
    bodies = [
        b"\x00\x01\x02",
        b'{"instances": [[]]}',
        b'{"instances": [[[[[[[[[[1]]]]]]]]]]}',
        b'{"instances": [{}]}',
        b'{"instances": [{"cell_v": {"nested": 1}}]}',
        b'{"instances": [[1, 2, 3, 4, 5, {"a": 1}]]}',
        b'{"instances": null}',
        b'"instances"',
        b"NaN",
        b"1e999999",
        b'{"instances": [[1, 2, 3, 4, 5, 6]], "instances": []}',
        json.dumps({"instances": [["\u202e"] * 6]}).encode(),
        json.dumps({"instances": [[1e308] * 6]}).encode(),
        json.dumps({"instances": [[-0.0] * 5 + ["-0"]]}).encode(),
        b'{"instances": [' + b"[1,2,3,4,5,6]," * 10 + b"]}",  # trailing comma
    ]
    for body in bodies:
        response = _post(client, body)
        assert 400 <= response.status_code < 500, (body[:60], response.status_code, response.text)
        assert _error(response)["code"] != "internal_error"


def test_a_finite_input_the_model_overflows_on_is_a_422_not_a_500(client) -> None:
    response = client.post("/v1/score", json={"instances": [[3.0e38] * 6]})
    assert response.status_code == 422, response.text
    error = _error(response)
    assert error["code"] == "non_finite_score" and "instance 0" in error["message"]


# -- health, metadata, metrics ----------------------------------------------------------------------
def test_healthz_names_the_bundle(client, detector) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "bundle_id": detector.bundle_id, "model_kind": "dense"}


def test_metadata_describes_schema_threshold_privacy_and_run(client, detector) -> None:
    import importlib.metadata

    response = client.get("/v1/metadata")
    assert response.status_code == 200
    meta = response.json()
    assert meta["bundle_id"] == meta["model_version"] == detector.bundle_id
    assert meta["fedae_version"] == importlib.metadata.version("fedae")
    assert meta["input_schema"] == {"kind": "tabular", "shape": [6], "feature_names": FEATURES}
    assert meta["threshold"]["value"] == detector.threshold and meta["threshold"]["rule"] == "percentile"
    assert meta["threshold"]["description"] == "80th percentile of normal calibration scores"
    assert meta["threshold"]["anomaly_if"] == "score > threshold"
    # NaN in the bundle's metadata becomes null: strict JSON for every client.
    assert meta["privacy"] == {"dp": True, "sample_level": {"max_epsilon": 2.1}, "delta": 1e-5, "odd": None}
    assert meta["training_run"] == {"scenario": "test", "rounds": 3, "clients": 2}
    assert meta["model"]["kind"] == "dense" and meta["model"]["input_shape"] == [6]
    assert meta["limits"] == {"max_instances": MAX_INSTANCES, "max_body_bytes": MAX_BODY}
    assert meta["drift"] == {"reference": True, "window": 500, "min_window": 200}


def test_metrics_move_by_exactly_the_requests_made(client, detector) -> None:
    # Prepare
    before = _metrics(client)
    rng = np.random.default_rng(11)
    batches = [_normal_rows(rng, n) * (2 if n == 7 else 1) for n in (3, 7, 1)]
    # Execute
    flagged = 0
    for batch in batches:
        response = client.post("/v1/score", json={"instances": batch.tolist()})
        assert response.status_code == 200
        flagged += sum(response.json()["anomaly"])
    assert _post(client, '{"instances": [[1, 2, 3, 4, 5, "x"]]}').status_code == 422
    assert _post(client, "{").status_code == 400
    assert client.get("/nowhere").status_code == 404
    after = _metrics(client)

    # Assert
    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("fedae_http_requests_total", endpoint="/v1/score", status="200") == 3
    assert delta("fedae_http_requests_total", endpoint="/v1/score", status="422") == 1
    assert delta("fedae_http_requests_total", endpoint="/v1/score", status="400") == 1
    assert delta("fedae_http_requests_total", endpoint="other", status="404") == 1
    assert delta("fedae_http_requests_total", endpoint="/metrics", status="200") == 1  # the first scrape
    assert delta("fedae_http_request_duration_seconds_count", endpoint="/v1/score") == 5
    assert delta("fedae_http_request_duration_seconds_bucket", endpoint="/v1/score", le="+Inf") == 5
    assert delta("fedae_instances_scored_total") == 11
    assert delta("fedae_anomalies_flagged_total") == flagged
    assert delta("fedae_errors_total", kind="wrong_type") == 1
    assert delta("fedae_errors_total", kind="malformed_json") == 1
    assert delta("fedae_errors_total", kind="not_found") == 1
    assert (
        after[
            (
                "fedae_model_info",
                (("bundle_id", detector.bundle_id), ("fedae_version", "0.1.0"), ("model_kind", "dense")),
            )
        ]
        == 1
    )
    assert after[("fedae_anomaly_threshold", ())] == pytest.approx(detector.threshold)
    # The anomaly rate is derivable from the counters, and the recent gauge covers the drift window.
    scored = after[("fedae_instances_scored_total", ())]
    window = after[("fedae_recent_anomaly_window_size", ())]
    assert window == min(scored, 500)
    assert 0.0 <= after[("fedae_recent_anomaly_rate", ())] <= 1.0
    for name in ("psi", "ks_statistic", "ks_pvalue", "alert", "window_size"):
        assert (f"fedae_drift_{name}", ()) in after


def test_drift_gauges_alert_after_shifted_data(detector) -> None:
    live = LiveServer(create_app(detector, max_instances=MAX_INSTANCES, drift_window=200))
    try:
        with httpx.Client(base_url=live.url, timeout=30) as http:
            empty = _metrics(http)
            assert math.isnan(empty[("fedae_drift_psi", ())]) and empty[("fedae_drift_window_size", ())] == 0
            assert math.isnan(empty[("fedae_recent_anomaly_rate", ())])
            rng = np.random.default_rng(5)
            for _ in range(4):  # 256 normal rows, like the calibration rows
                http.post("/v1/score", json={"instances": _normal_rows(rng, 64).tolist()}).raise_for_status()
            normal = _metrics(http)
            for _ in range(4):  # then 256 rows of a shifted plant: every sensor reads 40 % higher
                http.post(
                    "/v1/score", json={"instances": (_normal_rows(rng, 64) * 1.4).tolist()}
                ).raise_for_status()
            shifted = _metrics(http)
    finally:
        live.stop()
    assert normal[("fedae_drift_window_size", ())] == 200
    assert normal[("fedae_drift_alert", ())] == 0 and normal[("fedae_drift_psi", ())] < 0.2
    assert shifted[("fedae_drift_alert", ())] == 1
    assert shifted[("fedae_drift_psi", ())] >= 0.2 and shifted[("fedae_drift_ks_pvalue", ())] < 0.01
    assert shifted[("fedae_drift_ks_statistic", ())] > normal[("fedae_drift_ks_statistic", ())]
    assert shifted[("fedae_recent_anomaly_rate", ())] > normal[("fedae_recent_anomaly_rate", ())]


def test_a_bundle_without_a_drift_reference_serves_without_drift_gauges(tmp_path) -> None:
    detector = _tabular_bundle(tmp_path / "b", drift=False)
    live = LiveServer(create_app(detector))
    try:
        with httpx.Client(base_url=live.url, timeout=30) as http:
            assert http.post("/v1/score", json={"instances": [[1, 2, 3, 4, 5, 6]]}).status_code == 200
            samples = _metrics(http)
            assert http.get("/v1/metadata").json()["drift"]["reference"] is False
    finally:
        live.stop()
    assert samples[("fedae_drift_reference_loaded", ())] == 0
    assert not any(
        name.startswith("fedae_drift_") and name != "fedae_drift_reference_loaded" for name, _ in samples
    )
    assert (
        samples[("fedae_instances_scored_total", ())] == 1
    )  # its own registry: other servers' counts absent


def test_concurrent_requests_are_all_answered_correctly(client, detector) -> None:
    # Prepare: 16 threads x 6 requests, each with its own rows and batch size
    rng = np.random.default_rng(9)
    batches = [_normal_rows(rng, 1 + i % 9) * (1 + (i % 3) / 2) for i in range(96)]
    expected = [detector.score(batch) for batch in batches]

    def ask(i: int) -> list[float]:
        response = client.post("/v1/score", json={"instances": batches[i].tolist()})
        assert response.status_code == 200, response.text
        return response.json()["scores"]

    # Execute
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(ask, range(len(batches))))
    # Assert
    for answer, want in zip(answers, expected, strict=True):
        np.testing.assert_allclose(answer, want, rtol=1e-5)


def test_images_are_arrays_of_the_raw_shape(tmp_path) -> None:
    rng = np.random.default_rng(4)
    x = (rng.random((30, 8, 8, 1)) * 16).astype(np.float32)
    scaler = Scaler.fit(x, "image", (0.0, 16.0), flatten=False)
    spec = ModelSpec("conv", scaler.model_input_shape, 4, "sigmoid")
    save_bundle(
        Detector(
            build_model(spec),
            spec,
            scaler,
            ResidualScorer("mse", None),
            0.05,
            "percentile",
            {"input_schema": {"kind": "image", "shape": [8, 8, 1], "feature_names": []}},
        ),
        tmp_path / "b",
    )
    detector = load_bundle(tmp_path / "b")
    live = LiveServer(create_app(detector))
    try:
        with httpx.Client(base_url=live.url, timeout=30) as http:
            good = http.post("/v1/score", json={"instances": x[:3].tolist()})
            ragged = x[:2].tolist()
            ragged[1][5] = ragged[1][5][:7]
            bad_shape = http.post("/v1/score", json={"instances": ragged})
            flat = http.post("/v1/score", json={"instances": x[:1].reshape(1, -1).tolist()})
            bad_value = x[:1].tolist()
            bad_value[0][2][3][0] = "dark"
            bad_type = http.post("/v1/score", json={"instances": bad_value})
            record = http.post("/v1/score", json={"instances": [{"pixel": 1}]})
    finally:
        live.stop()
    assert good.status_code == 200
    np.testing.assert_allclose(good.json()["scores"], detector.score(x[:3]), rtol=1e-5)
    assert bad_shape.status_code == 422
    assert _error(bad_shape)["message"] == (
        "instance 1: expected shape [8, 8, 1]; a list of 7 at [5] where 8 belong"
    )
    assert flat.status_code == 422 and "a list of 64 where 8 belong" in _error(flat)["message"]
    assert bad_type.status_code == 422
    assert _error(bad_type) == {
        "code": "wrong_type",
        "message": "instance 0, element [2, 3, 0]: expected a number, got a string ('dark')",
    }
    assert record.status_code == 422 and _error(record)["code"] == "records_unsupported"


def test_an_internal_error_is_a_generic_500_with_the_traceback_in_the_log(tmp_path, caplog) -> None:
    # A detector whose scorer does not fit its model (a broken export): a real failure inside scoring.
    detector = _tabular_bundle(tmp_path / "b")
    detector.scorer = ResidualScorer("standardized", np.ones(len(FEATURES) + 1))
    with pytest.raises(ValueError, match="residuals have 6 features"):  # create_app's warm-up call finds it
        create_app(detector)
    app = create_app(_tabular_bundle(tmp_path / "c"))
    app.state.service.detector.scorer = ResidualScorer("standardized", np.ones(len(FEATURES) + 1))
    live = LiveServer(app)
    try:
        with (
            httpx.Client(base_url=live.url, timeout=30) as http,
            caplog.at_level(logging.ERROR, "fedae.serve"),
        ):
            response = http.post("/v1/score", json={"instances": [[1, 2, 3, 4, 5, 6]]})
            counted = _metrics(http)
    finally:
        live.stop()
    assert response.status_code == 500
    assert _error(response) == {
        "code": "internal_error",
        "message": "internal error; the service's log has the details",
    }
    assert "residuals" not in response.text  # no internals leak to the client
    assert any("residuals have 6 features" in (r.exc_text or "") for r in caplog.records)
    assert counted[("fedae_http_requests_total", (("endpoint", "/v1/score"), ("status", "500")))] == 1
    assert counted[("fedae_errors_total", (("kind", "internal_error"),))] == 1


def test_bad_limits_are_refused(detector) -> None:
    with pytest.raises(ValueError, match="max_instances must be an integer >= 1, got 0"):
        create_app(detector, max_instances=0)
    with pytest.raises(ValueError, match="drift_window must be an integer >= 1, got True"):
        create_app(detector, drift_window=True)


def test_the_cli_defaults_are_the_apps() -> None:
    import inspect

    from fedae import instances
    from fedae.cli import _parser
    from shared.drift import DEFAULT_WINDOW

    args = _parser().parse_args(["serve", "b"])
    defaults = {k: p.default for k, p in inspect.signature(create_app).parameters.items() if k != "detector"}
    assert defaults == {
        "max_instances": args.max_instances,
        "max_body_bytes": args.max_body_bytes,
        "drift_window": args.drift_window,
    }
    assert instances.DEFAULT_DRIFT_WINDOW == DEFAULT_WINDOW
    assert (args.host, args.port) == ("127.0.0.1", 8080)


# -- the command -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fedae", "serve", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize(
    "stop",
    [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],  # slow: another service start
    ids=["SIGINT", "SIGTERM"],
)
def test_fedae_serve_scores_and_stops_cleanly(bundle_dir, detector, stop) -> None:
    port = _free_port()
    process = _start_cli(str(bundle_dir), "--port", str(port), "--max-instances", "10")
    try:
        deadline, health = time.monotonic() + 120, None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.25)
        assert health is not None and health.status_code == 200, process.communicate(timeout=10)
        x = _normal_rows(np.random.default_rng(8), 4)
        scored = httpx.post(f"http://127.0.0.1:{port}/v1/score", json={"instances": x.tolist()}, timeout=30)
        too_many = httpx.post(
            f"http://127.0.0.1:{port}/v1/score", json={"instances": x.tolist() * 3}, timeout=30
        )
        process.send_signal(stop)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert scored.status_code == 200
    np.testing.assert_allclose(scored.json()["scores"], detector.score(x), rtol=1e-5)
    assert too_many.status_code == 413 and "at most 10" in too_many.text
    assert process.returncode == 0, err
    assert "Traceback" not in err and f"on http://127.0.0.1:{port}" in err and "stopped" in err


def test_fedae_serve_refuses_a_tampered_bundle_and_bad_flags(bundle_dir, tmp_path) -> None:
    import shutil

    tampered = tmp_path / "tampered"
    shutil.copytree(bundle_dir, tampered)
    threshold = json.loads((tampered / "threshold.json").read_text())
    threshold["threshold"] = 1e9
    (tampered / "threshold.json").write_text(json.dumps(threshold))
    refused = _start_cli(str(tampered), "--port", str(_free_port()))
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 2
    assert err.strip().splitlines()[-1].startswith("fedae: error: ") and "threshold.json" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1

    bad = _start_cli(str(bundle_dir), "--max-instances", "0")
    _, err = bad.communicate(timeout=60)
    assert bad.returncode == 2 and err.strip() == "fedae: error: --max-instances must be at least 1, got 0"


@pytest.mark.slow  # loads the bundle before it finds the port taken
def test_fedae_serve_refuses_a_taken_port(bundle_dir) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = _start_cli(str(bundle_dir), "--port", str(port))
        _, err = busy.communicate(timeout=120)
    assert busy.returncode == 2
    assert (
        err.strip().splitlines()[-1]
        == f"fedae: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert "Traceback" not in err
