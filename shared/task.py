"""What one client does in a round, and how the server scores a model: plain functions, no Flower.

The ClientApp and ServerApp translate Flower messages to and from these functions.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared import faults, privacy
from shared.attacks import poisoning
from shared.config import ConfigError, FedaeConfig
from shared.data.errors import TrainingDataError
from shared.data.sources import (
    ClientData,
    DataSpec,
    load_client_data,
    load_server_data,
    load_site_file,
    num_clients_for,
)
from shared.ledger import LedgerEvent, PrivacyLedger, dataset_fingerprint
from shared.models import ModelSpec
from shared.preprocess import Scaler
from shared.replies import ReplyStore, weights_digest
from shared.scoring import ResidualScorer
from shared.training import LocalTrainer, TrainSettings, get_trainer, sampling_plan

logger = logging.getLogger(f"fedae.{__name__}")


def model_spec(config: FedaeConfig, spec: DataSpec, scaler: Scaler) -> ModelSpec:
    activation = "sigmoid" if spec.kind == "image" else "linear"
    return ModelSpec(config.model, scaler.model_input_shape, config.latent_dim, activation, config.activation)


def train_settings(config: FedaeConfig, spec: DataSpec) -> TrainSettings:
    return TrainSettings(
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        l2_norm_clip=config.l2_norm_clip,
        denoise_stddev=config.denoise_stddev,
        input_range=(0.0, 1.0) if spec.kind == "image" else None,
        sampling=config.sampling,
        adversarial_epsilon=config.adversarial_training_epsilon,
        adversarial_steps=config.adversarial_training_steps,
        adversarial_target=config.adversarial_training_target,
    )


def planned_event(
    config: FedaeConfig, num_examples: int, server_round: int, sigma: float
) -> privacy.TrainingEvent:
    """The privacy event one local training of this config will be, known before it runs."""
    q, steps = sampling_plan(num_examples, config.batch_size, config.local_epochs, config.sampling)
    return privacy.TrainingEvent(
        server_round, sigma, q, steps, num_examples, config.sampling, config.local_epochs
    )


def planned_releases(config: FedaeConfig, num_examples: int) -> list[privacy.TrainingEvent]:
    """What the client will release after the rounds: with threshold-rule "federated-percentile", one
    histogram of its training rows' scores. Each training's budget check (and "auto" calibration) keeps
    room for it, so a client that trains to its budget can still send its histogram."""
    if config.threshold_rule != "federated-percentile":
        return []
    return [privacy.histogram_event(config.threshold_noise_multiplier, num_examples, config.sampling)]


def noise_multiplier_for(
    config: FedaeConfig,
    num_examples: int,
    server_round: int,
    history: list[privacy.TrainingEvent],
    target_epsilon: float,
) -> float:
    """The configured sigma, or with "auto" the smallest one that keeps this client within its budget
    if it trains in this and every remaining round of the run (history included)."""
    if not config.auto_noise:
        return float(config.noise_multiplier)
    remaining = max(1, config.num_server_rounds - server_round + 1)
    after = planned_releases(config, num_examples)

    def plan(sigma: float) -> list[privacy.TrainingEvent]:
        trainings = [planned_event(config, num_examples, server_round + i, sigma) for i in range(remaining)]
        return [*trainings, *after]

    return privacy.calibrate_noise_multiplier(history, plan, target_epsilon, config.delta, config.accountant)


def make_scaler(config: FedaeConfig, spec: DataSpec, x_calibration: np.ndarray) -> Scaler:
    return Scaler.fit(x_calibration, spec.kind, spec.value_range, flatten=config.model != "conv")


REBUILD_ENV = "FEDAE_REBUILD_TRAINER"


def trainer_for(config: FedaeConfig, spec: DataSpec, scaler: Scaler) -> LocalTrainer:
    from shared.tfenv import configure_tensorflow

    threads = int(os.environ.get("FEDAE_TF_THREADS", "0")) or None
    configure_tensorflow(threads)
    model, settings = model_spec(config, spec, scaler), train_settings(config, spec)
    if os.environ.get(REBUILD_ENV) == "1":
        # Benchmarks only (benchmarks/round_overhead.py): Flower's TensorFlow quickstart pattern, a new
        # Keras session, model and traced functions in every call, measured against the reused trainer.
        from shared.tfenv import load_tensorflow

        load_tensorflow().keras.backend.clear_session()
        return LocalTrainer(model, settings)
    return get_trainer(model, settings)


# Client data a process keeps, least recently used first out past this many bytes. A simulation worker
# serves many virtual clients and a client sampled again (or evaluated after it trained) should not
# regenerate or reread its data; the budget bounds the worker's memory when the federation's data does
# not fit (1,000 fleet clients of 200 rows are 166 MB in all). The runner counts it in each worker's
# memory (simulations.runner.WORKER_MEMORY_GIB).
def _cache_megabytes(name: str = "FEDAE_CLIENT_DATA_CACHE_MB", default: str = "256") -> int:
    raw = os.environ.get(name, default)
    if not raw.strip().isdigit():
        raise ValueError(f"{name} must be a whole number of megabytes (0 or more), got {raw!r}")
    return int(raw)


CLIENT_DATA_CACHE_BYTES = _cache_megabytes() * 2**20
_CLIENT_DATA: OrderedDict[tuple[object, ...], ClientData] = OrderedDict()


def client_data(config: FedaeConfig, client_id: int, site: SiteData | None = None) -> ClientData:
    """The client's data, loaded on first use and kept while the process's cache budget allows: a
    deployed site's own file (``site``), or its part of the run's scenario."""
    if site is not None:
        path = Path(site.path)
        # The file's size and time are in the key: a site that edits its file between rounds trains on
        # the new rows (its ledger composes every event whatever the data, shared.ledger).
        stat = path.stat() if path.exists() else None
        key: tuple[object, ...] = (
            "site-file",
            str(path.resolve()),
            stat and (stat.st_size, stat.st_mtime_ns),
            site.spec,
            config.label_column,
            config.seed,
            client_id,
        )
        return _cached(
            key, lambda: load_site_file(site.path, site.spec, config.label_column, config.seed, client_id)
        )
    key = (
        config.scenario,
        config.seed,
        config.partition,
        config.num_clients,
        config.rows_per_site,
        config.dirichlet_alpha,
        config.data_dir,
        config.label_column,
        config.normal_classes,
        config.batch_size,
        client_id,
    )
    return _cached(key, lambda: load_client_data(config, client_id))


def _cached(key: tuple[object, ...], load: Callable[[], ClientData]) -> ClientData:
    if key in _CLIENT_DATA:
        _CLIENT_DATA.move_to_end(key)
        return _CLIENT_DATA[key]
    data = load()
    _CLIENT_DATA[key] = data
    while len(_CLIENT_DATA) > 1 and sum(map(_nbytes, _CLIENT_DATA.values())) > CLIENT_DATA_CACHE_BYTES:
        _CLIENT_DATA.popitem(last=False)
    return data


def _nbytes(data: ClientData) -> int:
    arrays = (data.x_train, data.x_holdout, data.x_labelled, data.y_labelled)
    return sum(a.nbytes for a in arrays if a is not None)


@dataclass(frozen=True)
class SiteData:
    """A deployed site's own data file (its SuperNode's ``data-file``) and the run's schema for it."""

    path: str
    spec: DataSpec


