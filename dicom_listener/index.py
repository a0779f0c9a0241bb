"""SQLite index of the spool: which instances arrived (with a digest of their content), and where
each series stands.

receiving -> complete -> processing -> done | failed (with a reason). Every change to a series'
content (a new instance, new content under a known SOP Instance UID) bumps its `generation` and
sends it back to receiving; processing takes a snapshot (generation + instance digests) and may
only finish if the generation is still the same, so a result always describes exactly the
instances it was computed from. `released` records that an association which sent to the series
was released after its last instance, so a restart resumes each series in the state it had.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

RECEIVING, COMPLETE, PROCESSING, DONE, FAILED = (
    "receiving",
    "complete",
    "processing",
    "done",
    "failed",
)
STATES = (RECEIVING, COMPLETE, PROCESSING, DONE, FAILED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    instances INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    updated REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL REFERENCES series(series_uid),
    received REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS series_state ON series(state);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
"""
# Columns added after the first release; an existing spool index is migrated in place.
_ADDED_COLUMNS = {
    "series": {
        "generation": "INTEGER NOT NULL DEFAULT 0",
        "released": "INTEGER NOT NULL DEFAULT 0",
    },
    "instances": {"digest": "TEXT NOT NULL DEFAULT ''"},
}
_SERIES_COLUMNS = (
    "series_uid, study_uid, state, reason, instances, last_received, attempts, generation, released"
)


class Arrival(enum.Enum):
    """What a received instance changed in its series."""

    NEW = "new"  # a SOP Instance UID not seen before
    REPLACED = "replaced"  # a known SOP Instance UID with different content
    DUPLICATE = "duplicate"  # the same content again: nothing changes
    CONFLICT = "conflict"  # a known SOP Instance UID in another series: refused


@dataclass(frozen=True)
class SeriesRecord:
    """One series as the index knows it."""

    series_uid: str
    study_uid: str
    state: str
    reason: str | None
    instances: int
    last_received: float
    attempts: int
    generation: int
    released: bool


@dataclass(frozen=True)
class Snapshot:
    """What a processing attempt works on: the series' generation and its instances' digests."""

    generation: int
    instances: tuple[tuple[str, str], ...]  # (SOP Instance UID, sha256 of the stored file), sorted

    @property
    def content_sha256(self) -> str:
        """One hash over which instances the series held and what each contained."""
        text = "".join(f"{sop}:{digest}\n" for sop, digest in self.instances)
        return hashlib.sha256(text.encode()).hexdigest()


def index_path(spool_dir: Path) -> Path:
    """Where a spool's index lives (one file, shared by every ingest process)."""
    return spool_dir / "index.sqlite3"


