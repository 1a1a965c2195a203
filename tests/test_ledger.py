"""The durable privacy ledger: append-only, crash-safe, never silently reset."""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shared.config import FedaeConfig
from shared.data.sources import DataSpec
from shared.ledger import LedgerError, LedgerEvent, PrivacyLedger, dataset_fingerprint, ledger_path
from shared.preprocess import Scaler
from shared.privacy import cumulative_epsilon

ROOT = Path(__file__).resolve().parents[1]


def event(round_: int, fingerprint: str = "f" * 64) -> LedgerEvent:
    return LedgerEvent("run-1", round_, fingerprint, 1000, 1.2, 0.05, 20, 0.5)


def test_events_survive_reopening_and_are_keyed_by_data(tmp_path) -> None:
    path = ledger_path(tmp_path, 3)
    first = event(1)
    with PrivacyLedger(path) as ledger:
        ledger.record(first)
        ledger.record(event(2))
        ledger.record(event(1, fingerprint="0" * 64))
    assert path == tmp_path / "client-3" / "privacy-ledger.sqlite"
    with PrivacyLedger(path, create=False) as ledger:
        assert [e.round for e in ledger.events("f" * 64)] == [1, 2]
        assert len(ledger.events()) == 3
        assert ledger.events("f" * 64)[0] == first  # every field, the time included


