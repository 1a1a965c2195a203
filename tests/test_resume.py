"""A run whose server dies resumes from its checkpoint: every round once, every charge once."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared.checkpoint import CHECKPOINT_FILE, load_checkpoint
from shared.ledger import PrivacyLedger, ledger_path
from shared.replies import REPLIES_DIR, weights_digest

ROOT = Path(__file__).resolve().parents[1]
SMALL = "num-clients=2 rows-per-site=400 fraction-evaluate=0"


def _simulate(out: Path, rounds: int, fault: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "FEDAE_FAULT_INJECT": fault}
    args = ["simulate", "--rounds", str(rounds), "--out", str(out), "--no-baselines", "--run-config", SMALL]
    return subprocess.run(
        [sys.executable, "-m", "fedae", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def _charges(out: Path) -> dict[int, list[tuple[str, int]]]:
    charges = {}
    for client in range(2):
        with PrivacyLedger(ledger_path(out / "state", client), create=False) as ledger:
            charges[client] = [(e.run_id, e.round) for e in ledger.events()]
    return charges


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["server-exit@1", "server-exit-before-checkpoint@2"])
def test_a_restarted_server_resumes_without_repeating_a_round_or_a_charge(tmp_path, fault: str) -> None:
    out = tmp_path / "run"
    died = _simulate(out, rounds=2, fault=fault)
    assert died.returncode != 0 and not (out / "summary.json").exists(), died.stderr[-2000:]
    checkpoint = load_checkpoint(out / CHECKPOINT_FILE)
    assert checkpoint is not None and checkpoint.completed_round == 1
    round_one_model = weights_digest(checkpoint.arrays["global"])
    if fault.startswith("server-exit-before-checkpoint"):
        # The clients trained round 2 and charged it; the server died before it recorded the round.
        assert all(
            rounds == [(checkpoint.run_key, 1), (checkpoint.run_key, 2)] for rounds in _charges(out).values()
        )
    shutil.copy(out / CHECKPOINT_FILE, tmp_path / "after-round-1.npz")

    resumed = _simulate(out, rounds=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming run" in resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    # One charge per round per client, all under the run's key, although Flower ran it twice.
    assert _charges(out) == {c: [(checkpoint.run_key, 1), (checkpoint.run_key, 2)] for c in range(2)}
    # Round 2 was trained from round 1's global model: each client's kept update says what it received.
    for client in range(2):
        kept = ledger_path(out / "state", client).parent / REPLIES_DIR / f"{checkpoint.run_key}.npz"
        with np.load(kept, allow_pickle=False) as archive:
            meta = json.loads(str(archive["__meta__"]))
        assert meta["round"] == 2 and meta["received"] == round_one_model
    epsilons = summary["privacy"]["sample_level"]["per_client_over_rounds"]
    assert set(epsilons) == {"0", "1"} and all(set(r) == {"1", "2"} for r in epsilons.values())