class SpoolIndex:
    """Thread-safe (one connection behind a lock); WAL so readers never block the receiver.
    Ingest processes each open their own connection: SQLite's file lock orders their writes (a
    writer waits up to BUSY_TIMEOUT_S for another's transaction)."""

    BUSY_TIMEOUT_S = 30.0

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            str(path), check_same_thread=False, isolation_level=None, timeout=self.BUSY_TIMEOUT_S
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._migrate()
        self._lock = threading.Lock()

    def _migrate(self) -> None:
        for table, columns in _ADDED_COLUMNS.items():
            present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for name, declaration in columns.items():
                if name not in present:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")

    def close(self) -> None:
        """Close the database (the listener is stopping)."""
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One writer at a time, all statements or none (the connection is in autocommit mode)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # also when COMMIT itself failed (disk full)
                    self._db.execute("ROLLBACK")
                raise

    def record_instance(
        self, study_uid: str, series_uid: str, sop_uid: str, digest: str
    ) -> Arrival:
        """Record a stored instance. Any change of content re-opens the series (back to receiving,
        next generation): a result must cover it."""
        now = time.time()
        with self._transaction():
            row = self._db.execute(
                "SELECT series_uid, digest FROM instances WHERE sop_uid = ?", (sop_uid,)
            ).fetchone()
            if row is not None and row[0] != series_uid:
                return Arrival.CONFLICT
            if row is not None and row[1] == digest:
                return Arrival.DUPLICATE
            self._db.execute(
                "INSERT INTO series"
                " (series_uid, study_uid, state, first_received, last_received, updated)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(series_uid) DO NOTHING",
                (series_uid, study_uid, RECEIVING, now, now, now),
            )
            self._db.execute(
                "INSERT INTO instances (sop_uid, series_uid, received, digest) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(sop_uid) DO UPDATE SET digest = excluded.digest,"
                " received = excluded.received",
                (sop_uid, series_uid, now, digest),
            )
            self._db.execute(
                "UPDATE series SET instances = instances + ?, last_received = ?, updated = ?,"
                " state = ?, reason = NULL, generation = generation + 1, released = 0"
                " WHERE series_uid = ?",
                (int(row is None), now, now, RECEIVING, series_uid),
            )
            return Arrival.NEW if row is None else Arrival.REPLACED

    def mark_released(self, series_uid: str) -> None:
        """An association that sent to the series was released after its last instance."""
        with self._transaction():
            self._db.execute("UPDATE series SET released = 1 WHERE series_uid = ?", (series_uid,))

    def set_state(self, series_uid: str, state: str, reason: str | None = None) -> None:
        """Set a series' state unconditionally (expiry, failures outside processing)."""
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        with self._transaction():
            self._db.execute(
                "UPDATE series SET state = ?, reason = ?, updated = ? WHERE series_uid = ?",
                (state, reason, time.time(), series_uid),
            )

    def complete_if_receiving(self, series_uid: str) -> bool:
        """receiving -> complete, atomically; False if another path got there first."""
        with self._transaction():
            return (
                self._db.execute(
                    "UPDATE series SET state = ?, updated = ? WHERE series_uid = ? AND state = ?",
                    (COMPLETE, time.time(), series_uid, RECEIVING),
                ).rowcount
                == 1
            )

    def begin(self, series_uid: str) -> Snapshot | None:
        """complete -> processing, with the snapshot to process; None if the series is no longer
        complete (it changed since it was queued, or another worker took it)."""
        with self._transaction():
            changed = self._db.execute(
                "UPDATE series SET state = ?, updated = ?, attempts = attempts + 1"
                " WHERE series_uid = ? AND state = ?",
                (PROCESSING, time.time(), series_uid, COMPLETE),
            ).rowcount
            if not changed:
                return None
            generation = self._db.execute(
                "SELECT generation FROM series WHERE series_uid = ?", (series_uid,)
            ).fetchone()[0]
            return self._snapshot(series_uid, generation)

    def peek(self, series_uid: str) -> Snapshot | None:
        """The snapshot of a series still receiving whose sender has released (a head start may
        process it before it completes), without changing its state; None otherwise."""
        with self._transaction():
            row = self._db.execute(
                "SELECT generation FROM series WHERE series_uid = ? AND state = ? AND released = 1",
                (series_uid, RECEIVING),
            ).fetchone()
            return None if row is None else self._snapshot(series_uid, row[0])

    def _snapshot(self, series_uid: str, generation: int) -> Snapshot:
        rows = self._db.execute(
            "SELECT sop_uid, digest FROM instances WHERE series_uid = ? ORDER BY sop_uid",
            (series_uid,),
        ).fetchall()
        return Snapshot(generation, tuple((sop, digest) for sop, digest in rows))

    def finish(
        self,
        series_uid: str,
        generation: int,
        state: str,
        reason: str | None = None,
        publish: Callable[[], None] | None = None,
    ) -> bool:
        """processing -> `state` only if the series is still the generation that was processed;
        False means it changed meanwhile and the result must not be published. `publish` runs
        inside the transaction: no instance is recorded meanwhile, and if it raises nothing
        changes."""
        with self._transaction():
            row = self._db.execute(
                "SELECT state, generation FROM series WHERE series_uid = ?", (series_uid,)
            ).fetchone()
            if row is None or tuple(row) != (PROCESSING, generation):
                return False
            if publish is not None:
                publish()
            self._db.execute(
                "UPDATE series SET state = ?, reason = ?, updated = ? WHERE series_uid = ?",
                (state, reason, time.time(), series_uid),
            )
            return True

    def requeue_processing(self) -> int:
        """After a restart: a series that was being processed is complete again."""
        with self._transaction():
            return self._db.execute(
                "UPDATE series SET state = ? WHERE state = ?", (COMPLETE, PROCESSING)
            ).rowcount

    def get(self, series_uid: str) -> SeriesRecord | None:
        """The series' record, or None if it was never received."""
        with self._lock:
            row = self._db.execute(
                f"SELECT {_SERIES_COLUMNS} FROM series WHERE series_uid = ?", (series_uid,)
            ).fetchone()
        return SeriesRecord(*row) if row else None

    def in_state(self, *states: str) -> list[SeriesRecord]:
        """Every series in one of `states`, oldest activity first."""
        marks = ",".join("?" * len(states))
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_SERIES_COLUMNS} FROM series WHERE state IN ({marks})"
                " ORDER BY last_received",
                states,
            ).fetchall()
        return [SeriesRecord(*row) for row in rows]

    def counts(self) -> dict[str, int]:
        """How many series are in each state (every state present)."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM series GROUP BY state").fetchall()
        return {state: 0 for state in STATES} | dict(rows)

    def forget_instances(self, series_uid: str) -> None:
        """Drop the instance rows of a series whose files were freed (expired)."""
        with self._transaction():
            self._db.execute("DELETE FROM instances WHERE series_uid = ?", (series_uid,))
            self._db.execute("UPDATE series SET instances = 0 WHERE series_uid = ?", (series_uid,))
