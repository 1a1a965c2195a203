"""A run whose server dies resumes from its checkpoint: every round once, every charge once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared.checkpoint import CHECKPOINT_FILE, load_checkpoint
from shared.ledger import PrivacyLedger, ledger_path
from shared.replies import REPLIES_DIR, weights_digest

ROOT = Path(__file__).resolve().parents[1]
SMALL = "num-clients=2 rows-per-site=400 fraction-evaluate=0 robustness-rows=0"  # attacks: tested elsewhere


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
@pytest.mark.parametrize(
    ("fault", "checkpointed"), [("server-exit@1", 1), ("server-exit-before-checkpoint@1", 0)]
)
def test_a_restarted_server_resumes_without_repeating_a_round_or_a_charge(
    tmp_path, fault, checkpointed
) -> None:
    out = tmp_path / "run"
    died = _simulate(out, rounds=2, fault=fault)
    assert died.returncode != 0 and not (out / "summary.json").exists(), died.stderr[-2000:]
    checkpoint = load_checkpoint(out / CHECKPOINT_FILE)
    assert checkpoint is not None and checkpoint.completed_round == checkpointed
    if not checkpointed:
        # The clients trained round 1 and charged it; the server died before it recorded the round (its
        # round-0 checkpoint holds the run key, so round 1 comes back under it).
        assert _charges(out) == {c: [(checkpoint.run_key, 1)] for c in range(2)}

    resumed = _simulate(out, rounds=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming run" in resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    # One charge per round per client, all under the run's key, although Flower ran it twice.
    assert _charges(out) == {c: [(checkpoint.run_key, 1), (checkpoint.run_key, 2)] for c in range(2)}
    # Round 2 was trained from one model, round 1's global model (the checkpoint's, when round 1 was
    # checkpointed before the crash): each client's kept update says what it received.
    received = set()
    for client in range(2):
        kept = ledger_path(out / "state", client).parent / REPLIES_DIR / f"{checkpoint.run_key}.npz"
        with np.load(kept, allow_pickle=False) as archive:
            meta = json.loads(str(archive["__meta__"]))
        assert meta["round"] == 2
        received.add(meta["received"])
    assert len(received) == 1
    if checkpointed:
        assert received == {weights_digest(checkpoint.arrays["global"])}
    epsilons = summary["privacy"]["sample_level"]["per_client_over_rounds"]
    assert set(epsilons) == {"0", "1"} and all(set(r) == {"1", "2"} for r in epsilons.values())


# -- the strategy's state across a restart, without processes ---------------------------------------------
class _Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def _replies(messages, delta: float) -> list:
    """Each node's reply: the model it was sent, moved by ``delta``, as float32 (Keras's dtype)."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    replies = []
    for client, msg in enumerate(messages):
        weights = [(w + delta).astype(np.float32) for w in msg.content["arrays"].to_numpy_ndarrays()]
        metrics = MetricRecord({"client-id": client, "num-examples": 100, "train-loss": 0.1})
        reply = Message(RecordDict({"arrays": ArrayRecord(weights), "metrics": metrics}), reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
        replies.append(reply)
    return replies


@pytest.fixture
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # as a SuperLink sets them
        monkeypatch.setattr(TaskIdentity, name, value)


def _fedadam_rounds(strategy, rounds: int, start: list[np.ndarray]) -> list[np.ndarray]:
    from flwr.app import ArrayRecord, ConfigRecord

    arrays = ArrayRecord(start)
    for server_round in range(1, rounds + 1):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord({}), _Grid([10, 11])))
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{server_round}-{i}"
        aggregated, _ = strategy.aggregate_train(server_round, _replies(messages, 0.01))
        assert aggregated is not None, f"round {server_round} aggregated nothing"
        arrays = aggregated
    return arrays.to_numpy_ndarrays()


def test_fedadam_keeps_the_model_float32_so_later_rounds_are_accepted(task_identity) -> None:
    from server.strategy import RoundRecorder, build_strategy
    from shared.config import FedaeConfig

    strategy = build_strategy(FedaeConfig(strategy="fedadam"), RoundRecorder(), 2)
    start = [np.zeros((4, 3), np.float32), np.zeros(3, np.float32)]
    weights = _fedadam_rounds(strategy, 3, start)  # FedAdam's float64 step would make round 2 reject all
    assert all(w.dtype == np.float32 for w in weights)


def test_a_checkpoint_restores_fedadam_moments_exhausted_clients_and_the_client_level_accountant(
    tmp_path, task_identity
) -> None:
    from flwr.serverapp import GaussianPrivacyEvent

    from server import resume
    from server.rounds import RoundBook
    from server.strategy import RoundRecorder, build_strategy
    from shared.config import FedaeConfig

    start = [np.zeros((4, 3), np.float32), np.zeros(3, np.float32)]
    config = FedaeConfig(strategy="fedadam", num_server_rounds=5)
    book = RoundBook(config, RoundRecorder(), start)
    strategy = build_strategy(config, book.recorder, 2)
    weights = _fedadam_rounds(strategy, 2, start)
    strategy.exhausted[99] = "budget exhausted: client-id=7 is at epsilon 3.0"
    book.rows.append({"round": 2, "clients": [0, 1], "eval_loss": float("nan")})
    run = resume.Resumption(tmp_path / CHECKPOINT_FILE, "key", "digest", None)
    resume.save(run, book, strategy, config, 2, weights)

    found = load_checkpoint(run.path)
    fresh_book = RoundBook(config, RoundRecorder(), start)
    fresh = build_strategy(config, fresh_book.recorder, 2)
    restored = resume.restore(resume.Resumption(run.path, "key", "digest", found), fresh_book, fresh)
    assert [w.tobytes() for w in restored] == [w.tobytes() for w in weights]
    assert fresh.round_offset == 2 and fresh.exhausted_clients() == [7]
    assert fresh_book.rows[0]["round"] == 2 and np.isnan(fresh_book.rows[0]["eval_loss"])
    for name in ("m_t", "v_t"):
        saved, loaded = getattr(strategy, name), getattr(fresh, name)
        assert list(saved) == list(loaded) and all(np.array_equal(saved[k], loaded[k]) for k in saved)

    dp = FedaeConfig(client_dp="server-fixed", client_dp_noise_multiplier=1.0)
    released = build_strategy(dp, RoundRecorder(), 2)
    released.accountant.compose(
        GaussianPrivacyEvent(noise_multiplier=1.0, sample_size=2, population_size=2), 3
    )
    resume.save_accountant(run, released)
    again = build_strategy(dp, RoundRecorder(), 2)
    resume.restore(
        resume.Resumption(run.path, "key", "digest", None), RoundBook(dp, RoundRecorder(), start), again
    )
    assert again.accountant.num_releases == 3
    assert again.privacy_spent().epsilon == pytest.approx(released.privacy_spent().epsilon)
