"""PGD adversarial training inside DP-SGD: perturbations stay in their ball and range, depend on their own
row only, padding still adds nothing, clipping still bounds each example, and the privacy event is the
one without adversarial training."""

import numpy as np
import pytest
import tensorflow as tf

from shared.config import ConfigError, FedaeConfig
from shared.models import ModelSpec
from shared.training import LocalTrainer, TrainSettings

EPSILON = 0.05
DENSE = ModelSpec("dense", (12,), 3, "linear")  # a table: no range to clamp to
IMAGE = ModelSpec("dense", (16,), 4, "sigmoid")  # flattened pixels in [0, 1]
CONV = ModelSpec("conv", (8, 8, 1), 4, "sigmoid")
VAE = ModelSpec("vae", (12,), 3, "linear")
KINDS = [DENSE, IMAGE, CONV, VAE]
KIND_IDS = ["dense-table", "dense-image", "conv", "vae"]


def _settings(spec: ModelSpec, clip: float = 1.0, **changes) -> TrainSettings:
    image = spec.output_activation == "sigmoid"
    options = {"input_range": (0.0, 1.0) if image else None, "adversarial_epsilon": EPSILON, **changes}
    return TrainSettings(8, 1e-3, clip, **options)


def _data(spec: ModelSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    if spec.output_activation == "sigmoid":
        # Many pixels at the range's ends, as in digit images: the clamp matters there.
        return np.clip(rng.normal(0.5, 0.6, (n, *spec.input_shape)), 0, 1).astype(np.float32)
    return rng.normal(0.0, 1.0, (n, *spec.input_shape)).astype(np.float32)


def _perturbed(trainer: LocalTrainer, x: np.ndarray, seed: int = 7) -> np.ndarray:
    """The perturbed inputs the trainer's step would train on, for a fixed random start."""
    trainer._reseed(seed)
    inputs, _ = trainer._inputs_and_targets(tf.constant(x))
    return (inputs[0] if trainer.spec.kind == "vae" else inputs).numpy()


def _losses(trainer: LocalTrainer, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    model_in = inputs
    if trainer.spec.kind == "vae":
        model_in = [tf.constant(inputs), tf.zeros((len(inputs), trainer.spec.latent_dim))]
    return trainer.loss_fn(tf.constant(targets), trainer.model(model_in)).numpy()


def _norm(grads: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads)))


def _without_vae_noise(trainer: LocalTrainer, target: str = "clean"):
    """The VAE trainer's inputs and targets with eps = 0 (the posterior mean) in the search and the step,
    so that a reference computed without the trainer sees the same model function."""

    def inputs_and_targets(x: tf.Tensor):
        eps = tf.zeros((tf.shape(x)[0], trainer.spec.latent_dim))
        adversarial = trainer._adversarial(x, eps)
        return [adversarial, eps], (x if target == "clean" else adversarial)

    return inputs_and_targets


@pytest.mark.parametrize("spec", KINDS, ids=KIND_IDS)
def test_perturbation_stays_in_the_ball_and_the_valid_range_and_raises_the_loss(spec, rng) -> None:
    # Prepare: target "perturbed", whose loss moves with the input even for an untrained model (an
    # untrained sigmoid decoder outputs about 0.5 whatever it is given).
    trainer = LocalTrainer(spec, _settings(spec, adversarial_target="perturbed"))
    if spec.kind == "vae":  # score with the same eps the search used: none, to compare like with like
        trainer._inputs_and_targets = _without_vae_noise(trainer, "perturbed")
    x = _data(spec, 32, rng)
    # Execute
    adversarial = _perturbed(trainer, x)
    # Assert: within the L-infinity ball (float32 rounding aside) and, for images, within [0, 1].
    assert np.abs(adversarial - x).max() <= EPSILON * (1 + 1e-5)
    if spec.output_activation == "sigmoid":
        assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    else:
        assert np.abs(adversarial - x).max() >= 0.99 * EPSILON  # no clamp: PGD reaches the ball's edge
    # PGD beats a random point of the same ball for nearly every row.
    random_point = x + rng.uniform(-EPSILON, EPSILON, x.shape).astype(np.float32)
    if spec.output_activation == "sigmoid":
        random_point = np.clip(random_point, 0, 1)
    pgd_loss = _losses(trainer, adversarial, adversarial)
    random_loss = _losses(trainer, random_point, random_point)
    assert np.mean(pgd_loss > random_loss) >= 0.9 and np.all(pgd_loss >= _losses(trainer, x, x) - 1e-7)


