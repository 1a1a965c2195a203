"""The client's durable privacy ledger: every DP-SGD training it ran and every threshold histogram it
released, in an embedded SQLite database.

One database per site (per simulated client in simulation), at
``<state-dir>/client-<id>/privacy-ledger.sqlite``.
Events are only ever appended: there is no update or delete, and a database that cannot be read is an
error, never a reason to start a fresh one (losing the ledger would under-report privacy loss). Each
``record`` is one committed transaction in WAL mode with ``synchronous=FULL``, so once it returns the
event survives a crash of the process; the client records an event before it sends the weights the
event paid for.

Epsilon composes over every event recorded for the same data set, across rounds and runs: events are
keyed by a fingerprint of the training data. Each event names its ``mechanism``: ``dp-sgd`` (a local
training) or ``histogram`` (the federated threshold's Gaussian histogram of the same training rows,
recorded with q = 1, one step, and the histogram's L2 sensitivity 1 in ``l2_norm_clip``), so an auditor
sees which is which; both compose into one epsilon (``shared.privacy``).
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from shared.privacy import TrainingEvent

# 2: events.epochs (the shuffled-batch bound needs it); version-1 rows are Poisson.
# 3: events.mechanism ('dp-sgd' | 'histogram'); every earlier row is a DP-SGD training.
SCHEMA_VERSION = 3
LEDGER_FILE = "privacy-ledger.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    dataset_fingerprint TEXT NOT NULL,
    num_examples INTEGER NOT NULL CHECK (num_examples > 0),
    noise_multiplier REAL NOT NULL CHECK (noise_multiplier > 0),
    sampling_probability REAL NOT NULL CHECK (sampling_probability > 0 AND sampling_probability <= 1),
    steps INTEGER NOT NULL CHECK (steps >= 0),
    l2_norm_clip REAL NOT NULL CHECK (l2_norm_clip > 0),
    sampling TEXT NOT NULL CHECK (sampling IN ('poisson', 'shuffle')),
    epochs INTEGER NOT NULL DEFAULT 1 CHECK (epochs >= 1),
    recorded_at TEXT NOT NULL,
    mechanism TEXT NOT NULL DEFAULT 'dp-sgd' CHECK (mechanism IN ('dp-sgd', 'histogram'))
);
CREATE INDEX IF NOT EXISTS events_by_data ON events (dataset_fingerprint);
"""


class LedgerError(RuntimeError):
    """The ledger cannot be opened or read; nothing is reset or overwritten."""


