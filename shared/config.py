"""The run configuration: one typed object, parsed and validated once.

Keys are Flower's kebab-case ``run_config`` keys (``[tool.flwr.app.config]`` in pyproject.toml); the
defaults below must equal pyproject's, which a test checks. ``flwr.simulation.run_simulation`` passes an
empty run config, so the defaults have to live in code as well.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

SCENARIOS = ("fleet", "digits", "wdbc", "mnist", "files")
MODELS = ("dense", "conv", "vae")
ACTIVATIONS = ("relu", "elu", "gelu", "tanh")
STRATEGIES = ("fedavg", "fedadam", "fedprox")
ACCOUNTANTS = ("rdp", "pld")
THRESHOLD_RULES = ("percentile", "mean-k-sigma")
PARTITIONS = ("natural", "iid", "dirichlet")
SCORE_RULES = ("mse", "standardized", "max-standardized")  # shared.scoring.SCORE_RULES, checked by a test
SAMPLINGS = ("poisson", "shuffle")  # shared.training.SAMPLINGS, checked by a test
CLIENT_DP = ("none", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive")
AUTO = "auto"


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or out of range."""


def _key(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class FedaeConfig:
    """Every setting of a run. Attribute ``foo_bar`` is run-config key ``foo-bar``."""

    scenario: str = "fleet"
    num_server_rounds: int = 20
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_available_clients: int = 2
    strategy: str = "fedavg"
    server_learning_rate: float = 0.01
    proximal_mu: float = 0.01
    model: str = "dense"
    latent_dim: int = 16
    activation: str = "relu"
    local_epochs: int = 1
    batch_size: int = 64
    learning_rate: float = 0.001
    noise_multiplier: float | str = 1.5  # or "auto": calibrated per client from target-epsilon
    l2_norm_clip: float = 0.25
    sampling: str = "poisson"
    delta: float = 1e-5
    target_epsilon: float = 3.0
    accountant: str = "rdp"
    client_dp: str = "none"
    client_dp_noise_multiplier: float = 1.0
    client_dp_clip: float = 1.0
    client_dp_target_epsilon: float = 0.0
    denoise_stddev: float = 0.0
    anomaly_score: str = "max-standardized"
    threshold_rule: str = "percentile"
    threshold_percentile: float = 95.0
    threshold_k: float = 3.0
    partition: str = "natural"
    dirichlet_alpha: float = 0.5
    num_clients: int = 5
    seed: int = 42
    normal_classes: str = ""
    data_dir: str = ""
    test_file: str = ""
    label_column: str = "label"
    out_dir: str = ""
    state_dir: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._validate()

    # -- parsing -------------------------------------------------------------------------------------
    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any] | None) -> FedaeConfig:
        """Build from Flower's ``context.run_config`` (kebab-case keys); unknown keys are refused."""
        run_config = dict(run_config or {})
        known = {_key(f.name): f for f in fields(cls) if f.name != "extra"}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ConfigError(f"unknown run-config key(s) {unknown}; known keys: {', '.join(sorted(known))}")
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            values[known[key].name] = _coerce(key, value, known[key].type)
        return cls(**values)

    def replace(self, **changes: Any) -> FedaeConfig:
        return dataclasses.replace(self, **changes)

    def with_overrides(self, overrides: Mapping[str, Any]) -> FedaeConfig:
        """Apply kebab-case overrides (values may be strings, as typed on a command line)."""
        merged = self.to_run_config()
        merged.update(overrides)
        return FedaeConfig.from_run_config(merged)

    def to_run_config(self) -> dict[str, Any]:
        """Kebab-case dict of every setting, the form Flower's records and TOML files use."""
        return {_key(f.name): getattr(self, f.name) for f in fields(self) if f.name != "extra"}

    # -- derived ---------------------------------------------------------------------------------------
    @property
    def dp_enabled(self) -> bool:
        """DP-SGD is on unless both noise and clipping are switched off (the non-private baseline)."""
        return not (self.noise_multiplier == 0.0 and self.l2_norm_clip == 0.0)

    @property
    def auto_noise(self) -> bool:
        """noise-multiplier "auto": each client calibrates sigma to its budget and data size."""
        return self.noise_multiplier == AUTO

    @property
    def client_dp_enabled(self) -> bool:
        return self.client_dp != "none"

    @property
    def normal_class_list(self) -> list[int]:
        if not self.normal_classes.strip():
            return [0]
        try:
            return [int(part) for part in self.normal_classes.replace(";", ",").split(",") if part.strip()]
        except ValueError as err:
            raise ConfigError(
                f"normal-classes must be a comma-separated list of integers, got {self.normal_classes!r}"
            ) from err

    # -- validation ------------------------------------------------------------------------------------
    def _validate(self) -> None:
        _choice("scenario", self.scenario, SCENARIOS)
        _choice("model", self.model, MODELS)
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("accountant", self.accountant, ACCOUNTANTS)
        _choice("threshold-rule", self.threshold_rule, THRESHOLD_RULES)
        _choice("anomaly-score", self.anomaly_score, SCORE_RULES)
        _choice("partition", self.partition, PARTITIONS)
        _choice("sampling", self.sampling, SAMPLINGS)
        _choice("client-dp", self.client_dp, CLIENT_DP)
        for name in ("num_server_rounds", "latent_dim", "local_epochs", "batch_size", "num_clients"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_key(name)} must be >= 1, got {getattr(self, name)}")
        if self.min_available_clients < 1:
            raise ConfigError(f"min-available-clients must be >= 1, got {self.min_available_clients}")
        for name in ("fraction_train", "fraction_evaluate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{_key(name)} must be in [0, 1], got {value}")
        for name in ("learning_rate", "server_learning_rate", "dirichlet_alpha"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{_key(name)} must be a positive number, got {value}")
        if isinstance(self.noise_multiplier, str) and not self.auto_noise:
            raise ConfigError(
                f"noise-multiplier must be a number >= 0 or 'auto', got {self.noise_multiplier!r}"
            )
        if self.auto_noise and not (self.target_epsilon > 0 and self.l2_norm_clip > 0):
            raise ConfigError(
                "noise-multiplier 'auto' calibrates the noise to target-epsilon: set target-epsilon > 0 "
                f"(got {self.target_epsilon:g}) and l2-norm-clip > 0 (got {self.l2_norm_clip:g})"
            )
        for name in (
            *(() if self.auto_noise else ("noise_multiplier",)),
            "client_dp_noise_multiplier",
            "client_dp_target_epsilon",
            "l2_norm_clip",
            "denoise_stddev",
            "proximal_mu",
            "threshold_k",
            "target_epsilon",
        ):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{_key(name)} must be >= 0, got {value}")
        if self.client_dp_clip <= 0 or not math.isfinite(self.client_dp_clip):
            raise ConfigError(f"client-dp-clip must be a positive number, got {self.client_dp_clip}")
        if not self.auto_noise and self.noise_multiplier > 0 and self.l2_norm_clip == 0:  # type: ignore[operator]
            raise ConfigError(
                "noise-multiplier > 0 needs a clipping norm: set l2-norm-clip > 0 "
                "(noise is calibrated to the clipping norm)"
            )
        if self.l2_norm_clip > 0 and self.noise_multiplier == 0:
            # Clipping without noise gives no guarantee; refuse rather than print a misleading epsilon.
            raise ConfigError(
                "l2-norm-clip > 0 with noise-multiplier = 0 gives no privacy guarantee; for the "
                "non-private baseline set both to 0, for DP-SGD set noise-multiplier > 0"
            )
        if not 0.0 < self.delta < 1.0:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")
        if not 0.0 < self.threshold_percentile < 100.0:
            raise ConfigError(f"threshold-percentile must be in (0, 100), got {self.threshold_percentile}")
        if self.scenario == "files" and not self.data_dir:
            raise ConfigError("scenario 'files' needs data-dir (one CSV/Parquet/NPZ file per site)")
        if self.model == "conv" and self.scenario in ("fleet", "wdbc"):
            raise ConfigError(f"model 'conv' needs image data; scenario {self.scenario!r} is tabular")
        check_combinations(self)
        self.normal_class_list  # noqa: B018 - validates the list syntax


def check_combinations(config: FedaeConfig) -> None:
    """Refuse, at start, option combinations that would break a guarantee or cannot work."""
    if config.client_dp_enabled:
        if config.strategy == "fedadam":
            raise ConfigError(
                "client-dp needs FedAvg-style aggregation (strategy fedavg or fedprox): Flower's "
                "client-level accountant covers only a plain, uniformly weighted mean of clipped "
                "updates, and FedAdam replaces that mean with its own server optimiser step"
            )
        if config.client_dp_noise_multiplier <= 0:
            raise ConfigError(
                "client-dp needs client-dp-noise-multiplier > 0: clipping alone gives no client-level "
                "guarantee, and Flower's accountant refuses a noiseless release"
            )


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert a run-config value to the field's type; TOML and CLI strings both arrive here."""
    if str(annotation) == "float | str":  # a number, or the one word the field allows ("auto")
        if isinstance(value, str) and value.strip().lower() == AUTO:
            return AUTO
        annotation = "float"
    kind = {"int": int, "float": float, "str": str}.get(str(annotation), str)
    if kind is str:
        return str(value)
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a number, got the boolean {value}")
    try:
        converted = kind(value) if not isinstance(value, str) else kind(value.strip())
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}"
        ) from err
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return converted


def parse_key_values(text: str) -> dict[str, str]:
    """Parse ``"key=value key2=value2"`` as ``flwr run --run-config`` accepts it (values may be quoted)."""
    import shlex

    result: dict[str, str] = {}
    for token in shlex.split(text):
        if "=" not in token:
            raise ConfigError(f"expected key=value in --run-config, got {token!r}")
        key, value = token.split("=", 1)
        result[key.strip()] = value.strip().strip('"').strip("'")
    return result
