"""DP-SGD: clipping bound, noise scale, Poisson sampling, equivalence with plain training, no retracing."""

import numpy as np
import pytest
import tensorflow as tf

from shared.models import ModelSpec
from shared.training import LocalTrainer, TrainingDataError, TrainSettings

DENSE = ModelSpec("dense", (12,), 3, "linear")
CONV = ModelSpec("conv", (8, 8, 1), 4, "sigmoid")
VAE = ModelSpec("vae", (12,), 3, "linear")
DENSE_ELU = ModelSpec("dense", (12,), 3, "linear", "elu")


def _data(spec: ModelSpec, n: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    x = rng.normal(0.0, scale, (n, *spec.input_shape)).astype(np.float32)
    return np.clip(x, 0, 1) if spec.output_activation == "sigmoid" else x


def _true_example_gradient(trainer: LocalTrainer, x: np.ndarray) -> list[np.ndarray]:
    """The gradient of one example's loss computed the slow, obvious way."""
    inputs = tf.constant(x[None])
    model_in = [inputs, tf.zeros((1, trainer.spec.latent_dim))] if trainer.spec.kind == "vae" else inputs
    with tf.GradientTape() as tape:
        loss = trainer.loss_fn(inputs, trainer.model(model_in, training=True))[0]
    return [g.numpy() for g in tape.gradient(loss, trainer.model.trainable_variables)]


def _norm(grads: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads)))


@pytest.mark.parametrize(
    ("spec", "fast"),
    [(DENSE, True), (DENSE_ELU, True), (VAE, True), (CONV, True), (CONV, False), (DENSE, False)],
    ids=["dense-fast", "dense-elu-fast", "vae-fast", "conv-fast", "conv-per-example", "dense-per-example"],
)
def test_clipped_sum_of_one_example_is_its_gradient_scaled_to_the_bound(spec: ModelSpec, fast, rng) -> None:
    # Prepare: a clip norm well below typical gradient norms, and one far above.
    x = _data(spec, 8, rng, scale=3.0)
    for clip in (1e-3, 1e6):
        trainer = LocalTrainer(spec, TrainSettings(4, 1e-3, clip), fast_norms=fast)
        assert trainer.fast_clipping == fast
        if spec.kind == "vae":
            # Decode the posterior mean (noise input 0) so the slow reference sees the same inputs;
            # in training both of fast clipping's passes share one noise draw.
            latent = spec.latent_dim
            trainer._inputs_and_targets = lambda t, k=latent: ([t, tf.zeros((tf.shape(t)[0], k))], t)
        for i in range(3):
            # Execute: the clipped sum for a batch holding example i only.
            clipped = [g.numpy() for g in trainer._clipped_sum_for(tf.constant(x), np.array([i]))[0]]
            true = _true_example_gradient(trainer, x[i])
            # Assert: never above the bound; equal to the true gradient scaled by min(1, C/||g||).
            assert _norm(clipped) <= clip * (1 + 1e-4)
            factor = min(1.0, clip / _norm(true))
            for c, t in zip(clipped, true, strict=True):
                np.testing.assert_allclose(c, t * factor, rtol=2e-3, atol=1e-7 * max(1.0, factor))


def test_every_model_kind_can_take_the_fast_path_and_takes_the_measured_faster_one() -> None:
    from shared.training import FAST_NORMS_BY_KIND

    for spec in (DENSE, VAE, CONV):
        assert LocalTrainer(spec, TrainSettings(4, 1e-3, 1.0), fast_norms=True).fast_clipping
        default = LocalTrainer(spec, TrainSettings(4, 1e-3, 1.0))
        assert default.fast_clipping == FAST_NORMS_BY_KIND[spec.kind]


