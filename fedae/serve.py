"""``fedae serve``: an exported detector bundle as an HTTP service (FastAPI, run by uvicorn).

Endpoints: ``POST /v1/score`` (scores and 0/1 anomaly flags for a batch of instances, one model call per
request), ``GET /healthz``, ``GET /v1/metadata`` (input schema, threshold, privacy figures, training
run) and ``GET /metrics`` (Prometheus text format: requests, latency, instances, anomalies, errors,
score drift). docs/DETECTOR.md, "HTTP service", documents each one.

Bad input never produces a 500: every refusal is a 4xx ``{"error": {"code": ..., "message": ...}}``
naming the problem (``fedae/instances.py``); only a real internal error is a 500, and its traceback goes
to the log, not to the client.

``create_app`` needs only a loaded ``Detector`` (no flwr, no CLI); ``run_server`` is the uvicorn glue the
CLI uses.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedae.instances import (
    DEFAULT_DRIFT_WINDOW,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_INSTANCES,
    InputSchema,
    RequestError,
    instances_array,
    parse_json,
)
from fedae.service_metrics import ServiceMetrics
from shared.drift import DEFAULT_MIN_WINDOW, DriftMonitor

logger = logging.getLogger("fedae.serve")

ENDPOINTS = ("/v1/score", "/healthz", "/v1/metadata", "/metrics")  # metrics label; anything else: "other"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]


class ScoreResponse(BaseModel):
    """``POST /v1/score``'s answer (documents the OpenAPI schema; responses are written directly)."""

    scores: list[float]
    anomaly: list[int]
    threshold: float
    model_version: str


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


def _error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