@pytest.mark.parametrize("spec", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("target", ["clean", "perturbed"])
def test_a_rows_perturbation_depends_on_that_row_only_padding_included(spec, target, rng) -> None:
    # Prepare: a padded batch of 5 real rows; then row 2 changed and the padding pointed at another row.
    trainer = LocalTrainer(spec, _settings(spec, adversarial_target=target))
    x = _data(spec, 20, rng)
    idx, weights = trainer._padded(np.array([3, 1, 4, 15, 9]))
    changed = x.copy()
    changed[4] = _data(spec, 1, rng)[0]  # the batch's row 2
    other_idx = idx.numpy().copy()
    other_idx[5:] = 11  # padding rows: another example's values
    # Execute: the same random start (seed) for both.
    before = _perturbed(trainer, x[idx.numpy()])
    after = _perturbed(trainer, changed[other_idx])
    # Assert: every other real row's perturbation is unchanged, row 2's did change.
    for i in (0, 1, 3, 4):
        np.testing.assert_allclose(after[i], before[i], rtol=0, atol=1e-6)
    assert not np.allclose(after[2], before[2])
    assert float(tf.reduce_sum(weights)) == 5


@pytest.mark.parametrize(
    ("spec", "fast"),
    [(DENSE, True), (IMAGE, True), (VAE, True), (CONV, True), (CONV, False), (DENSE, False)],
    ids=["dense-bookkept", "image-bookkept", "vae-bookkept", "conv-fast", "conv-per-example", "dense-per-ex"],
)
def test_padding_rows_still_contribute_exactly_zero(spec, fast, rng) -> None:
    # Prepare: padding pointing at an ordinary row, then at a row scaled up to give huge gradients.
    trainer = LocalTrainer(spec, _settings(spec, clip=0.5), fast_norms=fast)
    x = _data(spec, 12, rng)
    x[11] = x[11] * 50 if spec.output_activation != "sigmoid" else 1.0 - x[11]
    idx, weights = trainer._padded(np.array([2, 7, 5]), trainer.capacity)
    loud = idx.numpy().copy()
    loud[3:] = 11
    results = []
    for padding in (idx, tf.constant(loud)):
        # Execute: the compiled clipped sum, with the same random starts.
        trainer._reseed(3)
        results.append(trainer._clipped_sum(tf.constant(x), padding, weights))
    # Assert: the same sum and the same summed loss, whatever the padding rows hold.
    (a, loss_a), (b, loss_b) = results
    assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-6)
    for got, want in zip(a, b, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-8)
    # No real row at all: exactly zero.
    trainer._reseed(3)
    empty = trainer._clipped_sum(tf.constant(x), idx, tf.zeros_like(weights))[0]
    assert all(not np.any(g.numpy()) for g in empty)


