"""Reference detectors for the report's comparison table, on the same test split as the federated model:
the same autoencoder trained centrally without DP on the pooled client data (possible only in
simulation, where one process can see every client), and scikit-learn's IsolationForest."""

from __future__ import annotations

import dataclasses

import numpy as np
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score

from shared.config import FedaeConfig
from shared.models import ModelSpec
from shared.training import LocalTrainer, TrainSettings


def central_autoencoder_auc(
    config: FedaeConfig,
    spec: ModelSpec,
    settings: TrainSettings,
    x_train: np.ndarray,
    x_calibration: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    epochs: int,
) -> float:
    """ROC-AUC of the autoencoder trained on pooled data without DP (no clipping, no noise), scored with
    the run's anomaly score, fitted on the same calibration rows as the federated detector's."""
    from shared.pipeline import fit_and_score

    plain = dataclasses.replace(settings, l2_norm_clip=0.0)
    trainer = LocalTrainer(spec, plain)
    trainer.fit(x_train, epochs=epochs, seed=config.seed)
    _, _, scores = fit_and_score(config, trainer.model, spec, x_calibration, x_test)
    return float(roc_auc_score(y_test, scores))


def isolation_forest_auc(x_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, seed: int = 0) -> float:
    forest = IsolationForest(n_estimators=200, random_state=seed)
    forest.fit(x_train.reshape(len(x_train), -1))
    # score_samples is high for normal points; negate so that high means anomalous.
    return float(roc_auc_score(y_test, -forest.score_samples(x_test.reshape(len(x_test), -1))))
