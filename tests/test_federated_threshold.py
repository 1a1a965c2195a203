"""The federated threshold's arithmetic: noise scale, sensitivity, the percentile estimator (no TF)."""

import math

import numpy as np
import pytest
from scipy import stats

from shared import federated_threshold as ft
from shared.config import FedaeConfig

BINS = 80


def lognormal_clients(rng: np.random.Generator, clients: int, rows: int, median: float) -> list[np.ndarray]:
    return [median * np.exp(rng.normal(0.0, 0.8, rows)) for _ in range(clients)]


def test_bins_are_fixed_log_spaced_and_their_resolution_is_stated() -> None:
    edges = ft.bin_edges(BINS)
    assert len(edges) == BINS + 1
    assert edges[0] == pytest.approx(ft.SCORE_RANGE[0]) and edges[-1] == pytest.approx(ft.SCORE_RANGE[1])
    ratios = edges[1:] / edges[:-1]
    assert np.allclose(ratios, ft.bin_ratio(BINS))  # one factor everywhere: log-spaced
    assert ft.bin_ratio(BINS) == pytest.approx(10 ** (10 / 80))  # 1.334: 8 bins per decade
    assert np.array_equal(ft.bin_edges(BINS), edges)  # nothing but the setting decides them
    with pytest.raises(ValueError, match="positive integer"):
        ft.bin_edges(0)


@pytest.mark.parametrize("sigma", [1.0, 5.0])
def test_released_counts_have_noise_of_std_sigma_and_no_bias(sigma: float) -> None:
    # Prepare: 400 releases of one histogram, 32,800 noise draws.
    rng = np.random.default_rng(7)
    counts = ft.count_scores(np.exp(rng.normal(0.0, 1.0, 500)), BINS)
    # Execute
    noise = np.stack([ft.add_noise(counts, sigma, rng) - counts for _ in range(400)]).ravel()
    # Assert: the 99.9% confidence interval of the noise's std (chi-square) holds sigma and excludes a
    # sigma 20% off either way, so a wrongly scaled mechanism fails; the mean is 0 (z-test, 99.9%).
    k = noise.size
    variance = noise.var(ddof=1)
    low = math.sqrt((k - 1) * variance / stats.chi2.ppf(0.9995, k - 1))
    high = math.sqrt((k - 1) * variance / stats.chi2.ppf(0.0005, k - 1))
    assert low < sigma < high
    assert high < 1.2 * sigma and low > 0.8 * sigma
    assert abs(noise.mean()) < stats.norm.ppf(0.9995) * sigma / math.sqrt(k)
    # Independent across counts: neighbouring counts' noise is uncorrelated.
    draws = noise.reshape(400, BINS + 2)
    assert abs(np.corrcoef(draws[:, 10], draws[:, 11])[0, 1]) < 0.2


def test_default_noise_is_seeded_from_the_system_not_reproducible() -> None:
    counts = np.zeros(BINS + 2)
    assert not np.array_equal(ft.add_noise(counts, 5.0), ft.add_noise(counts, 5.0))
    with pytest.raises(ValueError, match="positive number"):
        ft.add_noise(counts, 0.0)


@pytest.mark.parametrize(
    "added",
    [0.0, 1e-9, ft.SCORE_RANGE[0], 0.37, 1.0, 2.5, 1e3, ft.SCORE_RANGE[1], 1e12, *ft.bin_edges(BINS)[::13]],
)
def test_one_row_added_or_removed_changes_one_count_by_exactly_one(added: float) -> None:
    rng = np.random.default_rng(3)
    scores = np.exp(rng.normal(0.0, 2.0, 1000))
    before = ft.count_scores(scores, BINS)
    after = ft.count_scores(np.append(scores, added), BINS)
    difference = after - before
    assert np.count_nonzero(difference) == 1 and difference.sum() == 1 and difference.max() == 1
    # Removing a row that is there: the same, the other way.
    removed = ft.count_scores(np.delete(scores, 17), BINS) - before
    assert np.count_nonzero(removed) == 1 and removed.min() == -1
    assert before.sum() == len(scores)  # every row counted once, out-of-range ones too


def test_non_finite_scores_are_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        ft.count_scores(np.array([1.0, np.nan]), BINS)


@pytest.mark.parametrize("median", [1e-3, 0.05, 2.0, 40.0, 5e3])
@pytest.mark.parametrize("percentile", [50.0, 90.0, 95.0, 99.0])
def test_without_noise_the_percentile_is_exact_to_within_one_bin(median: float, percentile: float) -> None:
    rng = np.random.default_rng(11)
    clients = lognormal_clients(rng, 5, 800, median)
    fit = ft.fit_percentile([ft.count_scores(c, BINS) for c in clients], BINS, percentile, 0.0)
    exact = np.percentile(np.concatenate(clients), percentile)
    assert fit.clamped is None and fit.noise_sd_points == 0.0 and fit.noisy_rows == 4000
    assert abs(math.log(fit.threshold / exact)) <= math.log(ft.bin_ratio(BINS))