@pytest.mark.parametrize(
    ("spec", "fast"),
    [(DENSE, True), (IMAGE, True), (VAE, True), (CONV, True), (CONV, False)],
    ids=["dense-bookkept", "image-bookkept", "vae-bookkept", "conv-fast", "conv-per-example"],
)
@pytest.mark.parametrize("target", ["clean", "perturbed"])
def test_each_example_is_its_perturbed_gradient_clipped_to_the_bound(spec, fast, target, rng) -> None:
    x = _data(spec, 6, rng)
    for clip in (1e-3, 1e6):  # every example clipped; none clipped
        # Prepare: the step run eagerly, so the reference sees the very same random start.
        trainer = LocalTrainer(spec, _settings(spec, clip=clip, adversarial_target=target), fast_norms=fast)
        if spec.kind == "vae":
            trainer._inputs_and_targets = _without_vae_noise(trainer, target)
        for i in range(3):
            idx, weights = trainer._padded(np.array([i]))
            trainer._reseed(11 + i)
            clipped = [g.numpy() for g in trainer._clipped_sum_impl(tf.constant(x), idx, weights)[0]]
            trainer._reseed(11 + i)
            inputs, targets = trainer._inputs_and_targets(tf.gather(tf.constant(x), idx))
            # Execute: example i's gradient at its perturbed point, the obvious way.
            one = tf.nest.map_structure(lambda t: t[:1], inputs)
            with tf.GradientTape() as tape:
                loss = trainer.loss_fn(targets[:1], trainer.model(one, training=True))[0]
            true = [g.numpy() for g in tape.gradient(loss, trainer.model.trainable_variables)]
            # Assert: never above the bound; the true gradient scaled by min(1, C / ||g||).
            assert _norm(clipped) <= clip * (1 + 1e-4)
            factor = min(1.0, clip / _norm(true))
            for c, t in zip(clipped, true, strict=True):
                np.testing.assert_allclose(c, t * factor, rtol=2e-3, atol=1e-7 * max(1.0, factor))


@pytest.mark.parametrize("spec", [DENSE, CONV], ids=["dense", "conv"])
def test_the_privacy_event_and_the_batches_are_those_without_adversarial_training(spec, rng) -> None:
    from shared.data.sources import DataSpec
    from shared.task import planned_event, train_settings

    # Prepare: the same data, seed and noise multiplier, with and without adversarial training.
    x = _data(spec, 96, rng)
    runs = {}
    for epsilon in (0.0, 0.1):
        trainer = LocalTrainer(spec, _settings(spec, adversarial_epsilon=epsilon))
        batches = []
        original = trainer._dp_step_for

        def spy(x_all, indices, noise, original=original, batches=batches):
            batches.append(np.array(indices))
            return original(x_all, indices, noise)

        trainer._dp_step_for = spy  # type: ignore[method-assign]
        # Execute
        result = trainer.fit(x, epochs=2, noise_multiplier=1.3, seed=5)
        runs[epsilon] = (result, batches, trainer.dp_noise_generator.state.numpy())
    # Assert: what the accountant is told, the batches sampled and the DP noise drawn are identical.
    (plain, plain_batches, plain_noise), (adv, adv_batches, adv_noise) = runs[0.0], runs[0.1]
    facts = ("steps", "sampling_probability", "num_examples", "epochs", "noise_multiplier", "sampling")
    assert all(getattr(plain, name) == getattr(adv, name) for name in facts)
    assert len(plain_batches) == len(adv_batches) == plain.steps
    assert all(np.array_equal(a, b) for a, b in zip(plain_batches, adv_batches, strict=True))
    np.testing.assert_array_equal(plain_noise, adv_noise)
    # And the event the client charges its ledger before training.
    config = FedaeConfig(scenario="digits")
    adversarial = config.replace(adversarial_training_epsilon=0.1, adversarial_training_steps=3)
    assert planned_event(config, 96, 4, 1.3) == planned_event(adversarial, 96, 4, 1.3)
    settings = train_settings(adversarial, DataSpec("image", (8, 8, 1), value_range=(0.0, 16.0)))
    assert (settings.adversarial_epsilon, settings.adversarial_steps, settings.input_range) == (
        0.1,
        3,
        (0, 1),
    )


