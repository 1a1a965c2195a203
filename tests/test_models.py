import numpy as np
import pytest

from shared.models import ModelSpec, build_model, hidden_widths, per_example_loss, reconstruction_errors


def test_seed_shape_is_derived_from_input_and_latent() -> None:
    assert hidden_widths(784, 16) == (256, 64)
    model = build_model(ModelSpec("dense", (784,), 16, "sigmoid"))
    assert [layer.units for layer in model.layers if hasattr(layer, "units")] == [256, 64, 16, 64, 256, 784]


@pytest.mark.parametrize(
    ("spec", "x_shape"),
    [
        (ModelSpec("dense", (207,), 16, "linear"), (5, 207)),
        (ModelSpec("conv", (8, 8, 1), 16, "sigmoid"), (5, 8, 8, 1)),
        (ModelSpec("conv", (28, 28, 1), 16, "sigmoid"), (5, 28, 28, 1)),
        (ModelSpec("vae", (64,), 8, "sigmoid"), (5, 64)),
    ],
)
def test_models_reconstruct_their_input_shape_and_score_per_example(
    spec: ModelSpec, x_shape: tuple, rng
) -> None:
    x = rng.random(x_shape).astype(np.float32)
    errors = reconstruction_errors(build_model(spec), spec, x)
    assert errors.shape == (5,)
    assert np.isfinite(errors).all() and (errors > 0).all()


def test_vae_loss_is_per_example_reconstruction_plus_kl(rng) -> None:
    spec = ModelSpec("vae", (4,), 2, "linear")
    loss = per_example_loss(spec)
    y = np.zeros((3, 4), np.float32)
    # Reconstruction exact, posterior = prior (mu 0, log var 0): loss 0; then KL grows with |mu|.
    perfect = np.zeros((3, 8), np.float32)
    assert np.allclose(loss(y, perfect).numpy(), 0.0)
    shifted = perfect.copy()
    shifted[1, 4:6] = 1.0  # mu = (1, 1) for example 1 only: KL = 0.5 * (1 + 1) = 1, / dim 4
    values = loss(y, shifted).numpy()
    assert values.shape == (3,)
    np.testing.assert_allclose(values, [0.0, 0.25, 0.0], atol=1e-6)


def test_conv_needs_sizes_divisible_by_four() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        build_model(ModelSpec("conv", (10, 10, 1), 4, "sigmoid"))
