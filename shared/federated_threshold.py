"""The federated threshold's arithmetic: fixed score bins, one client's noisy histogram, the server's
percentile (plain NumPy and scikit-learn, no TensorFlow, no Flower).

``threshold-rule = "federated-percentile"``: after the last round each client scores its own training
rows with the final model, counts them into the bins below and adds Gaussian noise to every count before
anything leaves (``shared.task.threshold_histogram`` charges the release to its ledger first). The server
sums the noisy histograms and reads the percentile from their running total.

Bins. ``bins`` log-spaced bins between ``SCORE_RANGE`` (1e-5 to 1e5, ten decades), plus an underflow bin
(scores below 1e-5, zero included) and an overflow bin (1e5 and above): ``bins + 2`` counts. The edges are
fixed constants and the run's settings, never a function of any data, so choosing them costs no privacy.
Scores are non-negative reconstruction errors: the ``mse`` score of data the scaler maps to unit scale and
the standardized scores (normal rows average 1 per feature by construction) sit within a few decades of 1,
so the range leaves several decades of margin either side. The resolution is the ratio of neighbouring
edges, ``10 ** (10 / bins)`` (80 bins: 1.334, a relative width of 33 %); the threshold is read to within one
bin, inside which it is interpolated on the log scale.

Sensitivity. Adding or removing one training row changes exactly one count by exactly 1 (L2 sensitivity
1, add/remove-one-example adjacency, the relation the Poisson DP-SGD accounting uses), so noise
N(0, sigma^2) per count is a Gaussian mechanism with noise multiplier sigma. Under replace-one adjacency
(the shuffled-batch ledgers) one row moves between two bins: L2 sensitivity sqrt(2) (``shared.privacy``).

Estimator. The summed noisy counts' running total is made monotone by isotonic regression (the
least-squares non-decreasing fit: a random walk of noise through empty bins must not make the cumulative
count go down), clipped at 0, and normalised by its last value, the noisy row count. The percentile is the
first bin whose cumulative share reaches p, interpolated within it on the log scale; if that is the
underflow or overflow bin the threshold is the range's edge and the fit says it was clamped. Every bin's
noise accumulates in the running total: with m clients the share's noise has a standard deviation of
about ``sigma * sqrt(m * (k (1 - F)^2 + (B - k) F^2)) / N`` at the k-th of B counts (F = p / 100, N rows),
which the fit reports in percentile points.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.isotonic import isotonic_regression

from shared import privacy
from shared.config import FedaeConfig

SCORE_RANGE = (1e-5, 1e5)  # the binned range; scores outside it fall in the underflow / overflow bins


class NoSignal(ValueError):
    """The noisy histograms hold no rows to read a percentile from (their noisy total is not positive)."""


def bin_edges(bins: int) -> np.ndarray:
    """The ``bins + 1`` log-spaced edges over ``SCORE_RANGE``: data-independent, the same on every side."""
    if isinstance(bins, bool) or not isinstance(bins, int | np.integer) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    low, high = SCORE_RANGE
    return np.logspace(math.log10(low), math.log10(high), int(bins) + 1)


def bin_ratio(bins: int) -> float:
    """The ratio of neighbouring edges: the threshold is read to within this factor (one bin)."""
    low, high = SCORE_RANGE
    return float((high / low) ** (1.0 / bins))


def count_scores(scores: np.ndarray, bins: int) -> np.ndarray:
    """The exact histogram (``bins + 2`` integer counts: underflow, the bins, overflow) of ``scores``.

    Each score lands in exactly one count, so adding or removing one row changes one count by 1.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if not np.isfinite(scores).all():
        # A non-finite score cannot be placed in a bin without a choice that depends on it; refuse.
        raise ValueError("scores must be finite to be counted into threshold bins")
    edges = bin_edges(bins)
    # side="right": a score equal to an edge belongs to the bin that starts there; index 0 is the
    # underflow bin (below the lowest edge), index bins + 1 the overflow bin (the highest edge and above).
    index = np.searchsorted(edges, scores, side="right")
    return np.bincount(index, minlength=bins + 2).astype(np.int64)


