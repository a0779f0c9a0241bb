"""Series completion: a series is complete once an association that sent to it has been released,
none that sent to it is still open, and nothing new arrived for `idle_s` seconds (a study may come
over several associations). An aborted association does not complete anything. A series still
receiving after `expiry_s` is given up with a reason.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from thighseg.dicom_listener.index import COMPLETE, PROCESSING, RECEIVING, SpoolIndex


@dataclass(frozen=True)
class SeriesKey:
    study_uid: str
    series_uid: str


@dataclass
class _Activity:
    open_associations: set[int] = field(default_factory=set)
    released_since_last_instance: bool = False
    last_activity: float = field(default_factory=time.monotonic)


class SeriesTracker:
    """Turns received instances and association events into complete series (`on_complete`)."""

    def __init__(self, index: SpoolIndex, on_complete: Callable[[SeriesKey], None],
                 on_expired: Callable[[SeriesKey], None], idle_s: float = 2.0, expiry_s: float = 86400.0,
                 poll_s: float = 0.2) -> None:
        self._index = index
        self._on_complete = on_complete
        self._on_expired = on_expired
        self._idle_s, self._expiry_s, self._poll_s = idle_s, expiry_s, poll_s
        self._activity: dict[SeriesKey, _Activity] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="series-tracker", daemon=True)

    def start(self) -> None:
        """Resume after a restart, then watch for complete series."""
        for record in self._index.in_state(COMPLETE, PROCESSING):
            self._on_complete(SeriesKey(record.study_uid, record.series_uid))
        with self._lock:  # receiving series get a fresh idle period: senders may resend the rest
            for record in self._index.in_state(RECEIVING):
                self._activity[SeriesKey(record.study_uid, record.series_uid)] = _Activity(
                    released_since_last_instance=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def received(self, association_id: int, key: SeriesKey, sop_uid: str) -> bool:
        """Record a stored instance; False for a duplicate SOP Instance UID."""
        new = self._index.record_instance(key.study_uid, key.series_uid, sop_uid)
        with self._lock:
            activity = self._activity.setdefault(key, _Activity())
            activity.open_associations.add(association_id)
            activity.last_activity = time.monotonic()
            if new:
                activity.released_since_last_instance = False
        return new

    def association_closed(self, association_id: int, released: bool) -> None:
        with self._lock:
            for activity in self._activity.values():
                if association_id in activity.open_associations:
                    activity.open_associations.discard(association_id)
                    activity.last_activity = time.monotonic()
                    activity.released_since_last_instance |= released

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            now = time.monotonic()
            with self._lock:
                ready = [key for key, a in self._activity.items()
                         if a.released_since_last_instance and not a.open_associations
                         and now - a.last_activity >= self._idle_s]
                for key in ready:
                    del self._activity[key]
            for key in ready:
                if self._index.complete_if_receiving(key.series_uid):
                    self._on_complete(key)
            self._expire(time.time())

    def _expire(self, wall_now: float) -> None:
        for record in self._index.in_state(RECEIVING):
            if wall_now - record.last_received >= self._expiry_s:
                key = SeriesKey(record.study_uid, record.series_uid)
                with self._lock:
                    self._activity.pop(key, None)
                self._on_expired(key)