def test_an_event_recorded_before_a_crash_is_not_lost(tmp_path) -> None:
    # A client process records its event, then dies before it could send anything (os._exit skips
    # every clean-up: no close, no flush by Python).
    path = ledger_path(tmp_path, 0)
    code = (
        "import os, sys; sys.path.insert(0, sys.argv[1]);"
        "from shared.ledger import PrivacyLedger, LedgerEvent;"
        "ledger = PrivacyLedger(sys.argv[2]);"
        "ledger.record(LedgerEvent('run', 1, 'a' * 64, 100, 1.0, 0.1, 10, 1.0));"
        "os._exit(9)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(ROOT), str(path)], capture_output=True)
    assert result.returncode == 9
    with PrivacyLedger(path, create=False) as ledger:
        assert [(e.round, e.steps) for e in ledger.events("a" * 64)] == [(1, 10)]


def test_damaged_or_foreign_files_are_errors_and_left_untouched(tmp_path) -> None:
    garbage = tmp_path / "client-0" / "privacy-ledger.sqlite"
    garbage.parent.mkdir()
    garbage.write_bytes(b"not a database" * 100)
    with pytest.raises(LedgerError, match="not a readable privacy ledger"):
        PrivacyLedger(garbage)
    assert garbage.read_bytes() == b"not a database" * 100

    foreign = tmp_path / "other.sqlite"
    with sqlite3.connect(foreign) as connection:
        connection.execute("CREATE TABLE customers (id INTEGER)")
    with pytest.raises(LedgerError, match="not a fedae privacy ledger"):
        PrivacyLedger(foreign)

    with pytest.raises(LedgerError, match="no privacy ledger here"):
        PrivacyLedger(tmp_path / "missing.sqlite", create=False)


def test_a_ledger_from_a_newer_fedae_is_refused(tmp_path) -> None:
    path = tmp_path / "l.sqlite"
    PrivacyLedger(path).close()
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(LedgerError, match="schema version 99 is newer"):
        PrivacyLedger(path)


def test_invalid_events_are_refused_by_the_schema(tmp_path) -> None:
    with PrivacyLedger(tmp_path / "l.sqlite") as ledger:
        with pytest.raises(LedgerError, match="could not record"):
            ledger.record(LedgerEvent("run", 1, "f" * 64, 100, 1.0, 0.1, 10, 0.0))  # clip 0 = no DP
        assert ledger.events() == []


def test_fingerprint_depends_on_every_value_and_the_shape(rng) -> None:
    x = rng.normal(size=(50, 4)).astype(np.float32)
    assert dataset_fingerprint(x) == dataset_fingerprint(x.copy())
    y = x.copy()
    y[17, 2] += 1e-3
    assert dataset_fingerprint(y) != dataset_fingerprint(x)
    assert dataset_fingerprint(x.reshape(100, 2)) != dataset_fingerprint(x)


def _wdbc_client(client_id: int, target_epsilon: float) -> tuple:
    """A real wdbc client's config, data spec, scaler, initial weights and data, for train_client."""
    from shared.data.sources import load_client_data
    from shared.task import trainer_for

    config = FedaeConfig(
        scenario="wdbc",
        partition="iid",
        num_clients=2,
        batch_size=16,
        latent_dim=4,
        local_epochs=1,
        noise_multiplier=1.5,
        l2_norm_clip=0.5,
        target_epsilon=target_epsilon,
    )
    data = load_client_data(config, client_id)
    scaler = Scaler.fit(data.x_train, "tabular", None, flatten=True)
    spec = DataSpec("tabular", (30,))
    return config, spec, scaler, trainer_for(config, spec, scaler).get_weights(), data


def test_client_epsilon_composes_across_rounds_and_runs_of_the_same_data(tmp_path) -> None:
    from shared.task import train_client

    config, spec, scaler, weights, data = _wdbc_client(0, target_epsilon=0.0)  # no budget: composition only
    path = ledger_path(tmp_path, 0)
    epsilons = []
    for run_id, round_ in (("run-a", 1), ("run-a", 2), ("run-b", 1)):  # a second run of the same data
        with PrivacyLedger(path) as ledger:
            epsilons.append(train_client(config, spec, scaler, weights, 0, round_, ledger, run_id).epsilon)
    with PrivacyLedger(path) as ledger:
        events = ledger.events(dataset_fingerprint(data.x_train))
    assert [(e.run_id, e.round) for e in events] == [("run-a", 1), ("run-a", 2), ("run-b", 1)]
    assert epsilons[0] < epsilons[1] < epsilons[2]
    expected = cumulative_epsilon([e.training_event() for e in events], config.delta, config.accountant)
    assert epsilons[2] == pytest.approx(expected)


def test_a_round_that_would_exceed_the_budget_is_refused_before_training(tmp_path) -> None:
    from shared.privacy import BudgetExhausted
    from shared.task import train_client

    config, spec, scaler, weights, _ = _wdbc_client(1, target_epsilon=2.5)
    path = ledger_path(tmp_path, 1)
    with PrivacyLedger(path) as ledger:
        first = train_client(config, spec, scaler, weights, 1, 1, ledger, "run").epsilon
        assert first < 2.5
        with pytest.raises(
            BudgetExhausted, match=r"client-id=1 is at epsilon .* above its target-epsilon 2.5"
        ):
            train_client(config, spec, scaler, weights, 1, 2, ledger, "run")
        assert [e.round for e in ledger.events()] == [1]  # nothing recorded, nothing spent
        # A site's own, larger budget (node config) lets it go on.
        assert (
            train_client(config, spec, scaler, weights, 1, 2, ledger, "run", target_epsilon=10.0).epsilon
            > first
        )


def test_foreign_files_are_not_modified_and_a_lost_events_table_is_not_recreated(tmp_path) -> None:
    foreign = tmp_path / "other.sqlite"
    with sqlite3.connect(foreign) as connection:
        connection.execute("CREATE TABLE customers (id INTEGER)")
    before = foreign.read_bytes()
    with pytest.raises(LedgerError, match="not a fedae privacy ledger"):
        PrivacyLedger(foreign)
    assert foreign.read_bytes() == before  # not even switched to WAL

    path = tmp_path / "l.sqlite"
    with PrivacyLedger(path) as ledger:
        ledger.record(event(1))
    with sqlite3.connect(path) as connection:
        connection.execute("DROP TABLE events")
    with pytest.raises(LedgerError, match="events table is gone"):
        PrivacyLedger(path)


def test_reading_a_ledger_writes_nothing(tmp_path) -> None:
    path = tmp_path / "l.sqlite"
    with PrivacyLedger(path) as ledger:
        ledger.record(event(1))
    path.chmod(0o444)
    try:
        with PrivacyLedger(path, create=False) as ledger:
            assert len(ledger.events()) == 1
            with pytest.raises(LedgerError, match="could not record"):
                ledger.record(event(2))
    finally:
        path.chmod(0o644)


def test_a_version_1_ledger_is_upgraded_in_place_and_keeps_every_event(tmp_path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as connection:  # the version-1 schema, as fedae 0.1 wrote it
        connection.executescript(
            """
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL,
                round INTEGER NOT NULL, dataset_fingerprint TEXT NOT NULL, num_examples INTEGER NOT NULL,
                noise_multiplier REAL NOT NULL, sampling_probability REAL NOT NULL, steps INTEGER NOT NULL,
                l2_norm_clip REAL NOT NULL, sampling TEXT NOT NULL, recorded_at TEXT NOT NULL);
            INSERT INTO meta VALUES ('schema_version', '1');
            INSERT INTO events (run_id, round, dataset_fingerprint, num_examples, noise_multiplier,
                sampling_probability, steps, l2_norm_clip, sampling, recorded_at)
                VALUES ('old-run', 1, 'abc', 100, 1.5, 0.1, 10, 0.5, 'poisson', '2026-01-01T00:00:00');
            """
        )
    with PrivacyLedger(path, create=False) as ledger:  # read-only: readable as it is
        assert [e.run_id for e in ledger.events()] == ["old-run"]
    with PrivacyLedger(path) as ledger:
        ledger.record(event(2))
        events = ledger.events()
    assert [e.run_id for e in events] == ["old-run", "run-1"]
    assert events[0].epochs == 1 and events[0].training_event().sampling == "poisson"
    assert events[0].mechanism == "dp-sgd"
    with sqlite3.connect(path) as connection:
        version = connection.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
    assert version == "3"


def _version_2_ledger(path: Path) -> None:
    """A ledger as fedae wrote it before histogram events (schema version 2), with two trainings."""
    with sqlite3.connect(path) as connection:
        connection.executescript(
            """
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL,
                round INTEGER NOT NULL, dataset_fingerprint TEXT NOT NULL,
                num_examples INTEGER NOT NULL CHECK (num_examples > 0),
                noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
                sampling_probability REAL NOT NULL
                    CHECK (sampling_probability > 0 AND sampling_probability <= 1),
                steps INTEGER NOT NULL CHECK (steps >= 0),
                l2_norm_clip REAL NOT NULL CHECK (l2_norm_clip > 0),
                sampling TEXT NOT NULL CHECK (sampling IN ('poisson', 'shuffle')),
                epochs INTEGER NOT NULL DEFAULT 1 CHECK (epochs >= 1), recorded_at TEXT NOT NULL);
            CREATE INDEX events_by_data ON events (dataset_fingerprint);
            INSERT INTO meta VALUES ('schema_version', '2');
            INSERT INTO events (run_id, round, dataset_fingerprint, num_examples, noise_multiplier,
                sampling_probability, steps, l2_norm_clip, sampling, epochs, recorded_at)
                VALUES ('v2-run', 1, 'abc', 3400, 1.5, 0.0188, 54, 0.25, 'poisson', 1, '2026-02-01T00:00:00'),
                       ('v2-run', 2, 'abc', 3400, 1.5, 0.0188, 54, 0.25, 'poisson', 1, '2026-02-01T00:01:00');
            """
        )


def test_a_version_2_ledger_is_upgraded_to_3_and_its_events_read_as_dp_sgd(tmp_path) -> None:
    from shared.privacy import histogram_event

    path = tmp_path / "v2.sqlite"
    _version_2_ledger(path)
    with PrivacyLedger(path, create=False) as ledger:  # read-only: read as it is, not upgraded
        before = ledger.events()
    assert [(e.run_id, e.round, e.mechanism) for e in before] == [
        ("v2-run", 1, "dp-sgd"),
        ("v2-run", 2, "dp-sgd"),
    ]
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT value FROM meta").fetchone()[0] == "2"  # untouched by reading

    histogram = LedgerEvent("run-2", 0, "abc", 3400, 5.0, 1.0, 1, 1.0, mechanism="histogram")
    with PrivacyLedger(path) as ledger:  # opened for writing: upgraded in place, then appended to
        assert ledger.events() == before  # nothing lost, every field as it was
        ledger.record(histogram)
    with PrivacyLedger(path, create=False) as ledger:
        after = ledger.events()
    assert after == [*before, histogram]
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT value FROM meta").fetchone()[0] == "3"
        mechanisms = connection.execute("SELECT mechanism FROM events ORDER BY id").fetchall()
    assert mechanisms == [("dp-sgd",), ("dp-sgd",), ("histogram",)]
    # The histogram composes as one Gaussian release on top of the two trainings.
    expected = cumulative_epsilon([*(e.training_event() for e in before), histogram_event(5.0, 3400)], 1e-5)
    assert cumulative_epsilon([e.training_event() for e in after], 1e-5) == pytest.approx(expected)


def test_an_unknown_mechanism_is_refused_by_the_schema(tmp_path) -> None:
    from dataclasses import replace

    with PrivacyLedger(tmp_path / "l.sqlite") as ledger:
        with pytest.raises(LedgerError, match="could not record"):
            ledger.record(replace(event(1), mechanism="laplace"))
        assert ledger.events() == []


def test_shuffled_events_keep_their_sampling_and_epochs(tmp_path) -> None:
    from dataclasses import replace

    path = tmp_path / "l.sqlite"
    shuffled = replace(event(1), sampling="shuffle", epochs=3)
    with PrivacyLedger(path) as ledger:
        ledger.record(shuffled)
    with PrivacyLedger(path, create=False) as ledger:
        (got,) = ledger.events()
    assert got.training_event().sampling == "shuffle" and got.training_event().epochs == 3
    assert cumulative_epsilon([got.training_event()], 1e-5) == pytest.approx(
        cumulative_epsilon([shuffled.training_event()], 1e-5)
    )
    with pytest.raises(LedgerError, match="could not record"), PrivacyLedger(path) as ledger:
        ledger.record(replace(event(2), sampling="sequential"))  # the schema's CHECK refuses it


def test_auto_noise_spends_the_budget_evenly_and_ends_at_the_target(tmp_path) -> None:
    from shared.task import train_client

    config, spec, scaler, weights, _ = _wdbc_client(0, target_epsilon=2.0)
    config = config.replace(noise_multiplier="auto", num_server_rounds=3)
    with PrivacyLedger(ledger_path(tmp_path, 0)) as ledger:
        outcomes = [train_client(config, spec, scaler, weights, 0, r, ledger, "run") for r in (1, 2, 3)]
        events = ledger.events()
    sigmas = [o.event.noise_multiplier for o in outcomes]
    assert sigmas[0] == pytest.approx(sigmas[1], rel=1e-3) == pytest.approx(sigmas[2], rel=1e-3)
    assert [e.noise_multiplier for e in events] == sigmas  # the ledger holds the sigma actually used
    assert outcomes[-1].epsilon <= 2.0 and outcomes[-1].epsilon == pytest.approx(2.0, rel=0.01)


def test_a_client_killed_after_training_before_replying_keeps_its_charge(tmp_path) -> None:
    # The client process dies after training, before its reply leaves (fault hook); a restarted client
    # finds the charge and composes on top of it.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from tests.test_ledger import _wdbc_client;"
        "from shared.ledger import PrivacyLedger, ledger_path;"
        "from shared.task import train_client;"
        "config, spec, scaler, weights, _ = _wdbc_client(0, target_epsilon=0.0);"
        "ledger = PrivacyLedger(ledger_path(sys.argv[2], 0));"
        "train_client(config, spec, scaler, weights, 0, int(sys.argv[3]), ledger, 'run');"
        "print('replied')"
    )
    env = {**os.environ, "FEDAE_FAULT_INJECT": "trained"}
    crashed = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), str(tmp_path), "1"], capture_output=True, env=env, text=True
    )
    assert crashed.returncode == 70 and "replied" not in crashed.stdout
    restarted = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), str(tmp_path), "2"], capture_output=True, text=True
    )
    assert restarted.returncode == 0 and "replied" in restarted.stdout, restarted.stderr[-2000:]
    with PrivacyLedger(ledger_path(tmp_path, 0), create=False) as ledger:
        assert [e.round for e in ledger.events()] == [1, 2]


