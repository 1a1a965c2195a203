"""The one place that prepares TensorFlow for this project; import it before anything imports TensorFlow.

Two import-time switches make tensorflow-privacy 0.9 work on TensorFlow 2.21
(see ../shared/design/STACK.md):

- ``TF_USE_LEGACY_KERAS=1`` makes ``tf.keras`` resolve to tf-keras (Keras 2), whose optimizer and model
  API tensorflow-privacy is written against. The whole project uses this one Keras.
- ``sys.skip_tf_privacy_import = True`` is tensorflow-privacy's own escape hatch: it skips the eager
  import of its TF1 estimator modules, which fail on TF 2.21. Submodules are then imported directly.

Every entry point (CLI, ServerApp, ClientApp in Flower's simulation workers and SuperNode processes,
tests) imports this module first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from types import ModuleType

os.environ["TF_USE_LEGACY_KERAS"] = "1"
# TensorFlow's C++ start-up chatter (including "failed call to cuInit" on machines without a GPU) is
# not for the user; `fedae ... --verbose` or TF_CPP_MIN_LOG_LEVEL=0 brings it back.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
sys.skip_tf_privacy_import = True  # type: ignore[attr-defined]

logger = logging.getLogger(f"fedae.{__name__}")
# TensorFlow's Python-side warnings (pfor fallbacks, autograph notes) are not for the user either.
logging.getLogger("tensorflow").setLevel(logging.ERROR)
_configured = False


def load_tensorflow() -> ModuleType:
    """Import TensorFlow with its pre-logging start-up lines silenced, and return the module.

    TensorFlow's C++ runtime prints lines such as "Could not find cuda drivers" to the process's stderr
    before its logging is initialised, so TF_CPP_MIN_LOG_LEVEL cannot hide them; file descriptor 2 is
    pointed at /dev/null for the import only. With TF_CPP_MIN_LOG_LEVEL below 3 (``--verbose``) nothing
    is hidden. Errors still surface as Python exceptions once stderr is restored.
    """
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "3":
        import tensorflow

        return tensorflow
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    return tensorflow


def configure_tensorflow(num_threads: int | None = None) -> str:
    """Import TensorFlow once per process, set thread counts and GPU memory growth.

    Returns the name of the device TensorFlow will place training on (logged once).
    """
    global _configured
    tf = load_tensorflow()

    if _configured:
        return _device_name(tf)
    _configured = True
    tf.get_logger().setLevel(logging.ERROR)
    if num_threads:
        # Flower's simulation workers share the machine's cores: without a cap, every TensorFlow
        # runtime would start as many threads as there are cores and they would fight.
        try:
            tf.config.threading.set_intra_op_parallelism_threads(num_threads)
            tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, num_threads)))
        except RuntimeError:  # already initialised in this process; keep what is set
            pass
    for gpu in tf.config.list_physical_devices("GPU"):
        # Several simulated clients may share one GPU: never grab all of its memory up front.
        with contextlib.suppress(RuntimeError):  # already initialised: growth is fixed by then
            tf.config.experimental.set_memory_growth(gpu, True)
    device = _device_name(tf)
    logger.info("TensorFlow %s will train on %s", tf.__version__, device)
    return device


def _device_name(tf: object) -> str:
    gpus = tf.config.list_physical_devices("GPU")  # type: ignore[attr-defined]
    return f"GPU ({gpus[0].name})" if gpus else "CPU"
