"""Local training with DP-SGD, the only module that imports tensorflow-privacy.

DP-SGD here follows Abadi et al. (2016). With ``sampling = "poisson"`` (the default), each step is the
Poisson-subsampled Gaussian mechanism the accountant assumes:

1. each step includes every local example independently with probability ``q = batch-size / n``;
2. each included example's gradient is clipped to L2 norm ``l2-norm-clip`` (C);
3. Gaussian noise N(0, (noise-multiplier * C)^2) is added to the *sum* of clipped gradients;
4. the sum is divided by the *expected* batch size ``q * n``, not the sampled one: the sampled size is
   itself data-dependent and dividing by it would leak it (as Opacus does for Poisson sampling).

With ``sampling = "shuffle"`` each epoch is a fresh random permutation cut into ``floor(n / B)`` batches
of exactly B examples (the remainder sits the epoch out), steps 2-3 are the same, and the sum is divided
by B. ``shared.privacy`` accounts that differently (no amplification by sampling, see there).

Per-example gradient norms come from tensorflow-privacy's fast ("ghost") clipping
(``clip_grads.compute_gradient_norms`` with its layer registry, extended with fedae's Conv2D and
Conv2DTranspose functions in ``shared.conv_norms``) when every trainable layer is registered (all three
model kinds); otherwise from exact per-example gradients with ``tf.vectorized_map``. When every trainable
layer is a Dense layer on rank-2 inputs (the dense autoencoder and the VAE), ``shared.bookkeeping`` forms
the clipped sum from the fast norms' own forward and backward pass instead of running a second one. All
give the same clipped sum; only the speed differs. Batches are padded to a fixed size with zero-weight rows,
so shapes never change and nothing retraces; zero-weight rows contribute exactly zero.

Optional PGD adversarial training (``adversarial_epsilon > 0``) replaces each sampled example by a
perturbation of it found inside the step, from that example and the current weights alone, before its
gradient is clipped (``LocalTrainer._adversarial``): the mechanism and its accounting are unchanged.

A trainer is built once per process and model configuration and reused across rounds and across the
virtual clients a simulation worker serves (weights set, optimizer state reset, RNG reseeded per fit).
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from shared.tfenv import load_tensorflow

tf = load_tensorflow()  # tensorflow-privacy is imported only after tfenv's switches are set

from tensorflow_privacy.privacy.fast_gradient_clipping import (
    clip_grads,
    gradient_clipping_utils,
    layer_registry,
)

from shared import bookkeeping, conv_norms
from shared.data.errors import TrainingDataError
from shared.models import ModelSpec, build_model, per_example_loss

SAMPLINGS = ("poisson", "shuffle")
# What an adversarially perturbed example x + delta is trained to reconstruct (``_inputs_and_targets``).
ADVERSARIAL_TARGETS = ("clean", "perturbed")
# Measured with benchmarks/dp_overhead.py on CPU (docs/BENCHMARKS.md): for the small conv autoencoder,
# exact per-example gradients (vectorized_map) cost 1.7x a plain epoch, fast norms plus their second
# backward pass 2.5x; for the dense models fast (there: book-kept) norms win by far (2.3x against 31x).
# XLA speeds up the dense models and slows CPU convolutions, so it compiles dense and VAE steps only.
FAST_NORMS_BY_KIND = {"dense": True, "vae": True, "conv": False}
XLA_KINDS = ("dense", "vae")
__all__ = [
    "ADVERSARIAL_TARGETS",
    "SAMPLINGS",
    "FitResult",
    "LocalTrainer",
    "TrainSettings",
    "TrainingDataError",
    "get_trainer",
]
logger = logging.getLogger(f"fedae.{__name__}")


@dataclass(frozen=True)
class TrainSettings:
    """The settings that shape the compiled training functions; one trainer per distinct value."""

    batch_size: int
    learning_rate: float
    l2_norm_clip: float  # 0: plain (non-private) training
    denoise_stddev: float = 0.0
    input_range: tuple[float, float] | None = None  # clamp noisy inputs (images) to this range
    sampling: str = "poisson"  # or "shuffle": fixed-size batches from a per-epoch permutation
    # PGD adversarial training (``LocalTrainer._adversarial``): each sampled example is replaced by the
    # point of its own L-infinity ball of this radius (model input space, clamped to ``input_range``)
    # that maximises its own training loss, found in ``adversarial_steps`` signed-gradient steps from a
    # random start; 0: off. ``adversarial_target``: what the perturbed example is trained to reconstruct.
    adversarial_epsilon: float = 0.0
    adversarial_steps: int = 5
    adversarial_target: str = "perturbed"

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if not (self.adversarial_epsilon >= 0 and math.isfinite(self.adversarial_epsilon)):
            raise ValueError(
                f"adversarial_epsilon must be a finite number >= 0, got {self.adversarial_epsilon}"
            )
        if self.adversarial_steps < 1:
            raise ValueError(f"adversarial_steps must be >= 1, got {self.adversarial_steps}")
        if self.adversarial_target not in ADVERSARIAL_TARGETS:
            raise ValueError(
                f"adversarial_target must be one of {ADVERSARIAL_TARGETS}, got {self.adversarial_target!r}"
            )
        if self.adversarial_epsilon > 0 and self.denoise_stddev > 0:
            # Both replace the input; which one the target would be clean of is ambiguous: refuse.
            raise ValueError(
                f"adversarial training (epsilon {self.adversarial_epsilon:g}) and denoising (stddev "
                f"{self.denoise_stddev:g}) cannot be combined; set one of them to 0"
            )

    @property
    def adversarial(self) -> bool:
        return self.adversarial_epsilon > 0

    @property
    def dp(self) -> bool:
        return self.l2_norm_clip > 0


@dataclass(frozen=True)
class FitResult:
    """What one local fit did; the sampling facts feed the privacy accountant."""

    loss: float  # mean per-example training loss (unclipped), over examples seen
    steps: int
    sampling_probability: float  # Poisson: q; shuffle: the batch fraction B / n
    num_examples: int
    epochs: int
    noise_multiplier: float
    sampling: str


class LocalTrainer:
    """A model plus compiled DP-SGD (or plain) training steps for one model spec and settings."""

    def __init__(
        self,
        spec: ModelSpec,
        settings: TrainSettings,
        fast_norms: bool | None = None,
        bookkeeping_clipping: bool | None = None,
    ) -> None:
        """``fast_norms``: registered fast norms (True) or exact per-example gradients (False); None
        takes the faster one for the model kind as measured by benchmarks/dp_overhead.py.

        ``bookkeeping_clipping`` (with fast norms only): the clipped sum from the norms' own pass (True;
        the model must be all Dense layers on rank-2 inputs) or from a second pass (False, tensorflow-
        privacy's way); None uses book-keeping wherever the model allows it."""
        if settings.l2_norm_clip < 0:
            raise ValueError(f"l2_norm_clip must be >= 0 (0: no DP), got {settings.l2_norm_clip}")
        self.spec = spec
        self.settings = settings
        self.model = build_model(spec)
        self.initial_weights = self.get_weights()  # to restart from, as the trainer is shared and reused
        self.loss_fn = per_example_loss(spec)
        self.optimizer = tf.keras.optimizers.Adam(learning_rate=settings.learning_rate)
        self.optimizer.build(self.model.trainable_variables)
        self.registry = make_layer_registry()
        fast_norms = FAST_NORMS_BY_KIND.get(spec.kind, True) if fast_norms is None else fast_norms
        self.fast_clipping = fast_norms and gradient_clipping_utils.all_trainable_layers_are_registered(
            self.model, self.registry
        )
        supported = bookkeeping.supports_bookkeeping(self.model)
        if bookkeeping_clipping and not (self.fast_clipping and supported):
            raise ValueError(
                f"book-kept clipping needs fast norms and a model of Dense layers, not {spec.kind}"
            )
        self.bookkeeping = self.fast_clipping and supported and bookkeeping_clipping is not False
        # Padded batch capacity: expected size + 4 standard deviations of the Poisson batch size.
        b = settings.batch_size
        self.capacity = b + math.ceil(4.0 * math.sqrt(b)) + 1
        # Without XLA a step takes any batch length at no extra cost, so a Poisson batch is padded only
        # to the next of a few sizes: about 70 rows instead of 97 on average at B = 64, and per-example
        # gradients (the conv model's path) cost in proportion to the rows. XLA compiles once per shape,
        # so the XLA kinds keep the one capacity.
        root = math.ceil(math.sqrt(b))
        jit = spec.kind in XLA_KINDS
        self.pad_sizes = (
            (self.capacity,) if jit else tuple(sorted({b, b + root, b + 2 * root, self.capacity}))
        )
        # Two independent streams, both keyed from each fit's seed (``_reseed``): the model's own input
        # randomness (VAE eps, denoising noise), drawn inside the clipped sum, and the DP noise, drawn
        # one step ahead on a worker thread (``_fit_dp``). Neither stream's order depends on the other.
        self.noise_generator = tf.random.Generator.from_seed(0)
        self.dp_noise_generator = tf.random.Generator.from_seed(1)
        # The noise multiplier is a variable, not a constant baked into the graph: with
        # noise-multiplier "auto" every client calibrates its own, and one trainer serves them all.
        self.noise_std = tf.Variable(0.0, trainable=False, dtype=tf.float32)
        # FedProx: mu/2 * ||w - w_global||^2 is added to the loss. Its gradient depends on the weights
        # only, not on any example, so it is added after clipping and noise at no privacy cost.
        self.proximal_mu = tf.Variable(0.0, trainable=False, dtype=tf.float32)
        self.anchor = [tf.Variable(v, trainable=False) for v in self.model.trainable_variables]
        self.trace_count = 0
        x_sig = tf.TensorSpec((None, *spec.input_shape), tf.float32)
        rows = self.capacity if jit else None
        idx_sig = tf.TensorSpec((rows,), tf.int32)
        w_sig = tf.TensorSpec((rows,), tf.float32)
        self._clipped_sum = tf.function(
            self._clipped_sum_impl,
            input_signature=[x_sig, idx_sig, w_sig],
            jit_compile=jit,
            reduce_retracing=True,
        )
        grad_sigs = [tf.TensorSpec(v.shape, v.dtype) for v in self.model.trainable_variables]
        self._standard_noise = tf.function(self._standard_noise_impl, input_signature=[])
        self._noisy_mean = tf.function(self._noisy_mean_impl, input_signature=[grad_sigs, grad_sigs])
        self._update = tf.function(self._update_impl, input_signature=[grad_sigs, grad_sigs], jit_compile=jit)
        # Clipped sum and update in one call, with the noise passed in: one dispatch instead of two, and
        # XLA fuses the noisy mean and Adam into the backward pass's outputs. The noise stays an input
        # (drawn outside XLA), so the values are those of the separate calls.
        self._dp_step = tf.function(
            self._dp_step_impl, input_signature=[x_sig, idx_sig, w_sig, grad_sigs], jit_compile=jit
        )
        # Plain steps take exactly batch-size rows (only the last batch of an epoch is padded): the
        # non-private baseline pays no Poisson capacity.
        plain_sig = [
            x_sig,
            tf.TensorSpec((settings.batch_size,), tf.int32),
            tf.TensorSpec((settings.batch_size,), tf.float32),
        ]
        self._plain_step = tf.function(self._plain_step_impl, input_signature=plain_sig, jit_compile=jit)
        self._initial_optimizer_state = [v.numpy() for v in self.optimizer.variables()]
        self._calls = _ConcreteCalls(self)
        logger.debug(
            "trainer for %s: fast clipping %s, book-keeping %s, capacity %d",
            spec.kind,
            self.fast_clipping,
            self.bookkeeping,
            self.capacity,
        )

    # -- weights ---------------------------------------------------------------------------------------
    def get_weights(self) -> list[np.ndarray]:
        return [w.copy() for w in self.model.get_weights()]

    def set_weights(self, weights: list[np.ndarray]) -> None:
        expected = [tuple(w.shape) for w in self.model.get_weights()]
        got = [tuple(np.shape(w)) for w in weights]
        if expected != got:
            raise ValueError(f"weight shapes {got} do not match the model's {expected}")
        self.model.set_weights(weights)

    def reset_optimizer(self) -> None:
        """Forget Adam's moments: every client round starts from the received weights alone."""
        for variable, value in zip(self.optimizer.variables(), self._initial_optimizer_state, strict=True):
            variable.assign(value)

    # -- model inputs -------------------------------------------------------------------------------------
    def _inputs_and_targets(self, x: tf.Tensor) -> tuple[object, tf.Tensor]:
        """Model inputs (noisy for the denoising option, adversarial for adversarial training, plus VAE
        noise) and the targets (clean, or the perturbed inputs with ``adversarial_target="perturbed"``)."""
        inputs, targets = x, x
        if self.settings.denoise_stddev > 0:
            inputs = x + self.noise_generator.normal(tf.shape(x), stddev=self.settings.denoise_stddev)
            if self.settings.input_range is not None:
                inputs = tf.clip_by_value(inputs, *self.settings.input_range)
        eps = None
        if self.spec.kind == "vae":
            eps = self.noise_generator.normal((tf.shape(x)[0], self.spec.latent_dim))
        if self.settings.adversarial:
            inputs = self._adversarial(x, eps)
            if self.settings.adversarial_target == "perturbed":
                targets = inputs
        return ([inputs, eps] if eps is not None else inputs), targets

    def _adversarial(self, x: tf.Tensor, eps: tf.Tensor | None) -> tf.Tensor:
        """PGD (Madry et al. 2018) on each row's own training loss: a uniform random start in the
        L-infinity ball of radius epsilon around the row, then ``adversarial_steps`` signed-gradient
        steps of 2.5 epsilon / steps, each projected back into the ball and the valid input range.

        DP: the loss is a sum of per-example losses and the models have no batch statistics, so row i's
        gradient, and with it its perturbation, depends on x_i, its own random start and the current
        weights only (the received model and this fit's earlier noisy steps, on which adaptive
        composition already lets every step depend). The clipped gradient of the perturbed example is
        then still a function of that one example, with norm at most C; sampling, steps and noise are
        untouched, and the accountant's event is the same.

        Targets. The detector scores the residual x~ - f(x~) of whatever row x~ it is given.
        ``"perturbed"`` (the default) trains f(x + delta) ~ x + delta: the min-max of that very score
        over the ball of each normal example, so the model learns to carry a small perturbation through
        to its output and leave it out of the residual, which is what a false-alarm attacker exploits
        (an anomaly pushed to evade gains from that too, but the anomaly's own residual stays).
        ``"clean"`` trains f(x + delta) ~ x, a denoiser: it removes delta from the output and so puts
        all of it into the residual, on purpose. Measured on digits (benchmarks/adversarial_training.py,
        paired seeds), "clean" lowered both the clean and the PGD AUC of the dense model; "perturbed"
        raised both (little under DP noise).
        docs/ROBUSTNESS.md has the figures."""
        epsilon = self.settings.adversarial_epsilon
        steps = self.settings.adversarial_steps
        step_size = 2.5 * epsilon / steps  # reaches the ball's edge from anywhere within it (Madry et al.)

        def project(point: tf.Tensor) -> tf.Tensor:
            point = tf.clip_by_value(point, x - epsilon, x + epsilon)
            if self.settings.input_range is not None:
                point = tf.clip_by_value(point, *self.settings.input_range)
            return point

        # The random start comes from the model's input stream, row by row: it couples no two rows.
        adversarial = project(x + self.noise_generator.uniform(tf.shape(x), -epsilon, epsilon))
        for _ in range(steps):  # unrolled: a few steps, and XLA compiles a fixed graph
            with tf.GradientTape() as tape:
                tape.watch(adversarial)
                model_in = [adversarial, eps] if eps is not None else adversarial
                target = x if self.settings.adversarial_target == "clean" else adversarial
                # The sum's gradient w.r.t. row i is row i's own loss gradient (no row sees another).
                loss = tf.reduce_sum(self.loss_fn(target, self.model(model_in, training=False)))
            gradient = tape.gradient(loss, adversarial)
            adversarial = project(adversarial + step_size * tf.sign(gradient))
        # A fixed input for the weight gradient that follows (Danskin): no path back through the search.
        return tf.stop_gradient(adversarial)

    # -- DP-SGD ---------------------------------------------------------------------------------------------
    def _clipped_sum_impl(self, x_all: tf.Tensor, idx: tf.Tensor, weights: tf.Tensor):
        """Sum over the padded batch of per-example gradients clipped to norm C (weight 0 = padding)."""
        self.trace_count += 1  # Python side effect: runs only while tracing
        x = tf.gather(x_all, idx)
        inputs, targets = self._inputs_and_targets(x)
        clip = self.settings.l2_norm_clip
        variables = self.model.trainable_variables
        if self.bookkeeping:
            # One forward and one backward pass: the norms and the clipped sum from the same pass.
            grads, losses, _ = bookkeeping.clipped_sum(
                gradient_clipping_utils.model_forward_pass,
                self.model,
                self.loss_fn,
                inputs,
                targets,
                weights,
                clip,
            )
        elif self.fast_clipping:
            norms = clip_grads.compute_gradient_norms(
                self.model,
                self.registry,
                inputs,
                targets,
                weight_batch=weights,
                per_example_loss_fn=lambda y, p, w: self.loss_fn(y, p) * w,
                trainable_vars=variables,
            )
            clip_weights = weights * clip / tf.maximum(clip, norms)
            with tf.GradientTape() as tape:
                losses = self.loss_fn(targets, self.model(inputs, training=True))
                weighted = tf.reduce_sum(losses * tf.stop_gradient(clip_weights))
            grads = tape.gradient(weighted, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        else:

            def example_grads(args):
                example_inputs, target = args
                batched = tf.nest.map_structure(lambda t: t[None], example_inputs)
                with tf.GradientTape() as tape:
                    loss = self.loss_fn(target[None], self.model(batched, training=True))[0]
                g = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
                norm = tf.linalg.global_norm(g)
                factor = clip / tf.maximum(clip, norm)
                return [gi * factor for gi in g]

            per_example = tf.vectorized_map(example_grads, (inputs, targets))
            grads = [tf.tensordot(weights, g, axes=1) for g in per_example]
            losses = self.loss_fn(targets, self.model(inputs, training=False))
        return grads, tf.reduce_sum(losses * weights)

    def _standard_noise_impl(self) -> list[tf.Tensor]:
        """One N(0, 1) draw per weight, never XLA-compiled: XLA's CPU Gaussian sampler is about twice as
        slow as TensorFlow's own (5.6 vs 3.0 ms for the dense AE's 437,664 weights), and on CPU this
        draw is the largest cost of a DP step."""
        self.trace_count += 1
        return [self.dp_noise_generator.normal(tf.shape(v)) for v in self.model.trainable_variables]

    def _noisy_mean_impl(self, grad_sum: list[tf.Tensor], noise: list[tf.Tensor]) -> list[tf.Tensor]:
        """Gaussian noise (std ``noise_std``) on the clipped sum, divided by the expected batch size."""
        expected_batch = float(self.settings.batch_size)
        return [(g + z * self.noise_std) / expected_batch for g, z in zip(grad_sum, noise, strict=True)]

    def _update_impl(self, grad_sum: list[tf.Tensor], noise: list[tf.Tensor]) -> tf.Tensor:
        """Noisy mean, FedProx term and the optimizer step (fused by XLA for the dense kinds)."""
        self.trace_count += 1
        noisy = self._noisy_mean_impl(grad_sum, noise)
        self.optimizer.apply_gradients(
            zip(self._with_proximal(noisy), self.model.trainable_variables, strict=True)
        )
        return tf.constant(0)

    def _dp_step_impl(
        self, x_all: tf.Tensor, idx: tf.Tensor, weights: tf.Tensor, noise: list[tf.Tensor]
    ) -> tf.Tensor:
        """A whole DP-SGD step for a batch within capacity; returns the batch's summed loss."""
        grad_sum, loss = self._clipped_sum_impl(x_all, idx, weights)
        self._update_impl(grad_sum, noise)
        return loss

    def _with_proximal(self, grads: list[tf.Tensor]) -> list[tf.Tensor]:
        return [
            g + self.proximal_mu * (w - a)
            for g, w, a in zip(grads, self.model.trainable_variables, self.anchor, strict=True)
        ]

    # -- non-private baseline ---------------------------------------------------------------------------
    def _plain_step_impl(self, x_all: tf.Tensor, idx: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
        self.trace_count += 1
        x = tf.gather(x_all, idx)
        inputs, targets = self._inputs_and_targets(x)
        with tf.GradientTape() as tape:
            losses = self.loss_fn(targets, self.model(inputs, training=True))
            loss = tf.reduce_sum(losses * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)
        grads = tape.gradient(loss, self.model.trainable_variables)
        self.optimizer.apply_gradients(
            zip(self._with_proximal(grads), self.model.trainable_variables, strict=True)
        )
        return tf.reduce_sum(losses * weights)

    # -- public ---------------------------------------------------------------------------------------
    def dp_gradient(self, x: np.ndarray, indices: np.ndarray, noise_multiplier: float) -> list[np.ndarray]:
        """The privatised gradient DP-SGD would apply for the batch ``indices`` (for tests and audits):
        the same noisy-mean function ``fit`` applies."""
        self.noise_std.assign(noise_multiplier * self.settings.l2_norm_clip)
        grad_sum = self._clipped_sum_for(tf.convert_to_tensor(x), indices)[0]
        return [g.numpy() for g in self._noisy_mean(grad_sum, self._standard_noise())]

    def _padded(self, chunk: np.ndarray, size: int | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        size = next(p for p in self.pad_sizes if p >= len(chunk)) if size is None else size
        idx = np.zeros(size, dtype=np.int32)
        weights = np.zeros(size, dtype=np.float32)
        idx[: len(chunk)] = chunk
        weights[: len(chunk)] = 1.0
        return tf.constant(idx), tf.constant(weights)

    def _clipped_sum_for(self, x_all: tf.Tensor, indices: np.ndarray) -> tuple[list[tf.Tensor], float]:
        total, loss_sum = None, 0.0
        # A Poisson batch larger than the padded capacity (probability < 1e-4) is split into chunks
        # whose clipped sums are added: the step stays exactly the one the accountant assumes.
        for start in range(0, max(1, len(indices)), self.capacity):
            grads, loss = self._clipped_sum(x_all, *self._padded(indices[start : start + self.capacity]))
            total = grads if total is None else [a + b for a, b in zip(total, grads, strict=True)]
            loss_sum += float(loss)
        return total, loss_sum  # type: ignore[return-value]

    def _dp_step_for(self, x_all: tf.Tensor, indices: np.ndarray, noise: list[tf.Tensor]) -> float:
        """One DP-SGD step with the given N(0, 1) noise; returns the batch's summed loss."""
        if len(indices) <= self.capacity:
            return float(self._calls.dp_step(x_all, *self._padded(indices), noise))
        # Rare oversized Poisson batch: chunked clipped sums, then the update (traced on first use).
        grads, loss_sum = self._clipped_sum_for(x_all, indices)
        self._update(grads, noise)
        return loss_sum

    def _dp_batches(self, n: int, epochs: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """The fit's batches, in order, drawn from ``rng`` exactly as a step-by-step loop would."""
        b, q = self.settings.batch_size, self.settings.batch_size / n
        steps_per_epoch = sampling_plan(n, b, epochs, self.settings.sampling)[1] // epochs
        for _ in range(epochs):
            order = rng.permutation(n) if self.settings.sampling == "shuffle" else None
            for step in range(steps_per_epoch):
                if order is None:
                    yield np.flatnonzero(rng.random(n) < q)
                else:
                    yield order[step * b : (step + 1) * b]

    def _fit_dp(self, x_all: tf.Tensor, batches: list[np.ndarray]) -> float:
        """DP-SGD over ``batches``; returns the summed loss.

        The noise draw (3 ms for the dense AE's 437,664 weights on a 2-core CPU, as long as a plain
        step) depends on neither the batch nor the weights, so step t+1's draw runs on a worker thread
        while step t runs (TensorFlow releases the GIL). The draws come from their own generator, one per
        step and in step order, so the noise is that of drawing it step by step.
        """
        loss_sum = 0.0
        # One worker per fit. Leaving the ``with`` block (also on an error) waits for a draw still
        # running and joins the thread: none outlives the fit or races the next fit's reseeding.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedae-dp-noise") as pool:
            pending: Future[list[tf.Tensor]] = pool.submit(self._calls.standard_noise)
            for t, indices in enumerate(batches):
                noise = pending.result()
                if t + 1 < len(batches):
                    pending = pool.submit(self._calls.standard_noise)
                loss_sum += self._dp_step_for(x_all, indices, noise)
        return loss_sum

    def _reseed(self, seed: int) -> None:
        """Key both generators from ``seed`` through NumPy's SeedSequence. ``reset_from_seed(s)`` would
        set Philox's counter to s under one fixed key, so the streams of seeds s and s + 1 would be the
        same numbers shifted by one block: nearby seeds must give unrelated noise."""
        # Children of the seed's SeedSequence, not its own words, which also seed the batch sampler.
        input_key, noise_key = (
            int(np.random.SeedSequence(seed, spawn_key=(child,)).generate_state(1, np.uint64)[0] >> 1)
            for child in (0, 1)
        )  # Philox keys are stored as int64: 63 bits
        self.noise_generator.reset_from_key_counter(input_key, [0, 0])
        self.dp_noise_generator.reset_from_key_counter(noise_key, [0, 0])

    def fit(
        self,
        x: np.ndarray,
        epochs: int,
        noise_multiplier: float = 0.0,
        seed: int | None = None,
        proximal_mu: float = 0.0,
    ) -> FitResult:
        """Train on ``x`` (already scaled) for ``epochs`` local epochs from the current weights.

        With DP (``l2_norm_clip > 0``) the noise is ``noise_multiplier * l2_norm_clip`` on each step's sum.

        ``seed`` fixes sampling and noise for reproducible tests; by default both come from the OS's
        entropy source, because DP noise that an attacker can regenerate from a known seed protects
        nothing.
        """
        n = len(x)
        b = self.settings.batch_size
        if n < b:
            raise TrainingDataError(
                f"{n} training rows is fewer than batch-size {b}; lower batch-size "
                "or give this client more data"
            )
        seed = secrets.randbits(63) if seed is None else seed
        rng = np.random.default_rng(seed)
        self._reseed(seed)
        self.reset_optimizer()
        self.proximal_mu.assign(proximal_mu)
        for anchor, variable in zip(self.anchor, self.model.trainable_variables, strict=True):
            anchor.assign(variable)
        if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
            raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
        self.noise_std.assign(noise_multiplier * self.settings.l2_norm_clip)
        x_all = tf.convert_to_tensor(x, dtype=tf.float32)
        sampling = self.settings.sampling
        q = sampling_plan(n, b, epochs, sampling)[0]
        loss_sum, seen, steps = 0.0, 0, 0
        if self.settings.dp:
            # The noise is drawn outside XLA, always: with the Generator's draw inside XLA the training
            # trajectory changed (same seed, same initial weights; docs/BENCHMARKS.md) and XLA's CPU
            # sampler is slower. ``rng`` gives the same batches as drawing them step by step.
            batches = list(self._dp_batches(n, epochs, rng))
            loss_sum = self._fit_dp(x_all, batches)
            seen, steps = sum(len(indices) for indices in batches), len(batches)
        else:
            for _ in range(epochs):
                order = rng.permutation(n)
                for start in range(0, n, b):
                    idx, weights = self._padded(order[start : start + b], b)
                    loss_sum += float(self._calls.plain_step(x_all, idx, weights))
                    seen, steps = seen + min(b, n - start), steps + 1
        return FitResult(
            loss=loss_sum / max(seen, 1),
            steps=steps,
            sampling_probability=q if self.settings.dp else 1.0,
            num_examples=n,
            epochs=epochs,
            noise_multiplier=noise_multiplier if self.settings.dp else 0.0,
            sampling=sampling,
        )

    def mean_loss(self, x: np.ndarray) -> float:
        """Mean per-example training loss on ``x`` (VAE: with posterior-mean decoding)."""
        if len(x) == 0:
            return float("nan")
        inputs: object = tf.convert_to_tensor(x)
        if self.spec.kind == "vae":
            inputs = [inputs, tf.zeros((len(x), self.spec.latent_dim))]
        return float(
            tf.reduce_mean(self.loss_fn(tf.convert_to_tensor(x), self.model(inputs, training=False)))
        )


class _ConcreteCalls:
    """The per-step functions as concrete functions, traced on first use.

    Every signature is fixed, so each tf.function has exactly one concrete function. Calling it
    directly skips tf.function's per-call work (binding and casting every argument, looking up the
    trace cache): ~0.45 of the 1.5 ms a small model's DP step took in Python dispatch, about as
    much as its compute (docs/BENCHMARKS.md)."""

    def __init__(self, trainer: LocalTrainer) -> None:
        self._trainer = trainer

    @functools.cached_property
    def dp_step(self) -> Callable[..., tf.Tensor]:
        return self._trainer._dp_step.get_concrete_function()

    @functools.cached_property
    def standard_noise(self) -> Callable[[], list[tf.Tensor]]:
        return self._trainer._standard_noise.get_concrete_function()

    @functools.cached_property
    def plain_step(self) -> Callable[..., tf.Tensor]:
        return self._trainer._plain_step.get_concrete_function()


def make_layer_registry() -> layer_registry.LayerRegistry:
    """tensorflow-privacy's registry (Dense, Embedding) plus fedae's Conv2D / Conv2DTranspose norms."""
    registry = layer_registry.make_default_layer_registry()
    registry.insert(tf.keras.layers.Conv2D, conv_norms.conv2d_layer_computation)
    registry.insert(tf.keras.layers.Conv2DTranspose, conv_norms.conv2d_transpose_layer_computation)
    return registry


def sampling_plan(
    num_examples: int, batch_size: int, epochs: int, sampling: str = "poisson"
) -> tuple[float, int]:
    """DP-SGD's sampling rate and step count for a fit: q = B / n, and epochs * ceil(n / B) Poisson
    steps or epochs * floor(n / B) fixed-size shuffled batches.

    Known before training, so a client can check its budget against exactly what the fit will spend.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    per_epoch = math.ceil(num_examples / batch_size) if sampling == "poisson" else num_examples // batch_size
    return batch_size / num_examples, epochs * per_epoch


_TRAINERS: dict[tuple[ModelSpec, TrainSettings], LocalTrainer] = {}


def get_trainer(spec: ModelSpec, settings: TrainSettings) -> LocalTrainer:
    """The process-wide trainer for this spec and settings: built, compiled and traced once."""
    key = (spec, settings)
    if key not in _TRAINERS:
        _TRAINERS[key] = LocalTrainer(spec, settings)
    return _TRAINERS[key]
