import tomllib
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest

from shared.config import (
    NEEDS_INDIVIDUAL_UPDATES,
    ConfigError,
    FedaeConfig,
    check_combinations,
    parse_key_values,
)

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_equal_pyproject() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert FedaeConfig().to_run_config() == pyproject
    # And parsing pyproject's table gives the same object.
    assert FedaeConfig.from_run_config(pyproject) == FedaeConfig()


def test_string_overrides_are_typed() -> None:
    config = FedaeConfig().with_overrides(
        parse_key_values("num-server-rounds=3 noise-multiplier=1.5 model='vae'")
    )
    assert config.num_server_rounds == 3 and isinstance(config.num_server_rounds, int)
    assert config.noise_multiplier == 1.5
    assert config.model == "vae"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"no-such-key": 1}, "unknown run-config key"),
        ({"num-server-rounds": "three"}, "num-server-rounds must be an integer"),
        ({"num-server-rounds": 0}, "num-server-rounds must be >= 1"),
        ({"model": "lstm"}, "model must be one of"),
        ({"delta": 1.5}, "delta must be in (0, 1)"),
        ({"noise-multiplier": 1.0, "l2-norm-clip": 0.0}, "needs a clipping norm"),
        ({"noise-multiplier": 0.0, "l2-norm-clip": 1.0}, "no privacy guarantee"),
        ({"model": "conv"}, "needs image data"),
        ({"normal-classes": "1,x"}, "normal-classes"),
        ({"fraction-train": 2}, "fraction-train must be in [0, 1]"),
    ],
)
def test_bad_values_are_refused_with_the_value(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        FedaeConfig().with_overrides(overrides)
    assert message in str(info.value)


def test_no_dp_baseline_is_both_zero() -> None:
    assert FedaeConfig().dp_enabled
    assert not FedaeConfig(noise_multiplier=0.0, l2_norm_clip=0.0).dp_enabled


def test_parse_key_values_rejects_tokens_without_equals() -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_key_values("rounds")


def test_auto_noise_multiplier_parses_and_needs_a_budget() -> None:
    config = FedaeConfig.from_run_config({"noise-multiplier": "auto"})
    assert config.auto_noise and config.dp_enabled
    with pytest.raises(ConfigError, match="'auto' calibrates the noise to target-epsilon"):
        FedaeConfig.from_run_config({"noise-multiplier": "auto", "target-epsilon": 0})
    with pytest.raises(ConfigError, match="noise-multiplier must be a number"):
        FedaeConfig.from_run_config({"noise-multiplier": "lots"})


def test_samplings_match_the_trainer() -> None:
    from shared import config as config_module
    from shared.training import SAMPLINGS

    assert config_module.SAMPLINGS == SAMPLINGS


SECAGG = {"secure-aggregation": "secagg+"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"secure-aggregation": "secagg"}, "secure-aggregation must be one of none, secagg+; got 'secagg'"),
        ({**SECAGG, "secagg-num-shares": 2}, "secagg-num-shares must be >= 3, got 2"),
        (
            {**SECAGG, "secagg-reconstruction-threshold": 1},
            "secagg-reconstruction-threshold must be >= 2, got 1",
        ),
        ({**SECAGG, "secagg-reconstruction-threshold": 3}, "(3) must be below secagg-num-shares (3)"),
        (
            {**SECAGG, "num-clients": 2},
            "secagg-num-shares (3) is more than the 2 client(s) sampled per round",
        ),
        (
            {**SECAGG, "num-clients": 10, "fraction-train": 0.2},
            "more than the 2 client(s) sampled per round (10 clients, fraction-train 0.2",
        ),
        ({**SECAGG, "secagg-num-shares": 4, "num-clients": 6}, "secagg-num-shares must be odd"),
        (
            {**SECAGG, "secagg-num-shares": 5, "secagg-reconstruction-threshold": 2},
            "(2) must be more than half of secagg-num-shares (5)",
        ),
        (
            {**SECAGG, "secagg-clipping-range": 0.0},
            "secagg-clipping-range must be a positive number, got 0.0",
        ),
        ({**SECAGG, "secagg-max-weight": -1}, "secagg-max-weight must be a positive number, got -1.0"),
    ],
)
def test_secure_aggregation_settings_that_cannot_work_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        FedaeConfig().with_overrides(overrides)
    assert message in str(info.value)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam"])
def test_secure_aggregation_runs_with_strategies_that_need_only_the_sum(strategy: str) -> None:
    # FedAdam's server step and FedProx's client-side term both work on the weighted mean alone.
    config = FedaeConfig().with_overrides({**SECAGG, "strategy": strategy})
    assert config.secure_aggregation == "secagg+" and config.strategy == strategy
    # An even number of shares is fine when it is every client of the round (nothing to round up).
    assert FedaeConfig().with_overrides(
        {**SECAGG, "secagg-num-shares": 4, "secagg-reconstruction-threshold": 3, "num-clients": 4}
    )


