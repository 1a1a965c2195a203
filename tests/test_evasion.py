"""Evasion attacks on a real trained detector: budgets kept, sanity orderings, and exact clean figures."""

import re

import numpy as np
import pytest

from shared.attacks import evasion
from shared.detector import detection_metrics, fit_threshold
from shared.models import ModelSpec, residuals
from shared.scoring import ResidualScorer
from shared.training import LocalTrainer, TrainSettings


@pytest.fixture(scope="module")
def detector() -> tuple[evasion.Target, np.ndarray, np.ndarray]:
    """A dense AE trained (without DP) on rows near a 3-dimensional subspace of 12 features; anomalies
    are rows off it. Scaled like the fleet's sensors (zero mean, unit spread)."""
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(3, 12))

    def normal(n: int) -> np.ndarray:
        return (rng.normal(size=(n, 3)) @ basis / 2 + 0.05 * rng.normal(size=(n, 12))).astype(np.float32)

    x_train, x_calibration = normal(2000), normal(500)
    anomalies = (normal(150) + rng.normal(scale=0.25, size=(150, 12))).astype(np.float32)
    x_test = np.concatenate([normal(150), anomalies])
    y_test = np.concatenate([np.zeros(150, int), np.ones(150, int)])
    spec = ModelSpec("dense", (12,), 3, "linear", "elu")
    trainer = LocalTrainer(spec, TrainSettings(64, 0.01, 0.0))
    trainer.fit(x_train, epochs=30, seed=0)
    scorer = ResidualScorer.fit("max-standardized", residuals(trainer.model, spec, x_calibration))
    threshold = fit_threshold(scorer.score(residuals(trainer.model, spec, x_calibration)), "percentile")
    low, high = evasion.input_range("tabular", x_calibration)
    return evasion.Target(trainer.model, spec, scorer, threshold, low, high), x_test, y_test


def test_the_attacked_score_is_the_detectors_score(detector) -> None:
    target, x, _ = detector
    expected = target.scorer.score(residuals(target.model, target.spec, x))
    np.testing.assert_array_equal(target.score(x), expected)  # the detector's own scores, bit for bit
    # The function the attacks differentiate: a compiled graph, where TensorFlow fuses each layer's
    # matmul, bias and activation and so rounds float32 a little differently (measured 1e-5 relative).
    score, gradient = target.score_and_gradient(x)
    np.testing.assert_allclose(score, expected, rtol=1e-4)
    # Its gradient is the score's: a central difference along the gradient agrees, except for the few
    # rows where the step crosses a kink of the max over features (measured: 3 % of rows).
    step = 1e-3 * gradient / np.linalg.norm(gradient, axis=1, keepdims=True)
    slope = (target.score(x + step) - target.score(x - step)) / 2e-3
    assert np.isclose(slope, np.linalg.norm(gradient, axis=1), rtol=0.05).mean() > 0.9


@pytest.mark.parametrize(
    ("kind", "shape", "rule"), [("conv", (8, 8, 1), "mse"), ("vae", (20,), "standardized")]
)
def test_conv_and_vae_targets_score_as_the_detector_and_keep_their_budgets(kind, shape, rule) -> None:
    from shared.models import build_model

    rng = np.random.default_rng(3)
    spec = ModelSpec(kind, shape, 4, "sigmoid" if kind == "conv" else "linear")
    model = build_model(spec)
    x = rng.uniform(0.1, 0.9, size=(40, *shape)).astype(np.float32)
    scorer = ResidualScorer.fit(rule, residuals(model, spec, x))
    low, high = evasion.input_range("image" if kind == "conv" else "tabular", x)
    target = evasion.Target(
        model, spec, scorer, float(np.median(scorer.score(residuals(model, spec, x)))), low, high
    )
    np.testing.assert_allclose(target.score(x), scorer.score(residuals(model, spec, x)), rtol=1e-6)
    for norm, epsilon in (("linf", 0.1), ("l2", 0.5)):
        adversarial = evasion.pgd(target, x, epsilon, norm, "false-alarm", steps=5)
        delta = (adversarial - x).reshape(len(x), -1)
        size = np.abs(delta).max(axis=1) if norm == "linf" else np.linalg.norm(delta, axis=1)
        assert size.max() <= epsilon * (1 + 1e-5) and (adversarial >= low - 1e-6).all()
        assert (adversarial <= high + 1e-6).all()
        assert np.mean(target.score(adversarial)) > np.mean(target.score(x))