def test_concurrent_charges_cannot_pass_the_budget_together(tmp_path) -> None:
    # Two runs training one site at the same moment, with room for one more round: one is charged, the
    # other sees that charge and refuses. The first one's check is slow, to make the race real.
    import threading
    import time

    from shared import privacy

    path = tmp_path / "l.sqlite"
    PrivacyLedger(path).close()
    one, two = (cumulative_epsilon([event(1).training_event()] * k, 1e-5) for k in (1, 2))
    budget = (one + two) / 2  # one event fits, two do not
    outcomes: dict[str, str] = {}

    def run(name: str, pause: float) -> None:
        def plan(history: list[LedgerEvent]) -> LedgerEvent:
            time.sleep(pause)
            planned = event(len(history) + 1)
            events = [e.training_event() for e in [*history, planned]]
            if cumulative_epsilon(events, 1e-5) > budget:
                raise privacy.BudgetExhausted(0, 0.0, 0.0, budget, 1e-5)
            return planned

        with PrivacyLedger(path) as ledger:
            try:
                ledger.charge(plan)
                outcomes[name] = "charged"
            except privacy.BudgetExhausted:
                outcomes[name] = "refused"

    slow = threading.Thread(target=run, args=("slow", 0.5))
    slow.start()
    time.sleep(0.1)
    run("fast", 0.0)
    slow.join()
    assert sorted(outcomes.values()) == ["charged", "refused"]
    with PrivacyLedger(path, create=False) as ledger:
        assert len(ledger.events()) == 1


