"""Names and numbers every part of the deployment agrees on, defined once (see DESIGN.md, "Ports
and names"). CLI options, config dataclasses, Helm values and docs take them from here or are
tested against them."""

from __future__ import annotations

AE_TITLE = "THIGHSEG"  # the listener's called AE title, and its calling AE title when forwarding
DICOM_PORT = 11112
LISTENER_METRICS_PORT = 9108  # /metrics, /healthz, /readyz
TRITON_HTTP_PORT = 8000
TRITON_GRPC_PORT = 8001
TRITON_METRICS_PORT = 8002
TRITON_URL = f"127.0.0.1:{TRITON_HTTP_PORT}"
DEFAULT_MODEL = "denseunet"  # best on the internal and external cohorts (README, Models)
# phantom cohorts `thighseg evaluate` reports by default; "stress" is the test-only generator
EVALUATION_COHORTS = ("internal_test", "external", "stress")
# the benchmark's parts, in the order `thighseg bench` measures them (`--parts` chooses some)
BENCH_PARTS = (
    "perf_analyzer",
    "baselines_slices_per_second",
    "int8",
    "ingest",
    "whole_study",
    "last_store_to_seg",
    "sustained",
)