class _ScoringService:
    """The detector and what is kept beside it: limits, drift monitor, metrics, the model's lock."""

    def __init__(self, detector: Any, *, max_instances: int, max_body_bytes: int, drift_window: int) -> None:
        for name, value in (
            ("max_instances", max_instances),
            ("max_body_bytes", max_body_bytes),
            ("drift_window", drift_window),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.detector = detector
        self.schema = InputSchema.from_detector(detector)
        self.max_instances = max_instances
        self.max_body_bytes = max_body_bytes
        self.threshold = float(detector.threshold)
        self.monitor = (
            None
            if detector.drift_reference is None
            else DriftMonitor(
                detector.drift_reference,
                window=drift_window,
                min_window=min(DEFAULT_MIN_WINDOW, drift_window),
            )
        )
        self.version = _fedae_version()
        self.metrics = ServiceMetrics(
            monitor=self.monitor,
            recent_window=drift_window,
            bundle_id=detector.bundle_id,
            model_kind=detector.spec.kind,
            fedae_version=self.version,
            threshold=self.threshold,
        )
        self.metadata = _json_safe(self._describe(drift_window))
        # One Keras model shared by every request thread. tf-keras documents no guarantee that one Model
        # may be called from several threads at once, so calls take turns. Little is lost: a call already
        # spreads over every core through TensorFlow's own intra-op thread pool, and the Python around it
        # holds the GIL anyway. Parsing and checking a body (most of a large request's time, measured in
        # docs/BENCHMARKS.md) happen outside the lock.
        self._model_lock = threading.Lock()
        self._warm_up()

    def _warm_up(self) -> None:
        """One call before the first request, so no request pays for TensorFlow's first-call set-up."""
        with self._model_lock:
            self.detector.score(np.zeros((1, *self.schema.shape), dtype=np.float32))

    def score_body(self, body: bytes) -> dict[str, Any]:
        """Parse, check, score (one model call) and record one request's body; RequestError if bad."""
        x = instances_array(parse_json(body), self.schema, self.max_instances)
        # Overflow is checked on the scores below; NumPy's warning about it would only fill the log.
        with self._model_lock, np.errstate(over="ignore", invalid="ignore"):
            scores = np.asarray(self.detector.score(x), dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(scores))
        if bad.size:  # finite float32 inputs far outside the training range can overflow the model
            raise RequestError(
                422,
                "non_finite_score",
                f"instance {int(bad[0])}: the model's score is {float(scores[bad[0]])}; its values are too "
                "far outside the range the model was trained on to be scored",
            )
        flags = scores > self.threshold
        if self.monitor is not None:
            self.monitor.observe(scores)
        self.metrics.observe_scored(flags)
        return {
            "scores": scores.tolist(),
            "anomaly": flags.astype(int).tolist(),
            "threshold": self.threshold,
            "model_version": self.detector.bundle_id,
        }

    def _describe(self, drift_window: int) -> dict[str, Any]:
        detector, meta = self.detector, self.detector.metadata
        return {
            "bundle_id": detector.bundle_id,
            "model_version": detector.bundle_id,
            "fedae_version": self.version,
            "model": meta.get("model")
            or {"kind": detector.spec.kind, "input_shape": list(detector.spec.input_shape)},
            "input_schema": {
                "kind": self.schema.kind,
                "shape": list(self.schema.shape),
                "feature_names": list(self.schema.feature_names),
            },
            "threshold": {
                "value": self.threshold,
                "rule": detector.threshold_rule,
                "description": meta.get("threshold_rule"),
                "anomaly_if": "score > threshold",
                "score": detector.scorer.describe(),
            },
            "privacy": meta.get("privacy"),
            "training_run": meta.get("training_run"),
            "limits": {"max_instances": self.max_instances, "max_body_bytes": self.max_body_bytes},
            "drift": {
                "reference": self.monitor is not None,
                "window": drift_window,
                "min_window": None if self.monitor is None else self.monitor.min_window,
            },
        }


def create_app(
    detector: Any,
    *,
    max_instances: int = DEFAULT_MAX_INSTANCES,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    drift_window: int = DEFAULT_DRIFT_WINDOW,
) -> FastAPI:
    """The service for a loaded ``shared.detector.Detector`` (ValueError on a bad limit).

    ``max_instances``: most instances in one request (more: 413). ``max_body_bytes``: largest request
    body (413, from Content-Length and while reading, so a chunked upload cannot pass it).
    ``drift_window``: scores the drift monitor and the recent anomaly rate look back over.
    """
    service = _ScoringService(
        detector, max_instances=max_instances, max_body_bytes=max_body_bytes, drift_window=drift_window
    )
    # No /docs or /redoc: their pages load scripts from a CDN. /openapi.json stays (it is the API's schema).
    app = FastAPI(title="fedae scoring service", version=service.version, docs_url=None, redoc_url=None)
    app.state.service = service
    app.add_middleware(_MetricsAndErrors, metrics=service.metrics)
    _add_error_handlers(app, service)
    _add_routes(app, service)
    return app


def _add_routes(app: FastAPI, service: _ScoringService) -> None:
    error_docs: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse} for status in (400, 413, 415, 422)
    }

    @app.post(
        "/v1/score",
        responses={200: {"model": ScoreResponse}, **error_docs},
        openapi_extra={"requestBody": _request_body_doc(service)},
    )
    async def score(request: Request) -> Response:
        _check_content_type(request)
        body = await _read_body(request, service.max_body_bytes)
        # Parsing, checks and the model call run in Starlette's thread pool, so the event loop keeps
        # answering /healthz and /metrics while a large batch is scored.
        return JSONResponse(await run_in_threadpool(service.score_body, body))

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        # The app exists only once the bundle is loaded and the model has answered its warm-up call.
        return {
            "status": "ok",
            "bundle_id": service.detector.bundle_id,
            "model_kind": service.detector.spec.kind,
        }

    @app.get("/v1/metadata")
    async def metadata() -> JSONResponse:
        return JSONResponse(service.metadata)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        # A scrape runs the drift monitor's KS test: off the event loop too.
        body, content_type = await run_in_threadpool(
            service.metrics.exposition, request.headers.get("accept", "")
        )
        return Response(body, headers={"content-type": content_type})


