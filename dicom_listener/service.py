"""The listener as one object: SCP server, spool + index, series tracker, a bounded pool of
pipeline workers, metrics and health endpoints.

A series is processed from a snapshot of the index (its generation and instance digests) into a
staging folder; the result is published (renamed into place, replacing an older one) only if the
series is still that generation, atomically with the index update. A head start processes a
series as soon as its sender releases, during the idle wait that completes it: when it completes
unchanged, that result is published; if anything arrived meanwhile, it is abandoned (between
stages) and discarded, and the series is processed again once complete. Triton down or results not
writable keep the series queued and retry; any other failure ends as a failed series with a
reason. /readyz says 503, with the reason, while the listener cannot make progress.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from thighseg.client.triton import TritonUnavailable
from thighseg.core.memory import fix_mmap_threshold, limit_arenas
from thighseg.dicom_listener.config import ListenerConfig
from thighseg.dicom_listener.forward import forward
from thighseg.dicom_listener.index import (
    COMPLETE,
    DONE,
    FAILED,
    STATES,
    Snapshot,
    SpoolIndex,
    index_path,
)
from thighseg.dicom_listener.ingest_processes import IngestProcesses
from thighseg.dicom_listener.logs import redact_identifiers
from thighseg.dicom_listener.scp import StoreHandler, listening_socket, start_scp, stop_scp
from thighseg.dicom_listener.series import SeriesKey, SeriesTracker
from thighseg.dicom_listener.spool import Spool
from thighseg.dicom_listener.telemetry import Telemetry
from thighseg.pipeline import seg_process, summary
from thighseg.pipeline.report import FAILED as REPORT_FAILED
from thighseg.pipeline.report import Forwarding, SeriesReport
from thighseg.pipeline.stages import (
    InferenceSettings,
    SeriesResult,
    Superseded,
    process_series,
    short_uid,
)
from thighseg.pipeline.streaming import SliceCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadStart:
    """A series processed before it completed: the snapshot it used, its staging folder and the
    work, which ends with the result (or the error that stopped it)."""

    snapshot: Snapshot
    staging: Path
    work: Future

    def result_for(self, snapshot: Snapshot) -> SeriesResult | None:
        """Its result, once the work ends, if it was computed from exactly `snapshot`; None (and
        the staging folder removed) otherwise."""
        try:
            result = self.work.result()
        except Exception:  # noqa: BLE001 - superseded, Triton down, disk full: processed afresh
            result = None
        if result is None or self.snapshot != snapshot:
            shutil.rmtree(self.staging, ignore_errors=True)
            return None
        return result

    def discard(self) -> None:
        """Not to be used: its staging folder goes once the work ends."""
        self.work.add_done_callback(lambda _: shutil.rmtree(self.staging, ignore_errors=True))


@dataclass
class Listener:
    """SCP, spool, index, completion, workers and endpoints, started and stopped together."""

    config: ListenerConfig
    inference: InferenceSettings
    results: dict[str, SeriesResult] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.spool = Spool(self.config.spool_dir)
        self.index = SpoolIndex(index_path(self.config.spool_dir))
        self.telemetry = Telemetry()
        self.tracker = SeriesTracker(
            self.index,
            self._enqueue,
            self._expire,
            self._head_start if self.config.head_start else None,
            idle_s=self.config.idle_s,
            expiry_s=self.config.expiry_s,
        )
        self._workers = ThreadPoolExecutor(
            max_workers=self.config.workers, thread_name_prefix="pipeline"
        )
        self.streaming = (
            SliceCache(
                self.inference.infer,
                self.inference.input_size,
                self.config.stream_slices,
                context=self.inference.context,
            )
            if self.config.stream_slices > 0
            else None
        )
        self._done = threading.Condition()
        self._publish_lock = threading.Lock()
        self._head_starts: dict[str, HeadStart] = {}  # by series UID
        self._head_lock = threading.Lock()
        self._timers: set[threading.Timer] = set()
        self._stopping = threading.Event()
        # why results cannot be written, until a series succeeds
        self._results_error: str | None = None
        self._claim: IO[str] | None = None  # the spool, held while running
        self._server = None  # the in-process SCP, or
        self.ingest: IngestProcesses | None = None  # the ingest processes (ingest_processes > 1)

    def start(self) -> Listener:
        """Accept associations, resume what the index left unfinished, serve the endpoints."""
        fix_mmap_threshold()  # study-sized arrays leave the process when freed (core.memory)
        limit_arenas()  # and the threads share two heaps instead of keeping one each
        redact_identifiers()  # no full UID in any log line, whichever library writes it
        if self.config.seg_process:
            seg_process.warm()  # the first study need not wait for the SEG process's imports
        summary.warm()  # nor for matplotlib's
        on_stored = self._stream if self.streaming else None
        self._claim = self.spool.claim()  # before recovery: one listener per spool
        try:
            _check_results_folder(self.config.output_dir)
            if self.config.ingest_processes > 1:
                self.ingest = IngestProcesses(
                    self.config, self.tracker, self.telemetry, on_stored
                ).start()
            else:
                store = StoreHandler(
                    self.spool, self.tracker, self.telemetry, self.config.limits, on_stored
                )
                listening = listening_socket(self.config.host, self.config.port)
                self._server = start_scp(self.config, store, self.tracker, listening)
        except OSError:
            self.index.close()
            self._claim.close()
            raise
        self.telemetry.queue_depth.set_function(lambda: self._count(COMPLETE))
        for state in STATES:  # read from the index at each scrape: always what the index says
            self.telemetry.series_by_state.labels(state).set_function(
                lambda state=state: self._count(state)
            )
        self.tracker.start()
        if self.config.metrics_port is not None:
            try:
                self.telemetry.serve(
                    self.config.metrics_port,
                    self.config.host,
                    alive=self.accepting,
                    blocked=self.blocked,
                )
            except OSError as error:
                self.stop()
                metrics = f"{self.config.host}:{self.config.metrics_port}"
                message = f"cannot serve metrics on {metrics}: {error.strerror}"
                raise OSError(error.errno, message) from error
        log.info(
            "listening as %s on %s:%d", self.config.ae_title, self.config.host, self.config.port
        )
        return self

    def stop(self) -> None:
        """Stop accepting, finish the series in progress, close everything."""
        self._stopping.set()
        if self._server is not None:
            stop_scp(self._server, self.config.drain_s)
            self._server = None
        if self.ingest is not None:
            self.ingest.stop()
            self.ingest = None
        self.tracker.stop()
        for timer in list(self._timers):
            timer.cancel()
        self._workers.shutdown(wait=True, cancel_futures=True)
        with self._head_lock:
            for head in self._head_starts.values():
                head.discard()
            self._head_starts.clear()
        if self.streaming is not None:
            self.streaming.close()
        self.telemetry.close()
        self.index.close()
        if self._claim is not None:
            self._claim.close()

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def accepting(self) -> bool:
        """Is the SCP (every ingest process, where there are several) accepting associations?"""
        return self._server is not None or (self.ingest is not None and self.ingest.alive())

    def blocked(self) -> str | None:
        """Why the listener cannot make progress now (the /readyz answer), or None."""
        if self.ingest is not None and not self.ingest.alive():
            return "an ingest process is down (being started again)"
        if self.tracker.error is not None or not self.tracker.is_alive():
            return f"series tracker failing: {self.tracker.error or 'stopped'}"
        try:
            if self.spool.free_bytes() < self.config.limits.min_free_spool_bytes:
                return "spool disk full"
        except OSError as error:
            return f"spool unavailable: {error.strerror}"
        if self._results_error is not None:
            return f"results not writable: {self._results_error}"
        return self.inference.blocked()

    def _count(self, state: str) -> float:
        try:
            return float(self.index.counts()[state])
        except Exception:  # noqa: BLE001 - a scrape must not fail because the index is busy or broken
            return float("nan")

    def _enqueue(self, key: SeriesKey) -> None:
        if self._stopping.is_set():
            return
        log.info("series %s queued", short_uid(key.series_uid))
        self._workers.submit(self._process, key)

    def _head_start(self, key: SeriesKey) -> None:
        """The sender released: process the series now, from what it holds, to publish once it
        completes (unless a head start for this very content exists already)."""
        if self._stopping.is_set():
            return
        with self._head_lock:  # atomic with the peek: processing cannot begin in between
            snapshot = self.index.peek(key.series_uid)
            if snapshot is None:
                return
            previous = self._head_starts.get(key.series_uid)
            if previous is not None and previous.snapshot == snapshot:
                return
            staging = self._staging(key, snapshot)
            work = self._workers.submit(self._process_early, key, snapshot, staging)
            self._head_starts[key.series_uid] = HeadStart(snapshot, staging, work)
        if previous is not None:
            self._discard(previous)

    def _discard(self, head: HeadStart) -> None:
        head.discard()
        self.telemetry.head_starts.labels("discarded").inc()

    def _process_early(self, key: SeriesKey, snapshot: Snapshot, staging: Path) -> SeriesResult:
        def still_wanted() -> bool:
            record = self.index.get(key.series_uid)
            return (
                not self._stopping.is_set()
                and record is not None
                and record.generation == snapshot.generation
            )

        log.info("series %s released: head start", short_uid(key.series_uid))
        try:
            return self._run(key, snapshot, staging, still_wanted, take_streamed=False)
        except Superseded:
            log.info("series %s changed: head start abandoned", short_uid(key.series_uid))
            raise

    def _adopt(
        self, key: SeriesKey, head: HeadStart | None, snapshot: Snapshot
    ) -> SeriesResult | None:
        """The head start's result for this snapshot, if it made one (waits for it to end)."""
        if head is None:
            return None
        result = head.result_for(snapshot)
        outcome = "discarded" if result is None else "used"
        self.telemetry.head_starts.labels(outcome).inc()
        log.info("series %s: head start %s", short_uid(key.series_uid), outcome)
        if result is not None and self.streaming is not None:
            self.streaming.forget(key.series_uid)
        return result

    def _forget_head_start(self, key: SeriesKey) -> None:
        with self._head_lock:
            head = self._head_starts.pop(key.series_uid, None)
        if head is not None:
            self._discard(head)

    def _stream(self, key: SeriesKey, sop_uid: str, digest: str, path: Path) -> None:
        """A stored instance goes to the model now, not when its series completes."""
        if self.streaming.submit(key.series_uid, sop_uid, digest, path):
            self.telemetry.slices_streamed.inc()

    def _result_dir(self, key: SeriesKey) -> Path:
        return self.config.output_dir / key.study_uid / key.series_uid

    def _expire(self, key: SeriesKey) -> None:
        record = self.index.get(key.series_uid)
        reason = (
            f"expired: no complete transfer within {self.config.expiry_s:.0f} s; "
            "spooled instances freed"
        )
        self._forget_head_start(key)
        shutil.rmtree(self.spool.series_dir(key.study_uid, key.series_uid), ignore_errors=True)
        self.index.forget_instances(key.series_uid)
        if self.streaming is not None:
            self.streaming.forget(key.series_uid)
        self.index.set_state(key.series_uid, FAILED, reason)
        self.telemetry.series.labels("expired").inc()
        log.warning("series %s %s", short_uid(key.series_uid), reason)
        report = SeriesReport(
            model=self.inference.model,
            status=REPORT_FAILED,
            reason=reason,
            study_instance_uid=key.study_uid,
            series_instance_uid=key.series_uid,
            instances_received=record.instances if record else 0,
        )
        try:
            report.write(self._result_dir(key) / "report.json")
        except OSError as error:
            log.error("could not write the report of an expired series: %s", error.strerror)

    def _process(self, key: SeriesKey) -> None:
        """Worker entry: whatever happens, the series ends failed with a reason, deferred or
        done."""
        try:
            self._process_snapshot(key)
        except Exception as error:  # noqa: BLE001 - a worker must never fail silently
            reason = f"internal error: {type(error).__name__}: {error}"[:500]
            log.error("series %s: %s", short_uid(key.series_uid), reason)
            for partial in self._result_dir(key).parent.glob(f".{key.series_uid}.*.partial"):
                shutil.rmtree(partial, ignore_errors=True)
            try:
                self.index.set_state(key.series_uid, FAILED, reason)
                SeriesReport(
                    model=self.inference.model,
                    reason=reason,
                    study_instance_uid=key.study_uid,
                    series_instance_uid=key.series_uid,
                ).write(self._result_dir(key) / "report.json")
            except Exception as record_error:  # noqa: BLE001 - left processing: retried at the next start
                log.error("could not record the failure: %s", record_error)
            self.telemetry.series.labels("failed").inc()

    def _staging(self, key: SeriesKey, snapshot: Snapshot) -> Path:
        final = self._result_dir(key)
        return final.with_name(f".{key.series_uid}.{snapshot.generation}.partial")

    def _run(
        self,
        key: SeriesKey,
        snapshot: Snapshot,
        staging: Path,
        still_wanted: Callable[[], bool] | None = None,
        take_streamed: bool = True,
    ) -> SeriesResult:
        """The series' instances in `snapshot` through every stage into `staging`."""
        paths = [
            self.spool.path(key.study_uid, key.series_uid, sop) for sop, _ in snapshot.instances
        ]
        provenance = {"content_sha256": snapshot.content_sha256, "generation": snapshot.generation}
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        options: dict = {"still_wanted": still_wanted} if still_wanted is not None else {}
        asked = []
        if self.streaming is not None:
            pick = self.streaming.take if take_streamed else self.streaming.peek

            def streamed() -> dict:
                asked.append(True)
                return pick(key.series_uid, dict(snapshot.instances))

            options["streamed_slices"] = streamed
        try:
            return process_series(
                paths,
                staging,
                self.inference,
                provenance,
                seg_process=self.config.seg_process,
                **options,
            )
        finally:
            if self.streaming is not None and take_streamed and not asked:
                self.streaming.forget(key.series_uid)  # failed before inference: freed all the same

    def _process_snapshot(self, key: SeriesKey) -> None:
        with self._head_lock:  # a head start registered before processing began is ours
            snapshot = self.index.begin(key.series_uid)
            head = self._head_starts.pop(key.series_uid, None) if snapshot is not None else None
        if snapshot is None:
            return  # changed since it was queued: the tracker queues it again when it is complete
        staging = self._staging(key, snapshot)
        result = self._adopt(key, head, snapshot)
        if result is not None:
            self._publish(key, snapshot, staging, result)
            return
        try:
            result = self._run(key, snapshot, staging)
        except TritonUnavailable as error:
            shutil.rmtree(staging, ignore_errors=True)
            self._defer(key, snapshot, "triton", f"waiting for Triton: {str(error)[:200]}")
            return
        except OSError as error:
            self._defer_unwritable(key, snapshot, staging, error)
            return
        self._publish(key, snapshot, staging, result)

    def _defer_unwritable(
        self, key: SeriesKey, snapshot: Snapshot, staging: Path, error: OSError
    ) -> None:
        """Results folder missing, unwritable or full: keep the series and retry (not ready)."""
        shutil.rmtree(staging, ignore_errors=True)
        self._results_error = error.strerror or type(error).__name__
        reason = f"results folder not writable: {self._results_error}"
        self._defer(key, snapshot, "results", reason)

    def _publish(
        self, key: SeriesKey, snapshot: Snapshot, staging: Path, result: SeriesResult
    ) -> None:
        status, done = result.report.status, result.report.done
        final = self._result_dir(key)
        with self._publish_lock:
            try:
                published = self.index.finish(
                    key.series_uid,
                    snapshot.generation,
                    DONE if done else FAILED,
                    result.report.reason,
                    publish=lambda: _replace_folder(staging, final),
                )
            except OSError as error:
                self._defer_unwritable(key, snapshot, staging, error)
                return
        shutil.rmtree(_previous(final), ignore_errors=True)
        if not published:
            shutil.rmtree(staging, ignore_errors=True)
            self.telemetry.superseded.inc()
            log.warning(
                "series %s changed while it was processed: result discarded, series queued again",
                short_uid(key.series_uid),
            )
            return
        self._results_error = None
        result = SeriesResult(
            final / "report.json", final / "seg.dcm" if done else None, result.report
        )
        if done and self.config.destinations:
            self._forward(result)
        self.telemetry.series.labels(status).inc()
        for stage, seconds in result.report.stage_seconds.items():
            self.telemetry.stage_seconds.labels(stage).observe(seconds)
        reason = f": {result.report.reason}" if result.report.reason else ""
        log.info("series %s %s%s", short_uid(key.series_uid), status, reason)
        with self._done:
            self.results[key.series_uid] = result
            self._done.notify_all()

    def _forward(self, result: SeriesResult) -> None:
        """Each destination in turn gets the outputs it chose; one's failure stops no other."""
        records = []
        for destination in self.config.destinations:
            sent = forward(
                destination.files(result.report_path.parent),
                destination,
                self.config.ae_title,
                attempts=self.config.forward_attempts,
            )
            records.append(Forwarding(destination.name, sent.delivered, sent.attempts, sent.detail))
            if not sent.delivered:
                self.telemetry.forward_failures.labels(destination.name).inc()
        result.report.forwarded = records
        with self._publish_lock:  # only if no newer result replaced this one meanwhile
            if _same_result(result.report_path, result.report):
                result.report.write(result.report_path)

    def _defer(self, key: SeriesKey, snapshot: Snapshot, cause: str, reason: str) -> None:
        """The series stays queued (state complete) and is tried again later with backoff."""
        self.telemetry.deferred.labels(cause).inc()
        if not self.index.finish(key.series_uid, snapshot.generation, COMPLETE, reason):
            return  # it changed meanwhile: the tracker queues it again
        record = self.index.get(key.series_uid)
        first, longest = self.config.retry_backoff_s
        delay = min(longest, first * 2 ** max(0, (record.attempts if record else 1) - 1))
        log.warning("series %s: %s; retry in %.0f s", short_uid(key.series_uid), reason, delay)
        if self._stopping.is_set():
            return
        timer = threading.Timer(delay, self._retry_now, args=(key,))
        timer.daemon = True
        self._timers.add(timer)
        timer.start()

    def _retry_now(self, key: SeriesKey) -> None:
        self._timers = {
            t for t in self._timers if t.is_alive() and t is not threading.current_thread()
        }
        self._enqueue(key)

    def wait_for(
        self, series_uid: str, timeout_s: float, instances: int | None = None
    ) -> SeriesResult:
        """Block until the series has a result (done or failed), optionally of `instances`
        slices."""

        def ready() -> bool:
            result = self.results.get(series_uid)
            return result is not None and (
                instances is None or result.report.instances == instances
            )

        with self._done:
            if not self._done.wait_for(ready, timeout_s):
                raise TimeoutError(
                    f"no result for series {short_uid(series_uid)} after {timeout_s:.0f} s"
                )
            return self.results[series_uid]


