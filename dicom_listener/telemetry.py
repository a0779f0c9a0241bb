"""Prometheus metrics of the listener, in a registry of its own (one per Listener instance)."""
from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass
class Telemetry:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.received = Counter("thighseg_instances_received", "Instances stored in the spool", registry=r)
        self.rejected = Counter("thighseg_instances_rejected", "Instances refused, by reason", ["reason"],
                                registry=r)
        self.series = Counter("thighseg_series", "Series processed, by final status", ["status"], registry=r)
        self.stage_seconds = Histogram("thighseg_stage_seconds", "Pipeline stage latency", ["stage"],
                                       buckets=STAGE_BUCKETS, registry=r)
        self.queue_depth = Gauge("thighseg_queue_depth", "Series complete but not yet processed", registry=r)
        self._server = None

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Expose /metrics over HTTP (port 9108 by default in the CLI)."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
