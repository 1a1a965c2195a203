"""The adversarial-robustness evaluation every run ends with: each attack, norm, budget and direction
against the aggregated detector, on a stratified sample of the labelled test rows.

``summary.json``'s ``robustness`` section: ``clean`` (the same figures without attack, on the same
sample), ``evasion`` (one object per attack x norm x epsilon x direction: ``attack``, ``norm``,
``epsilon``, ``direction`` (``evade``, ``false-alarm``, or ``two-sided``: both at once, combined
from those two runs), ``auc``, ``detection_rate``, ``false_alarm_rate``, ``success_rate``,
``queries``, ``rows_attacked``), the budgets and what the valid range was.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from shared.attacks import evasion
from shared.config import FedaeConfig, parse_epsilons

logger = logging.getLogger("fedae")

WHITE_BOX = ("random", "fgsm", "pgd")  # random: the baseline an attack must beat
TWO_SIDED = "two-sided"  # anomalies evading and normal rows alarming at once, from the two runs


def sample_rows(y: np.ndarray, rows: int, seed: int) -> np.ndarray:
    """Indices of at most ``rows`` test rows, half normal and half anomalous where both suffice."""
    rng = np.random.default_rng([seed, 17])
    normal, anomalous = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    # Half each where both classes suffice; otherwise the scarcer class whole and the other fills up.
    take_anomalous = min(len(anomalous), max(rows // 2, rows - len(normal)))
    take_normal = min(len(normal), rows - take_anomalous)
    picked = np.concatenate(
        [rng.choice(normal, take_normal, replace=False), rng.choice(anomalous, take_anomalous, replace=False)]
    )
    return np.sort(picked)


def evaluate(
    target: evasion.Target, x: np.ndarray, y: np.ndarray, config: FedaeConfig, kind: str
) -> dict[str, Any]:
    """Every configured attack against ``target`` on a stratified sample of ``x`` (model input space);
    ``kind``: the data's, "image" or "tabular" (what the valid range is)."""
    linf = parse_epsilons(config.robustness_linf_epsilons, "robustness-linf-epsilons")
    l2 = parse_epsilons(config.robustness_l2_epsilons, "robustness-l2-epsilons")
    if len(np.unique(y)) < 2:
        # ROC-AUC, detection and false-alarm rates all need both classes.
        return {"enabled": False, "reason": "the test data holds only one class (label 0 or 1)"}
    picked = sample_rows(y, config.robustness_rows, config.seed)
    x, y = x[picked], y[picked]
    clean_scores = target.score(x)
    clean = evasion.evasion_metrics(target, x, y, "fgsm", "linf", 0.0, "evade", clean_scores=clean_scores)
    rows = []
    scores_by_setting: dict[tuple[str, str, float, str], np.ndarray] = {}

    def run(attack: str, norm: str, epsilon: float, direction: str, **options: int) -> None:
        row, scores = evasion.evasion_row(
            target, x, y, attack, norm, epsilon, direction, config.seed, clean_scores, **options
        )
        rows.append(row)
        scores_by_setting[attack, norm, epsilon, direction] = scores

    for direction in evasion.DIRECTIONS:
        for norm, budgets in (("linf", linf), ("l2", l2)):
            for epsilon in budgets:
                for attack in WHITE_BOX:
                    run(attack, norm, epsilon, direction)
        if config.robustness_queries > 0:
            for epsilon in linf:
                run("spsa", "linf", epsilon, direction, query_budget=config.robustness_queries)
    rows += two_sided_rows(rows, scores_by_setting, y, clean_scores, target.threshold)
    logger.info(
        "robustness: %d attack settings on %d test rows (%d anomalous)", len(rows), len(y), int(y.sum())
    )
    return {
        "enabled": True,
        "rows": len(y),
        "anomalous_rows": int(y.sum()),
        "space": "the model input (after the scaler): images in [0, 1], tables in calibration z-scores",
        "valid_range": "pixel range [0, 1]"
        if kind == "image"
        else "each feature's range over the coordinator's calibration rows",
        "clean": {k: clean[k] for k in ("auc", "detection_rate", "false_alarm_rate")},
        "evasion": rows,
    }


def two_sided_rows(
    rows: list[dict[str, Any]],
    scores_by_setting: dict[tuple[str, str, float, str], np.ndarray],
    y: np.ndarray,
    clean_scores: np.ndarray,
    threshold: float,
) -> list[dict[str, Any]]:
    """One ``two-sided`` row per setting run in both directions: the anomalies' scores from its
    ``evade`` run with the normal rows' scores from its ``false-alarm`` run, so every row is attacked
    the way that hurts the detector (the worst case for ROC-AUC, which each one-sided row understates by
    leaving half the rows clean). Derived from the runs already made: no extra attack."""
    combined = []
    for row in rows:
        attack, norm, epsilon = row["attack"], row["norm"], row["epsilon"]
        if row["direction"] != "evade" or (attack, norm, epsilon, "false-alarm") not in scores_by_setting:
            continue
        evaded = scores_by_setting[attack, norm, epsilon, "evade"]
        alarmed = scores_by_setting[attack, norm, epsilon, "false-alarm"]
        scores = np.where(y == 1, evaded, alarmed)
        combined.append(
            {
                "attack": attack,
                "norm": norm,
                "epsilon": epsilon,
                "direction": TWO_SIDED,
                **evasion.score_metrics(y, scores, clean_scores, threshold, np.ones(len(y), bool)),
                "queries": row["queries"],  # per row, as each row was attacked once
                "rows_attacked": len(y),
            }
        )
    return combined


