"""A client that sends a broken model is left out of the aggregate, by name, and the run goes on."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("nan-weights@1", "array 0 holds 1 non-finite value(s)"),
        ("wrong-shape@1", "array 11 has shape (207, 2), the model's is (207,)"),
    ],
)
def test_a_broken_update_is_rejected_and_the_run_completes(tmp_path, fault: str, reason: str) -> None:
    out = tmp_path / "run"
    settings = "num-clients=3 rows-per-site=400 fraction-evaluate=0 robustness-rows=0"
    args = ["simulate", "--rounds", "2", "--out", str(out), "--no-baselines", "--run-config", settings]
    env = {**os.environ, "FEDAE_FAULT_INJECT": fault}
    done = subprocess.run(
        [sys.executable, "-m", "fedae", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "client 1's update rejected" in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    for row in summary["rounds"]:
        assert row["clients"] == [0, 2] and row["trained"] == [0, 1, 2]
        assert reason in row["rejected"]["1"]
    # Client 1 trained and paid for it: its epsilon is reported like the others'.
    assert set(summary["privacy"]["sample_level"]["per_client"]) == {"0", "1", "2"}
    assert (out / "bundle" / "model.keras").exists()
    assert f"round 2: client 1's update rejected: {reason}" in (out / "report.md").read_text()
