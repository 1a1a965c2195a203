import numpy as np
import pytest

from shared import config as config_module
from shared.scoring import SCORE_RULES, ResidualScorer


def test_config_knows_the_same_rules() -> None:
    assert config_module.SCORE_RULES == SCORE_RULES


def test_mse_is_the_mean_squared_residual(rng) -> None:
    residuals = rng.normal(size=(5, 4, 2))
    scores = ResidualScorer.fit("mse", residuals).score(residuals)
    np.testing.assert_allclose(scores, (residuals.reshape(5, -1) ** 2).mean(axis=1))


def test_standardized_scores_weigh_every_feature_by_its_normal_residual(rng) -> None:
    # Normal data: feature 0 is reconstructed to within 0.01, feature 1 only to within 1.
    calibration = np.column_stack([rng.normal(0, 0.01, 2000), rng.normal(0, 1.0, 2000)])
    quiet_fault = np.array([[0.2, 0.0]])  # 20 normal residuals off on the precise channel
    noisy_normal = np.array([[0.0, 1.5]])  # a typical residual on the noisy channel
    mse = ResidualScorer.fit("mse", calibration)
    standardized = ResidualScorer.fit("standardized", calibration)
    worst = ResidualScorer.fit("max-standardized", calibration)
    # MSE ranks the normal row above the fault; the standardized scores rank them correctly.
    assert mse.score(quiet_fault)[0] < mse.score(noisy_normal)[0]
    assert standardized.score(quiet_fault)[0] > standardized.score(noisy_normal)[0]
    assert worst.score(quiet_fault)[0] == pytest.approx(0.2**2 / 0.01**2, rel=0.1)
    # On calibration data itself the standardized score averages to 1.
    assert standardized.score(calibration).mean() == pytest.approx(1.0, rel=1e-6)


def test_perfect_features_are_floored_and_round_trip(rng) -> None:
    calibration = np.column_stack([np.zeros(100), rng.normal(size=100)])
    scorer = ResidualScorer.fit("max-standardized", calibration)
    assert np.isfinite(scorer.score(np.array([[1.0, 0.0]]))).all()
    again = ResidualScorer.from_dict(scorer.to_dict())
    np.testing.assert_array_equal(again.scale, scorer.scale)
    with pytest.raises(ValueError, match="anomaly score must be one of"):
        ResidualScorer("median", None)
    with pytest.raises(ValueError, match="features"):
        scorer.score(np.zeros((1, 3)))
