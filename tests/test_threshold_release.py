"""A client's federated-threshold release (shared.task.threshold_histogram), the ClientApp's query handler
and the server's reading of the replies: real models, real ledger files, real Flower messages."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared import federated_threshold as ft
from shared.config import FedaeConfig
from shared.data.sources import DataSpec, load_client_data
from shared.ledger import LedgerEvent, PrivacyLedger, dataset_fingerprint, ledger_path
from shared.preprocess import Scaler
from shared.privacy import BUDGET_EXHAUSTED, BudgetExhausted, cumulative_epsilon, histogram_event
from shared.scoring import ResidualScorer

ROOT = Path(__file__).resolve().parents[1]
RELEASED_EXIT = 70  # shared.faults: a process killed at a fault point exits with this code


def wdbc_release_setup(target_epsilon: float = 0.0, **changes: object) -> tuple:
    """A real wdbc client with threshold-rule federated-percentile: config, spec, scaler, weights, the
    scorer the server would send, and the client's data."""
    from shared.models import residuals
    from shared.task import trainer_for

    config = FedaeConfig(
        scenario="wdbc",
        partition="iid",
        num_clients=2,
        batch_size=16,
        latent_dim=4,
        noise_multiplier=1.5,
        l2_norm_clip=0.5,
        target_epsilon=target_epsilon,
        threshold_rule="federated-percentile",
        anomaly_score="standardized",
    ).replace(**changes)
    data = load_client_data(config, 0)
    scaler = Scaler.fit(data.x_train, "tabular", None, flatten=True)
    spec = DataSpec("tabular", (30,))
    trainer = trainer_for(config, spec, scaler)
    scorer = ResidualScorer.fit(
        config.anomaly_score, residuals(trainer.model, trainer.spec, scaler.transform(data.x_train[:50]))
    )
    return config, spec, scaler, trainer.get_weights(), scorer, data


def test_the_release_is_the_exact_histogram_plus_gaussian_noise_charged_with_the_trainings(tmp_path) -> None:
    from shared.models import residuals
    from shared.task import threshold_histogram, train_client, trainer_for

    config, spec, scaler, weights, scorer, data = wdbc_release_setup()
    with PrivacyLedger(ledger_path(tmp_path, 0)) as ledger:
        trained = train_client(config, spec, scaler, weights, 0, 1, ledger, "run-a")
        outcome = threshold_histogram(
            config, spec, scaler, trained.weights, scorer, 0, ledger, "run-a", rng=np.random.default_rng(9)
        )
        events = ledger.events()

    # What left: the exact counts of the training rows' scores plus the seeded draws of N(0, sigma^2).
    trainer = trainer_for(config, spec, scaler)
    trainer.set_weights(trained.weights)
    scores = scorer.score(residuals(trainer.model, trainer.spec, scaler.transform(data.x_train)))
    exact = ft.count_scores(scores, config.threshold_bins)
    noise = np.random.default_rng(9).normal(0.0, config.threshold_noise_multiplier, config.threshold_bins + 2)
    assert np.allclose(outcome.counts - noise, exact) and exact.sum() == data.num_examples
    # What the ledger holds: the training, then the release, under the same data fingerprint.
    assert [(e.mechanism, e.round, e.run_id) for e in events] == [
        ("dp-sgd", 1, "run-a"),
        ("histogram", 0, "run-a"),
    ]
    assert {e.dataset_fingerprint for e in events} == {dataset_fingerprint(data.x_train)}
    release = events[-1]
    assert (release.noise_multiplier, release.sampling_probability, release.steps) == (5.0, 1.0, 1)
    assert release.num_examples == data.num_examples
    # What it cost: the release alone, and the whole ledger afterwards.
    assert outcome.release_epsilon == pytest.approx(
        cumulative_epsilon([histogram_event(5.0, data.num_examples)], config.delta)
    )
    assert outcome.epsilon == pytest.approx(
        cumulative_epsilon([e.training_event() for e in events], config.delta)
    )
    assert outcome.epsilon > max(trained.epsilon, outcome.release_epsilon)