@dataclass
class TrainOutcome:
    weights: list[np.ndarray]
    num_examples: int
    train_loss: float
    event: privacy.TrainingEvent | None
    epsilon: float | None  # cumulative, None without DP
    fit_seconds: float = 0.0  # the local fit alone, for the round-overhead figures


def train_client(
    config: FedaeConfig,
    spec: DataSpec,
    scaler: Scaler,
    weights: list[np.ndarray],
    client_id: int,
    server_round: int,
    ledger: PrivacyLedger,
    run_id: str,
    target_epsilon: float | None = None,
    site: SiteData | None = None,
) -> TrainOutcome:
    """Local DP-SGD from ``weights``, charged to the client's ledger *before* it trains.

    The round's sampling rate, step count and sigma are known in advance, so the budget check and the
    event's record are one ledger transaction (``PrivacyLedger.charge``): a round that would pass the
    budget records nothing and raises ``BudgetExhausted``; a training that fails after its charge stays
    charged (over-reporting is safe, under-reporting is not). The returned epsilon composes every event
    in the ledger (all rounds of all runs that used it), not this round alone.
    """
    data = client_data(config, client_id, site)
    attack = _attack(config, client_id, site)  # before any charge: a refusal costs nothing
    received_weights = weights
    received = weights_digest(weights) if config.dp_enabled else ""  # what a kept update is keyed by
    if received and (kept := _kept_reply(config, ledger, run_id, server_round, received)) is not None:
        return kept
    target_epsilon = config.target_epsilon if target_epsilon is None else target_epsilon
    sigma, charged, history = 0.0, None, []
    if data.num_examples < config.batch_size:  # before any charge: a clear message, nothing spent
        raise TrainingDataError(
            f"client {client_id}: {data.num_examples} training rows is fewer than batch-size "
            f"{config.batch_size}; lower batch-size or give this client more data"
        )
    if config.dp_enabled:
        privacy.check_delta(config.delta, data.num_examples)
        fingerprint = dataset_fingerprint(data.x_train)

        def plan(recorded: list[LedgerEvent]) -> LedgerEvent:
            # Every event in this client's ledger counts, whatever data it was on: a re-split, re-seeded
            # or slightly edited copy of a site's data is still mostly the same people, so starting it
            # from zero would under-report. The fingerprint is kept with each event for the audit trail.
            past = [e.training_event() for e in recorded]
            _refuse_other_relation(past, config.sampling, client_id)
            sigma = _sigma_within_budget(
                config, data.num_examples, server_round, past, target_epsilon, client_id
            )
            event = planned_event(config, data.num_examples, server_round, sigma)
            return LedgerEvent(
                run_id,
                server_round,
                fingerprint,
                event.num_examples,
                event.noise_multiplier,
                event.sampling_probability,
                event.steps,
                config.l2_norm_clip,
                event.sampling,
                event.epochs,
            )

        recorded, charged = ledger.charge(plan)
        history = [e.training_event() for e in recorded]
        sigma = charged.noise_multiplier
    trainer = trainer_for(config, spec, scaler)
    trainer.set_weights(weights)
    mu = config.proximal_mu if config.strategy == "fedprox" else 0.0
    x_train = scaler.transform(data.x_train)
    rng = np.random.default_rng([config.seed, client_id, server_round, 0xA77])
    if attack == "backdoor":
        trigger = poisoning.make_trigger(spec.kind, spec.input_shape, scaler.model_input_shape, config.seed)
        held = scaler.transform(_attacker_anomalies(config))
        x_train = poisoning.backdoor_rows(x_train, held, trigger, rng)
    fit_started = time.perf_counter()
    result = trainer.fit(x_train, epochs=config.local_epochs, noise_multiplier=sigma, proximal_mu=mu)
    fit_seconds = time.perf_counter() - fit_started
    event = epsilon = None
    if charged is not None:
        event = charged.training_event()
        done = (result.steps, result.sampling_probability, result.sampling, result.epochs)
        if done != (event.steps, event.sampling_probability, event.sampling, event.epochs):
            # Never send weights whose privacy cost differs from the charge (a bug, not bad input).
            raise RuntimeError(f"the fit ran {done}, not the charged {event}; weights withheld")
        epsilon = privacy.cumulative_epsilon([*history, event], config.delta, config.accountant)
    faults.fault_point("trained", client_id)
    weights = faults.faulty_weights(trainer.get_weights(), client_id)
    if attack in poisoning.CLIENT_SIDE:
        weights = poisoning.poison_update(
            attack, received_weights, weights, config.attack_scale, config.attack_noise_std, rng
        )
        logger.info(
            "round %d: client %d sends a %s update (simulated attack)", server_round, client_id, attack
        )
    if charged is not None:
        _keep(ledger, run_id, server_round, received, weights, result.num_examples, result.loss)
    return TrainOutcome(weights, result.num_examples, result.loss, event, epsilon, fit_seconds)