def _add_error_handlers(app: FastAPI, service: _ScoringService) -> None:
    @app.exception_handler(RequestError)
    async def refused(_: Request, err: RequestError) -> JSONResponse:
        service.metrics.count_error(err.code)
        return _error_response(err.status, err.code, err.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, f"http_{err.status_code}")
        message = {
            404: f"no endpoint {request.url.path}; the service has {', '.join(ENDPOINTS)}",
            405: f"{request.method} is not allowed on {request.url.path}",
        }.get(err.status_code, str(err.detail))
        service.metrics.count_error(code)
        response = _error_response(err.status_code, code, message)
        if err.headers:
            response.headers.update(err.headers)  # Allow: on a 405
        return response


class _MetricsAndErrors:
    """Outermost of the app's own layers: times and counts every request, and turns an exception that
    nothing else handled (a real internal error: bad input is a RequestError) into a generic 500 whose
    traceback goes to the log, never to the client. Plain ASGI, so it never buffers a body."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"  # unknown paths must not grow the label set
        started, status, responded = time.perf_counter(), 500, False

        async def send_and_note(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = int(message["status"]), True
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            logger.exception("internal error answering %s %s", scope.get("method"), path)
            self.metrics.count_error("internal_error")
            if responded:  # too late for a 500: let the server drop the connection
                raise
            status = 500
            await _error_response(500, "internal_error", "internal error; the service's log has the details")(
                scope, receive, send
            )
        finally:
            self.metrics.observe_request(endpoint, status, time.perf_counter() - started)


def _check_content_type(request: Request) -> None:
    given = request.headers.get("content-type", "")
    media = given.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise RequestError(
            415,
            "unsupported_media_type",
            f"send the body as JSON with Content-Type: application/json (got {given or 'no Content-Type'!r})",
        )


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 once it passes ``limit`` bytes: by its declared Content-Length before
    anything is read, and by counting while reading (a chunked upload declares no length)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(
            413, "body_too_large", f"the body is {int(declared)} bytes; this service takes at most {limit}"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(
                413, "body_too_large", f"the body passed {limit} bytes, the most this service takes"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _request_body_doc(service: _ScoringService) -> dict[str, Any]:
    row = {"type": "array", "description": f"one instance of shape {list(service.schema.shape)}"}
    record = {"type": "object", "additionalProperties": {"type": "number"}, "description": "feature -> value"}
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["instances"],
                    "properties": {
                        "instances": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": service.max_instances,
                            "items": {"oneOf": [row, record]} if service.schema.feature_names else row,
                        }
                    },
                }
            }
        },
    }


def _fedae_version() -> str:
    try:
        return importlib.metadata.version("fedae")
    except importlib.metadata.PackageNotFoundError:
        from fedae import __version__

        return __version__


def _json_safe(value: Any) -> Any:
    """Strict-JSON copy: NaN and infinities (which a bundle's metadata may hold) become null, NumPy
    scalars plain numbers; Starlette's JSON responses refuse non-finite floats."""
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# -- running it ------------------------------------------------------------------------------------
def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (OSError when the port is taken or the host is not this machine's),
    handed to uvicorn, so that a taken port is one clear error before the service starts."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        # Lets a restarted service take its port back while old connections sit in TIME_WAIT; on Linux it
        # does not let two services listen on one port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class _Stop(Exception):
    """SIGTERM, turned into an exception after uvicorn's graceful shutdown re-raises it."""


def run_server(app: FastAPI, sock: socket.socket, *, access_log: bool = False) -> None:
    """Serve ``app`` on ``sock`` until SIGINT or SIGTERM, then return after a graceful shutdown.

    uvicorn answers either signal by finishing the requests in flight, then raises the same signal again
    once its own handlers are gone: SIGINT as KeyboardInterrupt, SIGTERM here as ``_Stop``. Both are
    caught, so stopping the service is a normal end (the CLI's exit 0), not a traceback."""

    def stop(signum: int, _frame: Any) -> None:
        raise _Stop(signum)

    config = uvicorn.Config(
        app, log_config=None, access_log=access_log, lifespan="off", timeout_graceful_shutdown=10
    )
    server = uvicorn.Server(config)
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.run(sockets=[sock])
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