@pytest.mark.parametrize(
    "layer",
    [
        lambda: tf.keras.layers.Conv2D(5, 3, padding="same", activation="relu"),
        lambda: tf.keras.layers.Conv2D(4, 3, strides=2, padding="same"),
        lambda: tf.keras.layers.Conv2D(3, (2, 3), padding="valid", use_bias=False),
        lambda: tf.keras.layers.Conv2D(3, 3, dilation_rate=2, padding="same", activation="tanh"),
        lambda: tf.keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same", activation="relu"),
        lambda: tf.keras.layers.Conv2DTranspose(3, 3, strides=2, padding="valid"),
        lambda: tf.keras.layers.Conv2DTranspose(2, 2, strides=1, padding="same", use_bias=False),
    ],
    ids=[
        "same",
        "strided",
        "valid-nobias",
        "dilated",
        "transpose-strided",
        "transpose-valid",
        "transpose-s1",
    ],
)
def test_fast_conv_norms_equal_per_example_gradient_norms(layer, rng) -> None:
    from shared.conv_norms import conv2d_layer_computation, conv2d_transpose_layer_computation

    layer = layer()
    x = tf.constant(rng.normal(size=(5, 8, 8, 3)).astype(np.float32))
    target = tf.constant(rng.normal(size=layer(x).shape).astype(np.float32))
    compute = (
        conv2d_transpose_layer_computation
        if isinstance(layer, tf.keras.layers.Conv2DTranspose)
        else conv2d_layer_computation
    )
    with tf.GradientTape() as tape:
        z, outputs, sqr_norm_fn = compute(layer, (x,), {}, tape)
        loss = tf.reduce_sum(tf.square(outputs - target))
    fast = np.sqrt(sqr_norm_fn(tape.gradient(loss, z)).numpy())
    slow = []
    for i in range(5):  # each example's own loss, differentiated the obvious way
        with tf.GradientTape() as tape:
            one = tf.reduce_sum(tf.square(layer(x[i : i + 1]) - target[i : i + 1]))
        slow.append(_norm([g.numpy() for g in tape.gradient(one, layer.trainable_variables)]))
    np.testing.assert_allclose(fast, slow, rtol=1e-4)


def test_every_example_in_a_batch_is_clipped_and_padding_adds_nothing(rng) -> None:
    x = _data(DENSE, 32, rng, scale=5.0)
    trainer = LocalTrainer(DENSE, TrainSettings(8, 1e-3, 0.01))
    idx = np.arange(10)
    summed = trainer._clipped_sum_for(tf.constant(x), idx)[0]
    # Each example contributes at most C, so the sum is at most 10 C (and equals the sum of the
    # individually clipped gradients: padding rows contribute exactly zero).
    singles = [trainer._clipped_sum_for(tf.constant(x), np.array([i]))[0] for i in idx]
    expected = [sum(s[k].numpy() for s in singles) for k in range(len(summed))]
    assert _norm([g.numpy() for g in summed]) <= 10 * 0.01 * (1 + 1e-4)
    for got, want in zip(summed, expected, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-3, atol=1e-8)


def test_noise_has_standard_deviation_sigma_c_over_expected_batch(rng) -> None:
    sigma, clip, batch = 1.7, 0.5, 16
    trainer = LocalTrainer(DENSE, TrainSettings(batch, 1e-3, clip))
    x = _data(DENSE, 32, rng)
    # With no example in the batch the privatised gradient is pure noise / expected batch size.
    noise = np.concatenate(
        [g.ravel() for _ in range(20) for g in trainer.dp_gradient(x, np.array([], dtype=int), sigma)]
    )
    expected = sigma * clip / batch
    # ~10^4 draws: the sample standard deviation is within 3% of the truth with overwhelming probability.
    assert abs(noise.std() / expected - 1.0) < 0.03
    assert abs(noise.mean()) < 4 * expected / np.sqrt(noise.size)


def test_poisson_batches_have_expected_size_q_n(rng) -> None:
    n, batch = 400, 40
    trainer = LocalTrainer(DENSE, TrainSettings(batch, 1e-3, 1.0))
    sizes = []
    original = trainer._dp_step_for

    def spy(x_all, indices, noise):
        sizes.append(len(indices))
        return original(x_all, indices, noise)

    trainer._dp_step_for = spy  # type: ignore[method-assign]
    result = trainer.fit(_data(DENSE, n, rng), epochs=5, noise_multiplier=1.0, seed=3)
    assert result.steps == 5 * 10 and result.sampling_probability == pytest.approx(0.1)
    sizes = np.array(sizes)
    # Binomial(400, 0.1): mean 40, sd 6; variable sizes prove sampling is Poisson, not fixed batches.
    assert abs(sizes.mean() - 40) < 3 * 6 / np.sqrt(len(sizes)) + 0.5
    assert sizes.std() > 3


