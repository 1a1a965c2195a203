"""Score drift: is the detector still seeing the data it was calibrated on? (issue 7, seed 5.4)

An autoencoder's threshold is only meaningful while normal traffic looks like the normal rows it was
calibrated on. When the plant, the sensors or the firmware change, the reconstruction-error scores of
normal rows move, and the alert rate moves with them without anything being anomalous. This module
watches for that: it keeps a rolling window of the most recent anomaly scores and compares it with the
scores of the detector's calibration rows (the reference).

Two figures, because they fail differently:

- **PSI** (population stability index) over reference-quantile bins: ``sum((o - e) * ln(o / e))`` where
  ``e`` and ``o`` are the reference's and the window's proportions per bin. Bins at the reference's
  deciles give every bin about 1/10 of the reference, so a shift anywhere in the distribution (the bulk
  or the upper tail, where the threshold lives) shows. Its usual reading: below 0.1 no significant
  change, 0.1 to 0.2 a moderate change, 0.2 or more a significant shift.
- **Two-sample Kolmogorov-Smirnov** (``scipy.stats.ks_2samp``, asymptotic p-value) of the window against
  a stored subsample of the reference: the largest gap between the two empirical CDFs, with a p-value.
  It needs no bins, but its p-value shrinks with the window, so on its own it flags negligible shifts in
  large windows.

The alert rule (the module constants below are the defaults; ``DriftMonitor`` takes each as a
parameter):

1. No verdict until the window holds at least ``DEFAULT_MIN_WINDOW`` (200) scores: with fewer, both
   figures are too noisy to act on. The figures are still reported, the alert is False and the reason
   says the window is too small.
2. Alert when ``PSI >= PSI_ALERT`` (0.2), or
3. alert when the KS p-value ``< KS_PVALUE_ALERT`` (0.01) **and** the KS statistic
   ``>= KS_STATISTIC_ALERT`` (0.1). The statistic floor is what keeps a window of many thousands of
   scores from alerting on a shift too small to matter: at 1000 scores against 10,000 reference scores
   a p-value of 0.01 is already reached at a statistic of about 0.054.

Why those numbers hold on normal data: with ``k`` bins, a window of ``n`` scores and a reference of
``N``, PSI of an unshifted window is about chi-square with ``k - 1`` degrees of freedom times
``(1/n + 1/N)``, i.e. about 0.045 +- 0.02 at ``k = 10, n = 200``: 0.2 is far outside that. The KS rule at
``n = 200`` has its nominal 1 % false-alarm rate (the floor does not bind there: the p = 0.01 critical
statistic is about 0.116), and at ``n = 1000`` the floor makes a false alarm very unlikely.

Why this is written by hand: PSI is a few lines of NumPy, and no maintained dependency already
installed in this project provides it; drift libraries such as evidently or nannyml would pull in large
dependency trees for one formula. The KS test comes from SciPy, which is installed already.

This module imports only NumPy, SciPy and the standard library (no ``flwr``, no TensorFlow), so a
scoring service can use it without loading the training stack.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

DEFAULT_BINS = 10
DEFAULT_SAMPLE_SIZE = 10_000
DEFAULT_WINDOW = 1000
DEFAULT_MIN_WINDOW = 200
# PSI's customary bands: < PSI_MODERATE no significant change, up to PSI_ALERT moderate, above: shifted.
PSI_MODERATE = 0.1
PSI_ALERT = 0.2
KS_PVALUE_ALERT = 0.01
KS_STATISTIC_ALERT = 0.1
# scipy.stats.ks_2samp's p-value method (see DriftMonitor.status for why not its default).
KS_METHOD = "asymp"
# A bin that is empty on one side would make ln(o / e) infinite; flooring both proportions at this value
# keeps PSI finite and still large for an emptied bin (about 1.95 for a 1/4 bin that empties).
PSI_FLOOR = 1e-4
# Proportions are stored as floats: a sum this close to 1 is rounding, anything further is a bad file.
PROPORTION_TOLERANCE = 1e-6

_REFERENCE_FIELDS = ("inner_edges", "proportions", "sample", "reference_size")


@dataclass(frozen=True)
class DriftReference:
    """The training-time score distribution that later windows are compared with.

    Attributes
    ----------
    inner_edges:
        Finite, strictly increasing bin edges. The outer edges -inf and +inf are implied (and not
        stored, so the JSON form never needs ``Infinity``): bin ``i`` is ``[edges[i], edges[i + 1])``
        of ``(-inf, *inner_edges, +inf)``, so every finite score falls in exactly one bin.
    proportions:
        The reference's share of scores per bin (``len(inner_edges) + 1`` values summing to 1).
    sample:
        A sorted subsample of the reference scores for the KS test (all of them when there are few).
    reference_size:
        How many scores the reference was built from.
    """

    inner_edges: tuple[float, ...]
    proportions: tuple[float, ...]
    sample: tuple[float, ...]
    reference_size: int

    def __post_init__(self) -> None:
        # Every way of building one (from_scores, from_dict, direct) passes through these checks.
        _check_finite("inner_edges", self.inner_edges)
        if any(b <= a for a, b in itertools.pairwise(self.inner_edges)):
            raise ValueError(
                f"drift reference field 'inner_edges' must be strictly increasing, got {self.inner_edges!r}"
            )
        if len(self.proportions) != len(self.inner_edges) + 1:
            raise ValueError(
                f"drift reference field 'proportions' must have {len(self.inner_edges) + 1} values "
                f"(one per bin), got {len(self.proportions)}"
            )
        _check_proportions("drift reference field 'proportions'", self.proportions)
        if not self.sample:
            raise ValueError("drift reference field 'sample' must not be empty, got []")
        _check_finite("sample", self.sample)
        if any(b < a for a, b in itertools.pairwise(self.sample)):
            raise ValueError("drift reference field 'sample' must be sorted in increasing order")
        if isinstance(self.reference_size, bool) or not isinstance(self.reference_size, int):
            raise ValueError(
                f"drift reference field 'reference_size' must be an integer, got {self.reference_size!r}"
            )
        if self.reference_size < len(self.sample):
            raise ValueError(
                f"drift reference field 'reference_size' must be at least the sample's size "
                f"{len(self.sample)}, got {self.reference_size}"
            )

    @classmethod
    def from_scores(
        cls,
        scores: np.ndarray | Sequence[float],
        bins: int = DEFAULT_BINS,
        sample_size: int = DEFAULT_SAMPLE_SIZE,
        seed: int = 0,
    ) -> DriftReference:
        """Build the reference from the anomaly scores of normal rows (the detector's calibration rows).

        Parameters
        ----------
        scores:
            1-D finite anomaly scores of normal rows.
        bins:
            Number of quantile bins wanted (at least 2). Ties can merge bins, so the reference may hold
            fewer; a constant reference holds one bin, and its PSI is then always 0 (KS still judges).
        sample_size:
            At most this many scores are kept (drawn without replacement with ``seed``) for the KS test.
        seed:
            Seed of that draw, so the same scores always give the same reference.
        """
        values = _as_scores(scores, "scores")
        if len(values) == 0:
            raise ValueError("a drift reference needs at least one score, got none")
        _check_count("bins", bins, minimum=2)
        _check_count("sample_size", sample_size, minimum=1)
        # Edges at the reference's own quantiles; "inverted_cdf" picks actual scores rather than
        # interpolating between two, so two edges never fall in the same gap between neighbouring scores
        # (which would leave an empty bin between them).
        quantiles = np.quantile(values, np.linspace(0.0, 1.0, bins + 1)[1:-1], method="inverted_cdf")
        # Ties give the same quantile several times; one edge each. An edge at the minimum would leave the
        # bin below it empty (bins are closed on the left), so it goes too. Every remaining bin then holds
        # at least one reference score: its own lower edge, or the minimum for the first bin.
        inner = np.unique(quantiles)
        inner = inner[inner > values.min()]
        counts = np.bincount(np.searchsorted(inner, values, side="right"), minlength=len(inner) + 1)
        proportions = counts / len(values)
        if len(values) > sample_size:
            sample = np.random.default_rng(seed).choice(values, size=sample_size, replace=False)
        else:
            sample = values
        return cls(
            inner_edges=tuple(float(edge) for edge in inner),
            proportions=tuple(float(share) for share in proportions),
            sample=tuple(float(score) for score in np.sort(sample)),
            reference_size=len(values),
        )

    @property
    def bins(self) -> int:
        return len(self.proportions)

    @property
    def edges(self) -> np.ndarray:
        """All bin edges, the implied -inf and +inf included."""
        return np.concatenate([[-np.inf], np.asarray(self.inner_edges, dtype=np.float64), [np.inf]])

    def bin_proportions(self, scores: np.ndarray) -> np.ndarray:
        """Share of ``scores`` (finite, 1-D, non-empty) in each of this reference's bins."""
        counts = np.bincount(
            np.searchsorted(np.asarray(self.inner_edges, dtype=np.float64), scores, side="right"),
            minlength=self.bins,
        )
        return counts / len(scores)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form (the bundle's drift.json); only finite floats, so strict JSON too."""
        return {
            "inner_edges": list(self.inner_edges),
            "proportions": list(self.proportions),
            "sample": list(self.sample),
            "reference_size": self.reference_size,
        }

    @classmethod
    def from_dict(cls, data: Any) -> DriftReference:
        """Read ``to_dict``'s form back, refusing anything malformed with a ValueError naming the field."""
        if not isinstance(data, dict):
            raise ValueError(f"a drift reference must be a JSON object, got {type(data).__name__}")
        missing = [name for name in _REFERENCE_FIELDS if name not in data]
        if missing:
            raise ValueError(f"drift reference is missing field(s) {', '.join(missing)}")
        unknown = sorted(set(data) - set(_REFERENCE_FIELDS))
        if unknown:
            raise ValueError(f"drift reference has unknown field(s) {', '.join(map(str, unknown))}")
        return cls(
            inner_edges=_float_list("inner_edges", data["inner_edges"]),
            proportions=_float_list("proportions", data["proportions"]),
            sample=_float_list("sample", data["sample"]),
            reference_size=data["reference_size"],
        )


def psi(
    expected: np.ndarray | Sequence[float], observed: np.ndarray | Sequence[float], floor: float = PSI_FLOOR
) -> float:
    """Population stability index ``sum((o - e) * ln(o / e))`` of two proportion vectors over the same bins.

    Both vectors are floored at ``floor`` before the logarithm: a bin that is empty on one side would
    otherwise make the index infinite, and an emptied bin should read as a large shift, not as a crash.
    The form is symmetric in ``expected`` and ``observed``.
    """
    if not (isinstance(floor, int | float) and not isinstance(floor, bool) and 0.0 < floor < 1.0):
        raise ValueError(f"the PSI floor must be in (0, 1), got {floor!r}")
    e = np.asarray(expected, dtype=np.float64)
    o = np.asarray(observed, dtype=np.float64)
    if e.ndim != 1 or e.shape != o.shape or e.size == 0:
        raise ValueError(
            f"PSI needs two non-empty 1-D proportion vectors of one shape, got {e.shape} and {o.shape}"
        )
    for name, values in (("expected", e), ("observed", o)):
        _check_proportions(f"PSI's {name}", values)
    e = np.maximum(e, floor)
    o = np.maximum(o, floor)
    return float(np.sum((o - e) * np.log(o / e)))


@dataclass(frozen=True)
class DriftStatus:
    """One verdict on the current window.

    ``psi``, ``ks_statistic`` and ``ks_pvalue`` are None only while the window is empty; below the
    minimum window they are reported but ``alert`` stays False. ``reason`` says in words why it alerts
    or why not.
    """

    window_size: int
    psi: float | None
    ks_statistic: float | None
    ks_pvalue: float | None
    alert: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "window_size": self.window_size,
            "psi": self.psi,
            "ks_statistic": self.ks_statistic,
            "ks_pvalue": self.ks_pvalue,
            "alert": self.alert,
            "reason": self.reason,
        }


class DriftMonitor:
    """A rolling window of recent anomaly scores, judged against a ``DriftReference``.

    Safe to share between threads (a service's request handlers): ``observe`` and ``status`` take one
    lock, and ``status`` computes on a copy so a slow computation does not hold up ``observe``.
    """

    def __init__(
        self,
        reference: DriftReference,
        *,
        window: int = DEFAULT_WINDOW,
        min_window: int = DEFAULT_MIN_WINDOW,
        psi_alert: float = PSI_ALERT,
        ks_pvalue_alert: float = KS_PVALUE_ALERT,
        ks_statistic_alert: float = KS_STATISTIC_ALERT,
        psi_floor: float = PSI_FLOOR,
    ) -> None:
        if not isinstance(reference, DriftReference):
            raise ValueError(f"reference must be a DriftReference, got {type(reference).__name__}")
        _check_count("window", window, minimum=1)
        _check_count("min_window", min_window, minimum=1)
        if min_window > window:
            # The window could never hold enough scores, so the monitor could never judge.
            raise ValueError(f"min_window must be at most window ({window}), got {min_window}")
        _check_threshold("psi_alert", psi_alert, low=0.0, high=math.inf, low_open=True)
        _check_threshold("ks_pvalue_alert", ks_pvalue_alert, low=0.0, high=1.0, low_open=True)
        _check_threshold("ks_statistic_alert", ks_statistic_alert, low=0.0, high=1.0, low_open=False)
        _check_threshold("psi_floor", psi_floor, low=0.0, high=1.0, low_open=True, high_open=True)
        self.reference = reference
        self.window = window
        self.min_window = min_window
        self.psi_alert = float(psi_alert)
        self.ks_pvalue_alert = float(ks_pvalue_alert)
        self.ks_statistic_alert = float(ks_statistic_alert)
        self.psi_floor = float(psi_floor)
        self._expected = np.asarray(reference.proportions, dtype=np.float64)
        self._sample = np.asarray(reference.sample, dtype=np.float64)
        self._lock = threading.Lock()
        self._scores: deque[float] = deque(maxlen=window)
        self._observed_total = 0

    @property
    def observed_total(self) -> int:
        """Scores accepted since the monitor was made (including those the window has since dropped)."""
        with self._lock:
            return self._observed_total

    @property
    def window_size(self) -> int:
        with self._lock:
            return len(self._scores)

    def window_scores(self) -> np.ndarray:
        """A copy of the window, oldest score first."""
        with self._lock:
            return np.array(self._scores, dtype=np.float64)

    def observe(self, scores: np.ndarray | Sequence[float]) -> None:
        """Add a batch of 1-D anomaly scores to the window.

        A batch with a NaN or infinite score is refused whole (ValueError naming the first bad index),
        so the window never holds half a batch.
        """
        values = _as_scores(scores, "scores")
        with self._lock:
            self._scores.extend(values.tolist())
            self._observed_total += len(values)

    def status(self) -> DriftStatus:
        """PSI and KS of the current window against the reference, and the alert rule's verdict."""
        window = self.window_scores()
        size = len(window)
        if size == 0:
            return DriftStatus(
                0, None, None, None, False, f"window 0 < {self.min_window}: too few scores to judge"
            )
        psi_value = psi(self._expected, self.reference.bin_proportions(window), floor=self.psi_floor)
        # The asymptotic p-value, not scipy's default "auto" (exact while both samples hold <= 10,000
        # scores): the exact one costs up to a second when the window is far from the reference, just
        # when a service is asked most often, while from the minimum window of 200 on the two agree
        # to well within what the 0.01 threshold can tell apart.
        ks = stats.ks_2samp(window, self._sample, method=KS_METHOD)
        ks_statistic, ks_pvalue = float(ks.statistic), float(ks.pvalue)
        alert, reason = self._verdict(size, psi_value, ks_statistic, ks_pvalue)
        return DriftStatus(size, psi_value, ks_statistic, ks_pvalue, alert, reason)

    def _verdict(
        self, size: int, psi_value: float, ks_statistic: float, ks_pvalue: float
    ) -> tuple[bool, str]:
        if size < self.min_window:
            return False, f"window {size} < {self.min_window}: too few scores to judge"
        psi_fires = psi_value >= self.psi_alert
        ks_significant = ks_pvalue < self.ks_pvalue_alert
        ks_large = ks_statistic >= self.ks_statistic_alert
        psi_text = f"PSI {psi_value:.4g} {'>=' if psi_fires else '<'} {self.psi_alert:g}"
        if ks_significant and ks_large:
            ks_text = (
                f"KS p-value {ks_pvalue:.3g} < {self.ks_pvalue_alert:g} "
                f"with statistic {ks_statistic:.4g} >= {self.ks_statistic_alert:g}"
            )
        elif ks_significant:
            ks_text = (
                f"KS p-value {ks_pvalue:.3g} < {self.ks_pvalue_alert:g} but statistic {ks_statistic:.4g} "
                f"< {self.ks_statistic_alert:g} (a shift too small to matter)"
            )
        else:
            ks_text = f"KS p-value {ks_pvalue:.3g} >= {self.ks_pvalue_alert:g}"
        if psi_fires or (ks_significant and ks_large):
            return True, f"drift: {psi_text}; {ks_text}"
        return False, f"no drift: {psi_text}; {ks_text}"


def _as_scores(scores: np.ndarray | Sequence[float], name: str) -> np.ndarray:
    """1-D float64 copy of ``scores``, refusing NaN and infinities with the first bad index."""
    values = np.array(scores, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {values.shape}")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        index = int(bad[0])
        raise ValueError(f"{name} must be finite: index {index} is {float(values[index])!r}")
    return values


def _float_list(name: str, value: Any) -> tuple[float, ...]:
    """A JSON list of numbers as a tuple of floats; strings, booleans and nesting are refused."""
    if not isinstance(value, list | tuple):
        raise ValueError(f"drift reference field {name!r} must be a list of numbers, got {value!r}")
    for index, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int | float):
            raise ValueError(f"drift reference field {name!r} must hold numbers: index {index} is {item!r}")
    return tuple(float(item) for item in value)


def _check_finite(name: str, values: Sequence[float]) -> None:
    for index, value in enumerate(values):
        if not math.isfinite(value):
            raise ValueError(f"drift reference field {name!r} must be finite: index {index} is {value!r}")


def _check_proportions(label: str, values: Sequence[float] | np.ndarray) -> None:
    """``label`` names the field in the message ("drift reference field 'proportions'")."""
    array = np.asarray(values, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(array) | (array < 0.0) | (array > 1.0))
    if bad.size:
        index = int(bad[0])
        raise ValueError(f"{label} must be proportions in [0, 1]: index {index} is {float(array[index])!r}")
    total = float(array.sum())
    if abs(total - 1.0) > PROPORTION_TOLERANCE:
        raise ValueError(f"{label} must sum to 1 (within {PROPORTION_TOLERANCE:g}), got {total!r}")


def _check_count(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_threshold(
    name: str, value: Any, *, low: float, high: float, low_open: bool, high_open: bool = False
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
