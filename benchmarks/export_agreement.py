"""How far the bundle's SavedModel and TFLite exports score from the Keras detector, on real test rows.

Not a speed benchmark: the accuracy cost of each export (docs/DETECTOR.md's table). It copies the
bundle, writes every export into the copy twice (int8 ranges from the run's calibration rows, then from
synthetic rows) and scores the scenario's labelled test rows through each.

    uv run fedae simulate --out /tmp/r
    uv run python benchmarks/export_agreement.py /tmp/r/bundle \
        --json benchmarks/results/export_agreement.json
"""

from __future__ import annotations

import shared.tfenv  # noqa: F401  (import-time switches before TensorFlow: keep first)

# isort: split

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from shared.config import FedaeConfig
from shared.data.sources import load_server_data
from shared.detector import load_bundle, save_bundle
from shared.export import EXPORT_KINDS, Representative, tflite_scores
from shared.models import tf


def _compare(
    scores: np.ndarray, flags: np.ndarray, reference: np.ndarray, threshold: float
) -> dict[str, Any]:
    relative = np.abs(scores - reference) / np.maximum(np.abs(reference), 1e-12)
    return {
        "median_relative_error": float(np.median(relative)),
        "p99_relative_error": float(np.quantile(relative, 0.99)),
        "max_relative_error": float(relative.max()),
        "flag_agreement": float(np.mean(flags == (reference > threshold))),
        "spearman": float(stats.spearmanr(scores, reference).statistic),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="a run's bundle folder (its run config names the scenario)")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()

    detector = load_bundle(args.bundle)
    config = FedaeConfig.from_run_config(detector.metadata["training_run"]["run_config"])
    data = load_server_data(config)
    x = data.x_test.astype(np.float32)
    reference = detector.score(x)
    results: dict[str, Any] = {"bundle": args.bundle, "bundle_id": detector.bundle_id, "rows": len(x)}
    with tempfile.TemporaryDirectory() as scratch:
        for label, representative in (
            ("calibration", Representative.from_rows(data.x_calibration, "calibration rows")),
            ("synthetic", None),
        ):
            copy = Path(scratch) / label
            shutil.copytree(args.bundle, copy)
            save_bundle(detector, copy, EXPORT_KINDS, representative)
            if label == "calibration":
                serve = tf.saved_model.load(str(copy / "saved_model")).signatures["serving_default"]
                out = serve(x=tf.constant(x))
                results["savedmodel"] = _compare(
                    out["score"].numpy(), out["anomaly"].numpy(), reference, detector.threshold
                )
                results["tflite-float16"] = _compare(
                    *tflite_scores(copy / "model_float16.tflite", x), reference, detector.threshold
                )
            results[f"tflite-int8 ({label} ranges)"] = _compare(
                *tflite_scores(copy / "model_int8.tflite", x), reference, detector.threshold
            )
    print(f"{len(x)} test rows of {config.scenario}, bundle {detector.bundle_id}")
    print(f"{'export':34s} {'median rel':>11s} {'p99 rel':>9s} {'flags equal':>12s} {'spearman':>9s}")
    for name, row in results.items():
        if isinstance(row, dict):
            print(
                f"{name:34s} {row['median_relative_error']:11.2e} {row['p99_relative_error']:9.2e} "
                f"{row['flag_agreement']:12.2%} {row['spearman']:9.4f}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
