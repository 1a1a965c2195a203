"""shared.drift: PSI, the quantile-binned reference, its JSON form and the rolling-window monitor."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
import threading

import numpy as np
import pytest
from scipy import stats

from shared import drift
from shared.drift import DriftMonitor, DriftReference, DriftStatus, psi

GAMMA_SHAPE = 2.0


def gamma_scores(seed: int, size: int, scale: float = 1.0) -> np.ndarray:
    """Reconstruction errors look like this: positive and right-skewed."""
    return np.random.default_rng(seed).gamma(GAMMA_SHAPE, scale, size)


@pytest.fixture(scope="module")
def reference() -> DriftReference:
    return DriftReference.from_scores(gamma_scores(0, 20_000))


# --- PSI ---------------------------------------------------------------------------------------------


def test_psi_matches_the_formula_worked_by_hand() -> None:
    # sum((o - e) * ln(o / e)) with e = 0.25 in every bin, written out term by term:
    by_hand = (
        (0.1 - 0.25) * math.log(0.1 / 0.25)
        + (0.2 - 0.25) * math.log(0.2 / 0.25)
        + (0.3 - 0.25) * math.log(0.3 / 0.25)
        + (0.4 - 0.25) * math.log(0.4 / 0.25)
    )
    assert psi([0.25] * 4, [0.1, 0.2, 0.3, 0.4]) == pytest.approx(by_hand, rel=1e-12)
    assert by_hand == pytest.approx(0.2282, abs=1e-4)  # the terms above: 0.1374 + 0.0112 + 0.0091 + 0.0705


def test_psi_of_identical_proportions_is_zero_and_the_form_is_symmetric() -> None:
    p = [0.1, 0.2, 0.3, 0.4]
    q = [0.4, 0.3, 0.2, 0.1]
    assert psi(p, p) == 0.0
    assert psi(p, q) > 0.0
    assert psi(p, q) == pytest.approx(psi(q, p), rel=1e-12)


def test_an_empty_bin_gives_a_finite_psi_because_of_the_floor() -> None:
    value = psi([0.5, 0.5], [1.0, 0.0])
    # The empty bin counts as 1e-4: 0.5 * ln(1 / 0.5) + (1e-4 - 0.5) * ln(1e-4 / 0.5)
    by_hand = 0.5 * math.log(2.0) + (1e-4 - 0.5) * math.log(1e-4 / 0.5)
    assert math.isfinite(value)
    assert value == pytest.approx(by_hand, rel=1e-12)
    # Both sides are floored: an empty reference bin gives the same finite figure.
    assert psi([1.0, 0.0], [0.5, 0.5]) == pytest.approx(by_hand, rel=1e-12)
    # The floor is what sets the figure: a smaller floor reads the empty bin as a larger shift.
    assert psi([0.5, 0.5], [1.0, 0.0], floor=1e-6) > value


@pytest.mark.parametrize(
    ("expected", "observed", "message"),
    [
        ([0.5, 0.5], [0.2, 0.3, 0.5], "one shape"),
        ([0.2, 0.3, 0.5], [0.5, 0.7, -0.2], "observed must be proportions .*index 2 is -0.2"),
        ([0.5, 0.5], [0.5, 0.6], "sum to 1"),
        ([0.4, 0.4], [0.5, 0.5], "expected must sum to 1"),
        ([], [], "non-empty"),
    ],
)
def test_psi_refuses_what_are_not_two_proportion_vectors(expected, observed, message) -> None:
    with pytest.raises(ValueError, match=message):
        psi(expected, observed)


# --- The reference -----------------------------------------------------------------------------------


def test_continuous_reference_bins_hold_a_tenth_each(reference: DriftReference) -> None:
    assert reference.bins == 10
    assert reference.reference_size == 20_000
    np.testing.assert_allclose(reference.proportions, 0.1, atol=0.01)
    edges = reference.edges
    assert edges[0] == -np.inf and edges[-1] == np.inf
    assert np.all(np.diff(edges) > 0)
    # The KS sample: at most sample_size scores, sorted, drawn from the reference scores.
    sample = np.asarray(reference.sample)
    assert len(sample) == 10_000
    assert np.all(np.diff(sample) >= 0)
    assert np.isin(sample, gamma_scores(0, 20_000)).all()


def test_reference_with_many_ties_still_gives_increasing_edges_and_no_empty_bin() -> None:
    rng = np.random.default_rng(7)
    # 60 % of the scores are exactly 0 and the rest take three values: most deciles coincide.
    scores = np.concatenate([np.zeros(3000), rng.integers(1, 4, 2000).astype(float)])
    reference = DriftReference.from_scores(scores)
    edges = np.asarray(reference.inner_edges)
    assert len(edges) >= 1
    assert np.all(np.diff(edges) > 0)
    assert sum(reference.proportions) == pytest.approx(1.0, abs=1e-12)
    assert min(reference.proportions) > 0.0
    # The zeros are one bin of their own.
    assert reference.proportions[0] == pytest.approx(0.6)


@pytest.mark.parametrize("size", [1, 2, 7, 15, 33, 101])
def test_small_references_have_no_empty_bin(size: int) -> None:
    rng = np.random.default_rng(size)
    for scores in (rng.normal(size=size), rng.integers(0, 3, size).astype(float)):
        reference = DriftReference.from_scores(scores)
        assert reference.bins <= min(10, len(np.unique(scores)))
        assert min(reference.proportions) > 0.0
        counts = np.array(reference.proportions) * size
        np.testing.assert_allclose(counts, np.round(counts))  # whole reference scores per bin
        assert sum(reference.proportions) == pytest.approx(1.0, abs=1e-12)


def test_small_reference_keeps_every_score_for_ks_and_the_draw_follows_the_seed() -> None:
    small = gamma_scores(3, 50)
    assert DriftReference.from_scores(small).sample == tuple(np.sort(small))
    large = gamma_scores(3, 5000)
    assert DriftReference.from_scores(large, sample_size=100, seed=1) == DriftReference.from_scores(
        large, sample_size=100, seed=1
    )
    assert DriftReference.from_scores(large, sample_size=100, seed=1) != DriftReference.from_scores(
        large, sample_size=100, seed=2
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scores": []}, "at least one score"),
        ({"scores": [1.0, float("nan")]}, "index 1"),
        ({"scores": [[1.0, 2.0]]}, "1-D"),
        ({"scores": [1.0, 2.0], "bins": 1}, "bins must be an integer >= 2, got 1"),
        ({"scores": [1.0, 2.0], "sample_size": 0}, "sample_size must be an integer >= 1, got 0"),
    ],
)
def test_from_scores_refuses_bad_input(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        DriftReference.from_scores(**kwargs)


# --- JSON --------------------------------------------------------------------------------------------


def test_json_round_trip_gives_the_same_reference_and_the_same_status(reference: DriftReference) -> None:
    text = json.dumps(reference.to_dict())
    assert "Infinity" not in text and "NaN" not in text  # strict JSON: the outer edges are implied
    again = DriftReference.from_dict(json.loads(text))
    assert again == reference
    window = gamma_scores(11, 500, scale=1.2)
    first, second = DriftMonitor(reference), DriftMonitor(again)
    first.observe(window)
    second.observe(window)
    assert first.status() == second.status()


def _tampered(field: str, value: object) -> dict[str, object]:
    data = DriftReference.from_scores(gamma_scores(0, 2000), bins=4, sample_size=100).to_dict()
    data[field] = value
    return data


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("inner_edges", [1.0, 0.5, 2.0], "'inner_edges' must be strictly increasing"),
        ("inner_edges", [0.5, 0.5, 2.0], "'inner_edges' must be strictly increasing"),
        ("inner_edges", [0.5, float("nan"), 2.0], "'inner_edges' must be finite: index 1 is nan"),
        ("inner_edges", [0.5, float("inf"), 2.0], "'inner_edges' must be finite: index 1 is inf"),
        ("inner_edges", "0.5,1,2", "'inner_edges' must be a list of numbers, got '0.5,1,2'"),
        ("inner_edges", [0.5, "1", 2.0], "'inner_edges' must hold numbers: index 1 is '1'"),
        ("proportions", [0.25, 0.25, 0.25, 0.35], "'proportions' must sum to 1 .*got 1.1"),
        ("proportions", [0.5, 0.5, 0.25, -0.25], "'proportions' must be proportions .*index 3 is -0.25"),
        ("proportions", [0.5, 0.5], "'proportions' must have 4 values .*got 2"),
        (
            "proportions",
            [0.25, float("nan"), 0.25, 0.25],
            "'proportions' must be proportions .*index 1 is nan",
        ),
        ("proportions", [0.25, True, 0.25, 0.25], "'proportions' must hold numbers: index 1 is True"),
        ("sample", [], "'sample' must not be empty"),
        ("sample", [0.1, float("nan")], "'sample' must be finite: index 1 is nan"),
        ("sample", [2.0, 1.0], "'sample' must be sorted"),
        ("sample", None, "'sample' must be a list of numbers, got None"),
        ("reference_size", "2000", "'reference_size' must be an integer, got '2000'"),
        ("reference_size", 2000.0, "'reference_size' must be an integer, got 2000.0"),
        ("reference_size", True, "'reference_size' must be an integer, got True"),
        ("reference_size", 10, "'reference_size' must be at least the sample's size 100, got 10"),
    ],
)
def test_tampered_reference_is_refused_naming_the_field(field, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        DriftReference.from_dict(_tampered(field, value))


def test_missing_unknown_or_non_object_reference_is_refused() -> None:
    data = _tampered("sample", [0.1, 0.2])
    assert DriftReference.from_dict(data).sample == (0.1, 0.2)  # the helper's dict itself is valid
    with pytest.raises(ValueError, match=r"missing field.* proportions"):
        DriftReference.from_dict({k: v for k, v in data.items() if k != "proportions"})
    with pytest.raises(ValueError, match=r"unknown field.* bins"):
        DriftReference.from_dict({**data, "bins": 4})
    with pytest.raises(ValueError, match="JSON object, got list"):
        DriftReference.from_dict([data])


# --- The monitor: statistics -------------------------------------------------------------------------


def test_same_distribution_rarely_alerts_and_a_shifted_one_always_does() -> None:
    same_alerts, shifted_alerts, same_psi = 0, 0, []
    for seed in range(20):
        reference = DriftReference.from_scores(gamma_scores(1000 + seed, 20_000), seed=seed)
        same, shifted = DriftMonitor(reference), DriftMonitor(reference)
        same.observe(gamma_scores(2000 + seed, 1000))
        shifted.observe(gamma_scores(3000 + seed, 1000, scale=1.5))
        same_status, shifted_status = same.status(), shifted.status()
        same_alerts += same_status.alert
        shifted_alerts += shifted_status.alert
        same_psi.append(same_status.psi)
        assert shifted_status.reason.startswith("drift:"), shifted_status.reason
    assert same_alerts <= 1
    assert shifted_alerts == 20
    assert max(same_psi) < drift.PSI_MODERATE


def test_ks_figures_are_scipys_on_the_window_and_the_reference_sample(reference: DriftReference) -> None:
    monitor = DriftMonitor(reference)
    window = gamma_scores(5, 700, scale=1.1)
    monitor.observe(window)
    status = monitor.status()
    expected = stats.ks_2samp(window, np.asarray(reference.sample), method="asymp")
    assert status.ks_statistic == float(expected.statistic)
    assert status.ks_pvalue == float(expected.pvalue)


@pytest.mark.parametrize("scale", [1.0, 1.1, 1.2])
def test_the_asymptotic_ks_pvalue_agrees_with_the_exact_one_from_the_minimum_window(
    reference: DriftReference, scale: float
) -> None:
    # The monitor asks for the asymptotic p-value (fast whatever the window); at 200 scores, the
    # smallest window that gets a verdict, it must still read like the exact one near the threshold.
    monitor = DriftMonitor(reference)
    window = gamma_scores(30, drift.DEFAULT_MIN_WINDOW, scale=scale)
    monitor.observe(window)
    exact = stats.ks_2samp(window, np.asarray(reference.sample), method="exact")
    assert monitor.status().ks_pvalue == pytest.approx(float(exact.pvalue), rel=0.02, abs=1e-3)


def test_psi_is_over_the_reference_bins(reference: DriftReference) -> None:
    monitor = DriftMonitor(reference)
    window = gamma_scores(6, 800, scale=1.3)
    monitor.observe(window)
    # Count by hand, bin [lo, hi) over the edges with -inf and +inf at the ends.
    edges = reference.edges
    counts = [np.count_nonzero((window >= lo) & (window < hi)) for lo, hi in itertools.pairwise(edges)]
    assert sum(counts) == len(window)
    assert monitor.status().psi == pytest.approx(
        psi(reference.proportions, np.array(counts) / 800), rel=1e-12
    )


def test_the_statistic_floor_keeps_a_huge_window_from_alerting_on_a_small_shift(
    reference: DriftReference,
) -> None:
    # 100,000 scores, 10 % larger: KS finds it certain (p far below 0.01), but the CDFs differ by about
    # 0.05 and PSI stays near 0.015, so the default rule does not alert ...
    window = gamma_scores(8, 100_000, scale=1.1)
    monitor = DriftMonitor(reference, window=100_000)
    monitor.observe(window)
    status = monitor.status()
    assert status.ks_pvalue < drift.KS_PVALUE_ALERT
    assert status.ks_statistic < drift.KS_STATISTIC_ALERT
    assert status.psi < drift.PSI_ALERT
    assert not status.alert
    assert "too small to matter" in status.reason
    # ... and without the floor it would.
    no_floor = DriftMonitor(reference, window=100_000, ks_statistic_alert=0.0)
    no_floor.observe(window)
    assert no_floor.status().alert


def test_psi_alone_can_alert(reference: DriftReference) -> None:
    # Thresholds so that KS cannot fire: only PSI's rule is left.
    monitor = DriftMonitor(reference, ks_pvalue_alert=1e-300)
    monitor.observe(gamma_scores(9, 1000, scale=1.5))
    status = monitor.status()
    assert status.psi >= drift.PSI_ALERT
    assert status.alert
    assert f"PSI {status.psi:.4g} >= 0.2" in status.reason


def test_scores_beyond_the_reference_range_fall_in_the_outer_bins(reference: DriftReference) -> None:
    monitor = DriftMonitor(reference)
    monitor.observe(np.concatenate([np.full(300, -1e9), np.full(300, 1e9)]))
    status = monitor.status()
    assert math.isfinite(status.psi)
    assert status.alert


# --- The monitor: the window -------------------------------------------------------------------------


def test_the_window_rolls(reference: DriftReference) -> None:
    monitor = DriftMonitor(reference, window=1000)
    monitor.observe(gamma_scores(20, 1500))
    assert monitor.window_size == 1000
    assert monitor.observed_total == 1500
    np.testing.assert_array_equal(monitor.window_scores(), gamma_scores(20, 1500)[500:])
    # Shifted scores alert; once 1000 normal scores have pushed them out, the status is clean again.
    monitor.observe(gamma_scores(21, 1000, scale=1.5))
    assert monitor.status().alert
    monitor.observe(gamma_scores(22, 1000))
    status = monitor.status()
    assert status.window_size == 1000
    assert not status.alert, status.reason
    assert monitor.observed_total == 3500


def test_no_verdict_below_the_minimum_window(reference: DriftReference) -> None:
    monitor = DriftMonitor(reference)
    empty = monitor.status()
    assert empty == DriftStatus(0, None, None, None, False, "window 0 < 200: too few scores to judge")
    shifted = gamma_scores(23, 200, scale=3.0)
    monitor.observe(shifted[:37])
    status = monitor.status()
    assert status.window_size == 37
    assert not status.alert
    assert status.reason == "window 37 < 200: too few scores to judge"
    assert status.psi is not None and status.psi >= drift.PSI_ALERT  # the figures are still reported
    # At the minimum the same kind of scores do alert: it was the window, not the data.
    monitor.observe(shifted[37:])
    assert monitor.status().window_size == 200
    assert monitor.status().alert


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ([1.0, 2.0, 3.0, float("nan"), float("inf")], "index 3 is nan"),
        ([float("inf"), 1.0], "index 0 is inf"),
        ([1.0, -float("inf")], "index 1 is -inf"),
        ([[1.0, 2.0]], "1-D"),
    ],
)
def test_a_bad_batch_is_refused_whole(reference: DriftReference, batch, message) -> None:
    monitor = DriftMonitor(reference)
    monitor.observe([0.5, 0.7])
    with pytest.raises(ValueError, match=message):
        monitor.observe(np.array(batch))
    np.testing.assert_array_equal(monitor.window_scores(), [0.5, 0.7])
    assert monitor.observed_total == 2


def test_concurrent_observers_lose_nothing(reference: DriftReference) -> None:
    threads_count, batches, batch_size = 8, 200, 5
    monitor = DriftMonitor(reference, window=10_000)  # larger than the total: every score stays
    start = threading.Barrier(threads_count)

    def work(worker: int) -> None:
        start.wait()  # all threads observe at once, not one after another
        for batch in range(batches):
            monitor.observe(np.full(batch_size, worker * 1000 + batch, dtype=float))
            if batch % 50 == 0:
                monitor.status()  # readers interleave with the writers

    threads = [threading.Thread(target=work, args=(worker,)) for worker in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    total = threads_count * batches * batch_size
    assert monitor.observed_total == total
    assert monitor.window_size == total
    # Every score is in the window exactly once, and each batch of 5 stayed together.
    window = monitor.window_scores()
    expected = np.repeat([w * 1000 + b for w in range(threads_count) for b in range(batches)], batch_size)
    np.testing.assert_array_equal(np.sort(window), np.sort(expected.astype(float)))
    assert np.all(window.reshape(-1, batch_size) == window.reshape(-1, batch_size)[:, :1])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 0}, "window must be an integer >= 1, got 0"),
        ({"window": 10.5}, "window must be an integer >= 1, got 10.5"),
        ({"min_window": 0}, "min_window must be an integer >= 1, got 0"),
        ({"window": 100, "min_window": 200}, r"min_window must be at most window \(100\), got 200"),
        ({"psi_alert": 0.0}, "psi_alert must be .*got 0.0"),
        ({"psi_alert": float("nan")}, "psi_alert must be .*got nan"),
        ({"ks_pvalue_alert": 1.5}, "ks_pvalue_alert must be .*got 1.5"),
        ({"ks_statistic_alert": -0.1}, "ks_statistic_alert must be .*got -0.1"),
        ({"psi_floor": 0.0}, "psi_floor must be .*got 0.0"),
        ({"psi_floor": "1e-4"}, "psi_floor must be .*got '1e-4'"),
    ],
)
def test_monitor_thresholds_are_validated(reference: DriftReference, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        DriftMonitor(reference, **kwargs)


def test_default_rule_constants(reference: DriftReference) -> None:
    monitor = DriftMonitor(reference)
    assert (monitor.window, monitor.min_window) == (1000, 200)
    assert (monitor.psi_alert, monitor.ks_pvalue_alert, monitor.ks_statistic_alert) == (0.2, 0.01, 0.1)
    assert json.loads(json.dumps(monitor.status().to_dict()))["reason"].startswith("window 0 < 200")


def test_drift_imports_neither_flower_nor_tensorflow() -> None:
    # A fresh interpreter: this one may have loaded TensorFlow for other tests.
    check = (
        "import sys, shared.drift; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('flwr', 'tensorflow', 'keras')))"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
