"""Central, non-private one-class detection on scikit-learn's digits: each digit in turn is normal.

The reference for how good the autoencoder can be on `digits` before federation and DP: for each of the
ten classes, train on that class's client share (the pooled training rows of the `digits` scenario),
score the scenario's test split (held-out images of that class vs all other digits) by mean squared
reconstruction error (the seed's score), and compare with PCA reconstruction error. Usage:

    uv run python -m simulations.one_class_digits [--model conv|dense|vae] [--epochs 100]
"""

from __future__ import annotations

import shared.tfenv  # noqa: F401  (import-time switches before TensorFlow: keep first)

# isort: split

import argparse
import dataclasses

import numpy as np
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score

from shared.config import FedaeConfig
from shared.data.sources import load_client_data, load_server_data
from shared.models import reconstruction_errors
from shared.task import make_scaler, model_spec, train_settings
from shared.training import LocalTrainer
from simulations import scenarios


def one_class_aucs(model: str, epochs: int, seed: int = 0) -> list[tuple[int, float, float]]:
    """(class, autoencoder AUC, PCA AUC) for each digit as the normal class."""
    base = FedaeConfig().with_overrides(scenarios.overrides("digits")).replace(model=model, seed=seed)
    rows = []
    for digit in range(10):
        config = base.replace(normal_classes=str(digit))
        server = load_server_data(config)
        scaler = make_scaler(config, server.spec, server.x_calibration)
        pool = scaler.transform(
            np.concatenate([load_client_data(config, c).x_train for c in range(config.num_clients)])
        )
        x_test = scaler.transform(server.x_test)
        settings = train_settings(config, server.spec)
        plain = dataclasses.replace(settings, l2_norm_clip=0.0)
        trainer = LocalTrainer(model_spec(config, server.spec, scaler), plain)
        trainer.fit(pool, epochs=epochs, seed=seed)
        ae_auc = roc_auc_score(server.y_test, reconstruction_errors(trainer.model, trainer.spec, x_test))
        flat_pool, flat_test = pool.reshape(len(pool), -1), x_test.reshape(len(x_test), -1)
        pca = PCA(n_components=8, random_state=seed).fit(flat_pool)
        pca_errors = np.mean((flat_test - pca.inverse_transform(pca.transform(flat_test))) ** 2, axis=1)
        rows.append((digit, float(ae_auc), float(roc_auc_score(server.y_test, pca_errors))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="conv", choices=["conv", "dense", "vae"])
    parser.add_argument("--epochs", type=int, default=100)
    args = parser.parse_args()
    rows = one_class_aucs(args.model, args.epochs)
    print(f"| normal digit | {args.model} AE ROC-AUC | PCA(8) ROC-AUC |")
    print("| --- | --- | --- |")
    for digit, ae, pca in rows:
        print(f"| {digit} | {ae:.4f} | {pca:.4f} |")
    print(f"| **mean** | **{np.mean([r[1] for r in rows]):.4f}** | **{np.mean([r[2] for r in rows]):.4f}** |")


if __name__ == "__main__":
    main()