@pytest.mark.parametrize("direction", evasion.DIRECTIONS)
@pytest.mark.parametrize("attack", ["fgsm", "pgd", "random", "spsa"])
def test_epsilon_zero_reproduces_the_clean_metrics_exactly(detector, attack: str, direction: str) -> None:
    target, x, y = detector
    row = evasion.evasion_metrics(target, x, y, attack, "linf", 0.0, direction)
    # The pipeline's own figures: the scorer on the model's residuals, as the run reports them.
    clean = detection_metrics(
        target.scorer.score(residuals(target.model, target.spec, x)), y, target.threshold
    )
    assert row["auc"] == pytest.approx(clean["test_auc"], abs=1e-12)
    assert row["detection_rate"] == clean["recall"] and row["false_alarm_rate"] == clean["false_alarm_rate"]
    assert row["success_rate"] == 0.0


@pytest.mark.parametrize("direction", evasion.DIRECTIONS)
@pytest.mark.parametrize(
    ("attack", "norm"),
    [(a, n) for a in ("fgsm", "pgd", "random") for n in evasion.NORMS] + [("spsa", "linf")],
)
def test_perturbations_stay_within_the_budget_and_the_valid_range(detector, attack, norm, direction) -> None:
    target, x, _ = detector
    epsilon = 0.3 if norm == "linf" else 1.0
    options = {"query_budget": 100} if attack == "spsa" else {}
    adversarial, _ = evasion.attack_rows(target, x, attack, norm, epsilon, direction, **options)
    delta = (adversarial - x).reshape(len(x), -1)
    size = np.abs(delta).max(axis=1) if norm == "linf" else np.linalg.norm(delta, axis=1)
    assert size.max() <= epsilon * (1 + 1e-5)
    # Within the valid range, widened only to hold a test row that lies outside the calibration span
    # (the attack never moves such a coordinate further out).
    low, high = np.minimum(target.low, x), np.maximum(target.high, x)
    assert ((adversarial >= low - 1e-6) & (adversarial <= high + 1e-6)).all()
    assert (adversarial != x).any()


# Budgets where this detector is neither untouchable nor trivially beaten (false alarms need far less:
# a normal row sits just under the threshold, an anomaly well over it).
BUDGETS = {
    ("evade", "linf"): 0.4,
    ("evade", "l2"): 0.6,
    ("false-alarm", "linf"): 0.05,
    ("false-alarm", "l2"): 0.15,
}


@pytest.mark.parametrize(("direction", "norm"), list(BUDGETS))
def test_pgd_is_at_least_as_strong_as_fgsm_and_far_stronger_than_noise(detector, direction, norm) -> None:
    target, x, y = detector
    epsilon = BUDGETS[direction, norm]
    rows = {
        a: evasion.evasion_metrics(target, x, y, a, norm, epsilon, direction)
        for a in ("random", "fgsm", "pgd")
    }
    assert rows["pgd"]["success_rate"] >= rows["fgsm"]["success_rate"], rows
    assert rows["pgd"]["success_rate"] >= rows["random"]["success_rate"] + 0.5, rows
    assert rows["pgd"]["auc"] <= rows["random"]["auc"], rows


def test_score_only_spsa_evades_within_its_query_budget(detector) -> None:
    target, x, y = detector
    anomalies = x[y == 1]
    adversarial, used = evasion.spsa(target, anomalies, 0.2, "evade", query_budget=400)
    assert 0 < used <= 400
    assert np.abs(adversarial - anomalies).max() <= 0.2 * (1 + 1e-6)
    assert np.median(target.score(adversarial)) < 0.7 * np.median(target.score(anomalies))


