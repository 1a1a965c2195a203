"""What one client does in a round, and how the server scores a model: plain functions, no Flower.

The ClientApp and ServerApp translate Flower messages to and from these functions.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from shared import privacy
from shared.config import FedaeConfig
from shared.data.sources import ClientData, DataSpec, load_client_data
from shared.ledger import LedgerEvent, PrivacyLedger, dataset_fingerprint
from shared.models import ModelSpec
from shared.preprocess import Scaler
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
    )


def planned_event(
    config: FedaeConfig, num_examples: int, server_round: int, sigma: float
) -> privacy.TrainingEvent:
    """The privacy event one local training of this config will be, known before it runs."""
    q, steps = sampling_plan(num_examples, config.batch_size, config.local_epochs, config.sampling)
    return privacy.TrainingEvent(
        server_round, sigma, q, steps, num_examples, config.sampling, config.local_epochs
    )


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

    def plan(sigma: float) -> list[privacy.TrainingEvent]:
        return [planned_event(config, num_examples, server_round + i, sigma) for i in range(remaining)]

    return privacy.calibrate_noise_multiplier(history, plan, target_epsilon, config.delta, config.accountant)


def make_scaler(config: FedaeConfig, spec: DataSpec, x_calibration: np.ndarray) -> Scaler:
    return Scaler.fit(x_calibration, spec.kind, spec.value_range, flatten=config.model != "conv")


def trainer_for(config: FedaeConfig, spec: DataSpec, scaler: Scaler) -> LocalTrainer:
    from shared.tfenv import configure_tensorflow

    threads = int(os.environ.get("FEDAE_TF_THREADS", "0")) or None
    configure_tensorflow(threads)
    return get_trainer(model_spec(config, spec, scaler), train_settings(config, spec))


_CLIENT_DATA: dict[tuple[object, ...], ClientData] = {}


def client_data(config: FedaeConfig, client_id: int) -> ClientData:
    """The client's data, loaded once per process (a simulation worker serves many clients)."""
    key = (
        config.scenario,
        config.seed,
        config.partition,
        config.num_clients,
        config.dirichlet_alpha,
        config.data_dir,
        config.label_column,
        config.normal_classes,
        config.batch_size,
        client_id,
    )
    if key not in _CLIENT_DATA:
        if len(_CLIENT_DATA) > 64:  # bound memory when a worker serves many virtual clients
            _CLIENT_DATA.clear()
        _CLIENT_DATA[key] = load_client_data(config, client_id)
    return _CLIENT_DATA[key]


@dataclass
class TrainOutcome:
    weights: list[np.ndarray]
    num_examples: int
    train_loss: float
    event: privacy.TrainingEvent | None
    epsilon: float | None  # cumulative, None without DP


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
) -> TrainOutcome:
    """Local DP-SGD from ``weights``; the event is in the ledger before the weights are returned.

    The returned epsilon composes every event in the client's ledger (all rounds of all runs that used
    it), not this round alone.
    """
    data = client_data(config, client_id)
    target_epsilon = config.target_epsilon if target_epsilon is None else target_epsilon
    sigma = 0.0
    if config.dp_enabled:
        privacy.check_delta(config.delta, data.num_examples)
        # Every event in this client's ledger counts, whatever data it was on: a re-split, re-seeded or
        # slightly edited copy of a site's data is still mostly the same people, so starting it from
        # zero would under-report. The fingerprint is kept with each event for the audit trail.
        history = [e.training_event() for e in ledger.events()]
        fingerprint = dataset_fingerprint(data.x_train)
        if config.auto_noise:
            try:
                sigma = noise_multiplier_for(config, data.num_examples, server_round, history, target_epsilon)
            except privacy.CalibrationError as err:
                current = privacy.cumulative_epsilon(history, config.delta, config.accountant)
                raise privacy.BudgetExhausted(
                    client_id, current, float("inf"), target_epsilon, config.delta, str(err)
                ) from err
            logger.debug(
                "client %d round %d: calibrated noise multiplier %.4f", client_id, server_round, sigma
            )
        else:
            sigma = float(config.noise_multiplier)
        if target_epsilon > 0:
            # The round's sampling rate and step count are known before training: check the epsilon
            # the client would have afterwards, and refuse to spend past the budget.
            planned = planned_event(config, data.num_examples, server_round, sigma)
            projected = privacy.cumulative_epsilon([*history, planned], config.delta, config.accountant)
            if projected > target_epsilon:
                current = privacy.cumulative_epsilon(history, config.delta, config.accountant)
                raise privacy.BudgetExhausted(client_id, current, projected, target_epsilon, config.delta)
    trainer = trainer_for(config, spec, scaler)
    trainer.set_weights(weights)
    mu = config.proximal_mu if config.strategy == "fedprox" else 0.0
    result = trainer.fit(
        scaler.transform(data.x_train), epochs=config.local_epochs, noise_multiplier=sigma, proximal_mu=mu
    )
    event = epsilon = None
    if config.dp_enabled:
        recorded = LedgerEvent(
            run_id,
            server_round,
            fingerprint,
            result.num_examples,
            result.noise_multiplier,
            result.sampling_probability,
            result.steps,
            config.l2_norm_clip,
            result.sampling,
            result.epochs,
        )
        ledger.record(recorded)
        event = recorded.training_event()
        epsilon = privacy.cumulative_epsilon([*history, event], config.delta, config.accountant)
    return TrainOutcome(trainer.get_weights(), result.num_examples, result.loss, event, epsilon)


def evaluate_client(
    config: FedaeConfig, spec: DataSpec, scaler: Scaler, weights: list[np.ndarray], client_id: int
) -> dict[str, float]:
    """Reconstruction loss on the client's held-out rows, and ROC-AUC where it has labelled rows."""
    from sklearn.metrics import roc_auc_score

    from shared.models import reconstruction_errors

    data = client_data(config, client_id)
    trainer = trainer_for(config, spec, scaler)
    trainer.set_weights(weights)
    metrics = {
        "eval-loss": trainer.mean_loss(scaler.transform(data.x_holdout)),
        "num-examples": float(len(data.x_holdout)),
    }
    if data.x_labelled is not None and data.y_labelled is not None and len(np.unique(data.y_labelled)) == 2:
        scores = reconstruction_errors(trainer.model, trainer.spec, scaler.transform(data.x_labelled))
        metrics["auc"] = float(roc_auc_score(data.y_labelled, scores))
    return metrics
