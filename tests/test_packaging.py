"""Layout rules: `shared` is this repository's package, imports no flwr, and the TF switches hold."""

import ast
import subprocess
import sys
from pathlib import Path

import shared

ROOT = Path(__file__).resolve().parents[1]


def test_shared_resolves_to_this_repository() -> None:
    assert Path(shared.__file__).resolve().parent == ROOT / "shared"


def test_shared_imports_no_flwr() -> None:
    offenders = []
    for path in (ROOT / "shared").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "flwr"]
    assert offenders == []


def test_only_training_and_the_empirical_audit_import_tensorflow_privacy() -> None:
    # training.py uses its DP-SGD code; empirical.py its privacy_tests (membership inference, epsilon
    # lower bounds), which ship in tensorflow-empirical-privacy. Nothing else touches it.
    importers = sorted(
        p.relative_to(ROOT).as_posix()
        for d in ("shared", "client", "server", "simulations", "fedae")
        for p in (ROOT / d).rglob("*.py")
        if "tensorflow_privacy" in p.read_text()
    )
    assert importers == ["shared/empirical.py", "shared/training.py"]
    modules = [
        node.module
        for node in ast.walk(ast.parse((ROOT / "shared" / "empirical.py").read_text()))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tensorflow_privacy")
    ]
    assert modules and all(m.startswith("tensorflow_privacy.privacy.privacy_tests") for m in modules)


def test_switches_hold_in_a_fresh_clientapp_process() -> None:
    # A SuperNode or simulation worker imports the ClientApp module first: the switches must be in
    # effect there, and tf.keras must be Keras 2 (tf-keras) for tensorflow-privacy.
    code = (
        "import client.app, os, sys, tensorflow as tf;"
        "print(os.environ['TF_USE_LEGACY_KERAS'], sys.skip_tf_privacy_import, tf.keras.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "True", "tf_keras.api._v2.keras"]
