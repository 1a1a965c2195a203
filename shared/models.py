"""The three autoencoders (dense, convolutional, variational), as Keras 2 (tf-keras) functional models.

Every model maps the scaled input to a reconstruction. The variational model also takes its
reparameterisation noise as a second input and returns ``[reconstruction, z_mean, z_log_var]`` joined on
the last axis, so its loss (reconstruction + KL) is computed per example inside the loss function: DP-SGD
clips per-example gradients of that loss, and a loss added with ``add_loss`` would escape clipping. Noise
as an input also means the two forward passes of fast gradient clipping see the same sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shared.tfenv import load_tensorflow

tf = load_tensorflow()  # after tfenv's switches: tf.keras is tf-keras (Keras 2)


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # "dense" | "conv" | "vae"
    input_shape: tuple[int, ...]  # the model's input layout (vectors for dense/vae)
    latent_dim: int
    output_activation: str  # "linear" for standardised tables, "sigmoid" for [0, 1] images
    activation: str = "relu"  # hidden layers; "elu" trains more reliably on very small tables


def hidden_widths(input_dim: int, latent_dim: int) -> tuple[int, int]:
    """Encoder widths from the input size: 784 -> (256, 64) as in the seed's 784-256-64-16 network.

    The first layer is the largest power of two not above half the input, the second the power of two
    nearest the geometric mean of the first and the latent size.
    """
    if input_dim < 1 or latent_dim < 1:
        raise ValueError(f"input_dim and latent_dim must be >= 1, got {input_dim}, {latent_dim}")
    first = max(2 * latent_dim, 2 ** max(0, math.floor(math.log2(max(1, input_dim / 2)))))
    second = 2 ** round(math.log2(math.sqrt(first * latent_dim)))
    return first, int(min(max(second, latent_dim), first))


def _dense_stack(x: tf.Tensor, widths: tuple[int, ...], prefix: str, activation: str) -> tf.Tensor:
    for i, width in enumerate(widths):
        x = tf.keras.layers.Dense(width, activation=activation, name=f"{prefix}_{i}")(x)
    return x


def build_dense(spec: ModelSpec) -> tf.keras.Model:
    (dim,) = spec.input_shape
    first, second = hidden_widths(dim, spec.latent_dim)
    inputs = tf.keras.Input(shape=(dim,), name="x")
    z = _dense_stack(inputs, (first, second), "enc", spec.activation)
    z = tf.keras.layers.Dense(spec.latent_dim, name="latent")(z)
    h = _dense_stack(z, (second, first), "dec", spec.activation)
    outputs = tf.keras.layers.Dense(dim, activation=spec.output_activation, name="reconstruction")(h)
    return tf.keras.Model(inputs, outputs, name="dense_autoencoder")


def build_conv(spec: ModelSpec) -> tf.keras.Model:
    height, width, channels = spec.input_shape
    if height % 4 or width % 4:
        raise ValueError(
            f"the convolutional autoencoder needs height and width divisible by 4, got {height}x{width}"
        )
    bottleneck = max(2, math.ceil(spec.latent_dim / ((height // 4) * (width // 4))))
    inputs = tf.keras.Input(shape=(height, width, channels), name="x")
    x = tf.keras.layers.Conv2D(16, 3, padding="same", activation=spec.activation, name="enc_conv_0")(inputs)
    x = tf.keras.layers.MaxPooling2D(2, name="enc_pool_0")(x)
    x = tf.keras.layers.Conv2D(8, 3, padding="same", activation=spec.activation, name="enc_conv_1")(x)
    x = tf.keras.layers.MaxPooling2D(2, name="enc_pool_1")(x)
    x = tf.keras.layers.Conv2D(bottleneck, 3, padding="same", activation=spec.activation, name="latent")(x)
    # Strided transposed convolutions upsample; UpSampling2D's gradient does not compile under
    # XLA's vectorised per-example gradients (STACK.md), and the learned upsampling is as good here.
    x = tf.keras.layers.Conv2DTranspose(
        8, 3, strides=2, padding="same", activation=spec.activation, name="dec_deconv_0"
    )(x)
    x = tf.keras.layers.Conv2DTranspose(
        16, 3, strides=2, padding="same", activation=spec.activation, name="dec_deconv_1"
    )(x)
    outputs = tf.keras.layers.Conv2D(
        channels, 3, padding="same", activation=spec.output_activation, name="reconstruction"
    )(x)
    return tf.keras.Model(inputs, outputs, name="conv_autoencoder")


@tf.keras.utils.register_keras_serializable(package="fedae")
class Reparameterize(tf.keras.layers.Layer):
    """z = mu + sigma * eps, with eps given as an input (zeros when scoring).

    A named layer rather than a Lambda: a Lambda cannot be saved without pickled Python code.
    """

    def call(self, inputs: list[tf.Tensor]) -> tf.Tensor:
        z_mean, z_log_var, eps = inputs
        return z_mean + tf.exp(0.5 * z_log_var) * eps


def build_vae(spec: ModelSpec) -> tf.keras.Model:
    (dim,) = spec.input_shape
    first, second = hidden_widths(dim, spec.latent_dim)
    inputs = tf.keras.Input(shape=(dim,), name="x")
    noise = tf.keras.Input(shape=(spec.latent_dim,), name="eps")
    h = _dense_stack(inputs, (first, second), "enc", spec.activation)
    z_mean = tf.keras.layers.Dense(spec.latent_dim, name="z_mean")(h)
    z_log_var = tf.keras.layers.Dense(spec.latent_dim, name="z_log_var")(h)
    z = Reparameterize(name="z")([z_mean, z_log_var, noise])
    d = _dense_stack(z, (second, first), "dec", spec.activation)
    recon = tf.keras.layers.Dense(dim, activation=spec.output_activation, name="reconstruction")(d)
    outputs = tf.keras.layers.Concatenate(name="recon_and_posterior")([recon, z_mean, z_log_var])
    return tf.keras.Model([inputs, noise], outputs, name="variational_autoencoder")


def build_model(spec: ModelSpec) -> tf.keras.Model:
    builders = {"dense": build_dense, "conv": build_conv, "vae": build_vae}
    if spec.kind not in builders:
        raise ValueError(f"model kind must be one of {sorted(builders)}, got {spec.kind!r}")
    return builders[spec.kind](spec)


def per_example_loss(spec: ModelSpec):
    """Per-example training loss ``f(y_true, y_pred) -> [batch]`` for the model kind."""
    if spec.kind != "vae":

        def reconstruction_mse(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
            axes = list(range(1, len(y_true.shape)))
            return tf.reduce_mean(tf.square(y_true - y_pred), axis=axes)

        return reconstruction_mse
    dim, latent = spec.input_shape[0], spec.latent_dim

    def vae_loss(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        recon, z_mean, z_log_var = y_pred[:, :dim], y_pred[:, dim : dim + latent], y_pred[:, dim + latent :]
        mse = tf.reduce_mean(tf.square(y_true - recon), axis=1)
        kl = -0.5 * tf.reduce_sum(1.0 + z_log_var - tf.square(z_mean) - tf.exp(z_log_var), axis=1)
        # Per-feature scale: KL / dim keeps the loss comparable to the plain autoencoder's MSE, so the
        # same clipping norm suits both.
        return mse + kl / float(dim)

    return vae_loss


def reconstruct(model: tf.keras.Model, spec: ModelSpec, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Deterministic reconstruction (the VAE decodes its posterior mean)."""
    outputs = []
    for start in range(0, len(x), batch_size):
        chunk = tf.convert_to_tensor(x[start : start + batch_size])
        if spec.kind == "vae":
            eps = tf.zeros((tf.shape(chunk)[0], spec.latent_dim))
            out = model([chunk, eps], training=False)[:, : spec.input_shape[0]]
        else:
            out = model(chunk, training=False)
        outputs.append(out.numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, *spec.input_shape), np.float32)


def residuals(model: tf.keras.Model, spec: ModelSpec, x: np.ndarray) -> np.ndarray:
    """Per-example residuals ``x - reconstruction``, flattened to ``[rows, features]``."""
    return (x - reconstruct(model, spec, x)).reshape(len(x), -1)


def reconstruction_errors(model: tf.keras.Model, spec: ModelSpec, x: np.ndarray) -> np.ndarray:
    """Anomaly score: per-example mean squared reconstruction error."""
    recon = reconstruct(model, spec, x)
    return np.mean(np.square(x - recon).reshape(len(x), -1), axis=1)