def test_the_release_is_recorded_before_the_reply_leaves(tmp_path) -> None:
    # The client process dies after its charge, before it could reply (fault hook): the event is there.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from tests.test_threshold_release import wdbc_release_setup;"
        "from shared.ledger import PrivacyLedger, ledger_path;"
        "from shared.task import threshold_histogram;"
        "config, spec, scaler, weights, scorer, _ = wdbc_release_setup();"
        "ledger = PrivacyLedger(ledger_path(sys.argv[2], 0));"
        "threshold_histogram(config, spec, scaler, weights, scorer, 0, ledger, 'run');"
        "print('replied')"
    )
    env = {**os.environ, "FEDAE_FAULT_INJECT": "released"}
    crashed = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), str(tmp_path)], capture_output=True, env=env, text=True
    )
    assert crashed.returncode == RELEASED_EXIT and "replied" not in crashed.stdout, crashed.stderr[-2000:]
    with PrivacyLedger(ledger_path(tmp_path, 0), create=False) as ledger:
        assert [e.mechanism for e in ledger.events()] == ["histogram"]


def test_a_release_that_would_pass_the_budget_is_refused_and_costs_nothing(tmp_path) -> None:
    from shared.task import threshold_histogram

    config, spec, scaler, weights, scorer, data = wdbc_release_setup()
    spent = LedgerEvent("old", 1, "f" * 64, data.num_examples, 1.5, 0.1, 100, 0.5)
    now = cumulative_epsilon([spent.training_event()], config.delta)
    after = cumulative_epsilon(
        [spent.training_event(), histogram_event(5.0, data.num_examples)], config.delta
    )
    with PrivacyLedger(ledger_path(tmp_path, 0)) as ledger:
        ledger.record(spent)
        with pytest.raises(BudgetExhausted, match=r"client-id=0 .* its threshold histogram would take it to"):
            threshold_histogram(
                config, spec, scaler, weights, scorer, 0, ledger, "run", target_epsilon=(now + after) / 2
            )
        assert ledger.events() == [spent]  # nothing recorded, nothing released
        # A site budget with room for it (its node config's) lets it release.
        outcome = threshold_histogram(
            config, spec, scaler, weights, scorer, 0, ledger, "run", target_epsilon=after
        )
        assert outcome.epsilon == pytest.approx(after)


def test_training_keeps_room_for_the_threshold_release(tmp_path) -> None:
    from shared.task import planned_event, threshold_histogram, train_client

    config, spec, scaler, weights, scorer, data = wdbc_release_setup()
    n = data.num_examples
    one_round = planned_event(config, n, 1, 1.5)
    alone = cumulative_epsilon([one_round], config.delta)
    with_release = cumulative_epsilon([one_round, histogram_event(5.0, n)], config.delta)
    budget = (alone + with_release) / 2  # the round fits, the round and the release do not
    with PrivacyLedger(ledger_path(tmp_path / "federated", 0)) as ledger:
        with pytest.raises(BudgetExhausted, match="threshold histogram it keeps room for"):
            train_client(config, spec, scaler, weights, 0, 1, ledger, "run", target_epsilon=budget)
        assert ledger.events() == []
    plain = config.replace(threshold_rule="percentile")  # no release planned: the round fits
    with PrivacyLedger(ledger_path(tmp_path / "plain", 0)) as ledger:
        assert (
            train_client(plain, spec, scaler, weights, 0, 1, ledger, "run", target_epsilon=budget).epsilon
            <= budget
        )

    # noise-multiplier "auto" calibrates for the rounds and the release: both fit, ending at the target.
    auto = config.replace(noise_multiplier="auto", num_server_rounds=2, target_epsilon=4.0)
    with PrivacyLedger(ledger_path(tmp_path / "auto", 0)) as ledger:
        for server_round in (1, 2):
            weights = train_client(auto, spec, scaler, weights, 0, server_round, ledger, "run").weights
        outcome = threshold_histogram(auto, spec, scaler, weights, scorer, 0, ledger, "run")
        assert [e.mechanism for e in ledger.events()] == ["dp-sgd", "dp-sgd", "histogram"]
    assert outcome.epsilon <= 4.0 and outcome.epsilon == pytest.approx(4.0, rel=0.01)


# -- the ClientApp's query handler -------------------------------------------------------------------------


def _query(config: FedaeConfig, spec, scaler, weights, scorer, **extra: object):
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    from shared.setup import encode_scorer, encode_setup

    values = encode_setup(config, spec, scaler, run_key="key-1") | encode_scorer(scorer) | extra
    content = RecordDict({"arrays": ArrayRecord(weights), "config": ConfigRecord(values)})
    return Message(content, dst_node_id=5, message_type="query.threshold")


@pytest.fixture
def as_supernode(monkeypatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 5), ("_task_id", 1)):  # as a SuperNode sets them
        monkeypatch.setattr(TaskIdentity, name, value)