def test_no_noise_and_huge_clip_matches_plain_training(rng) -> None:
    x = _data(DENSE, 16, rng)
    dp = LocalTrainer(DENSE, TrainSettings(16, 1e-2, 1e9))
    plain = LocalTrainer(DENSE, TrainSettings(16, 1e-2, 0.0))
    plain.set_weights(dp.get_weights())
    everything = np.arange(16)
    for _ in range(3):
        dp._update(dp._clipped_sum_for(tf.constant(x), everything)[0], dp._standard_noise())
        plain._plain_step(tf.constant(x), *plain._padded(everything, 16))
    for a, b in zip(dp.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_training_reduces_loss_and_does_not_retrace_across_clients(rng) -> None:
    trainer = LocalTrainer(DENSE, TrainSettings(16, 1e-2, 1.0))
    x_a, x_b = _data(DENSE, 200, rng), _data(DENSE, 321, rng)
    before = trainer.mean_loss(x_a)
    trainer.fit(x_a, epochs=3, noise_multiplier=0.5, seed=1)
    traces = trainer.trace_count
    for data in (x_b, x_a, x_b):  # other clients (other sizes), other rounds
        trainer.fit(data, epochs=1, noise_multiplier=0.5, seed=2)
    assert trainer.trace_count == traces
    assert trainer.mean_loss(x_a) < before


def test_fewer_rows_than_a_batch_is_a_clear_error(rng) -> None:
    trainer = LocalTrainer(DENSE, TrainSettings(64, 1e-3, 1.0))
    with pytest.raises(TrainingDataError, match="10 training rows is fewer than batch-size 64"):
        trainer.fit(_data(DENSE, 10, rng), epochs=1)


def test_vae_trains_with_dp_and_reports_per_example_loss(rng) -> None:
    trainer = LocalTrainer(VAE, TrainSettings(16, 1e-2, 1.0))
    x = _data(VAE, 128, rng)
    before = trainer.mean_loss(x)
    result = trainer.fit(x, epochs=4, noise_multiplier=0.8, seed=0)
    assert np.isfinite(result.loss)
    assert trainer.mean_loss(x) < before


def test_shuffled_batches_have_exactly_b_examples_each_seen_once_per_epoch(rng) -> None:
    n, batch, epochs = 100, 16, 3
    trainer = LocalTrainer(DENSE, TrainSettings(batch, 1e-3, 1.0, sampling="shuffle"))
    batches = []
    original = trainer._dp_step_for

    def spy(x_all, indices, noise):
        batches.append(np.array(indices))
        return original(x_all, indices, noise)

    trainer._dp_step_for = spy  # type: ignore[method-assign]
    result = trainer.fit(_data(DENSE, n, rng), epochs=epochs, noise_multiplier=1.0, seed=5)
    per_epoch = n // batch
    assert result.steps == epochs * per_epoch == len(batches) and result.sampling == "shuffle"
    assert all(len(b) == batch for b in batches)
    for e in range(epochs):
        seen = np.concatenate(batches[e * per_epoch : (e + 1) * per_epoch])
        assert len(np.unique(seen)) == len(seen) == per_epoch * batch  # nobody twice in an epoch
    # A fresh permutation each epoch, not the same batches again.
    assert not np.array_equal(batches[0], batches[per_epoch])


def test_one_trainer_serves_any_noise_multiplier_without_retracing(rng) -> None:
    trainer = LocalTrainer(DENSE, TrainSettings(16, 1e-3, 0.5))
    x = _data(DENSE, 64, rng)
    trainer.fit(x, epochs=1, noise_multiplier=0.7, seed=0)
    traces = trainer.trace_count
    trainer.fit(x, epochs=1, noise_multiplier=3.1, seed=0)
    assert trainer.trace_count == traces
    assert trainer.noise_std.numpy() == pytest.approx(3.1 * 0.5)
    with pytest.raises(ValueError, match="noise_multiplier must be a finite number >= 0"):
        trainer.fit(x, epochs=1, noise_multiplier=-1.0)


@pytest.mark.parametrize(
    "settings",
    [
        TrainSettings(16, 1e-2, 1.0),
        TrainSettings(16, 1e-2, 1.0, denoise_stddev=0.3),  # the clipped sum draws too
    ],
    ids=["plain-inputs", "denoising"],
)
@pytest.mark.parametrize("spec", [DENSE, VAE], ids=["dense", "vae"])
def test_noise_drawn_ahead_on_a_worker_equals_drawing_it_step_by_step(spec, settings, rng) -> None:
    """fit draws step t+1's noise on a worker thread during step t: the weights must be those of the
    sequential loop (clipped sum, then noise, then update), including an oversized batch that is split
    into chunks."""
    x = _data(spec, 200, rng)
    pipelined = LocalTrainer(spec, settings)
    sequential = LocalTrainer(spec, settings)
    sequential.set_weights(pipelined.get_weights())
    batches = [np.flatnonzero(rng.random(200) < 0.08) for _ in range(6)]
    batches.insert(3, np.arange(pipelined.capacity + 5))  # more rows than the padded capacity
    for trainer in (pipelined, sequential):
        trainer._reseed(11)
        trainer.noise_std.assign(0.7)
    x_all = tf.constant(x)
    pipelined._fit_dp(x_all, batches)
    for indices in batches:
        sequential._update(sequential._clipped_sum_for(x_all, indices)[0], sequential._standard_noise())
    for a, b in zip(pipelined.get_weights(), sequential.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # One draw per step, none ahead of the last: both noise streams end in the same place.
    np.testing.assert_array_equal(pipelined.dp_noise_generator.state, sequential.dp_noise_generator.state)


def test_nearby_seeds_draw_unrelated_noise() -> None:
    """Seeds s and s + 1 must not give one stream shifted (tf.random.Generator.reset_from_seed does),
    and the DP noise must not repeat the model's own input randomness."""
    trainer = LocalTrainer(DENSE, TrainSettings(16, 1e-2, 1.0))
    draws = []
    for seed in (3, 4):
        trainer._reseed(seed)
        draws.append(np.concatenate([z.numpy().ravel() for z in trainer._standard_noise()]))
    trainer._reseed(3)
    inputs = trainer.noise_generator.normal([draws[0].size]).numpy()
    for other in (draws[1], inputs):
        assert np.intersect1d(draws[0], other).size == 0  # no shared values, shifted or not
        assert abs(np.corrcoef(draws[0], other)[0, 1]) < 5 / np.sqrt(draws[0].size)
    assert draws[0].std() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("spec", [DENSE, DENSE_ELU, VAE], ids=["dense", "dense-elu", "vae"])
def test_bookkept_clipped_sum_equals_the_per_example_gradient_clipped_sum(spec, rng) -> None:
    """One pass (shared.bookkeeping) against per-example gradients taken one by one: the same norms,
    the same clipped sum, some examples clipped and some not, padding rows contributing exactly zero."""
    from tensorflow_privacy.privacy.fast_gradient_clipping.gradient_clipping_utils import model_forward_pass

    from shared import bookkeeping

    trainer = LocalTrainer(spec, TrainSettings(8, 1e-3, 1.0))
    assert trainer.bookkeeping
    n, pad = 9, 4
    x = tf.constant(_data(spec, n + pad, rng, scale=2.0))
    weights = tf.constant([1.0] * n + [0.0] * pad)
    eps = tf.constant(rng.normal(size=(n + pad, spec.latent_dim)).astype(np.float32))
    inputs = [x, eps] if spec.kind == "vae" else x
    variables = trainer.model.trainable_variables
    slow_grads, slow_norms = [], []
    for i in range(n):  # each example's own loss, differentiated the obvious way
        one = [x[i : i + 1], eps[i : i + 1]] if spec.kind == "vae" else x[i : i + 1]
        with tf.GradientTape() as tape:
            loss = trainer.loss_fn(x[i : i + 1], trainer.model(one, training=True))[0]
        grads = [g.numpy().astype(np.float64) for g in tape.gradient(loss, variables)]
        slow_grads.append(grads)
        slow_norms.append(_norm(grads))
    clip = float(np.median(slow_norms))  # about half the examples clipped
    expected = [
        sum(g[k] * min(1.0, clip / norm) for g, norm in zip(slow_grads, slow_norms, strict=True))
        for k in range(len(variables))
    ]
    summed, losses, norms = bookkeeping.clipped_sum(
        model_forward_pass, trainer.model, trainer.loss_fn, inputs, x, weights, clip
    )
    np.testing.assert_allclose(norms.numpy()[:n], slow_norms, rtol=1e-4)
    assert np.all(norms.numpy()[n:] == 0.0)  # padding: g = 0 exactly, so nothing of it reaches the sum
    assert 0 < sum(norm > clip for norm in slow_norms) < n
    for got, want in zip(summed, expected, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    np.testing.assert_allclose(losses.numpy(), trainer.loss_fn(x, trainer.model(inputs)).numpy(), rtol=1e-6)


@pytest.mark.parametrize("spec", [DENSE, VAE], ids=["dense", "vae"])
def test_bookkeeping_and_two_pass_fast_clipping_give_the_same_compiled_clipped_sum(spec, rng) -> None:
    """The trainers' compiled (XLA) clipped sums, book-kept and tensorflow-privacy's two passes, for the
    same weights and the same model noise."""
    x = tf.constant(_data(spec, 40, rng, scale=2.0))
    one_pass = LocalTrainer(spec, TrainSettings(8, 1e-3, 0.05))
    two_pass = LocalTrainer(spec, TrainSettings(8, 1e-3, 0.05), bookkeeping_clipping=False)
    assert one_pass.bookkeeping and two_pass.fast_clipping and not two_pass.bookkeeping
    two_pass.set_weights(one_pass.get_weights())
    indices = rng.choice(40, size=11, replace=False)
    results = []
    for trainer in (one_pass, two_pass):
        trainer._reseed(5)  # the VAE's eps: the same draw for both
        results.append(trainer._clipped_sum_for(x, indices))
    (a, loss_a), (b, loss_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for got, want in zip(a, b, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_bookkeeping_only_for_models_of_dense_layers() -> None:
    assert not LocalTrainer(CONV, TrainSettings(4, 1e-3, 1.0), fast_norms=True).bookkeeping
    assert not LocalTrainer(DENSE, TrainSettings(4, 1e-3, 1.0), fast_norms=False).bookkeeping
    with pytest.raises(ValueError, match="book-kept clipping needs"):
        LocalTrainer(CONV, TrainSettings(4, 1e-3, 1.0), fast_norms=True, bookkeeping_clipping=True)


def test_without_xla_batches_are_padded_to_the_next_size_and_padding_adds_nothing(rng) -> None:
    spec = CONV
    trainer = LocalTrainer(spec, TrainSettings(16, 1e-3, 1.0))
    assert trainer.pad_sizes == (16, 20, 24, trainer.capacity) and trainer.capacity == 33
    dense = LocalTrainer(DENSE, TrainSettings(16, 1e-3, 1.0))
    assert dense.pad_sizes == (dense.capacity,)  # XLA compiles per shape: one size
    x = tf.constant(_data(spec, 60, rng))
    for rows, padded_to in ((12, 16), (17, 20), (21, 24), (30, 33)):
        chunk = rng.choice(60, rows, replace=False)
        idx, weights = trainer._padded(chunk)
        assert len(idx) == padded_to and float(tf.reduce_sum(weights)) == rows
        by_size = trainer._clipped_sum(x, idx, weights)[0]
        full = trainer._clipped_sum(x, *trainer._padded(chunk, trainer.capacity))[0]
        for a, b in zip(by_size, full, strict=True):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    assert trainer.trace_count == 1  # one trace serves every size
