"""Per-example gradient norms for Conv2D and Conv2DTranspose, for tensorflow-privacy's fast clipping.

tensorflow-privacy's layer registry (``LayerRegistry.insert``, its extension point) has functions for
Dense, Embedding, EinsumDense, LayerNormalization and MultiHeadAttention, none for convolutions, so a
conv model falls back to per-example gradients of the whole model (several times slower). These two
functions follow the registry's contract: run the layer without its activation, watch the
pre-activation output ``z``, and return a function that maps ``dL/dz`` (summed loss) to each example's
squared gradient norm over the layer's kernel and bias.

A convolution's kernel gradient for one example is a sum over output positions of outer products:

- Conv2D: ``dW_b = sum_p patch_b(x)[p] (x) g_b[p]``, with ``patch`` the receptive field of position ``p``
  (``tf.image.extract_patches`` with the layer's kernel size, strides, dilation and padding);
- Conv2DTranspose is the adjoint of a Conv2D with the same kernel, strides and padding, so its kernel
  gradient swaps the roles: ``dW_b = sum_p patch_b(g)[p] (x) x_b[p]``, patches taken from the
  (upsampled) output gradient at the input's positions.

The per-example kernel gradient is formed explicitly (batch x kernel-size x channels; small for the
model zoo's kernels), not through the "ghost" Gram trick, whose cost grows with the square of the
number of positions (784^2 per 28x28 example); a test checks both layers against per-example gradients
computed the slow way, for every layer shape the models use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from shared.tfenv import load_tensorflow

tf = load_tensorflow()


def _check(layer: Any, input_args: Sequence[Any], input_kwargs: Mapping[str, Any], microbatches: Any) -> None:
    if input_kwargs or len(input_args) != 1:
        raise ValueError(f"{type(layer).__name__} fast norms take exactly one positional input")
    if microbatches is not None:
        raise NotImplementedError("fedae clips per example: microbatches are not supported")
    if layer.data_format != "channels_last" or getattr(layer, "groups", 1) != 1:
        raise NotImplementedError("fast conv norms need channels_last data and groups=1")


def _pre_activation(layer: Any, x: Any, tape: Any) -> tuple[Any, Any]:
    """The layer's output before its activation (watched on ``tape``) and after it."""
    activation = layer.activation
    layer.activation = None
    try:
        z = layer(x)
    finally:
        layer.activation = activation
    tape.watch(z)
    return z, (activation(z) if activation is not None else z)


def _patches(t: Any, layer: Any) -> Any:
    """Each position's receptive field in ``t`` (batch, positions, kh*kw*channels)."""
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    patches = tf.image.extract_patches(
        t, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1], rates=[1, dh, dw, 1], padding=layer.padding.upper()
    )
    return _flat(patches)


def _flat(t: Any) -> Any:
    """(batch, positions, channels) view of a (batch, height, width, channels) tensor."""
    return tf.reshape(t, [tf.shape(t)[0], -1, t.shape[-1]])


def _squared_norms(left: Any, right: Any, grads: Any, use_bias: bool) -> Any:
    """sum_b ||sum_p left[b,p] (x) right[b,p]||^2 (+ the bias term from ``grads``), per example."""
    kernel = tf.einsum("bpk,bpc->bkc", left, right)
    squared = tf.reduce_sum(tf.square(kernel), axis=[1, 2])
    if use_bias:
        squared += tf.reduce_sum(tf.square(tf.reduce_sum(_flat(grads), axis=1)), axis=1)
    return squared


def _computation(
    layer: Any,
    input_args: Sequence[Any],
    input_kwargs: Mapping[str, Any],
    tape: Any,
    num_microbatches: Any,
    transpose: bool,
) -> tuple[Any, Any, Callable[[Any], Any]]:
    """The registry contract for both layers; only which side the patches come from differs."""
    _check(layer, input_args, input_kwargs, num_microbatches)
    x = input_args[0]
    z, outputs = _pre_activation(layer, x, tape)

    def sqr_norm_fn(grads: Any) -> Any:
        if transpose:  # patches of the output gradient, at the input's positions
            return _squared_norms(_patches(grads, layer), _flat(x), grads, layer.use_bias)
        return _squared_norms(_patches(x, layer), _flat(grads), grads, layer.use_bias)

    return z, outputs, sqr_norm_fn


def conv2d_layer_computation(
    layer_instance: Any,
    input_args: Sequence[Any],
    input_kwargs: Mapping[str, Any],
    tape: Any,
    num_microbatches: Any = None,
) -> tuple[Any, Any, Callable[[Any], Any]]:
    """Registry function for ``tf.keras.layers.Conv2D``."""
    return _computation(layer_instance, input_args, input_kwargs, tape, num_microbatches, transpose=False)


def conv2d_transpose_layer_computation(
    layer_instance: Any,
    input_args: Sequence[Any],
    input_kwargs: Mapping[str, Any],
    tape: Any,
    num_microbatches: Any = None,
) -> tuple[Any, Any, Callable[[Any], Any]]:
    """Registry function for ``tf.keras.layers.Conv2DTranspose`` (no ``output_padding``)."""
    if layer_instance.output_padding is not None:
        raise NotImplementedError("fast Conv2DTranspose norms do not support output_padding")
    return _computation(layer_instance, input_args, input_kwargs, tape, num_microbatches, transpose=True)
