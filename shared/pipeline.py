"""The server's side of a run without Flower: set-up before round 1 and the detector after the last.

Set-up: load the coordinator's calibration and test data, fit the scaler, build the initial model.
Finish: fit the threshold on calibration errors (or take the federated one the clients' noisy histograms
gave, ``shared.federated_threshold``), score the test split, compare with baselines, export the bundle,
write ``summary.json``, plots and ``report.md``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from shared import privacy
from shared.config import FedaeConfig
from shared.data.sources import DataSpec, ServerData, load_client_data, load_server_data, num_clients_for
from shared.detector import Detector, describe_rule, detection_metrics, fit_threshold, save_bundle
from shared.drift import DriftReference
from shared.export import Representative, parse_exports
from shared.federated_threshold import ThresholdRelease
from shared.models import residuals
from shared.preprocess import Scaler
from shared.scoring import ResidualScorer
from shared.task import make_scaler, trainer_for

logger = logging.getLogger("fedae")


@dataclass
class RunSetup:
    config: FedaeConfig
    data: ServerData
    scaler: Scaler
    num_clients: int
    out_dir: Path

    @property
    def spec(self) -> DataSpec:
        return self.data.spec


def default_out_dir(config: FedaeConfig) -> Path:
    return Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{config.scenario}"


def prepare(config: FedaeConfig) -> RunSetup:
    data = load_server_data(config)
    scaler = make_scaler(config, data.spec, data.x_calibration)
    out_dir = Path(config.out_dir) if config.out_dir else default_out_dir(config)
    if not config.state_dir:
        # Without a state-dir of its own, a run keeps its clients' privacy ledgers in RUN_DIR/state: a
        # simulation of the same data started again begins new ledgers. Point state-dir at a
        # persistent folder to compose epsilon across runs (a deployed site always should).
        config = config.replace(state_dir=str((out_dir / "state").resolve()))
    return RunSetup(config, data, scaler, num_clients_for(config), out_dir)


def initial_weights(setup: RunSetup) -> list[np.ndarray]:
    return trainer_for(setup.config, setup.spec, setup.scaler).get_weights()


def calibration_loss(setup: RunSetup, weights: list[np.ndarray]) -> float:
    """Mean training loss of ``weights`` on the server's calibration rows (no client data involved)."""
    trainer = trainer_for(setup.config, setup.spec, setup.scaler)
    trainer.set_weights(weights)
    return trainer.mean_loss(setup.scaler.transform(setup.data.x_calibration))


@dataclass
class PrivacyRecord:
    """What the server learnt about privacy during the run, for the summary."""

    per_client: dict[int, float | None] = field(default_factory=dict)  # latest cumulative epsilon
    per_round_max: list[float | None] = field(default_factory=list)  # worst client after each round
    # Each client's cumulative epsilon after each round it trained in: {client: {round: epsilon}}.
    per_client_rounds: dict[int, dict[int, float]] = field(default_factory=dict)
    per_client_sigma: dict[int, float] = field(default_factory=dict)  # latest noise multiplier used
    client_level: dict[str, Any] | None = None  # server.client_dp's figures; never mixed in here


def privacy_section(
    config: FedaeConfig, record: PrivacyRecord, threshold_release: bool = False
) -> dict[str, Any]:
    """The summary's privacy section: sample-level (DP-SGD, per client) and client-level (central DP
    over clients) figures side by side, each with its own statement, never combined into one number.
    ``threshold_release``: the per-client figures include the federated threshold's histogram."""
    dp = config.dp_enabled
    per_client = record.per_client
    return {
        "dp": dp,
        "delta": config.delta if dp else None,
        "accountant": config.accountant.upper() if dp else None,
        "sampling": config.sampling if dp else None,
        "neighbouring": privacy.NEIGHBOURING[config.sampling] if dp else None,
        "statement": privacy.describe(config.delta, config.accountant, config.sampling, threshold_release)
        if dp
        else "no DP",
        "noise_multiplier": config.noise_multiplier,
        "l2_norm_clip": config.l2_norm_clip,
        "not_covered": (
            "per-round scalar metrics each client reports (training loss, held-out loss, evaluation "
            "AUC where it has labels, example count, seconds spent on the fit and the round) are sent in "
            "the clear and are outside the DP guarantee, as is any timing side channel (for the conv "
            "model a fit's time also depends on its sampled batch sizes); each client's example count n "
            "is treated as public"
        )
        if dp
        else None,
        "sample_level": {
            "max_epsilon": max((v for v in per_client.values() if v is not None), default=None)
            if dp
            else None,
            "per_client": {str(k): (v if dp else None) for k, v in sorted(per_client.items())},
            # Worst client's cumulative epsilon after each round (None where no client reported one).
            "per_round_max_epsilon": record.per_round_max if dp else None,
            "per_client_over_rounds": {
                str(c): {str(r): e for r, e in sorted(rounds.items())}
                for c, rounds in sorted(record.per_client_rounds.items())
            }
            if dp
            else None,
            # With noise-multiplier "auto" each client calibrates its own sigma.
            "noise_multiplier_per_client": {str(c): s for c, s in sorted(record.per_client_sigma.items())}
            if dp
            else None,
        },
        "client_level": record.client_level or {"enabled": False},
    }


