"""SQLite index of the spool: which instances arrived, and where each series stands.

receiving -> complete -> processing -> done | failed (with a reason). The index is what makes a
restart safe: series that were complete or processing when the listener died are processed again,
and an instance received twice is recorded once.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

RECEIVING, COMPLETE, PROCESSING, DONE, FAILED = "receiving", "complete", "processing", "done", "failed"
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
"""


@dataclass(frozen=True)
class SeriesRecord:
    series_uid: str
    study_uid: str
    state: str
    reason: str | None
    instances: int
    last_received: float
    attempts: int


class SpoolIndex:
    """Thread-safe (one connection behind a lock); WAL so readers never block the receiver."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def record_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        """Record a stored instance; False when it was a duplicate (already recorded)."""
        now = time.time()
        with self._lock, self._db:
            inserted = self._db.execute("INSERT OR IGNORE INTO instances VALUES (?, ?, ?)",
                                        (sop_uid, series_uid, now)).rowcount == 1
            self._db.execute(
                "INSERT INTO series (series_uid, study_uid, state, instances, first_received, last_received, updated)"
                " VALUES (?, ?, ?, 0, ?, ?, ?) ON CONFLICT(series_uid) DO NOTHING",
                (series_uid, study_uid, RECEIVING, now, now, now))
            if inserted:  # a new instance re-opens a finished series: its result must include it
                self._db.execute("UPDATE series SET instances = instances + 1, last_received = ?, updated = ?,"
                                 " state = ?, reason = NULL WHERE series_uid = ?",
                                 (now, now, RECEIVING, series_uid))
            return inserted

    def set_state(self, series_uid: str, state: str, reason: str | None = None, attempt: bool = False) -> None:
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        with self._lock, self._db:
            self._db.execute("UPDATE series SET state = ?, reason = ?, updated = ?,"
                             " attempts = attempts + ? WHERE series_uid = ?",
                             (state, reason, time.time(), int(attempt), series_uid))

    def complete_if_receiving(self, series_uid: str) -> bool:
        """receiving -> complete, atomically; False if another path got there first."""
        with self._lock, self._db:
            return self._db.execute("UPDATE series SET state = ?, updated = ? WHERE series_uid = ? AND state = ?",
                                    (COMPLETE, time.time(), series_uid, RECEIVING)).rowcount == 1

    def get(self, series_uid: str) -> SeriesRecord | None:
        with self._lock:
            row = self._db.execute("SELECT series_uid, study_uid, state, reason, instances, last_received, attempts"
                                   " FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
        return SeriesRecord(*row) if row else None

    def in_state(self, *states: str) -> list[SeriesRecord]:
        marks = ",".join("?" * len(states))
        with self._lock:
            rows = self._db.execute("SELECT series_uid, study_uid, state, reason, instances, last_received, attempts"
                                    f" FROM series WHERE state IN ({marks}) ORDER BY last_received", states).fetchall()
        return [SeriesRecord(*row) for row in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM series GROUP BY state").fetchall()
        return {state: 0 for state in STATES} | dict(rows)

    def forget_instances(self, series_uid: str) -> None:
        """Drop the instance rows of a series whose files were freed (expired)."""
        with self._lock, self._db:
            self._db.execute("DELETE FROM instances WHERE series_uid = ?", (series_uid,))
