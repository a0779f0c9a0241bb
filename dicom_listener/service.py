"""The listener as one object: SCP server, spool + index, series tracker, a bounded pool of
pipeline workers, metrics and health endpoints."""
from __future__ import annotations

import logging
import shutil
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from thighseg.client.triton import TritonUnavailable
from thighseg.dicom_listener.forward import Destination, forward
from thighseg.dicom_listener.index import COMPLETE, DONE, FAILED, PROCESSING, SpoolIndex
from thighseg.dicom_listener.outputs import write_report
from thighseg.dicom_listener.pipeline import InferenceSettings, SeriesResult, process_series, short_uid
from thighseg.dicom_listener.scp import StoreHandler, event_handlers, make_ae
from thighseg.dicom_listener.series import SeriesKey, SeriesTracker
from thighseg.dicom_listener.spool import Spool
from thighseg.dicom_listener.telemetry import Telemetry
from thighseg.dicom_listener.validation import Limits
from thighseg.memory import fix_mmap_threshold

log = logging.getLogger(__name__)
logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # its INFO/DEBUG output can carry identifiers


@dataclass
class ListenerConfig:
    spool_dir: Path
    output_dir: Path
    ae_title: str = "THIGHSEG"
    host: str = "0.0.0.0"
    port: int = 11112
    idle_s: float = 2.0
    expiry_s: float = 86400.0  # a series still receiving after this long is given up and freed
    workers: int = 1
    metrics_port: int | None = None  # /metrics, /healthz, /readyz; 9108 in the CLI, None to disable
    allowed_calling_aets: tuple[str, ...] = ()  # empty: any calling AE title may associate
    tls_cert: Path | None = None  # PEM certificate + key: DICOM over TLS
    tls_key: Path | None = None
    tls_ca: Path | None = None  # when set, clients must present a certificate signed by it
    max_pdu_bytes: int = 4 << 20
    limits: Limits = Limits()
    retry_backoff_s: tuple[float, float] = (2.0, 60.0)  # Triton down: first and longest wait
    destination: Destination | None = None  # C-STORE SEG and SR here when set
    forward_attempts: int = 4