def test_secagg_settings_are_not_checked_against_the_clients_when_secure_aggregation_is_off() -> None:
    assert FedaeConfig(num_clients=2).secure_aggregation == "none"  # 3 shares, 2 clients: irrelevant


@pytest.mark.parametrize("strategy", NEEDS_INDIVIDUAL_UPDATES)
def test_robust_aggregation_is_refused_under_secure_aggregation(strategy: str) -> None:
    # No robust rule is a strategy choice yet: the combination rule is checked on its own, so it holds the
    # day one is added to STRATEGIES.
    config = SimpleNamespace(**{**vars_of(FedaeConfig(secure_aggregation="secagg+")), "strategy": strategy})
    with pytest.raises(ConfigError) as info:
        check_combinations(config, 5)
    assert f"cannot run with strategy {strategy!r}" in str(info.value)
    assert "inspects each client's update" in str(info.value)


@pytest.mark.parametrize(
    ("client_dp", "message"),
    [
        ("server-fixed", "server-side clipping clips each client's update on the server"),
        ("server-adaptive", "needs every update in the clear"),
        ("client-fixed", "is not supported yet"),
        ("client-adaptive", "would train without the client-level noise"),
    ],
)
def test_client_level_dp_is_refused_under_secure_aggregation(client_dp: str, message: str) -> None:
    config = SimpleNamespace(**{**vars_of(FedaeConfig(secure_aggregation="secagg+")), "client_dp": client_dp})
    with pytest.raises(ConfigError) as info:
        check_combinations(config, 5)
    assert f"client-dp {client_dp!r}" in str(info.value) and message in str(info.value)
    # Without secure aggregation the same client-dp value is none of this rule's business (adaptive
    # modes are refused by the client-dp rule itself).
    if client_dp.endswith("-fixed"):
        check_combinations(SimpleNamespace(**{**vars(config), "secure_aggregation": "none"}), 5)


def vars_of(config: FedaeConfig) -> dict:
    return {f.name: getattr(config, f.name) for f in fields(config)}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"client-dp": "server-fixed", "strategy": "fedadam"}, "FedAvg-style aggregation"),
        ({"client-dp": "client-fixed", "client-dp-noise-multiplier": 0}, "client-dp-noise-multiplier > 0"),
        ({"client-dp": "server-sideways"}, "client-dp must be one of"),
        ({"client-dp": "server-adaptive"}, "adaptive-clipping wrappers add the update noise at the next"),
        ({"client-dp-clip": 0}, "client-dp-clip must be a positive number"),
        ({"sampling": "sequential"}, "sampling must be one of"),
        ({**SECAGG, "client-dp": "server-fixed"}, "server-side clipping clips each client's update"),
    ],
)
def test_client_dp_combinations_that_break_a_guarantee_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FedaeConfig().with_overrides(overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"threshold-rule": "federated"},
            "threshold-rule must be one of percentile, mean-k-sigma, federated",
        ),
        ({"threshold-noise-multiplier": 0}, "threshold-noise-multiplier must be a positive number, got 0.0"),
        (
            {"threshold-noise-multiplier": "nan"},
            "threshold-noise-multiplier must be a positive number, got nan",
        ),
        ({"threshold-noise-multiplier": "lots"}, "threshold-noise-multiplier must be a number, got 'lots'"),
        ({"threshold-bins": 5}, "threshold-bins must be in [10, 1000], got 5"),
        ({"threshold-bins": 2.5}, "threshold-bins must be an integer, got 2.5"),
        (
            {"threshold-rule": "federated-percentile", "noise-multiplier": 0, "l2-norm-clip": 0},
            "threshold-rule 'federated-percentile' with DP-SGD off",
        ),
        (
            {"threshold-rule": "federated-percentile", "client-dp": "server-fixed"},
            "cannot run with client-dp 'server-fixed'",
        ),
    ],
)
def test_federated_threshold_settings_are_validated(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        FedaeConfig().with_overrides(overrides)
    assert message in str(info.value)


def test_federated_threshold_settings_parse_from_strings() -> None:
    config = FedaeConfig().with_overrides(
        parse_key_values(
            "threshold-rule='federated-percentile' threshold-noise-multiplier=8 threshold-bins=120"
        )
    )
    assert config.threshold_rule == "federated-percentile"
    assert config.threshold_noise_multiplier == 8.0 and config.threshold_bins == 120
    assert isinstance(config.threshold_bins, int)
    # It runs under SecAgg+: each histogram is a DP release of its own, sent as a plain message.
    assert FedaeConfig(threshold_rule="federated-percentile", secure_aggregation="secagg+").secure_aggregation
