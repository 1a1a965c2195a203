"""Book-kept per-example clipping for models built from Dense layers alone: one forward, one backward pass.

tensorflow-privacy's fast clipping (``clip_grads.compute_gradient_norms``) runs a forward pass and a
backward pass to every layer's pre-activation output ``z`` to get per-example gradient norms, and
returns only the norms; the clipped sum then needs a second forward and backward pass on the
clip-weighted loss. For a Dense layer on rank-2 inputs the first pass already holds everything the
clipped sum needs (Bu et al. 2023, "book-keeping" clipping). With ``a_i`` the layer's input row and
``g_i`` the gradient of example i's weighted loss w.r.t. ``z_i``:

- example i's kernel gradient is the outer product ``a_i g_i^T`` and its bias gradient ``g_i``, so its
  squared norm over the layer is ``||a_i||^2 ||g_i||^2 + ||g_i||^2`` (the same quantity tensorflow-
  privacy's Dense registry function computes);
- with ``c_i = C / max(C, ||grad_i||)`` (the norm summed over all layers), the clipped sum is
  ``A^T (c * G)`` for the kernel and ``sum_i c_i g_i`` for the bias.

Written here because tensorflow-privacy exposes only the norms, not the inputs and output gradients it
captured. The capture itself is its ``gradient_clipping_utils.model_forward_pass`` (the functional graph
walked layer by layer; each trainable layer run without its activation and its output watched, as its
Dense registry function does), passed in by ``shared.training``, which stays the one module that imports
tensorflow-privacy's training code. Exact only when each trainable layer is a Dense layer applied once
to rank-2 inputs and examples do not interact (no batch statistics); ``supports_bookkeeping`` checks the
model's structure, and the trace checks the ranks and that every trainable variable was captured once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from shared.tfenv import load_tensorflow

tf = load_tensorflow()

LossFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
# A layer's output and what it captured, from (layer, args, kwargs); tensorflow-privacy's generator_fn.
GeneratorFn = Callable[[Any, Sequence[Any], Mapping[str, Any]], tuple[Any, Any]]
# model_forward_pass(model, inputs, generator_fn) -> (model outputs, each layer's captures).
ForwardPass = Callable[[tf.keras.Model, Any, GeneratorFn], tuple[Any, list[Any]]]


def supports_bookkeeping(model: tf.keras.Model) -> bool:
    """Whether every trainable layer of the functional ``model`` is a plain Dense layer called once on
    rank-2 inputs (the dense autoencoder and the VAE; not the conv autoencoder)."""
    if not isinstance(model, tf.keras.Model) or not hasattr(model, "_nodes_by_depth"):
        return False  # not a functional graph that the forward pass can walk
    for layer in model.layers:
        if not layer.trainable_variables:
            continue
        # Exactly Dense: a subclass may change ``call`` and with it the per-example gradient.
        if type(layer) is not tf.keras.layers.Dense or len(layer.inbound_nodes) != 1:
            return False
        if layer.input.shape.rank != 2:
            return False
    return True


def clipped_sum(
    forward_pass: ForwardPass,
    model: tf.keras.Model,
    loss_fn: LossFn,
    inputs: Any,
    targets: tf.Tensor,
    weights: tf.Tensor,
    clip: float,
) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]:
    """The sum over the batch of each example's gradient of ``weights_i * loss_i`` clipped to norm
    ``clip``, in ``model.trainable_variables`` order, plus the per-example losses (unweighted) and the
    per-example gradient norms. Rows of weight 0 (padding) contribute exactly zero: their ``g_i`` is 0.

    ``forward_pass``: tensorflow-privacy's ``gradient_clipping_utils.model_forward_pass``."""
    tape = tf.GradientTape(watch_accessed_variables=False)
    captured: list[tuple[tf.keras.layers.Dense, tf.Tensor, tf.Tensor]] = []

    def capture(
        layer: tf.keras.layers.Layer, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> tuple[tf.Tensor, None]:
        if not layer.trainable_variables:
            return layer(*args, **kwargs), None
        if type(layer) is not tf.keras.layers.Dense or kwargs or len(args) != 1 or args[0].shape.rank != 2:
            raise NotImplementedError(f"book-kept clipping needs Dense layers on rank-2 inputs: {layer.name}")
        activation = layer.activation
        layer.activation = None  # z: the pre-activation output, whose gradient is g
        try:
            z = layer(args[0])
        finally:
            layer.activation = activation
        tape.watch(z)
        captured.append((layer, args[0], z))
        return (activation(z) if activation is not None else z), None

    with tape:
        outputs, _ = forward_pass(model, inputs, capture)
        losses = loss_fn(targets, outputs)
        weighted = tf.reduce_sum(losses * weights)
    output_grads = tape.gradient(
        weighted, [z for _, _, z in captured], unconnected_gradients=tf.UnconnectedGradients.ZERO
    )

    squared = tf.zeros_like(weights)
    for (layer, a, _), g in zip(captured, output_grads, strict=True):
        g_squared = tf.reduce_sum(tf.square(g), axis=1)
        squared += tf.reduce_sum(tf.square(a), axis=1) * g_squared
        if layer.use_bias:
            squared += g_squared
    norms = tf.sqrt(squared)
    factors = (clip / tf.maximum(clip, norms))[:, None]

    by_variable: dict[Any, tf.Tensor] = {}
    for (layer, a, _), g in zip(captured, output_grads, strict=True):
        scaled = g * factors
        by_variable[layer.kernel.ref()] = tf.matmul(a, scaled, transpose_a=True)
        if layer.use_bias:
            by_variable[layer.bias.ref()] = tf.reduce_sum(scaled, axis=0)
    variables = model.trainable_variables
    # A layer called twice would need the cross terms of its two calls in the norm.
    called_once = len({id(layer) for layer, _, _ in captured}) == len(captured)
    if (
        not called_once
        or len(by_variable) != len(variables)
        or any(v.ref() not in by_variable for v in variables)
    ):
        raise NotImplementedError("book-kept clipping needs each trainable layer called exactly once")
    return [by_variable[v.ref()] for v in variables], losses, norms