def _refuse_other_relation(past: list[privacy.TrainingEvent], sampling: str, client_id: int) -> None:
    """Poisson events are bounded for add/remove-one, shuffled ones for replace-one: their composition
    holds under neither relation, so no epsilon could be stated (a histogram release is recorded under
    its ledger's relation, ``shared.privacy``)."""
    other = sorted({e.sampling for e in past} - {sampling})
    if other:
        raise privacy.IncompatibleLedger(
            f"client-id={client_id}: its ledger holds {other[0]}-sampling events and this run uses "
            f"sampling {sampling!r}; their bounds hold for different neighbouring relations "
            "and cannot be composed. Use the same sampling as before, or a new state-dir for "
            "data that was never trained on"
        )


@functools.lru_cache(maxsize=1)
def _attacker_anomalies(config: FedaeConfig) -> np.ndarray:
    """A simulated backdoor attacker's anomalies (half the test pool's), built once per process: the
    fleet's test data takes seconds to generate, and the attacker trains in every round."""
    server = load_server_data(config)
    return poisoning.attacker_anomalies(server.x_test, server.y_test)


def _attack(config: FedaeConfig, client_id: int, site: SiteData | None = None) -> str:
    """The simulated attack this client runs ("none" for an honest one): attack-fraction of the clients,
    the same seeded choice on every side (shared.attacks.poisoning). A deployed site (its own data file)
    refuses any: a server's run config must not turn a real site into an attacker."""
    if config.attack == "none":
        return "none"
    if site is not None:
        raise ConfigError(
            f"the run config asks for the simulated attack {config.attack!r}; a deployed site never runs one"
        )
    chosen = poisoning.malicious_clients(num_clients_for(config), config.attack_fraction, config.seed)
    return config.attack if client_id in chosen else "none"