def test_a_ledger_of_poisson_events_refuses_a_shuffled_round(tmp_path) -> None:
    from shared.privacy import IncompatibleLedger
    from shared.task import train_client

    config, spec, scaler, weights, _ = _wdbc_client(0, target_epsilon=0.0)
    with PrivacyLedger(ledger_path(tmp_path, 0)) as ledger:
        train_client(config, spec, scaler, weights, 0, 1, ledger, "run")
        with pytest.raises(
            IncompatibleLedger, match="poisson-sampling events and this run uses sampling 'shuffle'"
        ):
            train_client(config.replace(sampling="shuffle"), spec, scaler, weights, 0, 2, ledger, "run")
        assert len(ledger.events()) == 1  # nothing charged


def test_a_site_budget_from_node_config_is_validated() -> None:
    from flwr.app import Context, RecordDict

    from client.app import _site_budget
    from shared.privacy import PrivacyRefusal

    def context(value: object) -> Context:
        node_config = {"partition-id": 3} | ({} if value is None else {"target-epsilon": value})
        return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})

    assert _site_budget(FedaeConfig(target_epsilon=3.0), context(None)) == 3.0
    assert _site_budget(FedaeConfig(), context(1.5)) == 1.5
    assert _site_budget(FedaeConfig(), context(0.0)) == 0.0  # no budget, fixed sigma: allowed
    for bad in (-1.0, "lots", float("nan")):
        with pytest.raises(PrivacyRefusal, match="client-id=3: node config target-epsilon must be"):
            _site_budget(FedaeConfig(), context(bad))
    with pytest.raises(PrivacyRefusal, match="> 0 with noise-multiplier auto"):
        _site_budget(FedaeConfig(noise_multiplier="auto"), context(0.0))