def server_ssl_context(config: ListenerConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None:
        return None
    if config.tls_key is None:
        raise ValueError("TLS needs both a certificate and its private key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(config.tls_cert), keyfile=str(config.tls_key))
    if config.tls_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(config.tls_ca))
    return context


@dataclass
class Listener:
    config: ListenerConfig
    inference: InferenceSettings
    results: dict[str, SeriesResult] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.spool = Spool(self.config.spool_dir)
        self.index = SpoolIndex(self.config.spool_dir / "index.sqlite3")
        self.telemetry = Telemetry()
        self.tracker = SeriesTracker(self.index, self._enqueue, self._expire, idle_s=self.config.idle_s,
                                     expiry_s=self.config.expiry_s)
        self._workers = ThreadPoolExecutor(max_workers=self.config.workers, thread_name_prefix="pipeline")
        self._done = threading.Condition()
        self._timers: set[threading.Timer] = set()
        self._stopping = threading.Event()
        self._server = None

    def start(self) -> "Listener":
        fix_mmap_threshold()  # study-sized arrays leave the process when freed (thighseg.memory)
        ae = make_ae(self.config.ae_title, self.config.max_pdu_bytes)
        if self.config.allowed_calling_aets:
            ae.require_calling_aet = list(self.config.allowed_calling_aets)
        store = StoreHandler(self.spool, self.tracker, self.telemetry, self.config.limits)
        self._server = ae.start_server((self.config.host, self.config.port), block=False,
                                       evt_handlers=event_handlers(store, self.tracker),
                                       ssl_context=server_ssl_context(self.config))
        self.tracker.start()
        if self.config.metrics_port is not None:
            self.telemetry.serve(self.config.metrics_port, self.config.host, alive=lambda: self._server is not None,
                                 ready=self.inference.ready)
        log.info("listening as %s on %s:%d", self.config.ae_title, self.config.host, self.config.port)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.tracker.stop()
        for timer in list(self._timers):
            timer.cancel()
        self._workers.shutdown(wait=True, cancel_futures=True)
        self.telemetry.close()
        self.index.close()

    def __enter__(self) -> "Listener":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _enqueue(self, key: SeriesKey) -> None:
        if self._stopping.is_set():
            return
        log.info("series %s queued", short_uid(key.series_uid))
        self.telemetry.queue_depth.inc()
        self._workers.submit(self._process, key)

    def _expire(self, key: SeriesKey) -> None:
        reason = f"expired: no complete transfer within {self.config.expiry_s:.0f} s; spooled instances freed"
        self.index.set_state(key.series_uid, FAILED, reason)
        self.index.forget_instances(key.series_uid)
        shutil.rmtree(self.spool.series_dir(key.study_uid, key.series_uid), ignore_errors=True)
        self.telemetry.series.labels("expired").inc()
        log.warning("series %s %s", short_uid(key.series_uid), reason)

    def _process(self, key: SeriesKey) -> None:
        self.telemetry.queue_depth.dec()
        self.index.set_state(key.series_uid, PROCESSING, attempt=True)
        out_dir = self.config.output_dir / key.study_uid / key.series_uid
        try:
            result = process_series(self.spool.instances(key.study_uid, key.series_uid), out_dir, self.inference)
        except TritonUnavailable as error:
            self._retry_later(key, str(error))
            return
        if result.report["status"] == "done" and self.config.destination is not None:
            self._forward(result)
        state = DONE if result.report["status"] == "done" else FAILED
        self.index.set_state(key.series_uid, state, result.report.get("reason"))
        self.telemetry.series.labels(result.report["status"]).inc()
        for stage, seconds in result.report["stage_seconds"].items():
            self.telemetry.stage_seconds.labels(stage).observe(seconds)
        self._update_state_gauge()
        log.info("series %s %s", short_uid(key.series_uid), result.report["status"])
        with self._done:
            self.results[key.series_uid] = result
            self._done.notify_all()

    def _forward(self, result: SeriesResult) -> None:
        sent = forward([result.seg_path, result.seg_path.with_name("sr.dcm")], self.config.destination,
                       self.config.ae_title, attempts=self.config.forward_attempts)
        result.report["forwarded"] = {"destination": self.config.destination.ae_title, "delivered": sent.delivered,
                                      "attempts": sent.attempts, "detail": sent.detail}
        if not sent.delivered:
            self.telemetry.forward_failures.inc()
        write_report(result.report, result.report_path)

    def _retry_later(self, key: SeriesKey, error: str) -> None:
        """Triton is down: the series stays queued (state complete) and is tried again later."""
        self.telemetry.triton_errors.inc()
        record = self.index.get(key.series_uid)
        first, longest = self.config.retry_backoff_s
        delay = min(longest, first * 2 ** max(0, (record.attempts if record else 1) - 1))
        self.index.set_state(key.series_uid, COMPLETE, f"waiting for Triton: {error[:200]}")
        log.warning("series %s: Triton unavailable, retry in %.0f s", short_uid(key.series_uid), delay)
        if self._stopping.is_set():
            return
        timer = threading.Timer(delay, self._retry_now, args=(key,))
        timer.daemon = True
        self._timers.add(timer)
        timer.start()

    def _retry_now(self, key: SeriesKey) -> None:
        self._timers = {t for t in self._timers if t.is_alive() and t is not threading.current_thread()}
        self._enqueue(key)

    def _update_state_gauge(self) -> None:
        for state, count in self.index.counts().items():
            self.telemetry.series_by_state.labels(state).set(count)

    def wait_for(self, series_uid: str, timeout_s: float, instances: int | None = None) -> SeriesResult:
        """Block until the series has a result (done or failed), optionally of `instances` slices."""
        def ready() -> bool:
            result = self.results.get(series_uid)
            return result is not None and (instances is None or result.report.get("instances") == instances)

        with self._done:
            if not self._done.wait_for(ready, timeout_s):
                raise TimeoutError(f"no result for series {short_uid(series_uid)} after {timeout_s:.0f} s")
            return self.results[series_uid]