def _kept_reply(
    config: FedaeConfig, ledger: PrivacyLedger, run_id: str, server_round: int, received: str
) -> TrainOutcome | None:
    """This round's update again, if the ledger paid for it and it was kept for the same global model
    (the server restarted mid-round and asks again): sending it again costs no privacy (shared.replies)."""
    events = ledger.events()
    charged = [
        e for e in events if e.run_id == run_id and e.round == server_round and e.mechanism == "dp-sgd"
    ]
    if not charged:
        return None
    kept = ReplyStore(ledger.path).find(run_id, server_round, received)
    if kept is None:
        logger.warning(
            "round %d of run %s was charged before but its update was not kept; training it again is a "
            "new release and is charged again",
            server_round,
            run_id,
        )
        return None
    history = [e.training_event() for e in events]
    epsilon = privacy.cumulative_epsilon(history, config.delta, config.accountant)
    logger.info("round %d of run %s: sending the kept update again (already charged)", server_round, run_id)
    return TrainOutcome(
        kept.weights, kept.num_examples, kept.train_loss, charged[-1].training_event(), epsilon
    )


def _keep(ledger: PrivacyLedger, run_id: str, server_round: int, received: str, *update: object) -> None:
    """Keep the update for a repeated ask; best effort: without it a repeat is trained and charged again
    (over-reporting), which is no reason to withhold a paid-for update now."""
    try:
        ReplyStore(ledger.path).keep(run_id, server_round, received, *update)  # type: ignore[arg-type]
    except OSError as err:
        logger.warning("round %d: the update could not be kept for a repeated ask (%s)", server_round, err)


def _sigma_within_budget(
    config: FedaeConfig,
    num_examples: int,
    server_round: int,
    history: list[privacy.TrainingEvent],
    target_epsilon: float,
    client_id: int,
) -> float:
    """This round's sigma (configured or calibrated); raises ``BudgetExhausted`` if the round would
    take the client past ``target-epsilon`` (0: no budget)."""
    if config.auto_noise:
        try:
            sigma = noise_multiplier_for(config, num_examples, server_round, history, target_epsilon)
        except privacy.CalibrationError as err:
            current = privacy.cumulative_epsilon(history, config.delta, config.accountant)
            raise privacy.BudgetExhausted(
                client_id, current, float("inf"), target_epsilon, config.delta, str(err)
            ) from err
        logger.debug("client %d round %d: calibrated noise multiplier %.4f", client_id, server_round, sigma)
    else:
        sigma = float(config.noise_multiplier)
    if target_epsilon > 0:
        planned = planned_event(config, num_examples, server_round, sigma)
        reserved = planned_releases(config, num_examples)
        projected = privacy.cumulative_epsilon(
            [*history, planned, *reserved], config.delta, config.accountant
        )
        if projected > target_epsilon:
            current = privacy.cumulative_epsilon(history, config.delta, config.accountant)
            why = (
                f"this round and the threshold histogram it keeps room for would take it to {projected:.4f}, "
                f"above its target-epsilon {target_epsilon:g}"
                if reserved
                else ""
            )
            raise privacy.BudgetExhausted(client_id, current, projected, target_epsilon, config.delta, why)
    return sigma


@dataclass
class HistogramOutcome:
    """A client's threshold release: the noisy counts that leave it, and what they cost."""

    counts: np.ndarray  # bins + 2 noisy counts (shared.federated_threshold)
    num_examples: int
    release_epsilon: float  # this release alone
    epsilon: float  # the whole ledger, this release included