def robustness_headline(section: dict[str, Any]) -> dict[str, Any]:
    """What the bundle says of the run's robustness evaluation: the clean figures and the strongest
    white-box and score-only attack per direction and norm at the largest budget (shared.robustness)."""
    if not section.get("enabled") or "evasion" not in section:
        return {"enabled": False, **({"reason": section["reason"]} if "reason" in section else {})}
    from shared.robustness import headline

    return {
        "enabled": True,
        "rows": section["rows"],
        "anomalous_rows": section["anomalous_rows"],
        "space": section["space"],
        "clean": section["clean"],
        "white_box": headline(section),
        "scores_only": headline(section, ("spsa",)),
        "details": "the run's summary.json and report.md (docs/ROBUSTNESS.md)",
    }


def fit_scorer(setup: RunSetup, weights: list[np.ndarray]) -> ResidualScorer:
    """The score's per-feature scales for the model ``weights``, fitted on the coordinator's calibration
    rows: what the exported detector scores with, and what the federated threshold's clients score with."""
    trainer = trainer_for(setup.config, setup.spec, setup.scaler)
    trainer.set_weights(weights)
    x_calibration = setup.scaler.transform(setup.data.x_calibration)
    return ResidualScorer.fit(
        setup.config.anomaly_score, residuals(trainer.model, trainer.spec, x_calibration)
    )


def fit_and_score(
    config: FedaeConfig,
    model: Any,
    spec: Any,
    x_calibration: np.ndarray,
    x_test: np.ndarray,
    scorer: ResidualScorer | None = None,
    threshold: float | None = None,
) -> tuple[ResidualScorer, float, np.ndarray]:
    """Fit the score's per-feature scales (unless ``scorer`` is given) and the threshold (unless
    ``threshold`` is given, as the federated one is) on calibration rows; score the test rows.

    Without a given threshold, "federated-percentile" reads the same percentile of the calibration
    scores: the fallback when no client's histogram was usable, and the central baselines' rule."""
    calibration_residuals = residuals(model, spec, x_calibration)
    scorer = scorer or ResidualScorer.fit(config.anomaly_score, calibration_residuals)
    if threshold is None:
        rule = "percentile" if config.threshold_rule == "federated-percentile" else config.threshold_rule
        threshold = fit_threshold(
            scorer.score(calibration_residuals), rule, config.threshold_percentile, config.threshold_k
        )
    return scorer, threshold, scorer.score(residuals(model, spec, x_test))


def _robustness(setup: RunSetup, trainer: Any, scorer: ResidualScorer, threshold: float) -> dict[str, Any]:
    """The adversarial-robustness evaluation of the exported detector (shared/robustness.py)."""
    config = setup.config
    if config.robustness_rows == 0:
        return {"enabled": False}
    from shared import robustness
    from shared.attacks import evasion

    x_calibration = setup.scaler.transform(setup.data.x_calibration)
    low, high = evasion.input_range(setup.spec.kind, x_calibration)
    target = evasion.Target(trainer.model, trainer.spec, scorer, threshold, low, high)
    started = time.perf_counter()
    try:
        section = robustness.evaluate(
            target, setup.scaler.transform(setup.data.x_test), setup.data.y_test, config, setup.spec.kind
        )
        # What the evaluation costs a run (lower robustness-rows or set it to 0 to shorten it).
        return {**section, "seconds": round(time.perf_counter() - started, 1)}
    except Exception as err:  # an evaluation bug must not cost the run its detector and summary
        logger.error(
            "the robustness evaluation failed (%s: %s); the run goes on without it", type(err).__name__, err
        )
        logger.debug("robustness evaluation", exc_info=True)
        return {"enabled": False, "reason": f"the evaluation failed: {type(err).__name__}: {err}"}


