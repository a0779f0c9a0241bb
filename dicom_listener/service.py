"""The listener as one object: SCP server + series tracker + a bounded pool of pipeline workers."""
from __future__ import annotations

import logging
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from thighseg.dicom_listener.pipeline import InferenceSettings, SeriesResult, process_series, short_uid
from thighseg.dicom_listener.scp import StoreHandler, event_handlers, make_ae
from thighseg.dicom_listener.series import SeriesKey, SeriesTracker
from thighseg.dicom_listener.spool import Spool
from thighseg.dicom_listener.telemetry import Telemetry

log = logging.getLogger(__name__)


@dataclass
class ListenerConfig:
    spool_dir: Path
    output_dir: Path
    ae_title: str = "THIGHSEG"
    host: str = "0.0.0.0"
    port: int = 11112
    idle_s: float = 2.0
    workers: int = 1
    metrics_port: int | None = None  # Prometheus /metrics; 9108 in the CLI, None to disable
    allowed_calling_aets: tuple[str, ...] = ()  # empty: any calling AE title may associate
    tls_cert: Path | None = None  # PEM certificate + key: DICOM over TLS
    tls_key: Path | None = None
    tls_ca: Path | None = None  # when set, clients must present a certificate signed by it


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
        self.telemetry = Telemetry()
        self.tracker = SeriesTracker(self._series_complete, idle_s=self.config.idle_s)
        self._workers = ThreadPoolExecutor(max_workers=self.config.workers, thread_name_prefix="pipeline")
        self._done = threading.Condition()
        self._server = None

    def start(self) -> "Listener":
        ae = make_ae(self.config.ae_title)
        if self.config.allowed_calling_aets:
            ae.require_calling_aet = list(self.config.allowed_calling_aets)
        handlers = event_handlers(StoreHandler(self.spool, self.tracker, self.telemetry), self.tracker)
        self._server = ae.start_server((self.config.host, self.config.port), block=False, evt_handlers=handlers,
                                       ssl_context=server_ssl_context(self.config))
        self.tracker.start()
        if self.config.metrics_port is not None:
            self.telemetry.serve(self.config.metrics_port, self.config.host)
        log.info("listening as %s on %s:%d", self.config.ae_title, self.config.host, self.config.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.tracker.stop()
        self._workers.shutdown(wait=True)
        self.telemetry.close()

    def __enter__(self) -> "Listener":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _series_complete(self, key: SeriesKey, count: int) -> None:
        log.info("series %s complete with %d instance(s); queued", short_uid(key.series_uid), count)
        self.telemetry.queue_depth.inc()
        self._workers.submit(self._process, key)

    def _process(self, key: SeriesKey) -> None:
        out_dir = self.config.output_dir / key.study_uid / key.series_uid
        self.telemetry.queue_depth.dec()
        result = process_series(self.spool.instances(key.study_uid, key.series_uid), out_dir, self.inference)
        self.telemetry.series.labels(result.report["status"]).inc()
        for stage, seconds in result.report["stage_seconds"].items():
            self.telemetry.stage_seconds.labels(stage).observe(seconds)
        log.info("series %s %s", short_uid(key.series_uid), result.report["status"])
        with self._done:
            self.results[key.series_uid] = result
            self._done.notify_all()

    def wait_for(self, series_uid: str, timeout_s: float) -> SeriesResult:
        """Block until the series has a result (done or failed)."""
        with self._done:
            if not self._done.wait_for(lambda: series_uid in self.results, timeout_s):
                raise TimeoutError(f"no result for series {short_uid(series_uid)} after {timeout_s:.0f} s")
            return self.results[series_uid]
