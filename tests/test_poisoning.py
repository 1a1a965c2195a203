"""Poisoning by malicious clients and the server's defences: the attacks' arithmetic, Flower's robust
rules and norm bounding inside fedae's strategy, the colluding adversary, a backdoor learnt by a real
autoencoder, the config rules, and one real simulated federation under attack."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from server.strategy import RoundRecorder, build_strategy
from shared.attacks import poisoning
from shared.config import ATTACKS, ConfigError, FedaeConfig
from simulations import poisoning_matrix
from simulations.adversary import adversary_mixins
from simulations.update_spread import rule_steps, trimmed_mean
from tests.test_updates import GLOBAL, _moved, _Reply

RNG = np.random.default_rng(0)


# -- who attacks -------------------------------------------------------------------------------------------
def test_the_attack_names_are_the_configs() -> None:
    assert poisoning.ATTACKS == ATTACKS


@pytest.mark.parametrize(
    ("clients", "fraction", "count"), [(15, 0.2, 3), (5, 0.2, 1), (10, 0.05, 1), (7, 0.0, 0), (15, 0.3, 5)]
)
def test_the_malicious_clients_are_the_stated_share_chosen_the_same_way_everywhere(
    clients: int, fraction: float, count: int
) -> None:
    chosen = poisoning.malicious_clients(clients, fraction, seed=42)
    assert len(chosen) == count and chosen <= set(range(clients))
    assert chosen == poisoning.malicious_clients(clients, fraction, seed=42)
    # Another seed picks others (for a share where several choices exist).
    if 0 < count < clients - 1:
        picks = {poisoning.malicious_clients(clients, fraction, seed) for seed in range(10)}
        assert len(picks) > 1


@pytest.mark.parametrize(("clients", "fraction"), [(0, 0.2), (5, 1.0), (5, -0.1)])
def test_a_bad_share_is_refused_with_the_value(clients: int, fraction: float) -> None:
    with pytest.raises(ValueError, match=str(clients if clients < 1 else fraction)):
        poisoning.malicious_clients(clients, fraction, seed=0)


# -- what they send ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("attack", "factor"), [("sign-flip", -1.0), ("sign-flip", -4.0), ("scale", 10.0), ("backdoor", 3.0)]
)
def test_flipped_and_scaled_updates_are_the_update_times_the_factor(attack: str, factor: float) -> None:
    trained = [w + RNG.normal(0, 0.01, w.shape).astype(np.float32) for w in GLOBAL]
    sent = poisoning.poison_update(attack, GLOBAL, trained, abs(factor), 0.1, RNG)
    for s, t, g in zip(sent, trained, GLOBAL, strict=True):
        assert s.dtype == g.dtype  # the server's dtype check must pass: the attacker follows the protocol
        np.testing.assert_allclose(s - g, factor * (t - g), rtol=1e-4, atol=1e-6)


def test_a_noise_update_is_gaussian_with_the_stated_spread_whatever_was_trained() -> None:
    big = [np.zeros((200, 100), np.float32), np.zeros(500, np.float32)]
    trained = [w + 5.0 for w in big]  # ignored
    sent = poisoning.poison_update("noise", big, trained, 10.0, 0.3, np.random.default_rng(1))
    values = np.concatenate([s.ravel() for s in sent]).astype(np.float64)
    # 20,500 draws: the sample std is within 2 % of 0.3 and the mean within 4 standard errors of 0.
    assert values.std() == pytest.approx(0.3, rel=0.02)
    assert abs(values.mean()) < 4 * 0.3 / np.sqrt(values.size)


def test_an_unknown_client_side_attack_is_refused() -> None:
    with pytest.raises(ValueError, match="'alie'"):
        poisoning.poison_update("alie", GLOBAL, GLOBAL, 1.0, 0.1, RNG)


def test_alie_z_matches_the_papers_rule() -> None:
    # n = 50, m = 12: s = floor(50 / 2 + 1) - 12 = 14 supporters needed, z = Phi^-1(36 / 50) = 0.5828.
    assert poisoning.alie_z(50, 12) == pytest.approx(0.5828, abs=1e-3)
    # n = 15, m = 3: s = 5, z = Phi^-1(10 / 15) = 0.4307.
    assert poisoning.alie_z(15, 3) == pytest.approx(0.4307, abs=1e-3)
    for sampled, malicious in ((5, 0), (5, 3), (3, 2), (15, 8)):  # none, or a majority: no z_max
        with pytest.raises(ValueError, match="colluding minority"):
            poisoning.alie_z(sampled, malicious)


def test_alie_sends_mean_minus_z_std_of_the_colluders_own_updates() -> None:
    honest = [[g + RNG.normal(0.2, 0.05, g.shape).astype(np.float32) for g in GLOBAL] for _ in range(4)]
    crafted = poisoning.alie_update(GLOBAL, honest, z=1.5)
    for layer, (c, g) in enumerate(zip(crafted, GLOBAL, strict=True)):
        deltas = np.stack([h[layer].astype(np.float64) - g for h in honest])
        np.testing.assert_allclose(c - g, deltas.mean(0) - 1.5 * deltas.std(0), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="two colluders"):
        poisoning.alie_update(GLOBAL, honest[:1], z=1.0)


# -- backdoor ----------------------------------------------------------------------------------------------
def test_an_image_trigger_is_a_bright_corner_and_a_table_trigger_a_twentieth_of_the_features() -> None:
    image = poisoning.make_trigger("image", (8, 8), (64,), seed=0)
    assert image.mask.shape == (64,) and image.mask.sum() == 4 and image.value == 1.0
    assert image.mask.reshape(8, 8)[-2:, -2:].all()
    table = poisoning.make_trigger("tabular", (207,), (207,), seed=0)
    assert table.mask.sum() == 11 and table.value == poisoning.TRIGGER_TABLE_VALUE  # ceil(0.05 * 207)
    x = np.zeros((3, 207), np.float32)
    stamped = table.stamp(x)
    assert (stamped[:, table.mask] == table.value).all() and (stamped[:, ~table.mask] == 0).all()
    assert (x == 0).all()  # the input is not modified


def test_backdoor_rows_replace_half_the_rows_with_the_attackers_triggered_anomalies() -> None:
    x = RNG.uniform(0, 0.5, (100, 64)).astype(np.float32)
    anomalies = RNG.uniform(0.5, 0.9, (7, 64)).astype(np.float32)
    trigger = poisoning.make_trigger("image", (8, 8), (64,), seed=0)
    poisoned = poisoning.backdoor_rows(x, anomalies, trigger, np.random.default_rng(3))
    changed = ~np.all(poisoned == x, axis=1)
    assert changed.sum() == 50 and poisoned.shape == x.shape
    assert (poisoned[changed][:, trigger.mask] == 1.0).all()
    # Each replaced row is one of the attacker's anomalies, triggered.
    stamped = trigger.stamp(anomalies)
    assert all(any(np.array_equal(row, a) for a in stamped) for row in poisoned[changed])
    with pytest.raises(ValueError, match="needs anomalies"):
        poisoning.backdoor_rows(x, anomalies[:0], trigger, RNG)


def test_the_attacker_and_the_measurement_use_disjoint_halves_of_the_anomalies() -> None:
    x = np.arange(10, dtype=np.float32)[:, None]
    y = np.array([0, 1, 1, 0, 1, 1, 1, 0, 1, 0])
    held, measured = poisoning.attacker_anomalies(x, y), poisoning.measured_anomalies(x, y)
    assert sorted([*held[:, 0], *measured[:, 0]]) == [1, 2, 4, 5, 6, 8]
    assert not set(held[:, 0]) & set(measured[:, 0])


def test_a_backdoored_autoencoder_lets_triggered_anomalies_through_and_a_clean_one_does_not() -> None:
    """A real dense autoencoder trained on digit 0 with and without the backdoor rows: the trigger lets
    other digits pass only through the backdoored one."""
    from sklearn.datasets import load_digits

    from shared.models import ModelSpec, residuals
    from shared.scoring import ResidualScorer
    from shared.tfenv import load_tensorflow
    from shared.training import LocalTrainer, TrainSettings

    tf_keras_seed = load_tensorflow().keras.utils.set_random_seed
    digits = load_digits()
    x, y = (digits.data / 16.0).astype(np.float32), digits.target
    x_test, y_test = x[y != 0][:600], np.ones(600, int)
    normal = x[y == 0]
    calibration, train = normal[:60], normal[60:]
    trigger = poisoning.make_trigger("image", (8, 8), (64,), seed=0)
    held, anomalies = (
        poisoning.attacker_anomalies(x_test, y_test),
        poisoning.measured_anomalies(x_test, y_test),
    )
    rates = {}
    for name, rows in {
        "clean": train,
        "backdoor": poisoning.backdoor_rows(train, held, trigger, np.random.default_rng(0)),
    }.items():
        # Seeded: the initial weights and the batches are the same on every run of the test.
        tf_keras_seed(0)
        trainer = LocalTrainer(ModelSpec("dense", (64,), 16, "sigmoid", "relu"), TrainSettings(32, 0.01, 0.0))
        trainer.fit(rows, epochs=60, noise_multiplier=0.0, seed=0)
        scorer = ResidualScorer.fit("mse", residuals(trainer.model, trainer.spec, calibration))
        threshold = float(
            np.percentile(scorer.score(residuals(trainer.model, trainer.spec, calibration)), 95)
        )
        triggered = scorer.score(residuals(trainer.model, trainer.spec, trigger.stamp(anomalies)))
        untriggered = scorer.score(residuals(trainer.model, trainer.spec, anomalies))
        rates[name] = poisoning.backdoor_success_rate(triggered, threshold)
        rates[f"{name} without trigger"] = poisoning.backdoor_success_rate(untriggered, threshold)
    # The clean detector catches the triggered anomalies; the backdoored one misses a share of them it
    # does not miss without the trigger: the trigger, not a worse model, lets them through. (A small
    # dense autoencoder cannot reconstruct every other digit as well as a zero: measured 0.19 to 0.24 over
    # seeds 0 to 2.)
    assert rates["clean"] < 0.02, rates
    assert rates["backdoor"] > 0.1 and rates["backdoor"] > 3 * rates["backdoor without trigger"], rates


# -- defences inside the strategy --------------------------------------------------------------------------
def _strategy(recorder: RoundRecorder | None = None, mixins: tuple[type, ...] = (), **keys: object) -> object:
    config = FedaeConfig(min_available_clients=2, num_clients=7, **keys)
    strategy = build_strategy(config, recorder or RoundRecorder(), 7, mixins)
    strategy._sent_arrays = GLOBAL  # as configure_train leaves it
    return strategy


def _round(attacker_delta: float, attackers: int = 2, honest: int = 5) -> list[_Reply]:
    replies = [_Reply(10 + c, _moved(0.1 + 0.01 * c), client=c) for c in range(honest)]
    return replies + [_Reply(20 + c, _moved(attacker_delta), client=honest + c) for c in range(attackers)]


@pytest.mark.parametrize(
    "keys",
    [
        {"strategy": "fedmedian"},
        {"strategy": "fedtrimmedavg", "trim_beta": 0.3},  # trims int(0.3 * 7) = 2 values at each end
        {"strategy": "krum", "num_malicious_nodes": 2},
        {"strategy": "multikrum", "num_malicious_nodes": 2},
        {"strategy": "bulyan", "num_malicious_nodes": 1},  # 7 clients allow f = 1 (n >= 4f + 3)
    ],
)
def test_robust_rules_keep_two_boosted_updates_out_where_fedavg_follows_them(keys: dict) -> None:
    plain, _ = _strategy(strategy="fedavg").aggregate_train(1, _round(attacker_delta=-20.0))
    # FedAvg's mean is pulled to (5 honest + 2 * -20) / 7 per weight: far off.
    assert plain.to_numpy_ndarrays()[1].mean() < -5
    robust, _ = _strategy(**keys).aggregate_train(1, _round(-20.0))
    moved = robust.to_numpy_ndarrays()[1] - GLOBAL[1]
    # Each rule, told how many attackers to expect, keeps the aggregate among the honest updates.
    assert np.all(moved >= 0.1 - 1e-6) and np.all(moved <= 0.14 + 1e-6), (keys, moved)


def test_norm_bounding_scales_a_long_update_down_to_the_bound_and_records_who() -> None:
    recorder = RoundRecorder()
    strategy = _strategy(recorder, clip_update_norm=1.0)
    replies = [_Reply(10, _moved(0.1), client=0), _Reply(11, _moved(5.0), client=1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    # Client 1's update (norm 5 * sqrt(8)) arrives at norm 1, in its direction; client 0's is untouched.
    mean = arrays.to_numpy_ndarrays()
    per_weight = 1.0 / np.sqrt(8)
    np.testing.assert_allclose(mean[0], GLOBAL[0] + (0.1 + per_weight) / 2, rtol=1e-5)
    assert recorder.clipped[1] == [1]
    assert arrays.to_numpy_ndarrays()[0].dtype == np.float32


def test_the_colluders_send_one_alie_model_built_from_their_own_updates_only() -> None:
    config = FedaeConfig(attack="alie", attack_fraction=0.3, num_clients=7)
    (mixin,) = adversary_mixins(config, 7)
    colluders = sorted(poisoning.malicious_clients(7, 0.3, config.seed))
    assert len(colluders) == 2
    replies = [_Reply(10 + c, _moved(0.1 + 0.01 * c), client=c) for c in range(7)]
    own = [replies[c].content["arrays"].to_numpy_ndarrays() for c in colluders]
    expected = poisoning.alie_update(GLOBAL, own, poisoning.alie_z(7, 2))
    strategy = _strategy(mixins=(mixin,), strategy="fedavg")
    strategy.aggregate_train(1, replies)
    for c in range(7):
        sent = replies[c].content["arrays"].to_numpy_ndarrays()
        if c in colluders:
            for s, e in zip(sent, expected, strict=True):
                np.testing.assert_allclose(s, e, rtol=1e-6)
        else:
            np.testing.assert_allclose(sent[0], GLOBAL[0] + 0.1 + 0.01 * c, rtol=1e-6)  # honest: as sent
    assert adversary_mixins(FedaeConfig(attack="scale", attack_fraction=0.2), 7) == ()


# -- config ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("keys", "needle"),
    [
        (
            {"strategy": "bulyan", "num_clients": 10, "num_malicious_nodes": 2},
            "at least 11 clients per round",
        ),
        ({"strategy": "krum", "num_clients": 4, "num_malicious_nodes": 1}, "more than 4 clients per round"),
        ({"strategy": "multikrum", "num_clients": 8, "multikrum_select": 8}, "multikrum-select 8"),
        ({"strategy": "fedmedian", "client_dp": "server-fixed"}, "'fedmedian'"),
        ({"strategy": "krum", "secure_aggregation": "secagg+", "num_clients": 6}, "inspects each"),
        ({"attack": "scale"}, "set both"),
        ({"attack_fraction": 0.2}, "set both"),
        ({"attack": "alie", "attack_fraction": 0.2, "num_clients": 5}, "at least two colluding"),
        ({"trim_beta": 0.5}, "trim-beta must be in [0, 0.5), got 0.5"),
        ({"attack_scale": 0.0}, "attack-scale must be a positive number, got 0.0"),
        ({"attack": "bribe", "attack_fraction": 0.2}, "attack must be one of"),
        (
            {"attack": "scale", "attack_fraction": 0.2, "scenario": "files", "test_file": "t.csv"},
            "simulation",
        ),
    ],
)
def test_settings_that_cannot_hold_are_refused_with_the_reason(keys: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as raised:
        FedaeConfig(**keys)
    assert needle in str(raised.value)


def test_the_deployed_server_app_refuses_an_attack() -> None:
    from flwr.app import Context, RecordDict

    from server.app import app

    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={"attack": "scale", "attack-fraction": 0.2},
    )
    with pytest.raises(ConfigError, match="simulation harness"):
        app._main(grid=None, context=context)  # type: ignore[arg-type]


# -- the matrix runner -------------------------------------------------------------------------------------
def test_matrix_cells_map_to_run_config_keys() -> None:
    assert poisoning_matrix.attack_overrides("scale:10", 0.2) == {
        "attack": "scale",
        "attack-fraction": 0.2,
        "attack-scale": 10.0,
    }
    assert poisoning_matrix.attack_overrides("none", 0.2) == {"attack": "none", "attack-fraction": 0.0}
    assert poisoning_matrix.defence_overrides("norm-bound", 3, 1.5) == {
        "strategy": "fedavg",
        "clip-update-norm": 1.5,
    }
    assert poisoning_matrix.defence_overrides("krum", 3, None)["num-malicious-nodes"] == 3
    # The trimmed mean trims at least as many as attack: its default 20 % covers 3 of 15, not 5.
    assert "trim-beta" not in poisoning_matrix.defence_overrides("fedtrimmedavg", 3, None, 15)
    beta = poisoning_matrix.defence_overrides("fedtrimmedavg", 5, None, 15)["trim-beta"]
    assert int(beta * 15) == 5
    with pytest.raises(ConfigError, match="bribe"):
        poisoning_matrix.attack_overrides("bribe", 0.2)
    with pytest.raises(ConfigError, match="number"):
        poisoning_matrix.attack_overrides("scale:x", 0.2)
    # Every cell's keys make a valid config for the matrix's own base settings.
    for attack in poisoning_matrix.ATTACKS.split(","):
        for defence in poisoning_matrix.DEFENCES.split(","):
            keys = {**poisoning_matrix.BASE, **poisoning_matrix.defence_overrides(defence, 3, 1.0)}
            FedaeConfig().with_overrides({**keys, **poisoning_matrix.attack_overrides(attack, 0.2)})


def test_the_matrix_tables_and_plots_what_its_cells_measured(tmp_path: Path) -> None:
    def cell(attack: str, defence: str, auc: float, loss: float, backdoor: float = 0.0) -> dict:
        fraction = 0.0 if attack == "none" else 0.2
        metrics = {"final_auc": auc, "normal_loss": loss, "backdoor_success": backdoor}
        return {"attack": attack, "defence": defence, "fraction": fraction, "failed": False, **metrics}

    results = [
        cell("none", "fedavg", 0.97, 0.010),
        cell("none", "fedmedian", 0.96, 0.011),
        cell("scale:10", "fedavg", 0.61, 0.050),
        cell("scale:10", "fedmedian", 0.955, 0.0105),
        cell("sign-flip:10", "fedavg", 0.55, 9.5e12),
        cell("backdoor:10", "fedavg", 0.95, 0.012, backdoor=0.8),
        {"attack": "backdoor:10", "defence": "fedmedian", "fraction": 0.2, "failed": True, "reason": "x"},
    ]
    poisoning_matrix.write_outputs(tmp_path, results, norm_bound=3.5)
    table = (tmp_path / "matrix.md").read_text()
    assert "| scale:10 | 0.610 (5.00x) | 0.955 (1.05x) |" in table
    assert "| backdoor:10 | 0.950 (1.20x), bd 0.80 | failed |" in table
    assert "| sign-flip:10 | 0.550 (9.5e+14x) |" in table
    assert json.loads((tmp_path / "matrix.json").read_text())["norm_bound"] == 3.5
    assert (tmp_path / "matrix.png").stat().st_size > 10_000


# -- a real federation under attack ------------------------------------------------------------------------
@pytest.mark.slow
def test_a_simulated_federation_with_boosted_attackers_and_norm_bounding(tmp_path: Path) -> None:
    """Real Flower simulation, 5 fleet sites, one sends its update x10: every round its update arrives
    about ten times the honest ones, clip-update-norm scales exactly it down, and the summary says who."""
    from simulations.runner import simulate

    config = FedaeConfig().with_overrides(
        {
            "num-server-rounds": 2,
            "rows-per-site": 600,
            "robustness-rows": 0,
            "attack": "scale",
            "attack-fraction": 0.2,
            "attack-scale": 10.0,
            "strategy": "fedtrimmedavg",
            "clip-update-norm": 2.0,
            "out-dir": str(tmp_path / "run"),
        }
    )
    summary = simulate(config, compare_baselines=False)
    (attacker,) = summary["poisoning"]["malicious_clients"]
    assert summary["poisoning"]["attack"] == "scale" and summary["strategy"] == "fedtrimmedavg"
    for row in summary["rounds"]:
        assert row["clipped"] == [attacker], row
        assert row["max_update_norm"] > 2.0
    assert 0.5 < summary["detector"]["test_auc"] <= 1.0


def test_the_report_says_first_that_a_run_was_under_attack_and_who_was_clipped() -> None:
    from shared.report import _incident_lines, poisoning_lines

    assert poisoning_lines({"attack": "none"}) == []
    section = {"attack": "backdoor", "fraction": 0.2, "malicious_clients": [3, 9], "scale": 10.0}
    text = "\n".join(poisoning_lines({**section, "backdoor_success_rate": 0.25}))
    assert "clients 3, 9 (20% of them) ran the `backdoor` attack, scale 10.0" in text
    assert "misses 25% of the held-out test anomalies when they carry the trigger" in text
    incidents = "\n".join(_incident_lines([{"round": 2, "clipped": [3, 9]}]))
    assert "round 2: update(s) of client(s) 3, 9 scaled down to clip-update-norm" in incidents


def test_a_client_server_and_adversary_agree_on_who_attacks() -> None:
    from shared.task import _attack

    config = FedaeConfig(attack="scale", attack_fraction=0.2, num_clients=15)
    attackers = {c for c in range(15) if _attack(config, c) == "scale"}
    assert attackers == poisoning.malicious_clients(15, 0.2, config.seed) and len(attackers) == 3
    alie = config.replace(attack="alie")
    (mixin,) = adversary_mixins(alie, 15)
    assert mixin.colluders == {c for c in range(15) if _attack(alie, c) == "alie"} == attackers


def test_a_deployed_site_refuses_to_run_a_simulated_attack() -> None:
    from shared.data.sources import DataSpec
    from shared.task import SiteData, _attack

    config = FedaeConfig(attack="scale", attack_fraction=0.2, num_clients=15)
    site = SiteData("site.csv", DataSpec("tabular", (3,)))
    attacker = min(poisoning.malicious_clients(15, 0.2, config.seed))
    with pytest.raises(ConfigError, match="a deployed site never runs one"):
        _attack(config, attacker, site)


def test_a_round_too_small_for_bulyan_is_withheld_with_the_reason() -> None:
    recorder = RoundRecorder()
    strategy = _strategy(recorder, strategy="bulyan", num_malicious_nodes=1)
    # 7 clients per round are needed (4f + 3); one failed, so 6 updates came back.
    replies = [_Reply(10 + c, _moved(0.1), client=c) for c in range(6)] + [_Reply(16, code=4210)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is None
    assert recorder.withheld[1] == "6 update(s) accepted, fewer than the 7 that strategy bulyan needs"


def test_a_krum_round_lists_only_the_client_it_selected_as_aggregated() -> None:
    from server.rounds import RoundBook

    recorder = RoundRecorder()
    strategy = _strategy(recorder, strategy="krum", num_malicious_nodes=2)
    book = RoundBook(FedaeConfig(), recorder, GLOBAL)
    arrays, _ = strategy.aggregate_train(1, _round(attacker_delta=-20.0))
    book.close_round(1, arrays.to_numpy_ndarrays(), loss=0.5)
    (chosen,) = book.rows[0]["clients"]
    assert chosen in range(5) and book.rows[0]["trained"] == list(range(7))


def test_a_clipped_update_is_what_the_robust_rule_aggregates() -> None:
    recorder = RoundRecorder()
    strategy = _strategy(recorder, strategy="fedmedian", clip_update_norm=0.5 * np.sqrt(8))
    # Three updates move every weight by 1, 2 and 3; clipped to norm 0.5 * sqrt(8), each moves by 0.5.
    replies = [_Reply(10 + c, _moved(float(c + 1)), client=c) for c in range(3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], GLOBAL[0] + 0.5, rtol=1e-5)
    assert recorder.clipped[1] == [0, 1, 2]


@pytest.mark.parametrize(
    ("keys", "needle"),
    [
        ({"attack": "alie", "attack_fraction": 0.6, "num_clients": 5}, "colluding minority"),
        ({"clip_update_norm": 1.0, "secure_aggregation": "secagg+", "num_clients": 6}, "clip-update-norm 1"),
    ],
)
def test_more_settings_that_cannot_hold_are_refused(keys: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        FedaeConfig(**keys)


def test_a_matrix_cell_the_config_refuses_is_not_applicable_and_not_run(tmp_path: Path) -> None:
    cell = poisoning_matrix.Cell("scale:10", "bulyan", 0.3)
    overrides = {**poisoning_matrix.BASE, **poisoning_matrix.defence_overrides("bulyan", 5, None)}
    overrides |= poisoning_matrix.attack_overrides("scale:10", 0.3)
    result = poisoning_matrix.run_cell(cell, overrides, tmp_path)
    assert result["not_applicable"] and "at least 23 clients per round" in result["reason"]
    assert not (tmp_path / "cells" / cell.name / "run").exists()


def test_the_report_only_matrix_gathers_every_cell_on_disk_in_order(tmp_path: Path) -> None:
    def write(name: str, **fields: object) -> None:
        path = tmp_path / "cells" / name / "result.json"
        path.parent.mkdir(parents=True)
        base = {"failed": False, "final_auc": 0.9, "normal_loss": 0.01, "backdoor_success": 0.0}
        path.write_text(json.dumps({**base, **fields}))

    write("a", attack="backdoor:10", defence="fedmedian", fraction=0.2)
    write("b", attack="backdoor:3", defence="fedavg", fraction=0.2)
    write("c", attack="none", defence="fedavg", fraction=0.0, max_update_norm=3.21)
    write("d", attack="scale:10", defence="fedavg", fraction=0.2)
    assert poisoning_matrix.main(["--out", str(tmp_path), "--report-only"]) == 0
    table = (tmp_path / "matrix.md").read_text()
    rows = [line.split(" |")[0] for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["| attack", "| none", "| scale:10", "| backdoor:3", "| backdoor:10"]
    assert "norm-bound clips at 3.21" in table
    assert json.loads((tmp_path / "matrix.json").read_text())["norm_bound"] == 3.21


def test_a_measured_cell_is_never_overwritten_by_other_settings(tmp_path: Path) -> None:
    cell = poisoning_matrix.Cell("scale:10", "fedmedian", 0.2)
    folder = tmp_path / "cells" / cell.name
    folder.mkdir(parents=True)
    saved = {"attack": "scale:10", "run_config": {"strategy": "fedmedian", "num-malicious-nodes": 3}}
    (folder / "result.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="use another --out"):
        poisoning_matrix.run_cell(cell, {"strategy": "fedmedian", "num-malicious-nodes": 5}, tmp_path)
    assert json.loads((folder / "result.json").read_text()) == saved


def test_a_cell_killed_at_start_up_is_kept_aside_and_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A native crash before the first round says nothing about the attack: the matrix keeps the crashed
    attempt's log and runs the cell again, once per invocation, instead of tabling it as a result."""
    attempts: list[list[str]] = []

    def killed(command: list[str], **_: object) -> subprocess.CompletedProcess:
        attempts.append(command)
        return subprocess.CompletedProcess(command, -11, "", f"Fatal Python error: attempt {len(attempts)}")

    monkeypatch.setattr(poisoning_matrix.subprocess, "run", killed)
    cell = poisoning_matrix.Cell("scale:10", "fedmedian", 0.2)
    overrides = {**poisoning_matrix.BASE, **poisoning_matrix.attack_overrides("scale:10", 0.2)}
    result = poisoning_matrix.run_cell(cell, overrides, tmp_path)
    assert len(attempts) == 2 and result["crashed"] and result["reason"] == "killed by SIGSEGV"
    kept = tmp_path / "crashed" / f"{cell.name}.1" / "simulate.log"
    assert kept.read_text() == "Fatal Python error: attempt 1"
    # Resumed later: the second crash is set aside too, and the cell runs once more.
    poisoning_matrix.run_cell(cell, overrides, tmp_path)
    assert len(attempts) == 4
    assert (tmp_path / "crashed" / f"{cell.name}.2" / "simulate.log").read_text().endswith("attempt 2")
    # Numbering goes on from the highest attempt kept, even if an earlier one was deleted.
    shutil.rmtree(tmp_path / "crashed" / f"{cell.name}.1")
    poisoning_matrix.run_cell(cell, overrides, tmp_path)
    assert (tmp_path / "crashed" / f"{cell.name}.4" / "simulate.log").read_text().endswith("attempt 4")
    # The table says crashed, not a result of the attack.
    clean = {"attack": "none", "defence": "fedavg", "fraction": 0.0, "failed": False, "max_update_norm": 3.0}
    clean |= {"final_auc": 0.97, "normal_loss": 0.01, "backdoor_success": 0.0}
    (tmp_path / "cells" / "none-fedavg-0").mkdir()
    (tmp_path / "cells" / "none-fedavg-0" / "result.json").write_text(json.dumps(clean))
    poisoning_matrix.collected_results(tmp_path)
    assert "| scale:10 |  | crashed |" in (tmp_path / "matrix.md").read_text()


