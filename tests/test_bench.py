"""The benchmark in its tiny configuration: it runs end to end and writes its figures (no
thresholds: speed targets are read from a full `thighseg bench` run, never asserted in tests)."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from thighseg.client.perf import without_dynamic_batching


def test_nobatch_variant_drops_only_dynamic_batching():
    config = (
        'name: "m"\nbackend: "python"\nmax_batch_size: 16\n'
        "dynamic_batching { max_queue_delay_microseconds: 100 }\n"
    )
    variant = without_dynamic_batching(config, "m_nobatch")
    assert 'name: "m_nobatch"' in variant and "max_batch_size: 16" in variant
    assert "dynamic_batching" not in variant


@pytest.mark.skipif(
    shutil.which("storescu") is None or shutil.which("storescp") is None,
    reason="DCMTK storescu/storescp not installed",
)
def test_tiny_benchmark_writes_json_markdown_and_plots(model_repository, tmp_path):
    pytest.importorskip("matplotlib")
    from thighseg.apps.bench import BenchConfig, run_bench

    results = run_bench(tmp_path, model_repository, BenchConfig.tiny())
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["ratios"] == results["ratios"]
    assert {(p["protocol"], p["dynamic_batching"]) for p in saved["perf_analyzer"]} == {
        ("http", True),
        ("http", False),
        ("grpc", True),
        ("grpc", False),
    }
    assert all(p["throughput"] > 0 and p["p99_ms"] >= p["p50_ms"] for p in saved["perf_analyzer"])
    assert {p["architecture"] for p in saved["perf_analyzer"]} == {"segformer"}
    assert {"onnxruntime_fp32", "onnxruntime_fp32_batch1", "torch_eager_fp32"} <= set(
        saved["baselines_slices_per_second"]["segformer"]
    )
    assert {r["receiver"] for r in saved["ingest"]} == {"dcmtk-storescp", "thighseg-listener"}
    whole = saved["whole_study"]
    assert whole["instances"] == 8 and whole["listener_peak_rss_mb"] > 0
    assert (
        whole["warm_listener_peak_rss_mb"] > 0
    )  # measured in a second listener, after a warm-up study
    assert "segformer: most_dynamic_batching_could_give_at_concurrency_2" in saved["ratios"]
    text = (tmp_path / "bench.md").read_text()
    assert "| ratio | value |" in text and "compute ceiling" in text
    for picture in ("perf_analyzer.png", "baselines_ingest.png"):
        image = Image.open(tmp_path / picture)
        assert image.size[0] > 600 and len(np.unique(np.asarray(image.convert("L")))) > 10