def dataset_fingerprint(x: np.ndarray) -> str:
    """SHA-256 of a training array's dtype, shape and bytes: the same data gives the same key."""
    array = np.ascontiguousarray(x)
    digest = hashlib.sha256(f"{array.dtype.str}|{array.shape}|".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def ledger_path(state_dir: str | Path, client_id: int) -> Path:
    return Path(state_dir) / f"client-{client_id}" / LEDGER_FILE


# The columns each schema version added, with the definition that keeps every older row's meaning.
_ADDED_COLUMNS = {
    "epochs": "epochs INTEGER NOT NULL DEFAULT 1 CHECK (epochs >= 1)",
    "mechanism": "mechanism TEXT NOT NULL DEFAULT 'dp-sgd' CHECK (mechanism IN ('dp-sgd', 'histogram'))",
}


@dataclass(frozen=True)
class LedgerEvent:
    """One recorded privacy event: a local DP-SGD training, or a threshold histogram release."""

    run_id: str
    round: int
    dataset_fingerprint: str
    num_examples: int
    noise_multiplier: float
    sampling_probability: float
    steps: int
    l2_norm_clip: float
    sampling: str = "poisson"
    epochs: int = 1
    mechanism: str = "dp-sgd"
    recorded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def training_event(self) -> TrainingEvent:
        """The event as the accountant composes it (a training or a histogram release)."""
        return TrainingEvent(
            self.round,
            self.noise_multiplier,
            self.sampling_probability,
            self.steps,
            self.num_examples,
            self.sampling,
            self.epochs,
            self.mechanism,
        )


class PrivacyLedger:
    """Append-only SQLite store of a client's privacy events."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        """Open (``create``: or start) the ledger at ``path``; ``create=False`` opens it read-only."""
        self.path = Path(path)
        if not self.path.exists() and not create:
            raise LedgerError(f"{self.path}: no privacy ledger here")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if create:
                self._connection = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            else:
                uri = f"file:{self.path.resolve()}?mode=ro"
                self._connection = sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None)
            version = self._check_existing()
            self._version = version or SCHEMA_VERSION
            if create:
                self._connection.execute("PRAGMA journal_mode=WAL")
                self._connection.execute("PRAGMA synchronous=FULL")
                with self._transaction():
                    if version is not None and version < SCHEMA_VERSION:
                        self._upgrade(self._columns())  # the columns re-read under the write lock
                    self._version = SCHEMA_VERSION
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            self._connection.execute(statement)
                    self._connection.execute(
                        "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                        (str(SCHEMA_VERSION),),
                    )
        except sqlite3.DatabaseError as err:
            raise LedgerError(
                f"{self.path}: not a readable privacy ledger ({err}); it was left untouched"
            ) from err

    def _check_existing(self) -> int | None:
        """Refuse, before writing anything, a file that is not (or no longer) a whole fedae ledger.

        Returns the existing schema version (None for a new, empty file).
        """
        query = "SELECT name FROM sqlite_master WHERE type='table'"
        tables = {row[0] for row in self._connection.execute(query)} - {"sqlite_sequence"}
        if not tables:
            return None
        if "meta" not in tables:
            raise LedgerError(
                f"{self.path}: an SQLite file that is not a fedae privacy ledger (tables {sorted(tables)})"
            )
        if "events" not in tables:
            raise LedgerError(f"{self.path}: the ledger's events table is gone; refusing to start a new one")
        row = self._connection.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        version = SCHEMA_VERSION if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"{self.path}: ledger schema version {row[0]} is newer than this fedae's ({SCHEMA_VERSION}); "
                "upgrade fedae"
            )
        return version

    def _columns(self) -> set[str]:
        return {row[1] for row in self._connection.execute("PRAGMA table_info(events)")}

    def _upgrade(self, columns: set[str]) -> None:
        """Add the columns later versions introduced, in place, inside the opening transaction: every
        event is kept, and a crash leaves the old version intact. Their defaults are what older rows
        were: version-1 events are all Poisson (whose bound needs no epochs), and every event before
        version 3 is a DP-SGD training."""
        for name, definition in _ADDED_COLUMNS.items():
            if name not in columns:
                self._connection.execute(f"ALTER TABLE events ADD COLUMN {definition}")
        self._connection.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
        )

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._connection.execute("ROLLBACK")
            raise
        self._connection.execute("COMMIT")

    def record(self, event: LedgerEvent) -> None:
        """Append ``event``; when this returns, the event is on disk."""
        try:
            with self._transaction():
                self._insert(event)
        except sqlite3.DatabaseError as err:
            raise LedgerError(f"{self.path}: could not record a privacy event ({err})") from err

    def charge(
        self, plan: Callable[[list[LedgerEvent]], LedgerEvent]
    ) -> tuple[list[LedgerEvent], LedgerEvent]:
        """Append ``plan(history)`` in the same write transaction that read ``history``.

        ``plan`` sees every event so far, checks the budget (or calibrates against it) and returns the
        event to charge, or raises to charge nothing. No other writer can append in between, so two runs
        training one site at once cannot together pass its budget; the second waits for the first.
        Returns the history ``plan`` saw and the charged event.
        """
        try:
            with self._transaction():
                history = self.events()
                event = plan(history)
                self._insert(event)
        except sqlite3.DatabaseError as err:
            raise LedgerError(f"{self.path}: could not record a privacy event ({err})") from err
        return history, event

    def _insert(self, event: LedgerEvent) -> None:
        values = asdict(event)
        columns = ", ".join(values)
        placeholders = ", ".join("?" for _ in values)
        self._connection.execute(
            f"INSERT INTO events ({columns}) VALUES ({placeholders})", tuple(values.values())
        )

    def events(self, dataset_fingerprint: str | None = None) -> list[LedgerEvent]:
        names = [f.name for f in LedgerEvent.__dataclass_fields__.values()]
        if self._version < SCHEMA_VERSION:
            # Opened read-only, not upgraded: the columns an older version lacks take their defaults,
            # which is what its rows were (Poisson trainings of one epoch each).
            try:
                present = self._columns()
            except sqlite3.DatabaseError as err:
                raise LedgerError(f"{self.path}: could not read the privacy events ({err})") from err
            names = [name for name in names if name in present]
        query = f"SELECT {', '.join(names)} FROM events"
        args: tuple[str, ...] = ()
        if dataset_fingerprint is not None:
            query += " WHERE dataset_fingerprint = ?"
            args = (dataset_fingerprint,)
        try:
            rows = self._connection.execute(query + " ORDER BY id", args).fetchall()
        except sqlite3.DatabaseError as err:
            raise LedgerError(f"{self.path}: could not read the privacy events ({err})") from err
        return [LedgerEvent(**dict(zip(names, row, strict=True))) for row in rows]

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
