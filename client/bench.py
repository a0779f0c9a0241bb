"""`thighseg bench`: every figure measured side by side in one run on one machine.

perf_analyzer sweeps (HTTP/gRPC, dynamic batching on/off), baselines on the same slices (PyTorch
eager FP32/bf16, ONNX Runtime), C-STORE ingest against DCMTK storescp, and one whole study from the
first C-STORE to the SEG with the listener's peak memory. Writes bench.json, bench.md and PNG plots.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from thighseg import models, phantom
from thighseg.client.baselines import onnxruntime_runner, slices_per_second, torch_runner
from thighseg.client.ingest import compare_ingest, free_port, listener_process, peak_rss_bytes, push
from thighseg.client.perf import measure, without_dynamic_batching
from thighseg.ct_series import write_series
from thighseg.embedded_triton import CPU_CONFIG_NAME, EmbeddedTriton, Ports
from thighseg.labels import normalise_hu
from thighseg.resample import MODEL_INPUT_SIZE, to_model_grid


@dataclass(frozen=True)
class BenchConfig:
    model: str = "segformer"
    concurrencies: tuple[int, ...] = (1, 2, 4, 8, 16)
    measurement_ms: int = 3000
    baseline_slices: int = 64
    bf16_slices: int = 16
    study_slices: int = 300
    study_size: int = 512
    ingest_associations: tuple[int, ...] = (1, 4)

    @staticmethod
    def tiny() -> "BenchConfig":
        """Proves the benchmark works in about a minute; its figures mean little."""
        return BenchConfig(concurrencies=(1, 2), measurement_ms=500, baseline_slices=8, bf16_slices=8,
                           study_slices=8, study_size=128, ingest_associations=(1, 2))


def bench_repository(source: Path, model: str, target: Path) -> tuple[str, str]:
    """The served model plus a copy without dynamic batching, for the on/off comparison."""
    name = models.triton_name(model)
    shutil.copytree(source / name, target / name, ignore=shutil.ignore_patterns("*.plan", "model_fp16.onnx"))
    nobatch = f"{name}_nobatch"
    shutil.copytree(target / name, target / nobatch)
    config = target / nobatch / "configs" / f"{CPU_CONFIG_NAME}.pbtxt"
    config.write_text(without_dynamic_batching(config.read_text(), nobatch))
    (target / nobatch / "config.pbtxt").unlink()
    return name, nobatch


def run_perf(server: EmbeddedTriton, names: tuple[str, str], config: BenchConfig) -> list[dict]:
    points = []
    plan = [(name, protocol, c) for name in names for protocol in ("http", "grpc") for c in config.concurrencies]
    for name, protocol, concurrency in tqdm(plan, desc="perf_analyzer"):
        url = server.http_url if protocol == "http" else server.grpc_url
        point = measure(name, url, protocol, concurrency, (1, MODEL_INPUT_SIZE, MODEL_INPUT_SIZE),
                        config.measurement_ms)
        points.append({**point.as_dict(), "dynamic_batching": not name.endswith("_nobatch")})
    return points


def run_baselines(model: str, onnx_path: Path, config: BenchConfig) -> dict[str, float]:
    study = phantom.generate(8101, size=MODEL_INPUT_SIZE, slices=config.baseline_slices)
    images = normalise_hu(to_model_grid(study.hu))[:, None].astype(np.float32)
    results = {"onnxruntime_fp32": slices_per_second(onnxruntime_runner(onnx_path), images)}
    try:
        network = models.load_trained(model)
    except ImportError:  # torch is an optional extra
        return results
    results["torch_eager_fp32"] = slices_per_second(torch_runner(network), images)
    results["torch_eager_bf16_autocast"] = slices_per_second(torch_runner(network, "bf16"),
                                                             images[:config.bf16_slices])
    return results


def run_whole_study(files: list[Path], triton_url: str, work: Path, voxel_bytes: int) -> dict:
    """First C-STORE to SEG on disk, stage times from the report, peak RSS of the listener process."""
    out = work / "whole-out"
    with listener_process(triton_url, work / "whole-spool", out, idle_s=1.0) as (port, process):
        started = time.perf_counter()
        send_seconds = push(files, port, 1, "THIGHSEG")
        deadline = time.monotonic() + 1800
        while not list(out.rglob("report.json")) and time.monotonic() < deadline:
            time.sleep(0.1)
        total = time.perf_counter() - started
        peak = peak_rss_bytes(process.pid)
    report = json.loads(next(out.rglob("report.json")).read_text())
    if report.get("status") != "done":
        raise RuntimeError(f"whole-study run failed: {report.get('reason')}")
    return {"instances": len(files), "seconds_first_store_to_seg": round(total, 2), "seconds_receive": round(
        send_seconds, 2), "stage_seconds": report["stage_seconds"], "listener_peak_rss_mb": round(peak / 2**20, 1),
        "study_voxel_mb": round(voxel_bytes / 2**20, 1), "peak_rss_over_voxel_bytes": round(peak / voxel_bytes, 2)}


def run_bench(out: Path, repository: Path, config: BenchConfig) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"config": asdict(config), "machine": {"platform": platform.platform(),
                                                           "processor": platform.processor(),
                                                           "cpus": os.cpu_count()},
                     "gpu": "missing: no GPU on this machine; run scripts/gpu_check.sh on a GPU host"}
    with tempfile.TemporaryDirectory(prefix="thighseg-bench-") as scratch:
        work = Path(scratch)
        names = bench_repository(repository, config.model, work / "repository")
        study = phantom.generate(8100, size=config.study_size, slices=config.study_slices, slice_spacing=5.0)
        files = write_series(study, work / "study")
        voxel_bytes = study.hu.size * 2  # as stored: 16 bits per voxel
        del study
        with EmbeddedTriton(work / "repository", Ports(free_port(), free_port(), free_port()),
                            log_file=work / "triton.log") as server:
            results["perf_analyzer"] = run_perf(server, names, config)
            results["baselines_slices_per_second"] = run_baselines(
                config.model, work / "repository" / names[0] / "1" / "model.onnx", config)
            results["ingest"] = [r.as_dict() for r in compare_ingest(files, server.http_url, work / "ingest",
                                                                     config.ingest_associations)]
            results["whole_study"] = run_whole_study(files, server.http_url, work, voxel_bytes)
    results["ratios"] = ratios(results)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    (out / "bench.md").write_text(markdown(results))
    plot(results, out)
    return results


def _best(points: list[dict], protocol: str, batching: bool, concurrency: int | None = None) -> float:
    chosen = [p["throughput"] for p in points if p["protocol"] == protocol and p["dynamic_batching"] == batching
              and (concurrency is None or p["concurrency"] == concurrency)]
    return max(chosen) if chosen else float("nan")


def ratios(results: dict) -> dict:
    points, baselines = results["perf_analyzer"], results["baselines_slices_per_second"]
    top = max(p["concurrency"] for p in points)
    at = 8 if any(p["concurrency"] == 8 for p in points) else top
    triton = max(_best(points, "http", True), _best(points, "grpc", True))
    ingest = {(r["receiver"], r["associations"]): r["instances_per_second"] for r in results["ingest"]}
    out = {
        f"dynamic_batching_on_vs_off_http_at_concurrency_{at}": _best(points, "http", True, at) / _best(
            points, "http", False, at),
        f"dynamic_batching_on_vs_off_grpc_at_concurrency_{at}": _best(points, "grpc", True, at) / _best(
            points, "grpc", False, at),
        "listener_peak_rss_over_study_voxel_bytes": results["whole_study"]["peak_rss_over_voxel_bytes"],
    }
    if "torch_eager_fp32" in baselines:
        out["embedded_triton_vs_torch_eager_fp32"] = triton / baselines["torch_eager_fp32"]
    out["embedded_triton_vs_onnxruntime_direct"] = triton / baselines["onnxruntime_fp32"]
    for count in sorted({r["associations"] for r in results["ingest"]}):
        out[f"ingest_listener_vs_storescp_{count}_associations"] = (
            ingest[("thighseg-listener", count)] / ingest[("dcmtk-storescp", count)])
    return {k: round(v, 3) for k, v in out.items()}


def markdown(results: dict) -> str:
    lines = ["# thighseg benchmark", "", f"Machine: {results['machine']['platform']}, "
             f"{results['machine']['cpus']} CPUs. GPU: {results['gpu']}", "", "## Ratios", "",
             "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in results["ratios"].items()]
    lines += ["", "## perf_analyzer (embedded Triton, CPU; slices/s and ms)", "",
              "| protocol | dynamic batching | concurrency | slices/s | p50 | p95 | p99 |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {p['protocol']} | {'on' if p['dynamic_batching'] else 'off'} | {p['concurrency']} | "
              f"{p['throughput']:.1f} | {p['p50_ms']:.0f} | {p['p95_ms']:.0f} | {p['p99_ms']:.0f} |"
              for p in results["perf_analyzer"]]
    lines += ["", "## Baselines on the same slices (slices/s, batch 8)", "", "| runtime | slices/s |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in results["baselines_slices_per_second"].items()]
    lines += ["", "## C-STORE ingest (DCMTK storescu as sender)", "",
              "| receiver | associations | instances | seconds | instances/s |", "|---|---|---|---|---|"]
    lines += [f"| {r['receiver']} | {r['associations']} | {r['instances']} | {r['seconds']:.2f} | "
              f"{r['instances_per_second']:.1f} |" for r in results["ingest"]]
    whole = results["whole_study"]
    lines += ["", "## Whole study", "", f"{whole['instances']} instances: first C-STORE to SEG in "
              f"{whole['seconds_first_store_to_seg']} s (receive {whole['seconds_receive']} s); stages "
              + ", ".join(f"{k} {v:.2f} s" for k, v in whole["stage_seconds"].items())
              + f". Listener peak RSS {whole['listener_peak_rss_mb']} MB for {whole['study_voxel_mb']} MB of voxels "
              f"({whole['peak_rss_over_voxel_bytes']}×).", ""]
    return "\n".join(lines)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4))
    for protocol in ("http", "grpc"):
        for batching in (True, False):
            points = sorted((p for p in results["perf_analyzer"] if p["protocol"] == protocol
                             and p["dynamic_batching"] == batching), key=lambda p: p["concurrency"])
            label = f"{protocol}, batching {'on' if batching else 'off'}"
            style = "-" if batching else "--"
            throughput.plot([p["concurrency"] for p in points], [p["throughput"] for p in points], style, marker="o",
                            label=label)
            latency.plot([p["concurrency"] for p in points], [p["p95_ms"] for p in points], style, marker="o",
                         label=label)
    for axis, title, unit in ((throughput, "Throughput", "slices/s"), (latency, "p95 latency", "ms")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrency")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    figure.savefig(out / "perf_analyzer.png", dpi=120)
    plt.close(figure)

    figure, (runtimes, ingest) = plt.subplots(1, 2, figsize=(11, 4))
    baselines = dict(results["baselines_slices_per_second"])
    baselines["triton (best, perf_analyzer)"] = max(p["throughput"] for p in results["perf_analyzer"])
    runtimes.barh(list(baselines), list(baselines.values()))
    runtimes.set_xlabel("slices/s")
    runtimes.set_title("Same slices, same CPU")
    labels = [f"{r['receiver']}\n{r['associations']} assoc." for r in results["ingest"]]
    ingest.barh(labels, [r["instances_per_second"] for r in results["ingest"]])
    ingest.set_xlabel("instances/s")
    ingest.set_title("C-STORE ingest")
    figure.tight_layout()
    figure.savefig(out / "baselines_ingest.png", dpi=120)
    plt.close(figure)