def test_the_run_evaluation_covers_every_setting_and_reports_clean_figures_on_its_sample(detector) -> None:
    from shared import robustness
    from shared.config import FedaeConfig

    target, x, y = detector
    config = FedaeConfig(
        robustness_linf_epsilons="0.05,0.1",
        robustness_l2_epsilons="0.5",
        robustness_rows=100,
        robustness_queries=100,
    )
    section = robustness.evaluate(target, x, y, config, "tabular")
    assert section["rows"] == 100 and section["anomalous_rows"] == 50
    # 2 directions and the two-sided rows derived from them x (3 white-box-or-random attacks x 3
    # budgets + SPSA x 2 L-infinity budgets)
    assert len(section["evasion"]) == 3 * (3 * 3 + 2)
    keys = {
        "attack",
        "norm",
        "epsilon",
        "direction",
        "auc",
        "detection_rate",
        "false_alarm_rate",
        "success_rate",
    }
    assert all(keys <= set(row) for row in section["evasion"])
    sample = robustness.sample_rows(y, 100, config.seed)
    clean = detection_metrics(target.score(x[sample]), y[sample], target.threshold)
    assert section["clean"] == {
        "auc": clean["test_auc"],
        "detection_rate": clean["recall"],
        "false_alarm_rate": clean["false_alarm_rate"],
    }
    worst = robustness.headline(section)
    assert worst["evade linf"]["epsilon"] == 0.1 and worst["evade linf"]["attack"] in ("fgsm", "pgd")
    assert robustness.headline(section, ("spsa",))["false-alarm linf"]["attack"] == "spsa"


def test_the_report_says_what_an_attacker_can_do(detector, tmp_path) -> None:
    from shared import robustness
    from shared.config import FedaeConfig
    from shared.report import robustness_lines

    target, x, y = detector
    config = FedaeConfig(robustness_linf_epsilons="0.1", robustness_l2_epsilons="0.5", robustness_rows=60)
    section = robustness.evaluate(target, x, y, config, "tabular")
    text = "\n".join(robustness_lines(section))
    assert "## Adversarial robustness" in text
    assert re.search(
        r"white box\), hiding anomalies: (FGSM|PGD) at linf 0\.1 takes the detection rate from", text
    )
    assert re.search(
        r"With scores only .* raising false alarms: SPSA at linf 0\.1 takes the false alarm", text
    )
    assert re.search(r"Both at once .*: (FGSM|PGD) at linf 0\.1 takes the ROC-AUC from", text)
    assert "With scores only" in text and text.count("| pgd |") == 6  # evade, false-alarm, two-sided x 2


def test_two_sided_rows_combine_the_evade_and_false_alarm_runs_at_no_extra_attack(
    detector, monkeypatch
) -> None:
    from sklearn.metrics import roc_auc_score

    from shared import robustness
    from shared.config import FedaeConfig

    # Prepare: one budget, so each direction runs each attack once.
    target, x, y = detector
    config = FedaeConfig(robustness_linf_epsilons="0.1", robustness_l2_epsilons="", robustness_rows=80)
    calls = []
    original = evasion.attack_rows

    def counting(*args, **kwargs):
        calls.append(args[2:6])
        return original(*args, **kwargs)

    # Execute
    monkeypatch.setattr(evasion, "attack_rows", counting)
    section = robustness.evaluate(target, x, y, config, "tabular")
    monkeypatch.undo()
    # Assert: no attack ran for the two-sided rows, and each equals the metrics of the anomalies' scores
    # under the evade attack with the normal rows' under the false-alarm attack.
    attacks = [c for c in calls if c[2] > 0]  # not the clean figures' budget-0 call
    assert len(attacks) == len(set(attacks)) == 2 * 4  # (random, fgsm, pgd, spsa) x 2 directions
    sample = robustness.sample_rows(y, 80, config.seed)
    xs, ys = x[sample], y[sample]
    two_sided = [r for r in section["evasion"] if r["direction"] == "two-sided"]
    assert sorted(r["attack"] for r in two_sided) == ["fgsm", "pgd", "random", "spsa"]
    for row in two_sided:
        options = {"query_budget": config.robustness_queries} if row["attack"] == "spsa" else {}
        by_direction = {
            direction: evasion.attacked_scores(
                target, xs, ys, row["attack"], "linf", 0.1, direction, config.seed, **options
            )[0]
            for direction in evasion.DIRECTIONS
        }
        scores = np.where(ys == 1, by_direction["evade"], by_direction["false-alarm"])
        assert row["auc"] == pytest.approx(roc_auc_score(ys, scores), abs=1e-12)
        assert row["detection_rate"] == pytest.approx(np.mean(scores[ys == 1] > target.threshold))
        assert row["false_alarm_rate"] == pytest.approx(np.mean(scores[ys == 0] > target.threshold))
        if row["attack"] == "pgd":
            # PGD keeps each row's best point (never better for the detector than clean), so attacking
            # both classes never leaves the ranking better than attacking either alone.
            one_sided = [r["auc"] for r in section["evasion"] if r["attack"] == "pgd"]
            assert row["auc"] <= min(one_sided) + 1e-12