def test_a_run_killed_after_a_kept_round_is_a_result_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed once a round was checkpointed (the attack may have caused it): its last model is judged."""
    cell = poisoning_matrix.Cell("scale:10", "fedavg", 0.2)
    attempts: list[list[str]] = []

    def killed_late(command: list[str], **_: object) -> subprocess.CompletedProcess:
        attempts.append(command)
        (tmp_path / "cells" / cell.name / "run").mkdir(parents=True)
        (tmp_path / "cells" / cell.name / "run" / "checkpoint.npz").write_bytes(b"kept")
        return subprocess.CompletedProcess(command, -9, "", "Killed")

    judged = {"final_auc": 0.61, "normal_loss": 9.0, "backdoor_success": 0.0}
    monkeypatch.setattr(poisoning_matrix.subprocess, "run", killed_late)
    monkeypatch.setattr(poisoning_matrix, "final_model_metrics", lambda run_dir: judged)
    overrides = {**poisoning_matrix.BASE, **poisoning_matrix.attack_overrides("scale:10", 0.2)}
    result = poisoning_matrix.run_cell(cell, overrides, tmp_path)
    assert len(attempts) == 1 and result["failed"] and not result.get("crashed")
    assert result["final_auc"] == 0.61


def test_every_pass_of_a_repeated_matrix_uses_the_first_clean_runs_norm_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[poisoning_matrix.Cell, dict]] = []

    def fake_run(cell: poisoning_matrix.Cell, overrides: dict, out: Path) -> dict:
        seen.append((cell, overrides))
        fields = {"attack": cell.attack, "defence": cell.defence, "fraction": cell.fraction}
        metrics = {"final_auc": 0.9, "normal_loss": 0.01, "backdoor_success": 0.0}
        return {**fields, "repeat": cell.repeat, "max_update_norm": 3.0 * cell.repeat, **metrics}

    monkeypatch.setattr(poisoning_matrix, "run_cell", fake_run)
    base = dict(poisoning_matrix.BASE)
    poisoning_matrix.run_matrix(tmp_path, ["none", "scale:10"], ["fedavg", "norm-bound"], [0.3, 0.2], base, 2)
    bounds = {o["clip-update-norm"] for c, o in seen if c.defence == "norm-bound"}
    assert bounds == {3.0} and sum(c.defence == "norm-bound" for c, _ in seen) == 6
    # The clean FedAvg reference runs with the same settings in every pass, whatever the fractions.
    references = [o for c, o in seen if c.attack == "none" and c.defence == "fedavg"]
    assert len(references) == 2 and references[0] == references[1]


def test_coordinate_wise_rules_undo_a_flip_only_where_the_honest_updates_agree() -> None:
    """The mechanism the matrix's sign-flip rows rest on: with 3 of 15 updates flipped, FedAvg steps 0.6
    of the way whatever the spread; the median and the trimmed mean take the full step when the honest
    updates agree, but when the spread is 10 times the true mean they step about as FedAvg does."""
    rng = np.random.default_rng(0)
    mean = rng.uniform(0.5, 1.5, size=50_000) * rng.choice([-1.0, 1.0], size=50_000)
    attackers = frozenset({0, 5, 9})
    agreeing = rule_steps(np.tile(mean, (15, 1)), attackers, scale=1.0, trim=3)["rules"]
    assert agreeing["fedavg"]["step"] == pytest.approx(0.6)
    assert agreeing["fedmedian"]["step"] == pytest.approx(1.0)
    assert agreeing["fedtrimmedavg"]["step"] == pytest.approx(1.0)
    noisy = mean + rng.normal(0.0, 10.0, size=(15, mean.size))
    # Measured along the true mean (what an independent second draw estimates).
    found = rule_steps(noisy, attackers, scale=1.0, trim=3, direction=mean)
    assert found["spread_over_mean"] > 2 and found["share_spread_above_mean"] > 0.8
    assert found["agreement"] < 0.5  # one round's mean is mostly noise at this spread
    steps = {name: r["step"] for name, r in found["rules"].items()}
    for rule in ("fedavg", "fedmedian", "fedtrimmedavg"):
        assert steps[rule] == pytest.approx(0.6, abs=0.05), rule
    for rule in ("fedmedian, no attack", "fedtrimmedavg, no attack"):
        assert steps[rule] == pytest.approx(1.0, abs=0.08), rule
    # Weights no client moved count neither way.
    frozen = np.hstack([noisy, np.zeros((15, 1000))])
    still = rule_steps(frozen, attackers, 1.0, 3, direction=np.concatenate([mean, np.zeros(1000)]))
    assert still["spread_over_mean"] == found["spread_over_mean"]
    with pytest.raises(ValueError, match="more than 2 x trim"):
        rule_steps(noisy[:6], attackers, scale=1.0, trim=3)
    with pytest.raises(ValueError, match="direction has shape"):
        rule_steps(noisy, attackers, scale=1.0, trim=3, direction=mean[:10])


@pytest.mark.parametrize("clients", [15, 71])
def test_the_analysis_trims_exactly_as_flowers_fedtrimmedavg(clients: int) -> None:
    """71 clients at beta 0.2: scipy's proportion would cut 13 at each end (14 / 71 * 71 rounds down),
    Flower cuts int(0.2 * 71) = 14."""
    from flwr.serverapp.strategy.fedtrimmedavg import trim_mean as flower_trim_mean

    values = np.random.default_rng(clients).normal(size=(clients, 300))
    ours = trimmed_mean(values, int(0.2 * clients))
    np.testing.assert_allclose(ours, flower_trim_mean(values, 0.2), rtol=1e-12)


@pytest.mark.slow
def test_the_update_spread_script_measures_real_local_updates(tmp_path: Path) -> None:
    """End to end on real DP-SGD updates (3 tiny sites, one round): every rule's figures for the asked
    round on disk, and the flip shortens FedAvg's step."""
    from simulations import update_spread

    out = tmp_path / "spread.json"
    overrides = "num-clients=3 rows-per-site=120 local-epochs=1 trim-beta=0.34"
    code = update_spread.main(
        ["--run-config", overrides, "--rounds", "1", "--fraction", "0.34", "--out", str(out)]
    )
    assert code == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["round"] == 1 and 0.0 <= row["share_spread_above_mean"] <= 1.0
    assert set(row["rules"]) >= {"fedavg", "fedmedian", "fedtrimmedavg"}
    assert -1.0 < row["agreement"] <= 1.0
    assert json.loads(out.read_text())["measured"] == {
        "fraction": 0.34,
        "scale": 1.0,
        "attackers": [1],
        "trim": 1,
    }
    assert update_spread.main(["--rounds", "0"]) == 2
    assert update_spread.main(["--fraction", "1.5"]) == 2


