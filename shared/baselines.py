"""Reference detectors for the report's comparison table, on the same test split as the federated model:
the same autoencoder trained centrally without DP on the pooled client data (possible only in
simulation, where one process can see every client), and scikit-learn's IsolationForest."""

from __future__ import annotations

import numpy as np
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score

from shared.models import ModelSpec, reconstruction_errors
from shared.training import LocalTrainer, TrainSettings


def central_autoencoder_auc(
    spec: ModelSpec,
    settings: TrainSettings,
    x_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    epochs: int,
    seed: int = 0,
) -> float:
    """ROC-AUC of the autoencoder trained on pooled data without DP (no clipping, no noise)."""
    plain = TrainSettings(
        settings.batch_size, settings.learning_rate, 0.0, 0.0, settings.denoise_stddev, settings.input_range
    )
    trainer = LocalTrainer(spec, plain)
    trainer.fit(x_train, epochs=epochs, seed=seed)
    return float(roc_auc_score(y_test, reconstruction_errors(trainer.model, spec, x_test)))


def isolation_forest_auc(x_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, seed: int = 0) -> float:
    forest = IsolationForest(n_estimators=200, random_state=seed)
    forest.fit(x_train.reshape(len(x_train), -1))
    # score_samples is high for normal points; negate so that high means anomalous.
    return float(roc_auc_score(y_test, -forest.score_samples(x_test.reshape(len(x_test), -1))))
