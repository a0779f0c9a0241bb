"""Prometheus metrics and health endpoints of the listener (/metrics, /healthz, /readyz).

Each Listener has its own registry, so several can run in one process (tests, benchmarks).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pynetdicom.transport import AddressInformation

STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class EndpointServer(ThreadingHTTPServer):
    """ThreadingHTTPServer in the address family of its host, IPv4 first as for the DICOM port
    (its own is IPv4 only: an IPv6 listener address such as ::1 failed to start)."""

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self.address_family = AddressInformation(*address).address_family  # as listening_socket
        super().__init__(address, handler)


@dataclass
class Telemetry:
    """The listener's Prometheus metrics and its HTTP endpoints."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.received = Counter(
            "thighseg_instances_received", "Instances stored in the spool", registry=r
        )
        self.replaced = Counter(
            "thighseg_instances_replaced", "Instances received again with new content", registry=r
        )
        self.duplicates = Counter(
            "thighseg_instances_duplicate", "Instances received again (idempotent)", registry=r
        )
        self.rejected = Counter(
            "thighseg_instances_rejected", "Instances refused, by reason", ["reason"], registry=r
        )
        self.associations_rejected = Counter(
            "thighseg_associations_rejected",
            "Associations refused or aborted, by reason",
            ["reason"],
            registry=r,
        )
        self.series = Counter(
            "thighseg_series", "Series processed, by final status", ["status"], registry=r
        )
        self.superseded = Counter(
            "thighseg_results_superseded",
            "Results discarded because the series changed while it was processed",
            registry=r,
        )
        self.head_starts = Counter(
            "thighseg_head_starts",
            "Series processed during the idle wait: result used, or discarded (the series changed)",
            ["outcome"],
            registry=r,
        )
        for outcome in ("used", "discarded"):  # exported as 0 before the first
            self.head_starts.labels(outcome)
        self.series_by_state = Gauge(
            "thighseg_series_state", "Series in the index, by state", ["state"], registry=r
        )
        self.stage_seconds = Histogram(
            "thighseg_stage_seconds",
            "Pipeline stage latency",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "thighseg_queue_depth",
            "Series complete but not yet processed (waiting for a worker, Triton or disk)",
            registry=r,
        )
        self.deferred = Counter(
            "thighseg_series_deferred",
            "Processing attempts deferred, by cause (triton: unreachable or failed; disk; ...)",
            ["cause"],
            registry=r,
        )
        self.slices_streamed = Counter(
            "thighseg_slices_streamed",
            "Slices sent to the model as they arrived, before their series completed",
            registry=r,
        )
        self.forward_failures = Counter(
            "thighseg_forward_failures",
            "Results not delivered to a destination AE",
            ["destination"],
            registry=r,
        )
        self._server: ThreadingHTTPServer | None = None

    def serve(
        self, port: int, host: str, alive: Callable[[], bool], blocked: Callable[[], str | None]
    ) -> None:
        """/metrics for Prometheus; /healthz (listener running) and /readyz (can make progress:
        `blocked` returns why not, e.g. Triton unreachable, spool full, results not writable)."""
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                if self.path.startswith("/metrics"):
                    self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    ok = alive()
                    self._reply(200 if ok else 503, b"ok\n" if ok else b"listener stopped\n")
                elif self.path == "/readyz":
                    reason = blocked()
                    self._reply(503 if reason else 200, f"{reason or 'ready'}\n".encode())
                else:
                    self._reply(404, b"not found\n")

            def _reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(
                self, *args: object
            ) -> None:  # probes every few seconds: keep logs quiet
                pass

        self._server = EndpointServer((host, port), Handler)
        threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        ).start()

    def close(self) -> None:
        """Stop the endpoints' HTTP server."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