def test_fedae_robustness_attacks_a_bundle_with_a_test_file(detector, tmp_path) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    import pandas as pd

    from shared.detector import Detector, save_bundle
    from shared.preprocess import Scaler

    target, x, y = detector
    names = [f"f{i}" for i in range(12)]
    scaler = Scaler(np.zeros(12, np.float32), np.ones(12, np.float32), (12,), True)  # the model saw raw rows
    schema = {"input_schema": {"kind": "tabular", "shape": [12], "feature_names": names}}
    bundle = save_bundle(
        Detector(target.model, target.spec, scaler, target.scorer, target.threshold, "percentile", schema),
        tmp_path / "bundle",
    )
    test = tmp_path / "test.csv"
    pd.DataFrame(x, columns=names).assign(label=y).to_csv(test, index=False)
    root = Path(__file__).resolve().parents[1]

    def robustness(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "fedae", "robustness", *args]
        return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=600)

    settings = (
        "robustness-rows=60 robustness-linf-epsilons=0.1 robustness-l2-epsilons=0.5 robustness-queries=0"
    )
    done = robustness(str(bundle), "--test", str(test), "--json", "--run-config", settings)
    assert done.returncode == 0, done.stderr[-2000:]
    section = json.loads(done.stdout)
    # (evade, false-alarm, two-sided) x (random, fgsm, pgd) x (linf, l2)
    assert section["rows"] == 60 and len(section["evasion"]) == 3 * 3 * 2
    assert section["valid_range"] == "each feature's range over the test file's normal rows"
    assert robustness(str(bundle), "--run-config", settings).returncode == 2  # a bundle needs --test
    refused = robustness(str(bundle), "--test", str(test), "--run-config", "epochs=3")
    assert refused.returncode == 2 and "robustness-* keys" in refused.stderr


def test_a_single_class_test_set_is_not_evaluated_and_scarce_classes_fill_the_sample(detector) -> None:
    from shared import robustness
    from shared.config import FedaeConfig

    target, x, y = detector
    section = robustness.evaluate(target, x[y == 0], y[y == 0], FedaeConfig(), "tabular")
    assert section == {"enabled": False, "reason": "the test data holds only one class (label 0 or 1)"}
    few_normal = np.concatenate([np.zeros(10, int), np.ones(300, int)])
    picked = robustness.sample_rows(few_normal, 100, seed=1)
    assert len(picked) == 100 and few_normal[picked].sum() == 90  # all 10 normal rows, 90 anomalies


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"robustness-queries": 10}, "robustness-queries must be 0 (no black-box attack) or at least 34"),
        ({"robustness-linf-epsilons": "", "robustness-l2-epsilons": ""}, "needs at least one budget"),
        ({"robustness-l2-epsilons": "0.5,-1"}, "positive finite numbers, got [-1.0]"),
    ],
)
def test_bad_robustness_settings_are_refused(settings: dict, needle: str) -> None:
    from shared.config import ConfigError, FedaeConfig

    with pytest.raises(ConfigError) as error:
        FedaeConfig().with_overrides(settings)
    assert needle in str(error.value)


def test_the_headline_takes_the_lowest_two_sided_auc_and_the_most_flipped_one_sided_rows() -> None:
    from shared.robustness import headline

    def row(attack: str, direction: str, auc: float, success: float) -> dict:
        metrics = {"auc": auc, "success_rate": success}
        return {"attack": attack, "norm": "linf", "epsilon": 0.1, "direction": direction, **metrics}

    section = {
        "evasion": [
            row("fgsm", "two-sided", 0.40, 0.9),  # flips more rows
            row("pgd", "two-sided", 0.20, 0.8),  # but PGD leaves the worse ranking
            row("fgsm", "evade", 0.70, 0.3),
            row("pgd", "evade", 0.75, 0.5),
        ]
    }
    worst = headline(section)
    assert worst["two-sided linf"]["attack"] == "pgd" and worst["evade linf"]["attack"] == "pgd"
