"""Series completion: a series is complete when no association that sent to it is still open
and nothing new arrived for `idle_s` seconds (a study may arrive over several associations).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class SeriesKey:
    study_uid: str
    series_uid: str


@dataclass
class _Pending:
    instances: set[str] = field(default_factory=set)
    open_associations: set[int] = field(default_factory=set)
    last_activity: float = field(default_factory=time.monotonic)


class SeriesTracker:
    """Collects received instances per series and hands complete series to `on_complete`."""

    def __init__(self, on_complete: Callable[[SeriesKey, int], None], idle_s: float = 2.0,
                 poll_s: float = 0.2) -> None:
        self._on_complete = on_complete
        self._idle_s = idle_s
        self._poll_s = poll_s
        self._pending: dict[SeriesKey, _Pending] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="series-tracker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def received(self, association_id: int, key: SeriesKey, sop_uid: str) -> None:
        with self._lock:
            pending = self._pending.setdefault(key, _Pending())
            pending.instances.add(sop_uid)
            pending.open_associations.add(association_id)
            pending.last_activity = time.monotonic()

    def association_closed(self, association_id: int) -> None:
        with self._lock:
            for pending in self._pending.values():
                if association_id in pending.open_associations:
                    pending.open_associations.discard(association_id)
                    pending.last_activity = time.monotonic()

    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            now = time.monotonic()
            with self._lock:
                ready = [(key, len(p.instances)) for key, p in self._pending.items()
                         if not p.open_associations and now - p.last_activity >= self._idle_s]
                for key, _ in ready:
                    del self._pending[key]
            for key, count in ready:
                self._on_complete(key, count)
