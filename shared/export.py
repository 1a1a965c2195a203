"""The bundle's serving exports: a TensorFlow SavedModel and TFLite files that score raw rows end to end.

``model.keras`` alone needs fedae to turn raw rows into scores (scaler, residual score, threshold). The
exports here fold all of that into one TensorFlow function, so TensorFlow Serving (SavedModel) or a
TFLite interpreter on a device scores raw rows with nothing else installed:

``score(x: float32[rows, *raw_shape]) -> {"score": float32[rows], "anomaly": int32[rows]}``

with ``anomaly = score > threshold``, the same rule as ``Detector.predict``. The SavedModel's signature is
``serving_default``; the TFLite files keep it, so ``Interpreter.get_signature_runner()`` returns named
outputs.

TFLite comes in two quantised forms. ``float16`` stores the weights as float16 and computes in float32.
``int8`` runs the autoencoder's layers in int8 (the scaler and the score stay float32), which needs a
representative dataset to set each tensor's range. It is never a client's rows. A run passes the
coordinator's own normal calibration rows, which already fix the bundle's scaler, score scales and
threshold; ``fedae bundle export --representative FILE`` takes a file the operator may use (public or
their own). Without either, **synthetic** draws in the model's scaled input space (standard normal per
feature for standardised tables, uniform in [0, 1] for images), mapped back with the bundle's scaler:
no one's data, but independent features are far from a real table's, so int8 ranges set on them fit
real rows poorly (docs/DEPLOYMENT.md has the measured figures). How far each TFLite file's scores are
from the float model's, on rows the int8 ranges were not set on, is written to the bundle's metadata,
so a deployer can judge a file before using it.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # shared.detector writes the exports: a runtime import would be circular
    from shared.detector import Detector

logger = logging.getLogger("fedae.export")

SAVED_MODEL = "saved_model"
TFLITE_FILES = {"tflite-float16": "model_float16.tflite", "tflite-int8": "model_int8.tflite"}
EXPORT_KINDS = ("savedmodel", *TFLITE_FILES)
EXPORT_ENTRIES = (SAVED_MODEL, *TFLITE_FILES.values())  # what the exports add to a bundle folder
SIGNATURE = "serving_default"
REPRESENTATIVE_ROWS = 200  # int8 calibration draws; more changes the ranges little and slows the export
AGREEMENT_ROWS = 500
# TFLite ops of the scaler, the residual score and the flag: kept in float32 in the int8 export.
FLOAT_OPS = [
    "SUB",
    "MUL",
    "DIV",
    "ADD",
    "EXP",
    "SQUARE",
    "SQUARED_DIFFERENCE",
    "REDUCE_MAX",
    "MEAN",
    "SUM",
    "GREATER",
    "CAST",
    "RESHAPE",
]  # synthetic rows the TFLite scores are compared with the float model's on


def parse_exports(text: str) -> tuple[str, ...]:
    """``"savedmodel,tflite-int8"`` -> the kinds, in EXPORT_KINDS order; ``""`` or ``"none"``: none."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if names == ["none"]:
        return ()
    unknown = [name for name in names if name not in EXPORT_KINDS]
    if unknown:
        raise ValueError(
            f"unknown bundle export(s) {', '.join(map(repr, unknown))}; choose from {', '.join(EXPORT_KINDS)}"
            " (comma-separated) or 'none'"
        )
    return tuple(kind for kind in EXPORT_KINDS if kind in names)


