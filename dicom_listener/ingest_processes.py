"""C-STORE ingest in several processes, for more instances per second than one GIL allows.

pynetdicom decodes PDUs in Python, so one process receives at most ~260 instances/s on this
machine whatever the number of associations. With `ingest_processes` N > 1 the listener opens the
listening socket and starts N ingest processes that all accept on it (whichever is free takes the
next association; connections queued while one restarts wait for the others); each runs the same
C-STORE handlers as the in-process SCP (checks, fsync, index, status codes) against the shared
spool and index.

What must be decided from every association stays in the listener process: the series tracker (a
study may come over associations served by different processes), streaming inference and the
metrics. Each ingest process reports to it through one queue, in order: every recorded arrival,
every association's end and every counter increment. An ingest process that dies is started
again, and its open associations count as aborted (their series do not complete on their account).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Hashable
from pathlib import Path

from thighseg.dicom_listener.config import ListenerConfig
from thighseg.dicom_listener.index import Arrival, SpoolIndex, index_path
from thighseg.dicom_listener.logs import redact_identifiers
from thighseg.dicom_listener.scp import StoreHandler, listening_socket, start_scp, stop_scp
from thighseg.dicom_listener.series import SeriesKey, SeriesTracker
from thighseg.dicom_listener.spool import Spool
from thighseg.dicom_listener.telemetry import Telemetry

log = logging.getLogger(__name__)

# the counters the SCP handlers increment (Telemetry attributes), counted in the listener process
RELAYED_COUNTERS = ("received", "replaced", "duplicates", "rejected", "associations_rejected")
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0  # beyond the drain: aborting what is still open, closing the index
_SPAWN = multiprocessing.get_context("spawn")  # never fork a process that runs threads


class _RelayedCounter:
    """A Counter (or one label of it) whose increments go to the listener process."""

    def __init__(self, events: multiprocessing.Queue, name: str, label: str | None = None):
        self._events, self._name, self._label = events, name, label

    def labels(self, label: str) -> _RelayedCounter:
        """The counter for one label value."""
        return _RelayedCounter(self._events, self._name, label)

    def inc(self, amount: float = 1) -> None:
        """Count in the listener process."""
        self._events.put(("count", self._name, self._label, amount))


class _RelayedTelemetry:
    """The Telemetry the SCP handlers see in an ingest process: its counters, relayed."""

    def __init__(self, events: multiprocessing.Queue) -> None:
        for name in RELAYED_COUNTERS:
            setattr(self, name, _RelayedCounter(events, name))


class _Relay:
    """An ingest process's side of the tracker: arrivals are recorded in the shared index here
    (before Success), then reported; so are association ends and stored instances."""

    def __init__(self, events: multiprocessing.Queue, index: SpoolIndex) -> None:
        self._events, self._index, self._process = events, index, os.getpid()

    def received(
        self, association_id: Hashable, key: SeriesKey, sop_uid: str, digest: str
    ) -> Arrival:
        """Record in the index, then tell the tracker which association it came on."""
        arrival = self._index.record_instance(key.study_uid, key.series_uid, sop_uid, digest)
        self._events.put(("arrival", (self._process, association_id), key, arrival))
        return arrival

    def association_closed(self, association_id: Hashable, released: bool) -> None:
        """Tell the tracker an association of this process ended."""
        self._events.put(("closed", (self._process, association_id), released))

    def stored(self, key: SeriesKey, sop_uid: str, digest: str, path: Path) -> None:
        """Tell streaming inference an instance is in place."""
        self._events.put(("stored", key, sop_uid, digest, path))


def serve(
    config: ListenerConfig,
    listening: socket.socket,
    number: int,
    events: multiprocessing.Queue,
    relay_stored: bool,
    listener_pid: int,
) -> None:
    """An ingest process: the SCP on the listener's socket until SIGTERM or the listener's
    exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the listener, which stops us
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s ingest-{number} %(levelname)s %(message)s"
    )
    redact_identifiers()
    index = SpoolIndex(index_path(config.spool_dir))
    relay = _Relay(events, index)
    store = StoreHandler(
        Spool(config.spool_dir),
        relay,
        _RelayedTelemetry(events),  # type: ignore[arg-type] - the counters the handlers use
        config.limits,
        on_stored=relay.stored if relay_stored else None,
    )
    try:
        server = start_scp(config, store, relay, listening)
    except Exception as error:  # noqa: BLE001 - the listener reports why and stops
        events.put(("failed", number, str(error)))
        index.close()
        return
    events.put(("ready", number, os.getpid()))
    _wait_for_sigterm_or_orphan(listener_pid)
    stop_scp(server, config.drain_s)
    index.close()


def _wait_for_sigterm_or_orphan(listener_pid: int) -> None:
    """Until SIGTERM or the listener's exit (the listener's PID, not getppid() at the start: a
    listener gone before we started is gone too)."""
    while os.getppid() == listener_pid:
        received = signal.sigtimedwait({signal.SIGTERM}, 1.0)
        # being stopped and continued (SIGSTOP/SIGCONT, a frozen pod) ends the wait with an empty
        # siginfo (si_signo 0): that is no reason to stop receiving
        if received is not None and received.si_signo == signal.SIGTERM:
            return