def add_noise(
    counts: np.ndarray, noise_multiplier: float, rng: np.random.Generator | None = None
) -> np.ndarray:
    """``counts`` plus independent N(0, noise_multiplier^2) on every count, as float64.

    ``rng`` is for tests only: by default the generator is seeded from the operating system's entropy,
    since noise that can be regenerated from a known seed protects nothing (docs/PRIVACY.md, Randomness).
    """
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a positive number, got {noise_multiplier}")
    counts = np.asarray(counts, dtype=np.float64)
    generator = rng if rng is not None else np.random.default_rng()
    return counts + generator.normal(0.0, noise_multiplier, size=counts.shape)


def check_histogram(values: np.ndarray, bins: int) -> np.ndarray:
    """A client's reply as ``bins + 2`` finite float64 counts, or ``ValueError`` saying what is wrong."""
    array = np.asarray(values)
    if array.shape != (bins + 2,):
        raise ValueError(f"a threshold histogram has {bins + 2} counts, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or not np.isfinite(array).all():
        raise ValueError("a threshold histogram's counts must be finite numbers")
    return array.astype(np.float64)


@dataclass(frozen=True)
class PercentileFit:
    """The server's percentile from the summed noisy histograms."""

    threshold: float
    percentile: float
    bin: int  # index among the bins + 2 counts (0: underflow, bins + 1: overflow)
    clamped: str | None  # "below the binned range" / "above the binned range", or None
    noisy_rows: float  # the noisy total count (isotonic fit's last value)
    noise_sd_points: float  # the noise's standard deviation of the share read, in percentile points


def fit_percentile(
    histograms: Sequence[np.ndarray], bins: int, percentile: float, noise_multiplier: float
) -> PercentileFit:
    """The ``percentile`` of the rows the noisy ``histograms`` count (one per client, summed here).

    ``noise_multiplier`` (the per-count noise each client added) only sizes the reported uncertainty;
    with exact counts the result is the exact percentile to within one bin.
    """
    if not 0 < percentile < 100:
        raise ValueError(f"percentile must be in (0, 100), got {percentile}")
    if not histograms:
        raise ValueError("fitting a federated percentile needs at least one histogram")
    total = np.sum([check_histogram(h, bins) for h in histograms], axis=0)
    # scikit-learn's pool-adjacent-violators solution: the least-squares non-decreasing fit, not a
    # running maximum, which would turn the noise's upward excursions into a bias.
    cumulative = np.clip(isotonic_regression(np.cumsum(total), increasing=True), 0.0, None)
    rows = float(cumulative[-1])
    if not rows > 0:
        raise NoSignal(
            f"the noisy histograms sum to {rows:.4g} rows: there is nothing to read a percentile from"
        )
    share = percentile / 100.0
    target = share * rows
    k = int(np.searchsorted(cumulative, target, side="left"))
    edges = bin_edges(bins)
    clamped = None
    if k == 0:
        threshold, clamped = float(edges[0]), "below the binned range"
    elif k >= bins + 1:
        threshold, clamped = float(edges[-1]), "above the binned range"
    else:
        # Bin k spans [edges[k - 1], edges[k]): spread its rows evenly in log(score).
        below = float(cumulative[k - 1])
        fraction = (target - below) / (float(cumulative[k]) - below)
        low, high = math.log(edges[k - 1]), math.log(edges[k])
        threshold = math.exp(low + fraction * (high - low))
    # First-order noise of the share read at count k: the counts up to k and those after it, each with
    # variance m * sigma^2, enter the ratio with weights (1 - F) and F.
    m, counts = len(histograms), bins + 2
    variance = m * noise_multiplier**2 * ((k + 1) * (1 - share) ** 2 + (counts - k - 1) * share**2)
    return PercentileFit(threshold, percentile, k, clamped, rows, 100.0 * math.sqrt(variance) / rows)


@dataclass(frozen=True)
class ClientHistogram:
    """One client's reply to the threshold query."""

    client: int
    counts: np.ndarray  # bins + 2 noisy counts
    num_examples: int
    release_epsilon: float  # this release alone
    epsilon: float  # the client's whole ledger afterwards


@dataclass(frozen=True)
class ThresholdRelease:
    """What the federated threshold came to: the threshold (None: no usable release, the coordinator's
    calibration percentile stands in) and the section ``summary.json`` and the bundle's metadata carry
    (``privacy.threshold_release``)."""

    threshold: float | None
    section: dict[str, Any]

    @property
    def epsilon_after(self) -> dict[int, float]:
        """Each contributing client's cumulative epsilon after its release."""
        return {int(c): e for c, e in self.section["epsilon_after"]["per_client"].items()}

    def sentence(self) -> str:
        """The threshold rule in words, for the bundle's ``threshold_rule`` and the report."""
        s = self.section
        if self.threshold is None:
            return (
                f"{s['percentile']:g}th percentile of normal calibration scores (the coordinator's data): "
                f"threshold-rule federated-percentile fell back, {s['fallback']}"
            )
        clamped = f"; clamped, {s['clamped']}" if s["clamped"] else ""
        return (
            f"{s['percentile']:g}th percentile of the clients' own training scores from Gaussian-noised "
            f"histograms ({len(s['contributing_clients'])} of {s['clients_asked']} clients contributed; "
            f"noise multiplier {s['noise_multiplier']:g} per count, {s['bins']} log-spaced bins over "
            f"[{SCORE_RANGE[0]:g}, {SCORE_RANGE[1]:g}] plus underflow and overflow, read to within one "
            f"bin, a factor {s['bin_ratio']:.3f}; noise sd about {s['noise_sd_percentile_points']:.2g} "
            f"percentile points{clamped})"
        )


def combine(
    config: FedaeConfig,
    histograms: Sequence[ClientHistogram],
    refused: Mapping[str, str],
    failed: Sequence[Mapping[str, Any]],
    clients_asked: int,
) -> ThresholdRelease:
    """Sum the clients' noisy histograms and fit the percentile; with none usable, say why (the caller
    falls back to the coordinator's calibration percentile)."""
    fit, fallback = None, None
    if not histograms:
        fallback = f"no client contributed a histogram ({len(refused)} refused, {len(failed)} failed)"
    else:
        try:
            fit = fit_percentile(
                [h.counts for h in histograms],
                config.threshold_bins,
                config.threshold_percentile,
                config.threshold_noise_multiplier,
            )
        except NoSignal as err:
            fallback = str(err)
    ordered = sorted(histograms, key=lambda h: h.client)
    section: dict[str, Any] = {
        "rule": "federated-percentile",
        "percentile": config.threshold_percentile,
        "noise_multiplier": config.threshold_noise_multiplier,
        "bins": config.threshold_bins,
        "score_range": list(SCORE_RANGE),
        "bin_ratio": bin_ratio(config.threshold_bins),
        "resolution": (
            f"read to within one bin (a factor {bin_ratio(config.threshold_bins):.3f}), interpolated on the "
            "log scale"
        ),
        "mechanism": (
            "each client counts its own training rows' scores into the fixed bins (plus underflow and "
            "overflow) and adds N(0, noise_multiplier^2) to every count before replying; the server sums "
            "the noisy counts"
        ),
        "clients_asked": clients_asked,
        "contributing_clients": [h.client for h in ordered],
        "refused": dict(sorted(refused.items())),
        "failed": [dict(f) for f in failed],
        "threshold": None if fit is None else fit.threshold,
        "clamped": None if fit is None else fit.clamped,
        "noisy_rows": None if fit is None else fit.noisy_rows,
        "noise_sd_percentile_points": None if fit is None else fit.noise_sd_points,
        "fallback": fallback,
        "release_epsilon": {
            "per_client": {str(h.client): h.release_epsilon for h in ordered},
            "statement": privacy.describe_release(config.delta, config.accountant, config.sampling),
        },
        "epsilon_after": {
            "per_client": {str(h.client): h.epsilon for h in ordered},
            "statement": privacy.describe(config.delta, config.accountant, config.sampling, True),
        },
        "rows": {str(h.client): h.num_examples for h in ordered},
    }
    return ThresholdRelease(None if fit is None else fit.threshold, section)
