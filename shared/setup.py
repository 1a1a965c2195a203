"""The run setup the server sends with every message: config, data spec and scaler, as flat values.

Flower's ``ConfigRecord`` holds scalars and lists of scalars; these functions turn the typed objects
into such a mapping and back, so the glue code only wraps the mapping in a record.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.config import FedaeConfig
from shared.data.sources import DataSpec
from shared.preprocess import Scaler
from shared.scoring import ResidualScorer

_PREFIX = "fedae."
# Train-reply metric every client sets to 1.0: client-level DP aggregates by it, so that each client
# weighs the same (Flower's accountant covers only the uniformly weighted mean).
UNIT_WEIGHT = "dp-weight"

# Error code of a client's reply when its own data cannot be used (missing or malformed data-file, wrong
# schema, too few rows): the message names the site, the file and the problem, and reaches the server log.
DATA_ERROR = 4210

# A client's train-reply metric under SecAgg+: how many of its weights the quantisation clipped.
SECAGG_CLIPPED = "secagg-clipped"


RUN_KEY = f"{_PREFIX}run-key"

# The federated threshold's query (threshold-rule "federated-percentile"): Flower message type
# "query.<THRESHOLD_QUERY>", and the error code of a query whose content cannot be used.
THRESHOLD_QUERY = "threshold"
BAD_QUERY = 4211


def encode_setup(config: FedaeConfig, spec: DataSpec, scaler: Scaler, run_key: str = "") -> dict[str, Any]:
    """``run_key``: the run's identity across server restarts (a resumed run keeps it), which clients
    record their privacy events under."""
    values: dict[str, Any] = dict(config.to_run_config())
    values |= {
        RUN_KEY: run_key,
        f"{_PREFIX}kind": spec.kind,
        f"{_PREFIX}input-shape": list(spec.input_shape),
        f"{_PREFIX}feature-names": list(spec.feature_names) or [""],
        f"{_PREFIX}value-range": list(spec.value_range) if spec.value_range else [],
        f"{_PREFIX}scaler-offset": [float(v) for v in scaler.offset.ravel()],
        f"{_PREFIX}scaler-scale": [float(v) for v in scaler.scale.ravel()],
        f"{_PREFIX}scaler-flatten": scaler.flatten,
    }
    return values


def decode_setup(values: Mapping[str, Any]) -> tuple[FedaeConfig, DataSpec, Scaler]:
    values = dict(values)
    # Besides fedae's own keys, Flower adds the round number and its DP wrappers' clipping norm.
    flower_keys = {"server-round", "clipping_norm"}
    run_config = {k: v for k, v in values.items() if not k.startswith(_PREFIX) and k not in flower_keys}
    config = FedaeConfig.from_run_config(run_config)
    shape = tuple(int(v) for v in values[f"{_PREFIX}input-shape"])
    names = tuple(n for n in values[f"{_PREFIX}feature-names"] if n)
    value_range = tuple(values[f"{_PREFIX}value-range"]) or None
    spec = DataSpec(str(values[f"{_PREFIX}kind"]), shape, names, value_range)  # type: ignore[arg-type]
    scaler = Scaler.from_dict(
        {
            "offset": values[f"{_PREFIX}scaler-offset"],
            "scale": values[f"{_PREFIX}scaler-scale"],
            "input_shape": list(shape),
            "flatten": values[f"{_PREFIX}scaler-flatten"],
        }
    )
    return config, spec, scaler


def encode_scorer(scorer: ResidualScorer) -> dict[str, Any]:
    """The score's rule and per-feature scales, for the threshold query: clients score exactly as the
    exported detector will."""
    scale = [] if scorer.scale is None else [float(v) for v in scorer.scale]
    return {f"{_PREFIX}scorer-rule": scorer.rule, f"{_PREFIX}scorer-scale": scale}


def decode_scorer(values: Mapping[str, Any]) -> ResidualScorer:
    """The scorer ``encode_scorer`` packed; ``KeyError`` / ``ValueError`` if it is missing or invalid."""
    rule = str(values[f"{_PREFIX}scorer-rule"])
    scale = list(values[f"{_PREFIX}scorer-scale"])
    return ResidualScorer.from_dict({"rule": rule, "scale": scale if rule != "mse" else None})
