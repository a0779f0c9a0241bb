"""The benchmark in its tiny configuration: it runs end to end and writes its figures (no
thresholds: speed targets are read from a full `thighseg bench` run, never asserted in tests)."""

import json
import shutil
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from conftest import MODEL, free_port
from PIL import Image

from thighseg.apps.ingest import IngestRun, importable, serving
from thighseg.client.perf import without_dynamic_batching
from thighseg.core import machine


def test_nobatch_variant_drops_only_dynamic_batching():
    config = (
        'name: "m"\nbackend: "python"\nmax_batch_size: 16\n'
        "dynamic_batching { max_queue_delay_microseconds: 100 }\n"
    )
    variant = without_dynamic_batching(config, "m_nobatch")
    assert 'name: "m_nobatch"' in variant and "max_batch_size: 16" in variant
    assert "dynamic_batching" not in variant


def test_an_ingest_figure_is_the_median_of_its_rounds():
    run = IngestRun.of_rounds("thighseg-listener", 4, 300, [1.5, 0.5, 0.75])
    assert run.seconds == 0.75 and run.instances_per_second == 400
    assert run.as_dict()["rounds_seconds"] == [1.5, 0.5, 0.75]


@pytest.mark.skipif(
    shutil.which("storescu") is None or shutil.which("storescp") is None,
    reason="DCMTK storescu/storescp not installed",
)
def test_a_server_can_run_from_another_checkout(tmp_path):
    """The A/B harness runs the other version's listener with `python -m` from its checkout."""
    (tmp_path / "which.txt").write_text("the other checkout")
    port = free_port()
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    with serving(argv, port, cwd=tmp_path):
        answer = urllib.request.urlopen(f"http://127.0.0.1:{port}/which.txt", timeout=10).read()
    assert answer == b"the other checkout"