def scoring_module(detector: Detector) -> Any:
    """A ``tf.Module`` whose ``score`` maps raw rows to scores and flags, as ``Detector.predict`` does."""
    from shared.models import tf

    spec, scaler, scorer = detector.spec, detector.scaler, detector.scorer
    raw_shape = tuple(int(v) for v in scaler.input_shape)
    model_shape = tuple(int(v) for v in scaler.model_input_shape)

    class ScoringModule(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="fedae_detector")
            self.model = detector.model
            self.offset = tf.constant(scaler.offset, tf.float32)
            self.scale = tf.constant(scaler.scale, tf.float32)
            self.threshold = tf.constant(detector.threshold, tf.float32)
            scale = scorer.scale if scorer.scale is not None else np.ones(int(np.prod(model_shape)))
            self.residual_scale = tf.constant(np.asarray(scale, np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, *raw_shape], tf.float32, name="x")])
        def score(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            z = tf.reshape((x - self.offset) / self.scale, [-1, *model_shape])
            if spec.kind == "vae":  # the posterior mean, as shared.models.reconstruct decodes
                eps = tf.zeros([tf.shape(z)[0], spec.latent_dim], tf.float32)
                reconstruction = self.model([z, eps], training=False)[:, : model_shape[0]]
            else:
                reconstruction = self.model(z, training=False)
            squared = tf.reshape(tf.square(z - reconstruction), [tf.shape(z)[0], -1])
            if scorer.rule == "mse":
                value = tf.reduce_mean(squared, axis=1)
            elif scorer.rule == "standardized":
                value = tf.reduce_mean(squared / self.residual_scale, axis=1)
            else:  # max-standardized
                value = tf.reduce_max(squared / self.residual_scale, axis=1)
            return {"score": value, "anomaly": tf.cast(value > self.threshold, tf.int32)}

    return ScoringModule()


def export_saved_model(detector: Detector, folder: str | Path) -> Path:
    """Write the SavedModel (signature ``serving_default``) to ``folder``, replacing an earlier one."""
    from shared.models import tf

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    module = scoring_module(detector)
    tf.saved_model.save(module, str(folder), signatures={SIGNATURE: module.score})
    return folder


def synthetic_rows(detector: Detector, rows: int, seed: int) -> np.ndarray:
    """Raw-unit rows drawn in the model's scaled input space: no one's data (see the module docstring)."""
    rng = np.random.default_rng(seed)
    shape = (rows, *detector.scaler.input_shape)
    if detector.spec.output_activation == "sigmoid":  # inputs scaled to [0, 1] (images)
        scaled = rng.uniform(0.0, 1.0, size=shape)
    else:  # standardised tables
        scaled = rng.standard_normal(size=shape)
    return (detector.scaler.offset + detector.scaler.scale * scaled).astype(np.float32)


@dataclass(frozen=True)
class Representative:
    """Rows that set the int8 export's tensor ranges (``calibration``) and rows, disjoint from them, that
    its agreement with the float model is measured on (``check``), with where they came from."""

    calibration: np.ndarray
    check: np.ndarray
    source: str

    @classmethod
    def synthetic(cls, detector: Detector) -> Representative:
        return cls(
            synthetic_rows(detector, REPRESENTATIVE_ROWS, seed=0),
            synthetic_rows(detector, AGREEMENT_ROWS, seed=1),
            "synthetic rows drawn in the model's scaled input space (no one's data)",
        )

    @classmethod
    def from_rows(cls, rows: np.ndarray, source: str, seed: int = 0) -> Representative:
        """A seeded split of ``rows`` (raw units): at most half of them calibrate, up to AGREEMENT_ROWS of
        the others are checked on."""
        rows = np.asarray(rows, np.float32)
        if len(rows) < 2:
            raise ValueError(f"representative data needs at least 2 rows, got {len(rows)}")
        order = np.random.default_rng(seed).permutation(len(rows))
        cut = min(REPRESENTATIVE_ROWS, len(rows) // 2)
        return cls(rows[order[:cut]], rows[order[cut : cut + AGREEMENT_ROWS]], source)


def convert_tflite(
    saved_model: str | Path,
    detector: Detector,
    quantization: str,
    representative: Representative | None = None,
) -> bytes:
    """TFLite bytes of the SavedModel's scoring function, ``float16`` or ``int8`` quantised (int8 with
    ``representative``'s calibration rows; synthetic ones when None)."""
    from shared.models import tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=[SIGNATURE])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif quantization != "int8":
        raise ValueError(f"TFLite quantization must be 'float16' or 'int8', got {quantization!r}")
    with warnings.catch_warnings():  # int8 calibration runs tf.lite.Interpreter: the same LiteRT notice
        warnings.filterwarnings("ignore", "(?s).*tf.lite.Interpreter is deprecated", UserWarning)
        if quantization == "float16":
            return converter.convert()
        draws = (representative or Representative.synthetic(detector)).calibration

        def representative() -> Any:
            for row in draws:
                yield {"x": row[None]}

        converter.representative_dataset = representative
        # The autoencoder's layers in int8, the scaler and the score in float: quantising the score to
        # 8 bits over the wide range of squared residuals made it useless (median relative error 2.3 and
        # no flag right on a trained fleet model), while this split measures about 4e-3. TFLite's
        # converter has no per-op switch; its quantisation debugger's deny-list is the supported way.
        # Inputs and outputs stay float32, so the file is called exactly like the float16 one.
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter,
            debug_dataset=representative,
            debug_options=tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=FLOAT_OPS),
        )
        return debugger.get_nondebug_quantized_model()