def _check_results_folder(folder: Path) -> None:
    """The results folder exists (made if need be) and may be written: a path to a file or a
    read-only folder is a mistake to report at start, not a queue that never drains (a folder
    that becomes unwritable later keeps its series queued until it is writable again)."""
    folder.mkdir(parents=True, exist_ok=True)  # FileExistsError where a file is
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "results folder is not writable", str(folder))


def _previous(final: Path) -> Path:
    return final.with_name(f".{final.name}.previous")


def _replace_folder(staging: Path, final: Path) -> None:
    """Put a finished result in place of the previous one (two renames; readers never see a
    mixture). If the second rename fails the previous result is put back. The previous folder is
    deleted by the caller, outside the index transaction."""
    previous = _previous(final)
    shutil.rmtree(previous, ignore_errors=True)  # left over by a crash
    if final.exists():
        os.replace(final, previous)
    try:
        os.replace(staging, final)
    except OSError:
        if previous.exists():
            os.replace(previous, final)
        raise


def _same_result(report_path: Path, report: SeriesReport) -> bool:
    try:
        current = json.loads(report_path.read_text())
    except (OSError, ValueError):
        return False
    return (current.get("content_sha256"), current.get("seg_sop_instance_uid")) == (
        report.content_sha256,
        report.seg_sop_instance_uid,
    )
