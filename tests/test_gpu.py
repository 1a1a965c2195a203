"""GPU use: memory growth, fractional GPU shares for simulation workers, training placed on the GPU.

CI has no GPU: the tests that need one skip cleanly there and run on a GPU machine
(`uv run pytest tests/test_gpu.py`, see docs/BENCHMARKS.md)."""

import numpy as np
import pytest

from shared.tfenv import configure_tensorflow, load_tensorflow

tf = load_tensorflow()
GPUS = tf.config.list_physical_devices("GPU")
needs_gpu = pytest.mark.skipif(not GPUS, reason="no GPU on this machine")


def test_workers_get_a_fractional_gpu_share_only_when_a_gpu_is_visible() -> None:
    from simulations.runner import _default_gpu_share, backend_config

    share = _default_gpu_share()
    assert share == (0.25 if GPUS else 0.0)  # four simulated clients per GPU
    resources = backend_config(2, share)["client_resources"]
    assert resources == {"num_cpus": 2, "num_gpus": share}


@needs_gpu
def test_memory_growth_is_on_for_every_gpu() -> None:
    assert configure_tensorflow(None).startswith("GPU")
    assert all(tf.config.experimental.get_memory_growth(gpu) for gpu in GPUS)


@needs_gpu
def test_dp_sgd_trains_on_the_gpu_and_matches_the_cpu_clipped_sum() -> None:
    from shared.models import ModelSpec
    from shared.training import LocalTrainer, TrainSettings

    spec = ModelSpec("dense", (64,), 8, "sigmoid")
    x = np.random.default_rng(0).random((256, 64), dtype=np.float32)
    settings = TrainSettings(32, 1e-3, 1.0)
    sums = {}
    for device in ("/GPU:0", "/CPU:0"):
        with tf.device(device):
            trainer = LocalTrainer(spec, settings)
            if device == "/GPU:0":
                assert "GPU" in trainer.model.trainable_variables[0].device
                result = trainer.fit(x, epochs=1, noise_multiplier=1.0, seed=1)
                assert np.isfinite(result.loss) and result.steps == 8
            trainer.set_weights([np.full_like(w, 0.01) for w in trainer.get_weights()])
            sums[device] = trainer.dp_gradient(x, np.arange(32), noise_multiplier=0.0)
    for gpu, cpu in zip(sums["/GPU:0"], sums["/CPU:0"], strict=True):
        # TensorFloat-32 matmuls (on by default on recent GPUs) keep about 3 significant digits.
        np.testing.assert_allclose(gpu, cpu, rtol=1e-2, atol=1e-5)