def test_with_the_default_noise_4000_rows_over_5_clients_read_the_95th_percentile_within_3_points() -> None:
    # Tolerance (docs/PRIVACY.md): the threshold's rank among the pooled rows is within 3 percentile
    # points of 95 in at least 95% of trials, with a mean absolute error under 1.5 points; the fit's
    # own noise estimate is within a factor 1.6 of the spread seen.
    config = FedaeConfig()
    sigma, bins, p = config.threshold_noise_multiplier, config.threshold_bins, config.threshold_percentile
    rng = np.random.default_rng(2026)
    ranks, reported = [], []
    for _ in range(200):
        clients = lognormal_clients(rng, 5, 800, median=2.0)
        histograms = [ft.add_noise(ft.count_scores(c, bins), sigma, rng) for c in clients]
        fit = ft.fit_percentile(histograms, bins, p, sigma)
        ranks.append(100.0 * np.mean(np.concatenate(clients) <= fit.threshold))
        reported.append(fit.noise_sd_points)
    errors = np.abs(np.array(ranks) - p)
    assert np.mean(errors <= 3.0) >= 0.95
    assert errors.mean() < 1.5
    spread = np.std(ranks)
    assert spread / 1.6 < np.mean(reported) < spread * 1.6


def test_scores_outside_the_bins_clamp_to_the_range_and_say_so() -> None:
    low = ft.fit_percentile([ft.count_scores(np.full(500, 1e-7), BINS)], BINS, 95.0, 0.0)
    assert low.threshold == pytest.approx(ft.SCORE_RANGE[0]) and low.clamped == "below the binned range"
    high = ft.fit_percentile([ft.count_scores(np.full(500, 1e7), BINS)], BINS, 95.0, 0.0)
    assert high.threshold == pytest.approx(ft.SCORE_RANGE[1]) and high.clamped == "above the binned range"


def test_histograms_with_no_rows_left_after_noise_are_no_signal_and_combine_falls_back() -> None:
    empty = [np.full(BINS + 2, -1.0), np.zeros(BINS + 2)]
    with pytest.raises(ft.NoSignal, match="nothing to read a percentile from"):
        ft.fit_percentile(empty, BINS, 95.0, 5.0)
    histograms = [ft.ClientHistogram(0, h, 10, 0.8, 2.0) for h in empty[:1]]
    release = ft.combine(FedaeConfig(), histograms, {}, [], clients_asked=2)
    assert release.threshold is None and "nothing to read" in release.section["fallback"]
    assert "fell back" in release.sentence()
    nobody = ft.combine(FedaeConfig(), [], {"1": "budget exhausted"}, [{"node": 7}], clients_asked=2)
    assert nobody.threshold is None
    assert nobody.section["fallback"] == "no client contributed a histogram (1 refused, 1 failed)"


def test_malformed_histograms_are_refused() -> None:
    with pytest.raises(ValueError, match="82 counts"):
        ft.check_histogram(np.zeros(81), BINS)
    with pytest.raises(ValueError, match="finite"):
        ft.check_histogram(np.full(82, np.inf), BINS)
    with pytest.raises(ValueError, match="finite numbers"):
        ft.check_histogram(np.array(["a"] * 82), BINS)


def test_combine_states_the_rule_contributors_and_each_clients_epsilon() -> None:
    rng = np.random.default_rng(5)
    config = FedaeConfig()
    histograms = [
        ft.ClientHistogram(c, ft.add_noise(ft.count_scores(s, BINS), 5.0, rng), 800, 0.795, 2.3 + c)
        for c, s in enumerate(lognormal_clients(rng, 3, 800, 2.0))
    ]
    release = ft.combine(config, histograms, {"3": "budget exhausted: client-id=3 ..."}, [], clients_asked=4)
    s = release.section
    assert release.threshold == s["threshold"] and s["fallback"] is None
    assert s["contributing_clients"] == [0, 1, 2] and list(s["refused"]) == ["3"]
    assert (s["percentile"], s["noise_multiplier"], s["bins"]) == (95.0, 5.0, 80)
    assert s["release_epsilon"]["per_client"] == {"0": 0.795, "1": 0.795, "2": 0.795}
    assert (
        "one release" in s["release_epsilon"]["statement"]
        and "delta=1e-05" in s["release_epsilon"]["statement"]
    )
    assert release.epsilon_after == {0: 2.3, 1: 3.3, 2: 4.3}
    sentence = release.sentence()
    assert "95th percentile" in sentence and "3 of 4 clients" in sentence and "noise multiplier 5" in sentence
