"""The attacks behind `fedae privacy audit --empirical`: they find leaks where there are some, and DP-SGD
at a small epsilon leaves them nothing to find.

One data set and model throughout: 200 member digits (scikit-learn's 8x8 images), 500 non-members from
the same data, the dense autoencoder the `digits` scenario uses.
"""

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import pytest
from sklearn.datasets import load_digits

from shared import privacy
from shared.empirical import canary_audit, make_canaries, membership_inference
from shared.models import ModelSpec, reconstruction_errors
from shared.tfenv import load_tensorflow
from shared.training import LocalTrainer, TrainSettings

tf = load_tensorflow()

SPEC = ModelSpec("dense", (64,), 16, "sigmoid", "relu")
DELTA = 1e-5


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    x = (load_digits().data / 16.0).astype(np.float32)
    x = x[np.random.default_rng(0).permutation(len(x))]
    return x[:200], x[1000:1500]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Keras's global seeds fixed inside the block, and the previous random states back after it."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    tf.keras.utils.set_random_seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        tf.random.set_seed(None)


def _attack(trainer: LocalTrainer, members: np.ndarray, non_members: np.ndarray):
    return membership_inference(
        reconstruction_errors(trainer.model, SPEC, members),
        reconstruction_errors(trainer.model, SPEC, non_members),
    )


def test_attack_finds_the_members_of_an_overfit_non_private_model(digits) -> None:
    # Prepare: no DP, 100 epochs on 200 rows: the model reconstructs its members better than others.
    members, non_members = digits
    trainer = LocalTrainer(SPEC, TrainSettings(batch_size=10, learning_rate=0.003, l2_norm_clip=0))
    trainer.fit(members, epochs=100, seed=1)

    # Execute
    result = _attack(trainer, members, non_members)

    # Assert: the attack is not vacuous.
    assert result.auc >= 0.60
    assert result.advantage > 0.2
    assert result.epsilon_lower_bound > 0
    assert (result.members, result.non_members) == (200, 500)


def test_dp_sgd_below_epsilon_3_leaves_membership_at_chance_and_under_its_bound(digits) -> None:
    # Prepare: the same members and model, DP-SGD with q = 0.05, 600 steps, sigma 2.5.
    members, non_members = digits
    settings = TrainSettings(batch_size=10, learning_rate=0.01, l2_norm_clip=1.0)
    with seeded(1):
        # Fixed initial weights: at this much noise how far the loss falls varies with the
        # initialisation (held-out loss ratio 0.68-1.0 over 12 initialisations and seeds), and a test
        # must not be a draw.
        trainer = LocalTrainer(SPEC, settings)
    untrained_loss = trainer.mean_loss(non_members)
    fit = trainer.fit(members, epochs=30, noise_multiplier=2.5, seed=1)
    epsilon = privacy.cumulative_epsilon(
        [privacy.TrainingEvent(1, 2.5, fit.sampling_probability, fit.steps, len(members))], DELTA
    )

    # Execute
    result = _attack(trainer, members, non_members)

    # Assert: DP at epsilon <= 3, the model learned, and the attack sees no membership.
    assert epsilon <= 3.0
    assert trainer.mean_loss(non_members) < 0.95 * untrained_loss
    assert result.auc <= 0.55
    assert result.epsilon_lower_bound <= epsilon


def _canary_run(digits, noise_multiplier: float):
    members, _ = digits
    settings = TrainSettings(batch_size=10, learning_rate=0.01, l2_norm_clip=1.0)
    return canary_audit(
        SPEC,
        settings,
        members,
        noise_multiplier=noise_multiplier,
        epochs=30,
        delta=DELTA,
        canaries=200,
        guesses=100,
        seed=3,
    )


def _claimed_epsilon(audit, noise_multiplier: float) -> float:
    event = privacy.TrainingEvent(
        1, noise_multiplier, audit.sampling_probability, audit.steps, audit.examples
    )
    return privacy.cumulative_epsilon([event], DELTA)


def test_canary_audit_of_honest_dp_sgd_stays_below_the_accountant(digits) -> None:
    audit = _canary_run(digits, noise_multiplier=5.0)
    assert audit.upper_bound == pytest.approx(_claimed_epsilon(audit, 5.0))
    assert audit.epsilon_lower_bound <= audit.upper_bound
    assert audit.ceiling == pytest.approx(3.49, abs=0.02)
    assert (audit.canaries, audit.guesses) == (200, 100)
    assert audit.examples == 200 + audit.included
    assert audit.steps == 30 * int(np.ceil(audit.examples / 10))


def test_canary_audit_catches_dp_sgd_that_adds_no_noise(digits) -> None:
    # A broken implementation: clipping and Poisson sampling as it should, but (almost) no noise, while
    # its ledger claims sigma 5. The audit's lower bound lands above the claimed epsilon.
    audit = _canary_run(digits, noise_multiplier=1e-6)
    claimed = _claimed_epsilon(audit, 5.0)
    assert audit.correct >= 80
    assert audit.epsilon_lower_bound > claimed


def test_canaries_are_far_from_the_data_and_in_the_models_layout() -> None:
    rng = np.random.default_rng(0)
    images = make_canaries(5, ModelSpec("conv", (8, 8, 1), 4, "sigmoid"), rng)
    assert images.shape == (5, 8, 8, 1) and set(np.unique(images)) <= {0.0, 1.0}
    rows = make_canaries(5, ModelSpec("dense", (30,), 8, "linear"), rng)
    assert rows.shape == (5, 30) and np.all(np.abs(rows) == 4.0)
    with pytest.raises(ValueError, match="canary count must be >= 1, got 0"):
        make_canaries(0, SPEC, rng)


def test_bad_attack_inputs_are_refused_with_the_value() -> None:
    with pytest.raises(
        ValueError, match=r"loss_members must be a 1-D array of at least 4 losses, got shape \(2,\)"
    ):
        membership_inference(np.ones(2), np.ones(10))
    with pytest.raises(ValueError, match="loss_non_members holds 1 non-finite"):
        membership_inference(np.ones(10), np.array([1.0, 2.0, np.nan, 3.0]))
    with pytest.raises(ValueError, match=r"guesses must be in \[1, canaries=10\], got 11"):
        canary_audit(
            SPEC,
            TrainSettings(10, 0.01, 1.0),
            np.zeros((20, 64)),
            noise_multiplier=1.0,
            epochs=1,
            delta=DELTA,
            canaries=10,
            guesses=11,
        )