def test_the_client_app_replies_with_noisy_counts_or_an_error_never_a_crash(tmp_path, as_supernode) -> None:
    from flwr.app import Context, Message, RecordDict

    from client.app import threshold
    from shared.setup import BAD_QUERY

    config, spec, scaler, weights, scorer, data = wdbc_release_setup(state_dir=str(tmp_path / "state"))
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    ledger_file = ledger_path(tmp_path / "state", 0)

    # Content it cannot use: an error reply naming why, nothing charged.
    empty = Message(RecordDict(), dst_node_id=5, message_type="query.threshold")
    bad_rule = _query(config.replace(threshold_rule="percentile"), spec, scaler, weights, scorer)
    no_scorer = _query(config, spec, scaler, weights, scorer, **{"fedae.scorer-rule": "median"})
    wrong_model = _query(config, spec, scaler, weights[:-1], scorer)
    for msg, needle in (
        (empty, "content cannot be used"),
        (bad_rule, "not 'federated-percentile'"),
        (no_scorer, "anomaly score must be one of"),
        (wrong_model, "weight shapes"),
    ):
        reply = threshold(msg, context)
        assert reply.has_error() and reply.error.code == BAD_QUERY and needle in reply.error.reason
    assert not ledger_file.exists() or PrivacyLedger(ledger_file, create=False).events() == []

    # A good query: the noisy counts and what they cost.
    reply = threshold(_query(config, spec, scaler, weights, scorer), context)
    assert not reply.has_error()
    (counts,) = reply.content["histogram"].to_numpy_ndarrays()
    metrics = reply.content["metrics"]
    assert counts.shape == (config.threshold_bins + 2,)
    assert abs(counts.sum() - data.num_examples) < 6 * 5.0 * np.sqrt(counts.size)  # the rows, plus noise
    assert metrics["client-id"] == 0 and metrics["num-examples"] == data.num_examples
    with PrivacyLedger(ledger_file, create=False) as ledger:
        (release,) = ledger.events()
    assert release.mechanism == "histogram" and release.run_id == "key-1"
    assert metrics["epsilon"] == pytest.approx(cumulative_epsilon([release.training_event()], config.delta))

    # A site budget (node config) too small for another release: refused with the budget code.
    two = cumulative_epsilon([release.training_event()] * 2, config.delta)
    context.node_config["target-epsilon"] = (metrics["epsilon"] + two) / 2
    reply = threshold(_query(config, spec, scaler, weights, scorer), context)
    assert reply.has_error() and reply.error.code == BUDGET_EXHAUSTED
    assert "client-id=0" in reply.error.reason
    with PrivacyLedger(ledger_file, create=False) as ledger:
        assert len(ledger.events()) == 1


# -- the server's side ---------------------------------------------------------------------------------------


def test_the_server_sorts_replies_into_histograms_refusals_and_failures(as_supernode) -> None:
    from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict

    from server.threshold import _read_replies

    bins = 80
    sent = [
        Message(RecordDict(), dst_node_id=node, message_type="query.threshold")
        for node in (11, 12, 13, 14, 15)
    ]
    for i, msg in enumerate(sent):
        msg.metadata.__dict__["_message_id"] = f"m{i}"  # as the grid does when it pushes them

    def good(msg: Message, client: int) -> Message:
        metrics = {"client-id": client, "num-examples": 100, "release-epsilon": 0.8, "epsilon": 2.0}
        content = RecordDict(
            {"histogram": ArrayRecord([np.ones(bins + 2)]), "metrics": MetricRecord(metrics)}
        )
        return Message(content, reply_to=msg)

    refusal = Error(code=BUDGET_EXHAUSTED, reason="budget exhausted: client-id=4 is at epsilon 2.9 ...")
    replies = [
        good(sent[0], 0),
        good(sent[1], 0),  # a second site configured with the same --id
        Message(error=refusal, reply_to=sent[2]),
        Message(RecordDict({"metrics": MetricRecord({"client-id": 3})}), reply_to=sent[3]),  # no histogram
    ]  # node 15 never replies
    histograms, refused, failed = _read_replies(sent, replies, bins)
    assert [h.client for h in histograms] == [0] and histograms[0].epsilon == 2.0
    assert list(refused) == ["4"]
    assert [(f["node"], f["reason"].split(":")[0].split(";")[0]) for f in failed] == [
        (12, "client-id 0 already replied"),
        (14, "malformed reply"),
        (15, "no reply before the query timed out"),
    ]
