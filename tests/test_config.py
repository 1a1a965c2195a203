import tomllib
from pathlib import Path

import pytest

from shared.config import ConfigError, FedaeConfig, parse_key_values

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


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"client-dp": "server-fixed", "strategy": "fedadam"}, "FedAvg-style aggregation"),
        ({"client-dp": "client-fixed", "client-dp-noise-multiplier": 0}, "client-dp-noise-multiplier > 0"),
        ({"client-dp": "server-sideways"}, "client-dp must be one of"),
        ({"client-dp-clip": 0}, "client-dp-clip must be a positive number"),
        ({"sampling": "sequential"}, "sampling must be one of"),
    ],
)
def test_combinations_that_break_a_guarantee_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FedaeConfig.from_run_config(overrides)
