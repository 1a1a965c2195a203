"""Many simulated clients: data is generated only when a client is sampled, the coordinator's data does
not grow with the number of sites, accounting is not repeated, and the report stays readable."""

import numpy as np
import pytest

from shared import privacy
from shared.config import FedaeConfig
from shared.data import fleet, sources


@pytest.fixture
def count_site_draws(monkeypatch) -> list[tuple[int, int, int]]:
    """Every call of fleet.normal_rows as (site, rows, purpose)."""
    calls: list[tuple[int, int, int]] = []
    original = fleet.normal_rows

    def counting(seed: int, site: int, num_rows: int, purpose: int = 0) -> np.ndarray:
        calls.append((site, num_rows, purpose))
        return original(seed, site, num_rows, purpose)

    monkeypatch.setattr(fleet, "normal_rows", counting)
    return calls


def test_checking_a_thousand_clients_generates_no_client_data(count_site_draws) -> None:
    from simulations.runner import validate_inputs

    config = FedaeConfig(num_clients=1000, rows_per_site=200, batch_size=32)
    assert validate_inputs(config) == 1000
    client_draws = [call for call in count_site_draws if call[2] == 0]
    assert client_draws == []  # counted, not generated: clients build their rows when sampled
    # The coordinator's calibration rows come from at most 20 sites, whatever the fleet's size.
    calibration_sites = {site for site, _, purpose in count_site_draws if purpose == 1}
    assert len(calibration_sites) == sources.FLEET_REFERENCE_SITES
    assert min(calibration_sites) == 0 and max(calibration_sites) == 999


def test_counted_rows_equal_the_rows_a_client_then_generates(count_site_draws) -> None:
    for rows_per_site in (200, 4000):
        config = FedaeConfig(num_clients=7, rows_per_site=rows_per_site)
        data = sources.load_client_data(config, 6)
        assert sources.client_train_rows(config, 6) == data.num_examples
        assert data.num_examples + len(data.x_holdout) == rows_per_site
    assert [call for call in count_site_draws if call[2] == 0] == [(6, 200, 0), (6, 4000, 0)]


@pytest.mark.parametrize("sites", [21, 25, 50, 500, 1000])
def test_reference_sites_cover_every_archetype_over_its_shifts_and_cap_at_twenty(sites: int) -> None:
    chosen = sources.reference_sites(sites)
    assert len(chosen) == 20 == len(set(chosen)) and all(0 <= s < sites for s in chosen)
    for archetype in range(fleet.NUM_ARCHETYPES):
        mine = [s for s in chosen if s % fleet.NUM_ARCHETYPES == archetype]
        assert len(mine) == 4
        # From the archetype's first site to its last (coolest to warmest shift).
        assert mine[0] == archetype and mine[-1] + fleet.NUM_ARCHETYPES >= sites


def test_twenty_or_fewer_sites_are_all_reference_sites() -> None:
    assert sources.reference_sites(5) == [0, 1, 2, 3, 4]
    assert sources.reference_sites(20) == list(range(20))


def test_pooled_fleet_partitions_generate_each_site_once_per_process(count_site_draws) -> None:
    sources._fleet_pool.cache_clear()
    config = FedaeConfig(num_clients=4, rows_per_site=300, partition="iid")
    parts = [sources.load_client_data(config, c) for c in range(4)]
    assert sum(p.num_examples + len(p.x_holdout) for p in parts) == 4 * 300
    assert sorted(site for site, _, purpose in count_site_draws if purpose == 0) == [0, 1, 2, 3]


def test_rows_per_site_must_be_positive() -> None:
    with pytest.raises(ValueError, match="rows-per-site must be >= 1, got 0"):
        FedaeConfig(rows_per_site=0)


