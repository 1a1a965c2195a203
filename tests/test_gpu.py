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


@pytest.mark.parametrize(
    ("cores", "memory_gib", "expected"),
    [
        (2, 24.0, 1),  # one worker per core
        (16, 8.0, 4),  # memory for 4 workers (1.5 GiB each beside 2 GiB): 4 cores each
        (4, 2.5, 4),  # too little memory for two: one worker with every core
        (16, 11.0, 3),  # memory for 6: 3 cores each, so Ray starts 5 (2 each would start 8)
    ],
)
def test_one_worker_per_core_unless_memory_allows_fewer(cores: int, memory_gib: float, expected: int) -> None:
    from simulations.runner import default_cpus_per_client

    assert default_cpus_per_client(0.0, cores=cores, memory_gib=memory_gib) == expected


def test_the_gpu_share_caps_the_workers(monkeypatch) -> None:
    from simulations import runner

    monkeypatch.setattr(runner, "_visible_gpus", lambda: 1)
    # 16 cores and one GPU shared four ways: four workers, four cores each for their TensorFlow.
    assert runner.default_cpus_per_client(0.25, cores=16, memory_gib=128.0) == 4