class IngestProcesses:
    """N ingest processes on the listener's port, and the thread that applies their reports."""

    def __init__(
        self,
        config: ListenerConfig,
        tracker: SeriesTracker,
        telemetry: Telemetry,
        on_stored: Callable[[SeriesKey, str, str, Path], None] | None,
    ) -> None:
        self._config = dataclasses.replace(config, destinations=())  # forwarding stays here
        self._tracker, self._telemetry, self._on_stored = tracker, telemetry, on_stored
        self._events: multiprocessing.Queue = _SPAWN.Queue()
        self._processes: dict[int, multiprocessing.process.BaseProcess] = {}
        self._ready: dict[int, int] = {}  # process number -> pid, once it accepts
        self._failure: str | None = None
        self._stopping = threading.Event()
        self._spawning = threading.Lock()  # no process is started once stopping has begun
        self._dispatcher = threading.Thread(target=self._dispatch, name="ingest-reports")
        self._listening: socket.socket | None = None

    def start(self) -> IngestProcesses:
        """All processes accepting, or an error that says why one could not."""
        self._listening = listening_socket(self._config.host, self._config.port)
        try:
            for number in range(self._config.ingest_processes):
                self._spawn(number)
        except BaseException:
            self.stop()
            raise
        self._dispatcher.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(self._ready) < len(self._processes) and self._failure is None:
            if time.monotonic() > deadline:
                self._failure = f"ingest processes not accepting after {START_TIMEOUT_S:.0f} s"
            time.sleep(0.05)
        if self._failure is not None:
            failure = self._failure
            self.stop()
            raise OSError(failure)
        return self

    def alive(self) -> bool:
        """Is every ingest process accepting?"""
        return not self._stopping.is_set() and all(
            process.is_alive() and number in self._ready
            for number, process in self._processes.items()
        )

    def pids(self) -> list[int]:
        """The ingest processes' PIDs (for tests and operators)."""
        return [process.pid for process in self._processes.values() if process.pid is not None]

    def stop(self) -> None:
        """Stop accepting; every report sent before the processes exited is applied."""
        with self._spawning:
            self._stopping.set()
        for process in self._processes.values():
            if process.is_alive():
                process.terminate()
        if self._listening is not None:  # new connections refused now, not reset after the drain
            with contextlib.suppress(OSError):
                self._listening.shutdown(socket.SHUT_RDWR)
        for process in self._processes.values():
            process.join(self._config.drain_s + STOP_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join()
        if self._dispatcher.is_alive():
            self._dispatcher.join()
        self._events.close()
        if self._listening is not None:
            self._listening.close()

    def _spawn(self, number: int) -> None:
        process = _SPAWN.Process(
            target=serve,
            args=(
                self._config,
                self._listening,
                number,
                self._events,
                self._on_stored is not None,
                os.getpid(),
            ),
            name=f"thighseg-ingest-{number}",
            daemon=True,
        )
        process.start()
        self._processes[number] = process

    def _dispatch(self) -> None:
        """Apply reports in order; restart a process that died. Ends once stopping and drained."""
        while True:
            try:
                self._apply(self._events.get(timeout=0.5))
            except queue.Empty:
                if self._stopping.is_set() and not any(
                    p.is_alive() for p in self._processes.values()
                ):
                    return
                self._restart_dead()
            except Exception:  # noqa: BLE001 - one bad report must not end the reports
                log.exception("could not apply an ingest report")

    def _apply(self, event: tuple) -> None:
        kind, *rest = event
        if kind == "arrival":
            association, key, arrival = rest
            self._tracker.note_arrival(association, key, arrival)
        elif kind == "closed":
            association, released = rest
            self._tracker.association_closed(association, released)
        elif kind == "stored":
            if self._on_stored is not None:
                self._on_stored(*rest)
        elif kind == "count":
            name, label, amount = rest
            counter = getattr(self._telemetry, name)
            (counter.labels(label) if label is not None else counter).inc(amount)
        elif kind == "ready":
            number, pid = rest
            self._ready[number] = pid
            log.info("ingest process %d (pid %d) accepting", number, pid)
        elif kind == "failed":
            number, message = rest
            self._failure = f"ingest process {number}: {message}"
            log.error("%s", self._failure)

    def _restart_dead(self) -> None:
        with self._spawning:
            if self._stopping.is_set():
                return
            for number, process in list(self._processes.items()):
                if process.is_alive() or number not in self._ready:
                    continue
                pid = self._ready.pop(number)
                log.error(
                    "ingest process %d (pid %d) exited (%s): starting it again",
                    number,
                    pid,
                    process.exitcode,
                )
                self._tracker.abandon(lambda association, pid=pid: association[0] == pid)
                self._spawn(number)