def headline(section: dict[str, Any], attacks: tuple[str, ...] = ("fgsm", "pgd")) -> dict[str, Any]:
    """The strongest of ``attacks`` (white box by default; ``("spsa",)``: scores only) per direction and
    norm at the largest budget: what an attacker with that knowledge achieves at most."""
    worst: dict[str, Any] = {}

    def damage(row: dict[str, Any]) -> tuple[float, float]:
        # One-sided rows are told by the rows they flip; two-sided ones by the ranking they leave (the
        # report quotes their ROC-AUC), so there the lowest AUC is the strongest.
        return (row["epsilon"], -row["auc"] if row["direction"] == TWO_SIDED else row["success_rate"])

    for row in section["evasion"]:
        if row["attack"] not in attacks:
            continue
        key = f"{row['direction']} {row['norm']}"
        if key not in worst or damage(row) > damage(worst[key]):
            worst[key] = row
    return worst


def evaluate_saved(
    target_path: str, test_file: str | None, label_column: str, overrides: dict[str, Any]
) -> dict[str, Any]:
    """``fedae robustness``: the evaluation of a finished run (RUN_DIR: its bundle, and its test data
    from its run config) or of a bundle folder with a labelled ``test_file``.

    ``overrides``: robustness-* run-config keys. For a bundle with a test file, a table's valid range is
    its normal test rows' span (the calibration rows stay with the coordinator)."""
    import json
    from pathlib import Path

    from shared.attacks import evasion
    from shared.config import ConfigError
    from shared.data.errors import DataError
    from shared.data.files import align_columns, read_table
    from shared.data.sources import load_server_data
    from shared.detector import load_bundle

    path = Path(target_path)
    summary_path = path / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        config = FedaeConfig.from_run_config(summary["run_config"]).with_overrides(overrides)
        if test_file:
            raise ConfigError(f"{path} is a run folder: its test data comes from its run config; drop --test")
        bundle, data = path / summary.get("bundle", "bundle"), load_server_data(config)
        detector = load_bundle(bundle)
        x_raw, y, reference_raw = data.x_test, data.y_test, data.x_calibration
        kind = data.spec.kind
        span = "each feature's range over the coordinator's calibration rows"
    elif (path / "metadata.json").is_file():
        if not test_file:
            raise ConfigError(f"{path} is a bundle: give a labelled test file with --test FILE")
        detector = load_bundle(path)
        config = FedaeConfig().with_overrides(overrides)
        schema = detector.metadata.get("input_schema", {})
        table = read_table(test_file, label_column, require_labels=True)
        kind = str(schema.get("kind", "tabular"))
        names = tuple(schema.get("feature_names") or ())
        x_raw = align_columns(table, names) if names else table.x
        shape = tuple(schema.get("shape") or x_raw.shape[1:])
        if x_raw.shape[1:] != shape:
            if int(np.prod(x_raw.shape[1:])) != int(np.prod(shape)):
                raise DataError(
                    f"rows have shape {x_raw.shape[1:]}, the bundle expects {shape}", path=test_file
                )
            x_raw = x_raw.reshape(len(x_raw), *shape)  # images stored as flat rows
        y = table.labels
        if y is None or len(np.unique(y)) < 2:
            raise DataError(
                f"needs both normal (0) and anomalous (1) rows in {label_column!r}", path=test_file
            )
        reference_raw = x_raw[y == 0]
        span = "each feature's range over the test file's normal rows"
    else:
        raise ConfigError(f"{path}: neither a run folder (summary.json) nor a bundle (metadata.json)")
    x = detector.scaler.transform(x_raw)
    low, high = evasion.input_range(kind, detector.scaler.transform(reference_raw))
    target = evasion.Target(detector.model, detector.spec, detector.scorer, detector.threshold, low, high)
    section = evaluate(target, x, np.asarray(y), config, kind)
    if kind != "image" and section["enabled"]:
        section["valid_range"] = span
    return {"target": str(path), **section}


def format_section(section: dict[str, Any]) -> str:
    """The evaluation as the report prints it (the paragraph and the table)."""
    from shared.report import robustness_lines

    return "\n".join(robustness_lines(section)).strip()