def poisoning_section(
    setup: RunSetup, model: Any, spec: Any, scorer: ResidualScorer, threshold: float
) -> dict[str, Any]:
    """Which clients a simulated poisoning attack ran on and, for a backdoor, how many triggered test
    anomalies the exported detector misses (shared/attacks/poisoning.py)."""
    config = setup.config
    if config.attack == "none":
        return {"attack": "none"}
    from shared.attacks import poisoning

    section: dict[str, Any] = {
        "attack": config.attack,
        "fraction": config.attack_fraction,
        "malicious_clients": sorted(
            poisoning.malicious_clients(setup.num_clients, config.attack_fraction, config.seed)
        ),
        "scale": config.attack_scale if config.attack in ("sign-flip", "scale", "backdoor") else None,
        "noise_std": config.attack_noise_std if config.attack == "noise" else None,
        "alie_z": (config.attack_alie_z or "z_max per round") if config.attack == "alie" else None,
    }
    if config.attack == "backdoor":
        section["backdoor_success_rate"] = backdoor_success(setup, model, spec, scorer, threshold)
    return section


def backdoor_success(
    setup: RunSetup, model: Any, spec: Any, scorer: ResidualScorer, threshold: float
) -> float:
    """The share of the test anomalies no attacker held that the detector misses once they carry the
    run's trigger (shared/attacks/poisoning.py)."""
    from shared.attacks import poisoning

    trigger = poisoning.make_trigger(
        setup.spec.kind, setup.spec.input_shape, setup.scaler.model_input_shape, setup.config.seed
    )
    anomalies = setup.scaler.transform(poisoning.measured_anomalies(setup.data.x_test, setup.data.y_test))
    scores = scorer.score(residuals(model, spec, trigger.stamp(anomalies)))
    return poisoning.backdoor_success_rate(scores, threshold)


def comparison(setup: RunSetup, federated_auc: float) -> dict[str, float]:
    """Federated model vs the same AE trained centrally without DP vs IsolationForest, same test split."""
    from shared.baselines import central_autoencoder_auc, isolation_forest_auc
    from shared.task import model_spec, train_settings

    config = setup.config
    pooled = np.concatenate([load_client_data(config, c).x_train for c in range(setup.num_clients)])
    x_pool, x_test = setup.scaler.transform(pooled), setup.scaler.transform(setup.data.x_test)
    x_calibration = setup.scaler.transform(setup.data.x_calibration)
    spec = model_spec(config, setup.spec, setup.scaler)
    label = f"federated {config.model} AE ({'DP-SGD' if config.dp_enabled else 'no DP'})"
    return {
        label: federated_auc,
        f"central {config.model} AE (no DP)": central_autoencoder_auc(
            config,
            spec,
            train_settings(config, setup.spec),
            x_pool,
            x_calibration,
            x_test,
            setup.data.y_test,
            epochs=config.num_server_rounds * config.local_epochs,
        ),
        "IsolationForest (central)": isolation_forest_auc(
            x_pool, x_test, setup.data.y_test, seed=config.seed
        ),
    }