def threshold_histogram(
    config: FedaeConfig,
    spec: DataSpec,
    scaler: Scaler,
    weights: list[np.ndarray],
    scorer: ResidualScorer,
    client_id: int,
    ledger: PrivacyLedger,
    run_id: str,
    target_epsilon: float | None = None,
    site: SiteData | None = None,
    rng: np.random.Generator | None = None,
) -> HistogramOutcome:
    """The federated threshold's release: the noisy histogram of this client's training-row scores.

    The rows are the array DP-SGD trained on (``data.x_train``), so the release is filed under the same
    data fingerprint and composes with the trainings in one epsilon. Scoring comes first (a data error
    costs nothing); then the budget check and the event's record are one ledger transaction, as for a
    training (``BudgetExhausted`` if the release would pass ``target-epsilon``, nothing recorded); only
    then is the noise drawn, so no noisy count exists that the ledger has not paid for.
    """
    from shared import federated_threshold
    from shared.models import residuals

    data = client_data(config, client_id, site)
    target_epsilon = config.target_epsilon if target_epsilon is None else target_epsilon
    sigma, n = config.threshold_noise_multiplier, data.num_examples
    try:
        privacy.check_delta(config.delta, n)
    except ValueError as err:
        raise privacy.IncompatibleLedger(f"client-id={client_id}: {err}") from err
    trainer = trainer_for(config, spec, scaler)
    shapes = [tuple(np.shape(w)) for w in weights]
    expected = [tuple(w.shape) for w in trainer.get_weights()]
    if shapes != expected:
        raise ValueError(f"the model sent has weight shapes {shapes}, this run's model {expected}")
    trainer.set_weights(weights)
    scores = scorer.score(residuals(trainer.model, trainer.spec, scaler.transform(data.x_train)))
    counts = federated_threshold.count_scores(scores, config.threshold_bins)
    release = privacy.histogram_event(sigma, n, config.sampling)
    fingerprint = dataset_fingerprint(data.x_train)

    def plan(recorded: list[LedgerEvent]) -> LedgerEvent:
        past = [e.training_event() for e in recorded]
        _refuse_other_relation(past, config.sampling, client_id)
        if target_epsilon > 0:
            projected = privacy.cumulative_epsilon([*past, release], config.delta, config.accountant)
            if projected > target_epsilon:
                current = privacy.cumulative_epsilon(past, config.delta, config.accountant)
                why = (
                    f"its threshold histogram would take it to {projected:.4f}, above its target-epsilon "
                    f"{target_epsilon:g}"
                )
                raise privacy.BudgetExhausted(
                    client_id, current, projected, target_epsilon, config.delta, why
                )
        # l2_norm_clip: one row's contribution is a one-hot count vector, L2 norm 1 (the relation's
        # sensitivity follows from it, as DP-SGD's follows from its clipping norm).
        return LedgerEvent(run_id, 0, fingerprint, n, sigma, 1.0, 1, 1.0, config.sampling, 1, "histogram")

    recorded, _ = ledger.charge(plan)
    noisy = federated_threshold.add_noise(counts, sigma, rng)
    faults.fault_point("released", client_id)  # durability tests: die after the charge, before the reply
    history = [e.training_event() for e in recorded]
    return HistogramOutcome(
        noisy,
        n,
        privacy.cumulative_epsilon([release], config.delta, config.accountant),
        privacy.cumulative_epsilon([*history, release], config.delta, config.accountant),
    )


def evaluate_client(
    config: FedaeConfig,
    spec: DataSpec,
    scaler: Scaler,
    weights: list[np.ndarray],
    client_id: int,
    site: SiteData | None = None,
) -> dict[str, float]:
    """Reconstruction loss on the client's held-out rows, and ROC-AUC where it has labelled rows."""
    from sklearn.metrics import roc_auc_score

    from shared.models import reconstruction_errors

    data = client_data(config, client_id, site)
    trainer = trainer_for(config, spec, scaler)
    trainer.set_weights(weights)
    metrics = {
        "eval-loss": trainer.mean_loss(scaler.transform(data.x_holdout)),
        "num-examples": float(len(data.x_holdout)),
    }
    # Every client sends the same keys (Flower refuses replies whose metric keys differ): NaN where it has
    # no labelled anomalies, and the server averages only the finite ones.
    metrics["auc"] = float("nan")
    if data.x_labelled is not None and data.y_labelled is not None and len(np.unique(data.y_labelled)) == 2:
        scores = reconstruction_errors(trainer.model, trainer.spec, scaler.transform(data.x_labelled))
        metrics["auc"] = float(roc_auc_score(data.y_labelled, scores))
    return metrics
