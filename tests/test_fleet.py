import numpy as np

from shared.data import fleet


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    a = fleet.normal_rows(7, 0, 300)
    np.testing.assert_array_equal(a, fleet.normal_rows(7, 0, 300))
    assert not np.allclose(a, fleet.normal_rows(8, 0, 300))


def test_two_hundred_plus_channels_named_and_cell_voltages_correlated() -> None:
    x = fleet.normal_rows(1, 1, 2000)
    assert x.shape == (2000, len(fleet.feature_names())) and x.shape[1] >= 200
    corr = np.corrcoef(x[:, : fleet.NUM_CELLS].T)
    # Series cells share one current: their voltages move together.
    assert np.median(corr[np.triu_indices(fleet.NUM_CELLS, 1)]) > 0.9
    # Pack voltage is the sum of the cells.
    np.testing.assert_allclose(x[:, 201], x[:, : fleet.NUM_CELLS].sum(axis=1), atol=0.5)
    assert np.isfinite(x).all()


def test_sites_are_not_identically_distributed() -> None:
    names = fleet.feature_names()
    ambient, current = names.index("ambient_t"), names.index("pack_current")
    sites = [fleet.normal_rows(3, s, 1500) for s in range(5)]
    ambient_means = [s[:, ambient].mean() for s in sites]
    current_means = [s[:, current].mean() for s in sites]
    assert max(ambient_means) - min(ambient_means) > 8  # climates
    assert max(current_means) - min(current_means) > 30  # usage: share of time charging, amps per km/h
    # Not one distribution: every pair of sites differs in its current distribution.
    from scipy.stats import ks_2samp

    for i in range(5):
        for j in range(i + 1, 5):
            assert ks_2samp(sites[i][:, current], sites[j][:, current]).pvalue < 1e-6, (i, j)


def test_test_rows_carry_every_fault_kind_and_training_rows_none(rng) -> None:
    profile = fleet.site_profile(0)
    for kind in fleet.FAULT_KINDS:
        rows, labels = fleet.simulate_vehicle(np.random.default_rng(5), profile, 3000, fault=kind)
        _clean, clean_labels = fleet.simulate_vehicle(np.random.default_rng(5), profile, 3000, fault=None)
        assert labels.any(), kind
        assert not clean_labels.any()
        assert rows.shape == (len(labels), len(fleet.feature_names()))
    _x, y = fleet.test_rows(2, [0, 1])
    assert 0.05 < y.mean() < 0.5
