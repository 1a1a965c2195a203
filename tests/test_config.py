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