def test_epsilon_is_computed_once_per_distinct_ledger_and_order_does_not_matter() -> None:
    a = privacy.TrainingEvent(1, 1.1, 0.05, 20, 640)
    b = privacy.TrainingEvent(2, 0.9, 0.05, 20, 640)
    privacy._epsilon.cache_clear()
    first = privacy.cumulative_epsilon([a, b, a], 1e-5)
    again = privacy.cumulative_epsilon([b, a, privacy.TrainingEvent(7, 1.1, 0.05, 20, 640)], 1e-5)
    assert again == first  # the same multiset of trainings (rounds aside): the same ledger
    info = privacy._epsilon.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    # The memoised figure is the accountant's own, composed step by step.
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent, rdp

    acc = rdp.RdpAccountant()
    for event in (a, b, a):
        step = PoissonSampledDpEvent(event.sampling_probability, GaussianDpEvent(event.noise_multiplier))
        acc.compose(SelfComposedDpEvent(step, event.steps))
    assert first == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


def test_report_lists_the_worst_clients_when_there_are_many(tmp_path) -> None:
    from shared.report import MANY_CLIENTS, _client_epsilon_lines

    per_client = {str(c): 1.0 + c / 100 for c in range(3 * MANY_CLIENTS)}
    per_client["5"] = None  # a client that never trained
    lines = _client_epsilon_lines(per_client, {})
    listed = [line for line in lines if line.startswith("- client")]
    assert len(listed) == 10
    assert listed[0].startswith(f"- client {3 * MANY_CLIENTS - 1}: epsilon = ")  # the worst first
    assert f"over {3 * MANY_CLIENTS - 1} clients" in lines[0]
    few = _client_epsilon_lines({"0": 1.5, "1": 2.0}, {"1": 1.2})
    assert few == ["- client 0: epsilon = 1.500", "- client 1: epsilon = 2.000, noise multiplier 1.2"]


def test_epsilon_plot_draws_every_clients_points_and_the_worst_client_line() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shared.report import MANY_CLIENTS, _epsilon_figure

    clients = 2 * MANY_CLIENTS
    over_rounds = {str(c): {str(1 + c % 2): 0.5 + c / 100} for c in range(clients)}
    summary = {
        "privacy": {
            "dp": True,
            "delta": 1e-5,
            "accountant": "RDP",
            "sampling": "poisson",
            "budget": {"target_epsilon": 3.0},
            "sample_level": {"per_client_over_rounds": over_rounds},
        },
        "rounds": [{"round": 1, "max_epsilon": 0.88}, {"round": 2, "max_epsilon": 0.89}],
    }
    fig = _epsilon_figure(summary, plt)
    ax = fig.axes[0]
    assert len(ax.collections[0].get_offsets()) == clients  # one point per client and round trained
    worst = [line for line in ax.get_lines() if line.get_label() == "worst client"]
    assert list(worst[0].get_ydata()) == [0.88, 0.89]
    plt.close(fig)


def test_client_data_cache_keeps_recent_clients_within_its_byte_budget(count_site_draws, monkeypatch) -> None:
    from shared import task

    config = FedaeConfig(num_clients=10, rows_per_site=100)
    one_client = 100 * 207 * 4  # rows x channels x float32 (train + hold-out)
    monkeypatch.setattr(task, "CLIENT_DATA_CACHE_BYTES", 3 * one_client)
    monkeypatch.setattr(task, "_CLIENT_DATA", type(task._CLIENT_DATA)())
    for client in (0, 1, 2, 0, 3):  # 0 is used again before 3 arrives: 1 is the least recent
        task.client_data(config, client)
    assert [key[-1] for key in task._CLIENT_DATA] == [2, 0, 3]
    assert sum(task._nbytes(d) for d in task._CLIENT_DATA.values()) <= 3 * one_client
    task.client_data(config, 2)  # cached: not generated again
    task.client_data(config, 1)  # evicted: generated again
    assert [site for site, _, purpose in count_site_draws if purpose == 0] == [0, 1, 2, 3, 1]


def test_a_bad_cache_size_names_the_variable_and_the_value(monkeypatch) -> None:
    from shared import task

    monkeypatch.setenv("FEDAE_CLIENT_DATA_CACHE_MB", "1GB")
    with pytest.raises(ValueError, match=r"FEDAE_CLIENT_DATA_CACHE_MB must be a whole number .*'1GB'"):
        task._cache_megabytes()
    monkeypatch.setenv("FEDAE_CLIENT_DATA_CACHE_MB", "64")
    assert task._cache_megabytes() == 64
