"""perf_analyzer (the binary inside the tritonclient 2.50 wheel) driven from Python.

Each point is one perf_analyzer run at a fixed concurrency, read back from its CSV export.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from google.protobuf import text_format


@dataclass(frozen=True)
class PerfPoint:
    """One perf_analyzer measurement: throughput and latency at one concurrency."""

    model: str
    protocol: str
    concurrency: int
    throughput: float  # inferences (slices) per second
    p50_ms: float
    p95_ms: float
    p99_ms: float

    def as_dict(self) -> dict:
        """Plain data for the benchmark's JSON."""
        return asdict(self)


def perf_analyzer_binary() -> str:
    """The perf_analyzer that tritonclient installed beside this interpreter."""
    local = Path(sys.executable).parent / "perf_analyzer"
    found = str(local) if local.exists() else shutil.which("perf_analyzer")
    if found is None:
        raise FileNotFoundError(
            "perf_analyzer not found: it ships in the tritonclient[all]==2.50.0 wheel"
        )
    return found


def perf_environment() -> dict[str, str]:
    """perf_analyzer links libcudart.so.12 even on CPU: point it at the pip-installed CUDA
    runtime."""
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime as runtime

        libs = [str(Path(p) / "lib") for p in runtime.__path__]
    except ImportError:
        libs = []
    env["LD_LIBRARY_PATH"] = ":".join([*libs, env.get("LD_LIBRARY_PATH", "")]).strip(":")
    return env


def measure(
    model: str,
    url: str,
    protocol: str,
    concurrency: int,
    input_shape: tuple[int, ...],
    measurement_ms: int = 2000,
    attempts: int = 3,
) -> PerfPoint:
    """One concurrency level. Shared CPUs are noisy: the stability band is widened to 30 % and an
    unstable run is repeated with a window twice as long."""
    for attempt in range(attempts):
        try:
            return _measure_once(
                model, url, protocol, concurrency, input_shape, measurement_ms * 2**attempt
            )
        except UnstableMeasurement:
            continue
    raise RuntimeError(
        f"perf_analyzer found no stable measurement for {model} at concurrency {concurrency}"
    )


class UnstableMeasurement(RuntimeError):
    """perf_analyzer could not reach a stable measurement window."""

    pass


def _measure_once(
    model: str,
    url: str,
    protocol: str,
    concurrency: int,
    input_shape: tuple[int, ...],
    measurement_ms: int,
) -> PerfPoint:
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "perf.csv"
        command = [
            perf_analyzer_binary(),
            "-m",
            model,
            "-u",
            url,
            "-i",
            protocol,
            "-b",
            "1",
            "--concurrency-range",
            f"{concurrency}:{concurrency}",
            "--shape",
            f"image:{','.join(map(str, input_shape))}",
            "-p",
            str(measurement_ms),
            "--max-trials",
            "8",
            "--stability-percentage",
            "30",
            "-f",
            str(report),
        ]
        result = subprocess.run(
            command, capture_output=True, text=True, env=perf_environment(), timeout=600
        )
        if "Failed to obtain stable measurement" in result.stdout + result.stderr:
            raise UnstableMeasurement(result.stdout[-300:])
        if result.returncode != 0 or not report.exists():
            raise RuntimeError(
                f"perf_analyzer failed ({result.returncode}): "
                f"{result.stdout[-800:]}{result.stderr[-800:]}"
            )
        row = next(csv.DictReader(report.open()))
    return PerfPoint(
        model,
        protocol,
        concurrency,
        float(row["Inferences/Second"]),
        float(row["p50 latency"]) / 1000,
        float(row["p95 latency"]) / 1000,
        float(row["p99 latency"]) / 1000,
    )


def without_dynamic_batching(config_text: str, name: str) -> str:
    """The same model configuration under another name with dynamic batching removed."""
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(config_text, model_config_pb2.ModelConfig())
    config.name = name
    config.ClearField("dynamic_batching")
    return text_format.MessageToString(config)