@pytest.mark.parametrize("spec", KINDS, ids=KIND_IDS)
def test_plain_and_dp_training_run_for_every_kind_without_retracing(spec, rng) -> None:
    x = _data(spec, 64, rng)
    for clip, sigma in ((1.0, 0.8), (0.0, 0.0)):  # DP-SGD, and the non-private baseline
        trainer = LocalTrainer(spec, _settings(spec, clip=clip))
        trainer.fit(x, epochs=1, noise_multiplier=sigma, seed=0)
        traces = trainer.trace_count
        result = trainer.fit(x[:40], epochs=2, noise_multiplier=sigma, seed=1)
        assert np.isfinite(result.loss) and trainer.trace_count == traces


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"adversarial_epsilon": -0.1}, "adversarial_epsilon must be a finite number >= 0, got -0.1"),
        ({"adversarial_epsilon": float("inf")}, "adversarial_epsilon must be a finite number >= 0, got inf"),
        ({"adversarial_steps": 0}, "adversarial_steps must be >= 1, got 0"),
        (
            {"adversarial_target": "both"},
            "adversarial_target must be one of ('clean', 'perturbed'), got 'both'",
        ),
        ({"denoise_stddev": 0.2}, "cannot be combined"),
    ],
)
def test_bad_train_settings_are_refused_with_the_value(changes: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        TrainSettings(8, 1e-3, 1.0, **{"adversarial_epsilon": 0.05, **changes})
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"adversarial-training-epsilon": -0.05}, "adversarial-training-epsilon must be >= 0, got -0.05"),
        ({"adversarial-training-epsilon": "nan"}, "adversarial-training-epsilon must be >= 0, got nan"),
        (
            {"adversarial-training-epsilon": "wide"},
            "adversarial-training-epsilon must be a number, got 'wide'",
        ),
        ({"adversarial-training-steps": 0}, "adversarial-training-steps must be >= 1, got 0"),
        ({"adversarial-training-steps": 2.5}, "adversarial-training-steps must be an integer, got 2.5"),
        (
            {"adversarial-training-target": "noisy"},
            "adversarial-training-target must be one of clean, perturbed",
        ),
        (
            {"adversarial-training-epsilon": 0.05, "denoise-stddev": 0.1},
            "adversarial-training-epsilon (0.05) and denoise-stddev (0.1)",
        ),
    ],
)
def test_bad_adversarial_training_config_is_refused_with_the_key_and_value(
    overrides: dict, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        FedaeConfig().with_overrides(overrides)
    assert message in str(info.value)


def test_adversarial_config_parses_and_its_targets_match_the_trainer() -> None:
    from shared import config as config_module
    from shared.training import ADVERSARIAL_TARGETS

    config = FedaeConfig().with_overrides(
        {"adversarial-training-epsilon": "0.05", "adversarial-training-steps": "3"}
    )
    assert (config.adversarial_training_epsilon, config.adversarial_training_steps) == (0.05, 3)
    assert FedaeConfig().adversarial_training_epsilon == 0.0  # off by default
    assert config_module.ADVERSARIAL_TARGETS == ADVERSARIAL_TARGETS


def test_dp_step_without_noise_or_clipping_is_the_plain_adversarial_step(rng) -> None:
    """The DP step trains on the same perturbed examples as the plain step: with no noise and a clip
    norm no gradient reaches, both give the same weights (the conv model, compiled without XLA, where the
    two agree to rounding; the XLA kinds are checked against the eager step below)."""
    # Prepare: the same weights and random starts; 16 rows, two batches of 8.
    x = tf.constant(_data(CONV, 16, rng))
    dp = LocalTrainer(CONV, _settings(CONV, clip=1e9, adversarial_target="perturbed"))
    plain = LocalTrainer(CONV, _settings(CONV, clip=0.0, adversarial_target="perturbed"))
    plain.set_weights(dp.get_weights())
    for trainer in (dp, plain):
        trainer._reseed(2)
    # Execute
    for half in (np.arange(8), np.arange(8, 16)):
        dp._update(dp._clipped_sum_for(x, half)[0], dp._standard_noise())  # noise_std is 0
        plain._plain_step(x, *plain._padded(half, 8))
    # Assert
    for a, b in zip(dp.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


class _NoRandomness:
    """A stand-in for the trainer's input-noise generator that draws zeros: PGD then starts at the row
    itself and the VAE decodes its posterior mean, the same in XLA and eagerly (their Philox draws differ)."""

    def uniform(self, shape, minval=0.0, maxval=1.0):
        return tf.zeros(shape)

    def normal(self, shape, stddev=1.0):
        return tf.zeros(shape)


@pytest.mark.parametrize("spec", [DENSE, VAE], ids=["dense", "vae"])
def test_the_compiled_xla_step_perturbs_as_the_eager_one(spec, rng) -> None:
    """The compiled (XLA) DP step trains on the perturbation that the eager code computes."""
    # Prepare: a batch of 6 padded to capacity, and a trainer without adversarial training, same weights.
    x = tf.constant(_data(spec, 20, rng))
    trainer = LocalTrainer(spec, _settings(spec, clip=1e9, adversarial_epsilon=0.3))
    without = LocalTrainer(spec, _settings(spec, clip=1e9, adversarial_epsilon=0.0))
    without.set_weights(trainer.get_weights())
    trainer.noise_generator = without.noise_generator = _NoRandomness()  # before the first trace
    idx, weights = trainer._padded(np.array([1, 4, 9, 12, 16, 19]))
    # Execute
    sums = {
        name: np.concatenate([g.numpy().ravel() for g in run(x, idx, weights)[0]])
        for name, run in (
            ("compiled", trainer._clipped_sum),
            ("eager", trainer._clipped_sum_impl),
            ("without", without._clipped_sum),
        )
    }
    # Assert: XLA's step is the eager step up to rounding, and far from the step without perturbation.
    scale = np.abs(sums["eager"]).max()
    np.testing.assert_allclose(sums["compiled"], sums["eager"], rtol=1e-4, atol=1e-6 * scale)
    assert np.linalg.norm(sums["without"] - sums["eager"]) > 0.1 * np.linalg.norm(sums["eager"])


@pytest.mark.parametrize(
    ("spec", "fast"),
    [(DENSE, None), (DENSE, False), (VAE, None), (CONV, None), (CONV, True)],
    ids=["dense-bookkept-xla", "dense-per-example", "vae-bookkept-xla", "conv-per-example", "conv-fast"],
)
def test_the_compiled_step_gives_one_row_the_same_clipped_contribution_whatever_else_is_sampled(
    spec, fast, rng
) -> None:
    """The compiled clipped sum, real random starts: a row's contribution (weight on it alone) does not
    change when every other row, the padding's source or the batch's padded size changes; it stays within
    the bound; and it is not the contribution without adversarial training (the perturbation is used)."""
    clip = 0.5
    trainer = LocalTrainer(spec, _settings(spec, clip=clip), fast_norms=fast)
    plain = LocalTrainer(spec, _settings(spec, clip=clip, adversarial_epsilon=0.0), fast_norms=fast)
    plain.set_weights(trainer.get_weights())
    x = _data(spec, 30, rng)

    def contribution(model: LocalTrainer, data: np.ndarray, chunk: list[int]) -> list[np.ndarray]:
        idx, weights = model._padded(np.array(chunk))
        only = np.zeros(len(weights), np.float32)
        only[2] = 1.0  # row 4 of the data, at position 2
        model._reseed(5)
        return [g.numpy() for g in model._clipped_sum(tf.constant(data), idx, tf.constant(only))[0]]

    alone = contribution(trainer, x, [3, 1, 4, 15, 9])
    others = x.copy()
    others[[0, 1, 3, 9, 15]] = _data(spec, 5, rng)  # every other row and the padding's source
    for changed in (
        contribution(trainer, others, [3, 1, 4, 15, 9]),
        contribution(trainer, x, [3, 1, 4, 15, 9, 20, 21, 22, 23, 24]),  # a larger padded batch
    ):
        for a, b in zip(alone, changed, strict=True):
            np.testing.assert_array_equal(a, b)
    assert _norm(alone) <= clip * (1 + 1e-4)
    unperturbed = contribution(plain, x, [3, 1, 4, 15, 9])
    assert max(float(np.abs(a - u).max()) for a, u in zip(alone, unperturbed, strict=True)) > 1e-6
