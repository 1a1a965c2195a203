"""The scoring service's Prometheus metrics, in one registry per service (never the process-global one,
so several services in one process, as in the tests, keep their own counts).

Counters and the latency histogram are prometheus_client's own (thread-safe). The drift figures and
the recent anomaly rate are computed when Prometheus scrapes (a custom collector), so a request never
pays for a KS test and a scrape always sees the current window.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterator

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from shared.drift import DriftMonitor

# From 1 ms (a one-row request on a small model) to 10 s (a full batch on a slow, busy machine).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RecentRate:
    """The share of flagged instances among the last ``window`` scored (thread-safe)."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._flags: deque[int] = deque(maxlen=window)
        self._lock = threading.Lock()

    def observe(self, flags: np.ndarray) -> None:
        with self._lock:
            self._flags.extend(flags.tolist())

    def rate(self) -> tuple[float, int]:
        """(rate, instances in the window); the rate is NaN while the window is empty."""
        with self._lock:
            size, flagged = len(self._flags), sum(self._flags)  # at scrape time only: O(window) is fine
        return (flagged / size if size else math.nan), size


class _ScrapeTimeCollector(Collector):
    """Drift gauges (from the DriftMonitor) and the recent anomaly rate, computed at each scrape."""

    def __init__(self, monitor: DriftMonitor | None, recent: RecentRate) -> None:
        self.monitor = monitor
        self.recent = recent

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families().values())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = self._families()
        rate, size = self.recent.rate()
        families["recent_rate"].add_metric([], rate)
        families["recent_size"].add_metric([], size)
        families["drift_reference"].add_metric([], 0.0 if self.monitor is None else 1.0)
        if self.monitor is None:  # a bundle without drift.json: nothing to compare with
            return iter([families["recent_rate"], families["recent_size"], families["drift_reference"]])
        status = self.monitor.status()
        for key, value in (
            ("psi", status.psi),
            ("ks_statistic", status.ks_statistic),
            ("ks_pvalue", status.ks_pvalue),
        ):
            families[key].add_metric([], math.nan if value is None else value)
        families["alert"].add_metric([], 1.0 if status.alert else 0.0)
        families["window_size"].add_metric([], status.window_size)
        return iter(families.values())

    @staticmethod
    def _families() -> dict[str, GaugeMetricFamily]:
        return {
            "recent_rate": GaugeMetricFamily(
                "fedae_recent_anomaly_rate",
                "Share of the last drift-window scored instances flagged as anomalies (NaN before any)",
            ),
            "recent_size": GaugeMetricFamily(
                "fedae_recent_anomaly_window_size", "Scored instances the recent anomaly rate is over"
            ),
            "drift_reference": GaugeMetricFamily(
                "fedae_drift_reference_loaded",
                "1 if the bundle has a drift reference (drift.json), so the fedae_drift_* gauges exist",
            ),
            "psi": GaugeMetricFamily(
                "fedae_drift_psi", "Population stability index of the recent scores against calibration"
            ),
            "ks_statistic": GaugeMetricFamily(
                "fedae_drift_ks_statistic", "Two-sample Kolmogorov-Smirnov statistic, recent vs calibration"
            ),
            "ks_pvalue": GaugeMetricFamily(
                "fedae_drift_ks_pvalue", "Asymptotic p-value of that KS test (NaN while the window is empty)"
            ),
            "alert": GaugeMetricFamily(
                "fedae_drift_alert", "1 when shared/drift.py's alert rule fires on the current window"
            ),
            "window_size": GaugeMetricFamily(
                "fedae_drift_window_size", "Scores in the drift window (no verdict below its minimum)"
            ),
        }


class ServiceMetrics:
    """Everything ``GET /metrics`` shows, in a registry of its own."""

    def __init__(
        self,
        *,
        monitor: DriftMonitor | None,
        recent_window: int,
        bundle_id: str,
        model_kind: str,
        fedae_version: str,
        threshold: float,
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fedae_http_requests",
            "HTTP requests answered, by endpoint (other: unknown paths) and status code",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fedae_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.instances = Counter(
            "fedae_instances_scored", "Instances scored (rows or images)", registry=self.registry
        )
        self.anomalies = Counter(
            "fedae_anomalies_flagged",
            "Scored instances flagged as anomalies (score > threshold)",
            registry=self.registry,
        )
        self.errors = Counter(
            "fedae_errors", "Refused or failed requests, by error code", ["kind"], registry=self.registry
        )
        info = Gauge(
            "fedae_model_info",
            "The bundle being served (always 1; its facts are the labels)",
            ["bundle_id", "model_kind", "fedae_version"],
            registry=self.registry,
        )
        info.labels(bundle_id, model_kind, fedae_version).set(1)
        Gauge(
            "fedae_anomaly_threshold",
            "The bundle's threshold: anomaly iff score > it",
            registry=self.registry,
        ).set(threshold)
        self.recent = RecentRate(recent_window)
        self.registry.register(_ScrapeTimeCollector(monitor, self.recent))

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_scored(self, flags: np.ndarray) -> None:
        self.instances.inc(len(flags))
        self.anomalies.inc(int(flags.sum()))
        self.recent.observe(flags)

    def count_error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The registry and its content type, in the format the scraper's Accept header asks for (the
        Prometheus text format 0.0.4 unless it asks for OpenMetrics or a later text version)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type
