"""Series completion: a series is complete once an association that sent to it has been released,
none that sent to it is still open, and nothing new arrived for `idle_s` seconds (a study may come
over several associations). An aborted association does not complete anything. A series still
receiving `expiry_s` after its last instance, with no association open to it, is given up with a
reason.

When the last association sending to a series is released, `on_quiet` hears of it at once: the
listener may start processing then (a head start), publishing only once the series completes.

The release is persisted in the index, so after a restart a series whose sender was still
connected stays receiving until its own completion; only a released one completes after `idle_s`.
A failure of the watch loop (disk full, index error) is reported by `error` and retried on the
next poll, never the end of the thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Protocol

from thighseg.dicom_listener.index import COMPLETE, RECEIVING, Arrival, SpoolIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesKey:
    """A series and the study it belongs to (their folder in the spool and the results)."""

    study_uid: str
    series_uid: str


class Arrivals(Protocol):
    """What the C-STORE handlers report: the tracker itself, or its relay in an ingest process."""

    def received(
        self, association_id: Hashable, key: SeriesKey, sop_uid: str, digest: str
    ) -> Arrival:
        """Record a stored instance in the index; say what it changed."""

    def association_closed(self, association_id: Hashable, released: bool) -> None:
        """An association ended, released or aborted."""


@dataclass
class _Activity:
    open_associations: set[Hashable] = field(default_factory=set)
    released_since_last_instance: bool = False
    last_activity: float = field(default_factory=time.monotonic)


class SeriesTracker:
    """Turns received instances and association events into complete series (`on_complete`)."""

    def __init__(
        self,
        index: SpoolIndex,
        on_complete: Callable[[SeriesKey], None],
        on_expired: Callable[[SeriesKey], None],
        on_quiet: Callable[[SeriesKey], None] | None = None,
        idle_s: float = 2.0,
        expiry_s: float = 86400.0,
        poll_s: float = 0.2,
    ) -> None:
        self._index = index
        self._on_complete = on_complete
        self._on_expired = on_expired
        self._on_quiet = on_quiet
        self._idle_s, self._expiry_s, self._poll_s = idle_s, expiry_s, poll_s
        self._activity: dict[SeriesKey, _Activity] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="series-tracker", daemon=True)
        # why the last poll failed; None while the loop makes progress
        self.error: str | None = None

    def start(self) -> None:
        """Resume after a restart, then watch for complete series."""
        self._index.requeue_processing()
        for record in self._index.in_state(COMPLETE):
            self._on_complete(SeriesKey(record.study_uid, record.series_uid))
        with self._lock:  # a receiving series completes only if its sender had released
            for record in self._index.in_state(RECEIVING):
                self._activity[SeriesKey(record.study_uid, record.series_uid)] = _Activity(
                    released_since_last_instance=record.released
                )
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; waits for the watch thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def is_alive(self) -> bool:
        """Is the watch loop running and making progress?"""
        return self._thread.is_alive() and self.error is None

    def received(
        self, association_id: Hashable, key: SeriesKey, sop_uid: str, digest: str
    ) -> Arrival:
        """Record a stored instance and what it changed."""
        arrival = self._index.record_instance(key.study_uid, key.series_uid, sop_uid, digest)
        self.note_arrival(association_id, key, arrival)
        return arrival

    def note_arrival(self, association_id: Hashable, key: SeriesKey, arrival: Arrival) -> None:
        """An instance the index has recorded (here or in an ingest process) keeps its series
        receiving."""
        with self._lock:
            activity = self._activity.setdefault(key, _Activity())
            activity.open_associations.add(association_id)
            activity.last_activity = time.monotonic()
            if arrival in (Arrival.NEW, Arrival.REPLACED):
                activity.released_since_last_instance = False

    def abandon(self, gone: Callable[[Hashable], bool]) -> None:
        """Associations of an ingest process that died count as aborted: their series complete
        only once a sender releases an association again."""
        with self._lock:
            ids = {a for act in self._activity.values() for a in act.open_associations if gone(a)}
        for association_id in ids:
            self.association_closed(association_id, released=False)

    def association_closed(self, association_id: Hashable, released: bool) -> None:
        """An association ended: a release (not an abort) lets its series complete."""
        released_series, quiet, cut_off = [], [], 0
        with self._lock:
            for key, activity in self._activity.items():
                if association_id in activity.open_associations:
                    cut_off += not released
                    activity.open_associations.discard(association_id)
                    activity.last_activity = time.monotonic()
                    if released and not activity.released_since_last_instance:
                        activity.released_since_last_instance = True
                        released_series.append(key.series_uid)
                    if activity.released_since_last_instance and not activity.open_associations:
                        quiet.append(key)
        if cut_off:
            log.warning(
                "an association sending to %d series was aborted: they complete after a later "
                "release, or expire",
                cut_off,
            )
        for series_uid in released_series:
            try:
                self._index.mark_released(series_uid)
            except Exception as error:  # noqa: BLE001 - completion still works from memory until a restart
                log.error("could not persist a release: %s", error)
        if self._on_quiet is not None:
            for key in quiet:
                self._on_quiet(key)

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self._complete_ready(time.monotonic())
                self._expire(time.time())
            except Exception as error:  # noqa: BLE001 - e.g. disk full: report it and try again
                if self.error is None:
                    log.error(
                        "series tracker cannot make progress: %s: %s", type(error).__name__, error
                    )
                self.error = f"{type(error).__name__}: {error}"
            else:
                if self.error is not None:
                    log.warning("series tracker recovered")
                self.error = None

    def _complete_ready(self, now: float) -> None:
        with self._lock:
            ready = [
                key
                for key, a in self._activity.items()
                if a.released_since_last_instance
                and not a.open_associations
                and now - a.last_activity >= self._idle_s
            ]
        for key in ready:
            completed = self._index.complete_if_receiving(key.series_uid)
            with self._lock:  # forgotten only once the index has recorded the completion
                activity = self._activity.get(key)
                if activity is not None and activity.last_activity <= now:
                    del self._activity[key]
            if completed:
                self._on_complete(key)

    def _expire(self, wall_now: float) -> None:
        """Give up series nobody is sending to any more; a series an open association is still
        sending to never expires, however long the sender pauses."""
        for record in self._index.in_state(RECEIVING):
            if wall_now - record.last_received >= self._expiry_s:
                key = SeriesKey(record.study_uid, record.series_uid)
                with self._lock:
                    activity = self._activity.get(key)
                    if activity is not None and activity.open_associations:
                        continue
                    self._activity.pop(key, None)
                self._on_expired(key)
