"""The run configuration: one typed object, parsed and validated once.

Keys are Flower's kebab-case ``run_config`` keys (``[tool.flwr.app.config]`` in pyproject.toml); the
defaults below must equal pyproject's, which a test checks. ``flwr.simulation.run_simulation`` passes an
empty run config, so the defaults have to live in code as well.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from shared.export import parse_exports

SCENARIOS = ("fleet", "digits", "wdbc", "mnist", "files")
MODELS = ("dense", "conv", "vae")
ACTIVATIONS = ("relu", "elu", "gelu", "tanh")
# Aggregation rules that look at each client's update (coordinate-wise median, trimming, distances between
# updates, Flower's robust strategies): SecAgg+ shows the server only the sum, so it refuses them.
NEEDS_INDIVIDUAL_UPDATES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
STRATEGIES = ("fedavg", "fedadam", "fedprox", *NEEDS_INDIVIDUAL_UPDATES)
SECURE_AGGREGATION = ("none", "secagg+")
ATTACKS = ("none", "sign-flip", "scale", "noise", "backdoor", "alie")  # shared.attacks.poisoning.ATTACKS
ACCOUNTANTS = ("rdp", "pld")
THRESHOLD_RULES = ("percentile", "mean-k-sigma", "federated-percentile")
PARTITIONS = ("natural", "iid", "dirichlet")
SCORE_RULES = ("mse", "standardized", "max-standardized")  # shared.scoring.SCORE_RULES, checked by a test
SAMPLINGS = ("poisson", "shuffle")  # shared.training.SAMPLINGS, checked by a test
ADVERSARIAL_TARGETS = ("clean", "perturbed")  # shared.training.ADVERSARIAL_TARGETS, checked by a test
CLIENT_DP = ("none", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive")
AUTO = "auto"
MAX_ADVERSARIAL_STEPS = 50
MIN_THRESHOLD_BINS, MAX_THRESHOLD_BINS = 10, 1000  # shared.federated_threshold's log-spaced bins
SPSA_MIN_QUERIES = 34  # one step of shared.attacks.evasion.spsa: 16 probe pairs, and two more scores


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
    # The server rejects a client's returned model that is further than this (L2, over all weights) from
    # the model it was sent, as well as any with the wrong shapes or dtypes or a non-finite value
    # (shared/updates.py); 0: shapes and finite values only.
    max_update_norm: float = 0.0
    # Norm bounding (Sun et al. 2019): the server scales every update longer than this (L2, over all
    # weights) down to it before aggregating, so no client moves the mean by more than its share of it;
    # 0: off. Unlike max-update-norm it keeps the client's direction rather than dropping the client.
    clip_update_norm: float = 0.0
    # Robust rules (strategy): FedTrimmedAvg drops this fraction of the values at each end of every
    # coordinate; Krum, MultiKrum and Bulyan assume at most num-malicious-nodes attackers per round;
    # MultiKrum averages the multikrum-select best-scored updates (0: sampled clients - num-malicious-nodes).
    trim_beta: float = 0.2
    num_malicious_nodes: int = 1
    multikrum_select: int = 0
    # Secure aggregation (docs/PRIVACY.md): "secagg+" runs Flower's SecAgg+, so the server learns only the
    # weighted sum of the clients' models. Each client's mask secrets are split into num-shares shares
    # (itself and num-shares - 1 neighbours: a fixed integer, so the privacy and dropout figures do not
    # shift with the sample size), any reconstruction-threshold of which recover them when a client drops
    # out. Each client scales its weights by n / max-weight (FedAvg's weighting; n must not exceed
    # max-weight) and quantises them within [-clipping-range, clipping-range]: values outside are clipped.
    # max-weight 10,000 (Flower's default is 1,000) covers the fleet scenario's 3,400 rows per client; the
    # price of a larger one is a coarser grid for small clients, 2 * range / 2**22 * max-weight / n per
    # weight (4e-4 for n = 100), with unbiased (stochastic) rounding.
    secure_aggregation: str = "none"
    secagg_num_shares: int = 3
    secagg_reconstruction_threshold: int = 2
    secagg_clipping_range: float = 8.0
    secagg_max_weight: float = 10000.0
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
    # PGD adversarial training inside local DP-SGD (shared/training.py, docs/ROBUSTNESS.md): each sampled
    # example is replaced by the worst point of its own L-infinity ball of this radius in the model's
    # input space (images clamped to [0, 1]; tables unclamped), found in this many steps, and trained to
    # reconstruct the perturbed example ("perturbed", measured better) or the clean one ("clean"). 0: off.
    # No privacy cost. The rounds' train-loss is then the loss at the perturbed points.
    adversarial_training_epsilon: float = 0.0
    adversarial_training_steps: int = 5
    adversarial_training_target: str = "perturbed"
    anomaly_score: str = "max-standardized"
    threshold_rule: str = "percentile"
    threshold_percentile: float = 95.0
    threshold_k: float = 3.0
    # threshold-rule "federated-percentile" (shared/federated_threshold.py, docs/PRIVACY.md): after the last
    # round each client sends a histogram of its own training rows' scores over threshold-bins fixed,
    # log-spaced bins, with N(0, noise-multiplier^2) added to every count (sensitivity 1), charged to its
    # ledger. 5.0 adds about 0.18 to the default fleet run's 2.10 (0.80 alone, RDP, delta 1e-5) and reads
    # the 95th percentile of 4,000 rows over 5 clients to 0.9-1.5 percentile points (one sd). 80 bins over
    # the fixed range are 8 per decade: the threshold is read to within one bin, a factor 1.33.
    threshold_noise_multiplier: float = 5.0
    threshold_bins: int = 80
    partition: str = "natural"
    dirichlet_alpha: float = 0.5
    num_clients: int = 5
    # fleet scenario: normal rows generated per site (15 % of them are the client's held-out part). Lower
    # it as num-clients grows to simulate many small sites with the same total data.
    rows_per_site: int = 4000
    seed: int = 42
    normal_classes: str = ""
    data_dir: str = ""
    test_file: str = ""
    label_column: str = "label"
    out_dir: str = ""
    state_dir: str = ""
    # The bundle's serving exports besides model.keras (shared/export.py): "savedmodel", "tflite-float16",
    # "tflite-int8", comma-separated, or "none".
    bundle_exports: str = "savedmodel"
    # The adversarial-robustness evaluation every run ends with (shared/robustness.py): budgets in the
    # model's input space, on a stratified sample of this many labelled test rows (0: no evaluation),
    # and the score-only attack's query budget per row (0: no black-box attack).
    robustness_linf_epsilons: str = "0.02,0.05,0.1"
    robustness_l2_epsilons: str = "0.25,0.5,1.0"
    robustness_rows: int = 400
    robustness_queries: int = 500
    # Poisoning, simulations only (shared/attacks/poisoning.py): attack-fraction of the clients (a seeded
    # choice) run this attack; attack-scale multiplies a sign-flip, scale or backdoor update; noise sends
    # N(0, attack-noise-std^2) per weight; alie shifts by attack-alie-z standard deviations (0: Baruch et
    # al.'s z_max for the round's sample).
    attack: str = "none"
    attack_fraction: float = 0.0
    attack_scale: float = 10.0
    attack_noise_std: float = 0.1
    attack_alie_z: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._validate()

    @property
    def sites_are_files(self) -> bool:
        """One client per file of data-dir (simulated site files): the count is known once listed."""
        return self.scenario == "files" and self.partition == "natural" and bool(self.data_dir)

    @property
    def deployed_files(self) -> bool:
        """Site files held by the sites themselves (each SuperNode's data-file), none on the server."""
        return self.scenario == "files" and not self.data_dir

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
        _choice("secure-aggregation", self.secure_aggregation, SECURE_AGGREGATION)
        _choice("accountant", self.accountant, ACCOUNTANTS)
        _choice("threshold-rule", self.threshold_rule, THRESHOLD_RULES)
        _choice("anomaly-score", self.anomaly_score, SCORE_RULES)
        _choice("partition", self.partition, PARTITIONS)
        _choice("sampling", self.sampling, SAMPLINGS)
        _choice("client-dp", self.client_dp, CLIENT_DP)
        _choice("attack", self.attack, ATTACKS)
        _choice("adversarial-training-target", self.adversarial_training_target, ADVERSARIAL_TARGETS)
        for name in (
            "num_server_rounds",
            "latent_dim",
            "local_epochs",
            "batch_size",
            "num_clients",
            "rows_per_site",
            "adversarial_training_steps",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_key(name)} must be >= 1, got {getattr(self, name)}")
        if self.adversarial_training_steps > MAX_ADVERSARIAL_STEPS:
            # The steps are unrolled in the compiled (XLA) training step: its size and compile time grow
            # with them, and past a few dozen a PGD search gains nothing.
            raise ConfigError(
                f"adversarial-training-steps must be at most {MAX_ADVERSARIAL_STEPS}, got "
                f"{self.adversarial_training_steps}"
            )
        if self.min_available_clients < 1:
            raise ConfigError(f"min-available-clients must be >= 1, got {self.min_available_clients}")
        for name in ("fraction_train", "fraction_evaluate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{_key(name)} must be in [0, 1], got {value}")
        for name in (
            "learning_rate",
            "server_learning_rate",
            "dirichlet_alpha",
            "secagg_clipping_range",
            "secagg_max_weight",
        ):
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
            "adversarial_training_epsilon",
            "proximal_mu",
            "max_update_norm",
            "clip_update_norm",
            "num_malicious_nodes",
            "multikrum_select",
            "attack_noise_std",
            "attack_alie_z",
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
        if not (self.threshold_noise_multiplier > 0 and math.isfinite(self.threshold_noise_multiplier)):
            # A noiseless histogram is no DP release: it would be charged nothing and protect nothing.
            raise ConfigError(
                f"threshold-noise-multiplier must be a positive number, got {self.threshold_noise_multiplier}"
            )
        if not MIN_THRESHOLD_BINS <= self.threshold_bins <= MAX_THRESHOLD_BINS:
            # Every bin carries its own noise, and the percentile is read from their running sum: past a few
            # hundred bins the noise of the sum swamps the finer resolution.
            raise ConfigError(
                f"threshold-bins must be in [{MIN_THRESHOLD_BINS}, {MAX_THRESHOLD_BINS}], got "
                f"{self.threshold_bins}"
            )
        if self.scenario == "files" and not (self.data_dir or self.test_file):
            raise ConfigError(
                "scenario 'files' needs data-dir (simulated: one CSV/Parquet/NPZ file per site) or, deployed "
                "across sites, a test-file on the server (each site's SuperNode names its own data-file)"
            )
        if self.deployed_files and self.partition != "natural":
            raise ConfigError(
                f"partition {self.partition!r} re-splits pooled data; deployed sites each keep their own "
                "data-file, so only partition 'natural' applies"
            )
        if self.adversarial_training_epsilon > 0 and self.denoise_stddev > 0:
            raise ConfigError(
                f"adversarial-training-epsilon ({self.adversarial_training_epsilon:g}) and denoise-stddev "
                f"({self.denoise_stddev:g}) both replace the training input and cannot be combined; set "
                "one of them to 0"
            )
        if self.model == "conv" and self.scenario in ("fleet", "wdbc"):
            raise ConfigError(f"model 'conv' needs image data; scenario {self.scenario!r} is tabular")
        self.normal_class_list  # noqa: B018 - validates the list syntax
        if not 0.0 <= self.trim_beta < 0.5:
            raise ConfigError(f"trim-beta must be in [0, 0.5), got {self.trim_beta}")
        if not (self.attack_scale > 0 and math.isfinite(self.attack_scale)):
            raise ConfigError(f"attack-scale must be a positive number, got {self.attack_scale}")
        if not 0.0 <= self.attack_fraction < 1.0:
            raise ConfigError(f"attack-fraction must be in [0, 1), got {self.attack_fraction}")
        if (self.attack == "none") != (self.attack_fraction == 0):
            raise ConfigError(
                f"attack {self.attack!r} with attack-fraction {self.attack_fraction:g}: set both (an attack "
                "and the fraction of clients that run it) or neither"
            )
        if self.robustness_rows < 0 or self.robustness_queries < 0:
            raise ConfigError(
                f"robustness-rows and robustness-queries must be >= 0, got {self.robustness_rows} and "
                f"{self.robustness_queries}"
            )
        try:
            parse_exports(self.bundle_exports)
        except ValueError as err:
            raise ConfigError(f"bundle-exports: {err}") from err
        budgets = 0
        for key in ("robustness-linf-epsilons", "robustness-l2-epsilons"):
            try:
                budgets += len(parse_epsilons(getattr(self, key.replace("-", "_")), key))
            except ValueError as err:
                raise ConfigError(str(err)) from err
        if self.robustness_rows > 0 and budgets == 0:
            raise ConfigError("robustness-rows > 0 needs at least one budget in robustness-*-epsilons")
        if 0 < self.robustness_queries < SPSA_MIN_QUERIES:
            raise ConfigError(
                f"robustness-queries must be 0 (no black-box attack) or at least {SPSA_MIN_QUERIES} (one "
                f"SPSA step), got {self.robustness_queries}"
            )
        # Site files partitioned naturally have one client per file: the count is known once the data is
        # listed, and the server and the simulation runner check again with it.
        known_clients = None if self.sites_are_files else self.num_clients
        check_combinations(self, known_clients)


# -- combinations ------------------------------------------------------------------------------------------
# Settings that are each valid but break a guarantee, or cannot work, together. Each rule returns the
# reasons it refuses ``config`` (empty when it accepts it); ``num_clients`` is the federation's size, None
# where it is not known yet. Add a rule here for each new combination.


def clients_per_round(config: Any, num_clients: int) -> int:
    """How many of ``num_clients`` the strategy samples each round: Flower's rule, a fraction but at least
    the minimum (as ``build_strategy`` sets it)."""
    minimum = min(config.min_available_clients, num_clients)
    return max(int(num_clients * config.fraction_train), minimum)


def _secagg_parameters(config: Any, num_clients: int | None) -> list[str]:
    """SecAgg+'s own parameters, checked against each other and against the clients sampled per round."""
    if config.secure_aggregation != "secagg+":
        return []
    shares, threshold = config.secagg_num_shares, config.secagg_reconstruction_threshold
    problems = []
    if shares < 3:
        # Flower's SecAggPlusWorkflow refuses 2 and reads 1 as "every sampled client".
        problems.append(f"secagg-num-shares must be >= 3, got {shares}")
    if threshold < 2:
        # One share would reveal a client's secret to whoever holds it (and Flower reads 1 as "all").
        problems.append(f"secagg-reconstruction-threshold must be >= 2, got {threshold}")
    if threshold >= shares:
        problems.append(
            f"secagg-reconstruction-threshold ({threshold}) must be below secagg-num-shares ({shares}): "
            "Flower's SecAgg+ refuses a threshold that leaves no room for a single dropout"
        )
    elif 2 * threshold <= shares:
        # Each share holder gives the server a share of either the client's mask seed (client active) or
        # its key (client dropped), never both. Flower's SecAgg+ has no round in which the holders check
        # that the server told them all the same story, so a server that tells half the holders one and
        # half the other collects `threshold` shares of both secrets, and unmasks that client, whenever
        # 2 * threshold <= shares.
        problems.append(
            f"secagg-reconstruction-threshold ({threshold}) must be more than half of secagg-num-shares "
            f"({shares}): with fewer, a server that gives a client's neighbours inconsistent dropout lists "
            "collects enough shares to unmask that client's model"
        )
    if num_clients is not None:
        sampled = clients_per_round(config, num_clients)
        if shares > sampled:
            problems.append(
                f"secagg-num-shares ({shares}) is more than the {sampled} client(s) sampled per round "
                f"({num_clients} clients, fraction-train {config.fraction_train:g}, min-available-clients "
                f"{config.min_available_clients}): each client's secrets are shared among num-shares "
                "clients of the round, so a round needs at least that many; add clients or lower it"
            )
        elif shares % 2 == 0 and shares != sampled:
            # SecAgg+ places each client in the middle of its num-shares neighbours; Flower rounds an even
            # number up, so the run would not use the value the config states.
            problems.append(
                f"secagg-num-shares must be odd (or equal to the {sampled} clients sampled per round), "
                f"got {shares}"
            )
    return problems


def _secagg_aggregation_rule(config: Any, num_clients: int | None) -> list[str]:
    """SecAgg+ gives the server the weighted sum of the updates and nothing else."""
    if config.secure_aggregation == "none":
        return []
    if config.strategy in NEEDS_INDIVIDUAL_UPDATES:
        return [
            f"secure-aggregation {config.secure_aggregation!r} cannot run with strategy "
            f"{config.strategy!r}: a robust rule (median, trimmed mean, Krum, Bulyan) inspects each "
            "client's update, and secure aggregation shows the server only their weighted sum; use "
            "fedavg, fedprox or fedadam, or secure-aggregation 'none'"
        ]
    for key in ("max-update-norm", "clip-update-norm"):
        bound = getattr(config, key.replace("-", "_"))
        if bound > 0:
            return [
                f"{key} {bound:g} bounds each client's update, and secure-aggregation "
                f"{config.secure_aggregation!r} shows the server only their sum, so no update could be "
                f"checked or clipped; set {key} 0 or secure-aggregation 'none'"
            ]
    # fedavg, fedprox (a client-side term) and fedadam (an optimiser step on the averaged model) need
    # only the weighted sum, which is what SecAgg+ delivers.
    return []


def _secagg_client_level_dp(config: Any, num_clients: int | None) -> list[str]:
    """Client-level DP (``client-dp``) and SecAgg+."""
    client_dp = config.client_dp
    if config.secure_aggregation == "none" or client_dp == "none":
        return []
    if client_dp.startswith("server-"):
        return [
            f"secure-aggregation {config.secure_aggregation!r} cannot run with client-dp {client_dp!r}: "
            "server-side clipping clips each client's update on the server, which needs every update "
            "in the clear, and secure aggregation hides them; use a client-side variant "
            "(client-fixed, client-adaptive) or secure-aggregation 'none'"
        ]
    # Client-side clipping works with secure aggregation in principle (clients clip, the server noises the
    # sum), but the SecAgg+ path (server/secure.py) does not wire it in: refuse rather than drop the noise.
    return [
        f"secure-aggregation {config.secure_aggregation!r} with client-dp {client_dp!r} is not supported "
        "yet: the SecAgg+ path would train without the client-level noise; use secure-aggregation 'none'"
    ]


def _client_dp_rule(config: Any, num_clients: int | None) -> list[str]:
    """Flower's client-level DP wrappers and accountant: what they can account for."""
    if config.client_dp == "none":
        return []
    problems = []
    if config.client_dp.endswith("-adaptive"):
        # Flower 1.42's adaptive wrappers noise the update at the *next* round's clipping norm, add the
        # count noise to the un-centred clipped count and aggregate short rounds: no accountant, Flower's
        # or ours, can state what they deliver. Refused rather than reported with a wrong epsilon.
        problems.append(
            f"client-dp {config.client_dp!r} is not supported: Flower 1.42's adaptive-clipping wrappers "
            "add the update noise at the next round's clipping norm and aggregate rounds with missing "
            "replies, so their client-level epsilon cannot be stated; use server-fixed or client-fixed"
        )
    if config.strategy not in ("fedavg", "fedprox"):
        problems.append(
            f"client-dp needs FedAvg-style aggregation (strategy fedavg or fedprox), got "
            f"{config.strategy!r}: Flower's client-level accountant covers only a plain, uniformly "
            "weighted mean of clipped updates, which a server optimiser step (FedAdam) or a robust rule "
            "(median, trimming, Krum, Bulyan) replaces"
        )
    if config.client_dp_noise_multiplier <= 0:
        problems.append(
            "client-dp needs client-dp-noise-multiplier > 0: clipping alone gives no client-level "
            "guarantee, and Flower's accountant refuses a noiseless release"
        )
    return problems


def rule_minimum(config: Any) -> int:
    """The fewest updates the configured rule is defined for: Krum and MultiKrum score each update by its
    n - f - 2 nearest neighbours (n >= 2f + 3), Bulyan needs n >= 4f + 3; the others 1. Checked on the
    sample at start (here) and on each round's accepted updates (server.strategy.RoundGuard)."""
    f = config.num_malicious_nodes
    return {"krum": 2 * f + 3, "multikrum": 2 * f + 3, "bulyan": 4 * f + 3}.get(config.strategy, 1)


def _robust_rule(config: Any, num_clients: int | None) -> list[str]:
    """What Flower's Krum, MultiKrum and Bulyan need from the round's sample: their guarantees hold for
    at most num-malicious-nodes attackers among n sampled clients when n > 2f + 2 (Krum) or n >= 4f + 3
    (Bulyan); below that Flower's Bulyan aggregates nothing and Krum's scores mean nothing."""
    if config.strategy not in ("krum", "multikrum", "bulyan") or num_clients is None:
        return []
    n, f, minimum = clients_per_round(config, num_clients), config.num_malicious_nodes, rule_minimum(config)
    if n < minimum:
        need = (
            f"at least {minimum} clients per round (4f + 3)"
            if config.strategy == "bulyan"
            else f"more than {minimum - 1} clients per round (2f + 2)"
        )
        return [
            f"strategy {config.strategy!r} with num-malicious-nodes {f} needs {need}, and samples {n}; add "
            "clients or lower num-malicious-nodes"
        ]
    if config.strategy == "multikrum" and config.multikrum_select > n - f:
        return [
            f"multikrum-select {config.multikrum_select} is more than the {n - f} clients per round that "
            f"are not assumed malicious ({n} sampled, num-malicious-nodes {f})"
        ]
    return []


def _attack_rule(config: Any, num_clients: int | None) -> list[str]:
    """Poisoning is a simulation harness: what each attack needs to be what its name says."""
    problems = []
    if config.attack == "alie":
        if config.secure_aggregation != "none":
            problems.append(
                "attack 'alie' needs the colluders' updates in the clear where their replies meet; "
                "secure-aggregation hides them"
            )
        if num_clients is not None:
            from shared.attacks.poisoning import malicious_clients

            count = len(malicious_clients(num_clients, config.attack_fraction, config.seed))
            sampled = clients_per_round(config, num_clients)
            if count < 2:
                problems.append(
                    f"attack 'alie' needs at least two colluding clients to estimate a spread; "
                    f"attack-fraction {config.attack_fraction:g} of {num_clients} clients gives {count}"
                )
            elif count >= sampled // 2 + 1:
                # Baruch et al.'s shift is defined for a colluding minority (z_max would be infinite).
                problems.append(
                    f"attack 'alie' is defined for a colluding minority: {count} colluders of {sampled} "
                    "clients per round is a majority, which needs no subtle attack; lower attack-fraction"
                )
    if config.attack != "none" and config.deployed_files:
        problems.append(
            f"attack {config.attack!r} is a simulation harness (fedae simulate); deployed sites run their "
            "own code"
        )
    return problems


def _federated_threshold_rule(config: Any, num_clients: int | None) -> list[str]:
    """The federated threshold is a sample-level DP release composed into each client's DP-SGD ledger."""
    if config.threshold_rule != "federated-percentile":
        return []
    problems = []
    if not config.dp_enabled:
        problems.append(
            "threshold-rule 'federated-percentile' with DP-SGD off: the model itself already releases the "
            "clients' data with no bound, so a DP threshold would protect nothing; use threshold-rule "
            "'percentile' (the coordinator's calibration data) for the non-private baseline"
        )
    if config.client_dp != "none":
        # Each client's noisy histogram reaches the server on its own, protected per example only: adding
        # or removing a whole client changes it by up to its row count, which no client-level figure covers.
        problems.append(
            f"threshold-rule 'federated-percentile' cannot run with client-dp {config.client_dp!r}: each "
            "client's histogram is protected per example, not per client, so the run's client-level "
            "epsilon would not cover it; use threshold-rule 'percentile' or client-dp 'none'"
        )
    return problems


COMBINATION_RULES: tuple[Callable[[Any, int | None], list[str]], ...] = (
    _secagg_parameters,
    _secagg_aggregation_rule,
    _secagg_client_level_dp,
    _client_dp_rule,
    _robust_rule,
    _attack_rule,
    _federated_threshold_rule,
)


def check_combinations(config: Any, num_clients: int | None = None) -> None:
    """Refuse settings that break a guarantee or cannot work together, naming every problem found."""
    problems = [problem for rule in COMBINATION_RULES for problem in rule(config, num_clients)]
    if problems:
        raise ConfigError("; ".join(problems))


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


def parse_epsilons(text: str, key: str) -> list[float]:
    """A comma-separated list of attack budgets (``"0.02,0.05"``); empty: none."""
    try:
        values = [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError as err:
        raise ValueError(f"{key} must be comma-separated numbers, got {text!r}") from err
    bad = [v for v in values if not (v > 0 and math.isfinite(v))]
    if bad:
        raise ValueError(f"{key} must hold positive finite numbers, got {bad}")
    return values


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