def tflite_scores(path: str | Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores and flags of raw rows ``x`` from a TFLite export (one interpreter call per row)."""
    from shared.models import tf

    with warnings.catch_warnings():  # tf.lite.Interpreter's notice that LiteRT will replace it
        warnings.simplefilter("ignore", UserWarning)
        interpreter = tf.lite.Interpreter(model_path=str(path))
    runner = interpreter.get_signature_runner(SIGNATURE)
    scores, flags = [], []
    # Row by row: the converted signature has a fixed batch of one (the representative draws' shape).
    for row in np.asarray(x, np.float32):
        out = runner(x=row[None])
        scores.append(float(out["score"][0]))
        flags.append(int(out["anomaly"][0]))
    return np.asarray(scores), np.asarray(flags, np.int64)


def agreement(detector: Detector, path: str | Path, x: np.ndarray, data: str) -> dict[str, Any]:
    """How a TFLite export's scores differ from the float model's on the raw rows ``x``."""
    reference = detector.score(x)
    scores, flags = tflite_scores(path, x)
    relative = np.abs(scores - reference) / np.maximum(np.abs(reference), 1e-12)
    return {
        "rows": len(x),
        "data": data,
        "median_relative_error": float(np.median(relative)),
        "p99_relative_error": float(np.quantile(relative, 0.99)),
        "flag_agreement": float(np.mean(flags == (reference > detector.threshold))),
    }


def write_exports(
    detector: Detector,
    folder: str | Path,
    kinds: tuple[str, ...],
    representative: Representative | None = None,
) -> dict[str, Any]:
    """Write the exports ``kinds`` into the bundle ``folder``; return what the metadata records of them.
    ``representative``: the int8 export's calibration rows (synthetic ones when None).

    TFLite is converted from the SavedModel, which is written first (and removed again afterwards when
    it was not asked for itself)."""
    folder = Path(folder)
    for entry in EXPORT_ENTRIES:  # an earlier export would describe an earlier model
        path = folder / entry
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    if not kinds:
        return {}
    from shared.models import tf

    records: dict[str, Any] = {}
    representative = representative or Representative.synthetic(detector)
    check, check_data = (
        representative.check,
        f"other rows than the int8 calibration rows: {representative.source}",
    )
    if len(check) == 0:
        check, check_data = Representative.synthetic(detector).check, "synthetic rows (seed 1)"
    saved_model = export_saved_model(detector, folder / SAVED_MODEL)
    if "savedmodel" in kinds:
        records["savedmodel"] = {
            "path": SAVED_MODEL,
            "signature": SIGNATURE,
            "input": {"x": ["float32", [None, *detector.scaler.input_shape]]},
            "outputs": {"score": "float32[rows]", "anomaly": "int32[rows] (score > threshold)"},
            "tensorflow": tf.__version__,
        }
    for kind, name in TFLITE_FILES.items():
        if kind not in kinds:
            continue
        quantization = kind.removeprefix("tflite-")
        (folder / name).write_bytes(convert_tflite(saved_model, detector, quantization, representative))
        records[kind] = {
            "path": name,
            "signature": SIGNATURE,
            "quantization": quantization,
            "input": {"x": ["float32", [1, *detector.scaler.input_shape]]},
            **(
                {"representative_data": f"{len(representative.calibration)} {representative.source}"}
                if quantization == "int8"
                else {}
            ),
            "agreement_with_float_model": agreement(detector, folder / name, check, check_data),
        }
        logger.info("%s: %s", name, records[kind]["agreement_with_float_model"])
    if "savedmodel" not in kinds:
        shutil.rmtree(saved_model)
    return records