def finish(
    setup: RunSetup,
    weights: list[np.ndarray],
    rounds: list[dict[str, Any]],
    privacy_record: PrivacyRecord,
    started: float,
    compare: bool = True,
    best_round: int | None = None,
    budget: dict[str, Any] | None = None,
    aggregation: dict[str, Any] | None = None,
    scorer: ResidualScorer | None = None,
    threshold_release: ThresholdRelease | None = None,
) -> dict[str, Any]:
    """Fit the threshold, evaluate, export the bundle and write the report; returns the summary.

    ``aggregation`` says how the server combined the clients' models (``secure_aggregation`` and, under
    SecAgg+, its parameters and what it does not hide). With threshold-rule "federated-percentile",
    ``threshold_release`` is what the clients' histograms gave and ``scorer`` the scorer they scored with;
    a release without a threshold falls back to the calibration percentile and says so."""
    config = setup.config
    aggregation = aggregation or {"secure_aggregation": "none"}
    out_dir = setup.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = trainer_for(config, setup.spec, setup.scaler)
    trainer.set_weights(weights)
    spec = trainer.spec
    x_calibration = setup.scaler.transform(setup.data.x_calibration)
    federated = config.threshold_rule == "federated-percentile"
    if federated and threshold_release is None:
        raise ValueError("threshold-rule 'federated-percentile' needs the clients' threshold release")
    scorer, threshold, test_scores = fit_and_score(
        config,
        trainer.model,
        spec,
        x_calibration,
        setup.scaler.transform(setup.data.x_test),
        scorer=scorer,
        threshold=threshold_release.threshold if threshold_release and federated else None,
    )
    # The reference that deployed drift monitors compare live scores with (shared/drift.py).
    drift_reference = DriftReference.from_scores(scorer.score(residuals(trainer.model, spec, x_calibration)))
    detector_metrics = detection_metrics(test_scores, setup.data.y_test, threshold)
    robustness_section = _robustness(setup, trainer, scorer, threshold)
    rule = describe_rule(config.threshold_rule, config.threshold_percentile, config.threshold_k)
    threshold_rule = config.threshold_rule
    privacy_record.per_round_max = [r.get("max_epsilon") for r in rounds]
    released = False
    if federated and threshold_release is not None:
        rule = threshold_release.sentence()
        if threshold_release.threshold is None:
            threshold_rule = "percentile"  # what the exported threshold is: the fallback's
            logger.warning("federated threshold: %s", rule)
        # Every client that released a histogram paid for it: its cumulative figure includes it.
        privacy_record.per_client.update(threshold_release.epsilon_after)
        released = bool(threshold_release.epsilon_after)
    privacy_info = privacy_section(config, privacy_record, released)
    if federated and threshold_release is not None:
        privacy_info["threshold_release"] = threshold_release.section
    privacy_info["budget"] = budget or {
        "target_epsilon": config.target_epsilon or None,
        "exhausted_clients": [],
        "stopped_early": None,
    }

    detector = Detector(
        trainer.model,
        spec,
        setup.scaler,
        scorer,
        threshold,
        threshold_rule,
        {
            "input_schema": {
                "kind": setup.spec.kind,
                "shape": list(setup.spec.input_shape),
                "feature_names": list(setup.spec.feature_names),
            },
            "threshold_rule": rule,
            "privacy": privacy_info,
            "robustness": robustness_headline(robustness_section),
            "training_run": {
                "scenario": config.scenario,
                "rounds": config.num_server_rounds,
                "clients": setup.num_clients,
                "strategy": config.strategy,
                "aggregation": aggregation,
                "best_round": best_round,
                "run_config": config.to_run_config(),
                "created": datetime.now(UTC).isoformat(),
            },
        },
        drift_reference,
    )
    save_bundle(
        detector,
        out_dir / "bundle",
        parse_exports(config.bundle_exports),
        Representative.from_rows(
            setup.data.x_calibration, "rows of the coordinator's normal calibration data (never a client's)"
        ),
    )

    summary: dict[str, Any] = {
        "scenario": config.scenario,
        "model": config.model,
        "strategy": config.strategy,
        "num_clients": setup.num_clients,
        "num_rounds": config.num_server_rounds,
        "best_round": best_round,
        "data_protocol": setup.spec.protocol or "rows labelled 1 are anomalies",
        "data_notes": setup.data.notes,
        "rounds": rounds,
        "privacy": privacy_info,
        "aggregation": aggregation,
        "detector": {
            "anomaly_score": scorer.describe(),
            **detector_metrics,
            "threshold_rule": rule,
            "calibration_rows": len(setup.data.x_calibration),
            "test_rows": len(setup.data.y_test),
            "test_anomaly_rows": int(setup.data.y_test.sum()),
        },
        "robustness": robustness_section,
        "poisoning": poisoning_section(setup, trainer.model, spec, scorer, threshold),
        "comparison": comparison(setup, detector_metrics["test_auc"]) if compare else {},
        "bundle": "bundle",
        "run_config": config.to_run_config(),
        "wall_time_s": round(time.time() - started, 1),
    }
    from shared.report import write_plots, write_report, write_summary

    plots = write_plots(summary, test_scores, setup.data.y_test, out_dir)
    summary["report"] = write_report(summary, plots, out_dir).name
    write_summary(summary, out_dir)
    return summary