def test_another_checkouts_mapped_packages_are_its_own_not_the_installed_ones(tmp_path):
    """The editable install maps thighseg.dicom_listener to this checkout's dicom_listener/; a
    listener run from another checkout must import that checkout's instead."""
    checkout = tmp_path / "checkout"
    for folder in ("thighseg", "dicom_listener"):
        (checkout / folder).mkdir(parents=True)
        (checkout / folder / "__init__.py").write_text(f"WHICH = 'the other {folder}'")
    (checkout / "pyproject.toml").write_text(
        '[tool.setuptools.package-dir]\n"thighseg" = "thighseg"\n'
        '"thighseg.dicom_listener" = "dicom_listener"\n'
    )
    (tmp_path / "overlay").mkdir()
    imported = subprocess.run(
        [
            sys.executable,
            "-c",
            "import thighseg, thighseg.dicom_listener as d; print(thighseg.WHICH, '/', d.WHICH)",
        ],
        cwd=importable(checkout, tmp_path / "overlay"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert imported.stdout.strip() == "the other thighseg / the other dicom_listener"


@pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK storescu not installed")
def test_tiny_benchmark_of_one_model_writes_json_markdown_plots_and_resumes(
    model_repository, tmp_path
):
    """The repository serves only MODEL, not the listener's default: every part, the listener's
    included, must use the model asked for, or its part fails."""
    pytest.importorskip("matplotlib")
    from thighseg.apps.bench import BenchConfig, run_bench
    from thighseg.core.constants import DEFAULT_MODEL

    assert MODEL != DEFAULT_MODEL
    config = BenchConfig.tiny((MODEL,))
    results = run_bench(tmp_path, model_repository, config)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["ratios"] == results["ratios"]
    assert {(p["protocol"], p["dynamic_batching"]) for p in saved["perf_analyzer"]} == {
        ("http", True),
        ("http", False),
        ("grpc", True),
        ("grpc", False),
    }
    assert all(p["throughput"] > 0 and p["p99_ms"] >= p["p50_ms"] for p in saved["perf_analyzer"])
    assert {p["architecture"] for p in saved["perf_analyzer"]} == {MODEL}
    assert {"onnxruntime_fp32", "onnxruntime_fp32_batch1", "torch_eager_fp32"} <= set(
        saved["baselines_slices_per_second"][MODEL]
    )
    assert {r["receiver"] for r in saved["ingest"]} == {
        "dcmtk-storescp",
        "dcmtk-storescp-nagle-default",
        "pynetdicom-bare",
        "thighseg-listener",
        "thighseg-listener-2-processes",
    }
    assert all(r["rounds_seconds"] == [r["seconds"]] for r in saved["ingest"])  # tiny: one round
    sustained = saved["sustained"]
    assert (sustained["studies"], sustained["associations"]) == (3, 2)
    assert sustained["studies_per_hour"] > 0
    assert 0 < sustained["latency_s"]["p50"] <= sustained["latency_s"]["p95"]
    assert "## Sustained load" in (tmp_path / "bench.md").read_text()
    assert "ingest_listener_vs_storescp_tcp_nodelay_1_associations" in saved["ratios"]
    assert saved["ratios"]["ingest_listener_vs_bare_pynetdicom_1_associations"] > 0
    assert saved["ratios"]["ingest_listener_2_processes_vs_one_process_2_associations"] > 0
    assert saved["errors"] == {}
    whole = saved["whole_study"]
    assert whole["instances"] == 8 and whole["listener_peak_rss_mb"] > 0
    # measured in a second listener, after a warm-up study
    assert whole["warm_listener_peak_rss_mb"] > 0
    assert whole["seg_in_listener"]["listener_peak_rss_mb"] > 0
    # the sum's parts: the listener and its SEG process (with its pool's helpers) at least
    parts = whole["process_peak_rss_mb"]
    assert len(parts) >= 2 and abs(sum(parts) - whole["listener_peak_rss_mb"]) < 0.5
    ratios = saved["ratios"]
    for together, summed in (
        ("listener_together", "listener"),
        ("warm_listener_together", "warm_listener"),
        ("seg_in_listener_together", "seg_in_listener"),
    ):  # sampled at once, never above the processes' own peaks summed
        at_once = ratios[f"{together}_peak_rss_over_study_voxel_bytes"]
        assert 0 < at_once <= ratios[f"{summed}_peak_rss_over_study_voxel_bytes"], together
    assert f"{MODEL}: most_dynamic_batching_could_give_at_concurrency_2" in saved["ratios"]
    latency = {(r["streaming"], r["head_start"]): r for r in saved["last_store_to_seg"]}
    assert set(latency) == {(True, True), (False, True), (True, False)}
    assert all(r["seconds_last_store_to_seg"] > 0 and r["instances"] == 8 for r in latency.values())
    streamed, whole_series = latency[(True, True)], latency[(False, True)]
    assert streamed["stage_seconds"]["infer"] < whole_series["stage_seconds"]["infer"]
    assert saved["ratios"]["last_store_to_seg_head_start_vs_none_at_full_per_s"] > 0
    int8 = saved["int8"][MODEL]
    assert int8["slices_per_s_batch1"]["int8"] > 0 and int8["int8_vs_fp32"]["slices"] == 4
    assert saved["ratios"][f"{MODEL}: int8_vs_fp32_onnxruntime_batch1"] == int8["int8_speedup"]
    text = (tmp_path / "bench.md").read_text()
    assert "| ratio | value |" in text and "compute ceiling" in text and "INT8 against" in text
    assert "Last C-STORE to SEG" in text
    for picture in ("perf_analyzer.png", "baselines_ingest.png"):
        image = Image.open(tmp_path / picture)
        assert image.size[0] > 600 and len(np.unique(np.asarray(image.convert("L")))) > 10
    assert whole["model"] == MODEL

    del saved["whole_study"]  # as a run killed during its last part leaves it
    (tmp_path / "bench.json").write_text(json.dumps(saved))
    again = run_bench(tmp_path, model_repository, config, resume=True)
    assert again["perf_analyzer"] == results["perf_analyzer"]  # kept, not measured again
    assert again["ingest"] == results["ingest"]
    assert again["whole_study"]["model"] == MODEL
    assert again["whole_study"]["seconds_first_store_to_seg"] > 0
    when, resumed = results["measured_at"], again["measured_at"]
    assert set(when) == set(resumed) >= {"perf_analyzer", "ingest", "whole_study"}
    assert resumed["perf_analyzer"] == when["perf_analyzer"], "a resumed part keeps its own time"
    assert resumed["whole_study"] >= when["whole_study"]
    where = again["measured_on"]
    assert set(where) == set(resumed), "every part names the CPU it ran on"
    where["perf_analyzer"] = "another host's CPU"  # as a part kept from another boot would
    (tmp_path / "bench.json").write_text(json.dumps(again))
    again = run_bench(tmp_path, model_repository, config, resume=True, parts=())
    assert again["measured_on"]["perf_analyzer"] == "another host's CPU"
    text = (tmp_path / "bench.md").read_text()
    assert f"whole_study {resumed['whole_study']} on {where['whole_study']}" in text
    assert "perf_analyzer" in text and "on another host's CPU" in text
    with pytest.raises(ValueError, match="another configuration"):
        run_bench(tmp_path, model_repository, BenchConfig.tiny(("denseunet",)), resume=True)


@pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK storescu not installed")
def test_a_listener_that_cannot_start_fails_its_parts_with_its_reason_and_the_rest_finish(
    model_repository, tmp_path
):
    """The listener asked to use a model the server does not serve exits at once: the C-STORE
    parts report its stderr (no blind wait for a port), the other parts keep their figures; the
    parts not asked for are not measured."""
    pytest.importorskip("matplotlib")
    from dataclasses import replace

    from thighseg.apps.bench import BenchConfig, run_bench

    config = replace(BenchConfig.tiny((MODEL,)), study_model="denseunet")  # not served here
    listener_parts = {"ingest", "whole_study", "last_store_to_seg", "sustained"}
    results = run_bench(
        tmp_path, model_repository, config, parts=("perf_analyzer", *sorted(listener_parts))
    )
    assert set(results["errors"]) == listener_parts
    assert all(
        "exited" in reason and "denseunet" in reason for reason in results["errors"].values()
    )
    assert {p["architecture"] for p in results["perf_analyzer"]} == {MODEL}
    assert not {"baselines_slices_per_second", "int8"} & set(results)  # not asked for
    assert set(results["measured_at"]) == {"perf_analyzer"}
    assert "Parts that failed" in (tmp_path / "bench.md").read_text()
    with pytest.raises(ValueError, match="no benchmark part ingets"):
        run_bench(tmp_path, model_repository, config, parts=("ingets",))


def test_alternating_runs_take_turns_and_each_is_saved_as_it_ends(tmp_path):
    from thighseg.apps.alternating import Bench, alternate

    bench = Bench(tmp_path, [], "unused", {"this checkout": None, "before": tmp_path})
    calls, out = [], tmp_path / "ab.json"

    def measure(label, checkout, run):
        saved = json.loads(out.read_text())["runs"] if out.exists() else {}
        calls.append((label, run, sum(len(runs) for runs in saved.values())))
        return {"seconds": run + (10 if checkout else 0)}

    summary = alternate(bench, 3, measure, "seconds", out, "test")
    # in turns, each run saved before the next began
    assert calls == [
        ("this checkout", 0, 0),
        ("before", 0, 1),
        ("this checkout", 1, 2),
        ("before", 1, 3),
        ("this checkout", 2, 4),
        ("before", 2, 5),
    ]
    assert summary["before"]["median"] == 11 and summary["this checkout"]["seconds"] == [0, 1, 2]
    assert summary["before"]["measured_on"] == machine.described(machine.cpu())
    assert json.loads(out.read_text()) == summary


def test_processes_peaking_at_different_times_are_sampled_together_below_their_summed_peaks():
    from thighseg.apps.ingest import TreeRss

    hold = "import numpy, time; a = numpy.ones(100 << 20, numpy.uint8); time.sleep(0.8); del a"
    # the parent holds 100 MB once its child has held and freed its own 100 MB
    parent = (
        f"import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
        f"{hold + '; time.sleep(3)'!r}]); time.sleep(1.5); {hold}; time.sleep(0.3); "
        f"print('done', flush=True); child.wait()"
    )
    process = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    try:
        with TreeRss(process.pid) as together:
            assert process.stdout.readline() == "done\n"
        peaks = together.peaks
    finally:
        process.wait(10)
    assert len(peaks) == 2 and all(peak > 100 << 20 for peak in peaks.values())
    assert together.peak > max(peaks.values())  # the other process counted too
    assert sum(peaks.values()) - together.peak > 60 << 20  # never both at 100 MB at once


def test_resuming_from_an_unreadable_benchmark_file_is_refused_before_measuring(tmp_path):
    """A corrupt bench.json was taken for none: --resume measured everything again, silently."""
    from thighseg.apps.bench import BenchConfig, run_bench

    (tmp_path / "bench.json").write_text('{"parts": {broken')
    with pytest.raises(ValueError, match="cannot resume from .*bench.json"):
        run_bench(tmp_path, tmp_path / "no-repository", BenchConfig.tiny((MODEL,)), resume=True)
    assert (tmp_path / "bench.json").read_text() == '{"parts": {broken'  # left as it was