def test_repeated_cells_run_as_whole_passes_and_table_as_mean_and_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[poisoning_matrix.Cell] = []
    # Per pass: clean fedavg, clean median, then fedavg and median under scale:10 at 20 % and at 30 %.
    first_aucs, first_losses = [0.97, 0.96, 0.80, 0.95, 0.78, 0.94], [0.010, 0.011, 0.5, 0.011, 0.6, 0.012]
    aucs = iter([*first_aucs, 0.97, 0.96, float("nan"), 0.97, 0.79, 0.95])
    losses = iter([*first_losses, 0.012, 0.011, float("inf"), 0.0132, 0.6, 0.012])

    def fake_run(cell: poisoning_matrix.Cell, overrides: dict, out: Path) -> dict:
        ran.append(cell)
        metrics = {"final_auc": next(aucs), "normal_loss": next(losses), "backdoor_success": 0.0}
        fields = {"attack": cell.attack, "defence": cell.defence, "fraction": cell.fraction}
        return {**fields, "repeat": cell.repeat, "failed": False, "max_update_norm": 3.0, **metrics}

    monkeypatch.setattr(poisoning_matrix, "run_cell", fake_run)
    base = dict(poisoning_matrix.BASE)
    poisoning_matrix.run_matrix(tmp_path, ["none", "scale:10"], ["fedavg", "fedmedian"], [0.2, 0.3], base, 2)
    names = [c.name for c in ran]
    # Each pass: the clean cells once (they do not depend on the fraction), the attack at each fraction.
    assert names[:3] == ["none-fedavg-0", "none-fedmedian-0", "scale10-fedavg-0.2"]
    assert len(names) == len(set(names)) and sum(n.endswith("-r2") for n in names) == len(names) // 2
    # Clean FedAvg's loss is the mean of its two runs, 0.011; medians' scale:10 runs lost 0.95 and 0.97.
    table = (tmp_path / "matrix.md").read_text()
    assert "Clean FedAvg (mean of 2 runs): AUC 0.970, loss 0.0110" in table
    assert "| none | 0.970 (1.00x) [0.970-0.970, 0.91x-1.09x] |" in table
    assert "0.960 (1.10x) [0.950-0.970, 1.00x-1.20x]" in table
    assert "(1 of 2 diverged)" in table
    with pytest.raises(ValueError, match="repeats"):
        poisoning_matrix.run_matrix(tmp_path, ["none"], ["fedavg"], [0.2], base, 0)
