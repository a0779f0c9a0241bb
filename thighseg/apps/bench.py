"""`thighseg bench`: every figure measured side by side in one run on one machine.

perf_analyzer sweeps for each served model (HTTP/gRPC, dynamic batching on/off), baselines on the
same slices (PyTorch eager FP32/bf16, ONNX Runtime at batch 1 and 8, whose best is the compute
ceiling any server of that model meets on this machine), C-STORE ingest against DCMTK storescp, and
one whole study from the first C-STORE to the SEG with the listener's peak memory, in a fresh
listener and in one that has already processed a study, and sustained load (many studies over
parallel associations: studies/hour, latency p50/p95). Writes bench.json, bench.md and PNG plots.

Each part writes bench.json as it finishes; a part that fails is recorded under "errors" with its
reason and the others go on; `resume` skips the parts an earlier run of the same configuration
finished. Every part uses the models asked for (the whole-study part the first of them, SegFormer
when it is among them).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pydicom
from tqdm import tqdm

from thighseg.apps.baselines import onnxruntime_runner, slices_per_second, torch_runner
from thighseg.apps.ingest import (
    TreeRss,
    compare_ingest,
    last_store_to_seg,
    listener_process,
    push,
    wait_for_report,
)
from thighseg.apps.sustained import run_sustained
from thighseg.client.perf import measure, without_dynamic_batching
from thighseg.core import machine
from thighseg.core.constants import AE_TITLE, BENCH_PARTS, DEFAULT_MODEL
from thighseg.core.labels import normalise_hu
from thighseg.core.ports import free_port
from thighseg.core.resample import MODEL_INPUT_SIZE, stacked_tiles
from thighseg.export.validation import onnx_channels, onnx_context
from thighseg.learning import models
from thighseg.pipeline.report import SeriesReport
from thighseg.serving.embedded_triton import CPU_CONFIG_NAME, EmbeddedTriton, Ports
from thighseg.synthetic import phantom
from thighseg.synthetic.ct_series import write_series

DYNAMIC_BATCHING_TARGET = 1.3  # issue 6: batching on vs off at concurrency 8


@dataclass(frozen=True)
class BenchConfig:
    models: tuple[str, ...] = ("denseunet", "manet", "segformer")
    study_model: str = DEFAULT_MODEL  # the listener's model in the ingest and whole-study parts
    concurrencies: tuple[int, ...] = (1, 2, 4, 8, 16)
    measurement_ms: int = 3000
    baseline_slices: int = 64
    bf16_slices: int = 16
    study_slices: int = 300
    study_size: int = 512
    # the study a listener processes first, for the steady-state memory figure
    warmup_slices: int = 12
    ingest_associations: tuple[int, ...] = (1, 4, 10)
    # the listener is also measured with this many ingest processes (one per core, at least 2)
    ingest_processes: int = max(2, os.cpu_count() or 2)
    ingest_rounds: int = 3  # interleaved rounds of every receiver: the median is the figure
    int8_slices: int = 8  # per validation subject (two subjects), judged against the truth
    # senders paced like a modality (instances/s; 0: as fast as the listener answers)
    stream_rates: tuple[float, ...] = (20.0, 100.0, 0.0)
    # runs of the first rate, streaming with a head start (the ≤ 3 s target): noisy, so repeated
    latency_repeats: int = 3
    # sustained load: studies of `sustained_slices` slices of study_size² over parallel associations
    sustained_studies: int = 20
    sustained_slices: int = 40
    sustained_associations: int = 4

    @staticmethod
    def for_models(models: tuple[str, ...], **options) -> BenchConfig:
        """Every part on `models`: the whole study with the listener's default model if it is
        among them, otherwise the first."""
        study_model = DEFAULT_MODEL if DEFAULT_MODEL in models else models[0]
        return BenchConfig(models=tuple(models), study_model=study_model, **options)

    @staticmethod
    def tiny(models: tuple[str, ...] = (DEFAULT_MODEL,)) -> BenchConfig:
        """Proves the benchmark works in a few minutes (3.6 on 2 cores); its figures mean little."""
        return BenchConfig.for_models(
            models,
            concurrencies=(1, 2),
            measurement_ms=500,
            baseline_slices=8,
            bf16_slices=8,
            study_slices=8,
            study_size=128,
            warmup_slices=4,
            ingest_associations=(1, 2),
            ingest_processes=2,
            ingest_rounds=1,
            int8_slices=2,
            stream_rates=(0.0,),
            latency_repeats=1,
            sustained_studies=3,
            sustained_slices=4,
            sustained_associations=2,
        )


def bench_repository(source: Path, model: str, target: Path) -> tuple[str, str]:
    """The served model plus a copy without dynamic batching, for the on/off comparison."""
    name = models.triton_name(model)
    shutil.copytree(
        source / name, target / name, ignore=shutil.ignore_patterns("*.plan", "model_fp16.onnx")
    )
    nobatch = f"{name}_nobatch"
    shutil.copytree(target / name, target / nobatch)
    config = target / nobatch / "configs" / f"{CPU_CONFIG_NAME}.pbtxt"
    config.write_text(without_dynamic_batching(config.read_text(), nobatch))
    (target / nobatch / "config.pbtxt").unlink()
    return name, nobatch


def run_perf(
    server: EmbeddedTriton, served: dict[str, tuple[str, str]], config: BenchConfig
) -> list[dict]:
    points = []
    # batching on and off back to back at each point: this machine's speed drifts over minutes
    plan = [
        (model, name, protocol, c)
        for model, names in served.items()
        for protocol in ("http", "grpc")
        for c in config.concurrencies
        for name in names
    ]
    channels = {
        model: onnx_channels(server.model_repository / names[0] / "1" / "model.onnx")
        for model, names in served.items()
    }
    for model, name, protocol, concurrency in tqdm(plan, desc="perf_analyzer"):
        url = server.http_url if protocol == "http" else server.grpc_url
        point = measure(
            name,
            url,
            protocol,
            concurrency,
            (channels[model], MODEL_INPUT_SIZE, MODEL_INPUT_SIZE),
            config.measurement_ms,
        )
        points.append(
            {
                **point.as_dict(),
                "architecture": model,
                "dynamic_batching": not name.endswith("_nobatch"),
            }
        )
    return points


def run_baselines(model: str, onnx_path: Path, config: BenchConfig) -> dict[str, float]:
    study = phantom.generate(8101, size=MODEL_INPUT_SIZE, slices=config.baseline_slices)
    pixel_mm = (study.geometry.pixel_spacing,) * 2
    tiles, _ = stacked_tiles(study.hu, pixel_mm, onnx_context(onnx_path))
    images = normalise_hu(tiles).astype(np.float32)
    session = onnxruntime_runner(onnx_path)
    results = {
        "onnxruntime_fp32_batch1": slices_per_second(
            session, images, batch_size=1, warmup_batches=8
        ),
        "onnxruntime_fp32": slices_per_second(session, images),
    }
    try:
        network = models.load_trained(model)
    except ImportError:  # torch is an optional extra
        return results
    results["torch_eager_fp32"] = slices_per_second(torch_runner(network), images)
    results["torch_eager_bf16_autocast"] = slices_per_second(
        torch_runner(network, "bf16"), images[: config.bf16_slices]
    )
    return results


def _sustained_studies(config: BenchConfig, folder: Path) -> list[list[Path]]:
    """The studies of the sustained part, each of its own subject."""
    return [
        write_series(
            phantom.generate(
                8200 + k, size=config.study_size, slices=config.sustained_slices, slice_spacing=5.0
            ),
            folder / f"study{k}",
        )
        for k in tqdm(range(config.sustained_studies), desc="sustained: studies")
    ]


def _process_study(files: list[Path], port: int, out: Path) -> tuple[float, float, SeriesReport]:
    """Push one study; (seconds from the first C-STORE to its report, seconds of sending, the
    report)."""
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    started = time.perf_counter()
    send_seconds = push(files, port, 1, AE_TITLE)
    report = wait_for_report(out, study_uid)
    return time.perf_counter() - started, send_seconds, report


@dataclass(frozen=True)
class ListenerRun:
    """A study through a fresh listener: seconds from its first C-STORE to its report and of
    sending, the report, each process's peak RSS by PID (the listener first), and the highest
    RSS of them all together, sampled (`TreeRss`)."""

    seconds: float
    send_seconds: float
    report: SeriesReport
    peaks: dict[int, int]
    together_peak: int


def fresh_listener(
    files: list[Path],
    triton_url: str,
    work: Path,
    model: str,
    name: str,
    first: list[Path] | None = None,
    options: tuple[str, ...] = (),
    checkout: Path | None = None,
) -> ListenerRun:
    """A fresh listener with `options` (of another `checkout`, if given) processes the study
    `first` (if given), then `files`."""
    out = work / f"{name}-out"
    with listener_process(
        triton_url,
        work / f"{name}-spool",
        out,
        idle_s=1.0,
        model=model,
        options=options,
        checkout=checkout,
    ) as (port, process):
        with TreeRss(process.pid) as together:
            if first is not None:
                _process_study(first, port, out)
            seconds, send_seconds, report = _process_study(files, port, out)
        return ListenerRun(seconds, send_seconds, report, together.peaks, together.peak)


def run_whole_study(
    files: list[Path], warmup: list[Path], triton_url: str, model: str, work: Path, voxel_bytes: int
) -> dict:
    """First C-STORE to SEG on disk, stage times from the report, and the listener's peak RSS
    (with its SEG process): in a fresh listener, in one that processed a small study first
    (libraries loaded, caches and heaps as they stay in a long-running listener), and in a fresh
    one that writes the SEG itself (`--seg-in-listener`, the low-memory choice)."""
    whole = fresh_listener(files, triton_url, work, model, "whole")
    warm = fresh_listener(files, triton_url, work, model, "warm", first=warmup)
    lean = fresh_listener(files, triton_url, work, model, "lean", options=("--seg-in-listener",))
    # each listener's processes' peaks summed: an upper bound (each peaks at its own time)
    peak, warm_peak, lean_peak = (sum(run.peaks.values()) for run in (whole, warm, lean))
    return {
        "model": model,
        "instances": len(files),
        "seconds_first_store_to_seg": round(whole.seconds, 2),
        "seconds_receive": round(whole.send_seconds, 2),
        "stage_seconds": whole.report.stage_seconds,
        "study_voxel_mb": round(voxel_bytes / 2**20, 1),
        "listener_peak_rss_mb": round(peak / 2**20, 1),
        "peak_rss_over_voxel_bytes": round(peak / voxel_bytes, 2),
        # the sum's parts: the listener process itself, then its children (SEG process, ...)
        "process_peak_rss_mb": [round(bytes_ / 2**20, 1) for bytes_ in whole.peaks.values()],
        # the processes' RSS summed at each sample: what the pod held at once
        "together_peak_rss_mb": round(whole.together_peak / 2**20, 1),
        "together_peak_rss_over_voxel_bytes": round(whole.together_peak / voxel_bytes, 2),
        "warm_listener_peak_rss_mb": round(warm_peak / 2**20, 1),
        "warm_peak_rss_over_voxel_bytes": round(warm_peak / voxel_bytes, 2),
        # what a long-running pod meets: libraries loaded, heaps as a first study left them
        "warm_together_peak_rss_mb": round(warm.together_peak / 2**20, 1),
        "warm_together_peak_rss_over_voxel_bytes": round(warm.together_peak / voxel_bytes, 2),
        "seg_in_listener": {
            "seconds_first_store_to_seg": round(lean.seconds, 2),
            "stage_seconds": lean.report.stage_seconds,
            "listener_peak_rss_mb": round(lean_peak / 2**20, 1),
            "peak_rss_over_voxel_bytes": round(lean_peak / voxel_bytes, 2),
            "together_peak_rss_mb": round(lean.together_peak / 2**20, 1),
            "together_peak_rss_over_voxel_bytes": round(lean.together_peak / voxel_bytes, 2),
        },
    }


def _save(out: Path, results: dict) -> None:
    temporary = out / "bench.json.part"
    temporary.write_text(json.dumps(results, indent=2))
    temporary.replace(out / "bench.json")


def _earlier_results(out: Path, config: BenchConfig) -> dict:
    """The parts an earlier run of the same configuration finished (for --resume)."""
    try:
        earlier = json.loads((out / "bench.json").read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise ValueError(
            f"cannot resume from {out}/bench.json ({error}): move it away, or run without --resume"
        ) from None
    if earlier.get("config") != json.loads(json.dumps(asdict(config))):
        raise ValueError(f"{out}/bench.json was measured with another configuration: no resume")
    kept = {part: earlier[part] for part in BENCH_PARTS if part in earlier}
    when = {part: at for part, at in earlier.get("measured_at", {}).items() if part in kept}
    where = {part: cpu for part, cpu in earlier.get("measured_on", {}).items() if part in kept}
    return {**kept, "measured_at": when, "measured_on": where}


def run_int8(model: str, onnx_path: Path, work: Path, config: BenchConfig) -> dict:
    """The model quantised to INT8 (as `thighseg export --format int8` does) against FP32, both in
    ONNX Runtime on this CPU: accuracy on phantom slices with truth, slices/s at batch 1."""
    from thighseg.export.build import VALIDATION_SEEDS
    from thighseg.export.int8 import calibration_images, choose_cpu_model, quantise
    from thighseg.export.validation import phantom_tiles

    folder = work / "int8" / model
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = Path(shutil.copy(onnx_path, folder / "model.onnx"))
    context = onnx_context(fp32)
    images, truth = phantom_tiles(VALIDATION_SEEDS, config.int8_slices, context=context)
    quantised = quantise(fp32, calibration_images(context))
    threads = len(os.sched_getaffinity(0))
    return choose_cpu_model(fp32, quantised["cpu"], images, truth, threads)


def _latency_plan(config: BenchConfig) -> list[tuple[float, bool, float, bool]]:
    """(rate, streaming, idle s, head start) of each last-C-STORE-to-SEG run: every rate streaming
    or not, with the listener's defaults; at the first rate, also without a head start, and the
    default repeated."""
    first = config.stream_rates[0]
    return [
        *((rate, stream, 1.0, True) for rate in config.stream_rates for stream in (True, False)),
        (first, True, 1.0, False),
        *((first, True, 1.0, True) for _ in range(config.latency_repeats - 1)),
    ]


def run_bench(
    out: Path,
    repository: Path,
    config: BenchConfig,
    resume: bool = False,
    parts: Collection[str] = BENCH_PARTS,
) -> dict:
    """Measure the `parts` asked for (all by default) and write bench.json, bench.md and the
    plots; with `resume`, parts an earlier run of the same configuration finished are kept."""
    unknown = sorted(set(parts) - set(BENCH_PARTS))
    if unknown:
        raise ValueError(
            f"no benchmark part {', '.join(unknown)}: choose of {', '.join(BENCH_PARTS)}"
        )
    out.mkdir(parents=True, exist_ok=True)
    this_cpu = machine.cpu()
    results: dict = {
        "config": asdict(config),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "cpu": this_cpu,
        },
        "gpu": "missing: no GPU on this machine; run scripts/gpu_check.sh on a GPU host",
        "errors": {},
        "measured_at": {},  # part -> UTC time it finished: resumed parts keep their own
        "measured_on": {},  # part -> the CPU it ran on (`machine.described`), likewise
        **(_earlier_results(out, config) if resume else {}),
    }
    with tempfile.TemporaryDirectory(prefix="thighseg-bench-") as scratch:
        work = Path(scratch)
        served = {
            model: bench_repository(repository, model, work / "repository")
            for model in config.models
        }
        study = phantom.generate(
            8100, size=config.study_size, slices=config.study_slices, slice_spacing=5.0
        )
        files = write_series(study, work / "study")
        voxel_bytes = study.hu.size * 2  # as stored: 16 bits per voxel
        del study
        warmup = write_series(
            phantom.generate(
                8102, size=config.study_size, slices=config.warmup_slices, slice_spacing=5.0
            ),
            work / "warmup",
        )
        ports = Ports(free_port(), free_port(), free_port())
        with EmbeddedTriton(work / "repository", ports, log_file=work / "triton.log") as server:
            measures = {
                "perf_analyzer": lambda: run_perf(server, served, config),
                "baselines_slices_per_second": lambda: {
                    model: run_baselines(
                        model, work / "repository" / names[0] / "1" / "model.onnx", config
                    )
                    for model, names in tqdm(served.items(), desc="baselines")
                },
                "int8": lambda: {
                    model: run_int8(
                        model, work / "repository" / names[0] / "1" / "model.onnx", work, config
                    )
                    for model, names in tqdm(served.items(), desc="int8")
                },
                "ingest": lambda: [
                    r.as_dict()
                    for r in compare_ingest(
                        files,
                        server.http_url,
                        work / "ingest",
                        config.ingest_associations,
                        config.study_model,
                        config.ingest_processes,
                        config.ingest_rounds,
                    )
                ],
                "whole_study": lambda: run_whole_study(
                    files, warmup, server.http_url, config.study_model, work, voxel_bytes
                ),
                "last_store_to_seg": lambda: [
                    last_store_to_seg(
                        files, server.http_url, work, config.study_model, rate or None, *run
                    )
                    for rate, *run in tqdm(_latency_plan(config), desc="last store to SEG")
                ],
                "sustained": lambda: run_sustained(
                    _sustained_studies(config, work / "sustained-studies"),
                    server.http_url,
                    work,
                    config.study_model,
                    config.sustained_associations,
                    workers=os.cpu_count() or 1,
                ),
            }
            for part, measure_part in measures.items():
                if part in results or part not in parts:
                    continue  # resumed, or not asked for
                try:
                    results[part] = measure_part()
                    results["measured_at"][part] = datetime.now(timezone.utc).isoformat(
                        timespec="seconds"
                    )
                    results["measured_on"][part] = machine.described(this_cpu)
                except Exception as error:  # noqa: BLE001 - one failing part must not cost the others
                    results["errors"][part] = f"{type(error).__name__}: {error}"[:2000]
                    print(f"bench: {part} failed: {results['errors'][part]}", flush=True)
                _save(out, results)
    results["ratios"] = ratios(results)
    _save(out, results)
    (out / "bench.md").write_text(markdown(results))
    plot(results, out)
    return results


def _best(
    points: list[dict],
    model: str,
    protocol: str | None,
    batching: bool,
    concurrency: int | None = None,
) -> float:
    chosen = [
        p["throughput"]
        for p in points
        if p["architecture"] == model
        and p["dynamic_batching"] == batching
        and (protocol is None or p["protocol"] == protocol)
        and (concurrency is None or p["concurrency"] == concurrency)
    ]
    return max(chosen) if chosen else float("nan")


def _ceiling(baselines: dict[str, float]) -> float:
    """ONNX Runtime called directly at its best batch: no server of the model beats it on this
    machine."""
    return max(baselines["onnxruntime_fp32_batch1"], baselines["onnxruntime_fp32"])


def _compared_concurrency(points: list[dict]) -> int:
    return (
        8 if any(p["concurrency"] == 8 for p in points) else max(p["concurrency"] for p in points)
    )


def _median_latency(runs: list[dict]) -> dict[tuple, float]:
    """Median seconds from the last C-STORE to the SEG by (rate, streaming, head start)."""
    seconds: dict[tuple, list[float]] = {}
    for r in runs:
        key = (r["rate_per_s"], r["streaming"], r.get("head_start", False))
        seconds.setdefault(key, []).append(r["seconds_last_store_to_seg"])
    return {key: float(np.median(values)) for key, values in seconds.items()}


def _latency_ratios(runs: list[dict]) -> dict[str, float]:
    """Streaming vs whole series, head start vs none (both streaming), medians at each rate."""
    latency, out = _median_latency(runs), {}
    for (rate, streaming, head_start), seconds in latency.items():
        if not (streaming and head_start):
            continue
        if (rate, False, True) in latency:
            out[f"last_store_to_seg_streaming_vs_whole_series_at_{rate}_per_s"] = (
                seconds / latency[(rate, False, True)]
            )
        if (rate, True, False) in latency:
            out[f"last_store_to_seg_head_start_vs_none_at_{rate}_per_s"] = (
                seconds / latency[(rate, True, False)]
            )
    return out


# ratio name -> where whole_study keeps it (a key, or "seg_in_listener" and a key); a figure absent
# from a run made before it was measured is left out
WHOLE_STUDY_RATIOS = {
    "listener_peak_rss_over_study_voxel_bytes": ("peak_rss_over_voxel_bytes",),
    "warm_listener_peak_rss_over_study_voxel_bytes": ("warm_peak_rss_over_voxel_bytes",),
    # what a pod's limit meets: the processes' RSS summed at each sample
    "listener_together_peak_rss_over_study_voxel_bytes": ("together_peak_rss_over_voxel_bytes",),
    "warm_listener_together_peak_rss_over_study_voxel_bytes": (
        "warm_together_peak_rss_over_voxel_bytes",
    ),
    "seg_in_listener_peak_rss_over_study_voxel_bytes": (
        "seg_in_listener",
        "peak_rss_over_voxel_bytes",
    ),
    "seg_in_listener_together_peak_rss_over_study_voxel_bytes": (
        "seg_in_listener",
        "together_peak_rss_over_voxel_bytes",
    ),
}


def _whole_study_ratios(whole: dict) -> dict:
    """The whole_study part's memory ratios (`WHOLE_STUDY_RATIOS`)."""
    out = {}
    for name, keys in WHOLE_STUDY_RATIOS.items():
        value: object = whole
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            out[name] = value
    return out


def ratios(results: dict) -> dict:
    """The figures the targets are about, from whichever parts finished."""
    out = {}
    points = results.get("perf_analyzer") or []
    at = _compared_concurrency(points) if points else None
    for model, baselines in results.get("baselines_slices_per_second", {}).items():
        ceiling = _ceiling(baselines)
        if points:
            triton = _best(points, model, None, True)
            for protocol in ("http", "grpc"):
                out[f"{model}: dynamic_batching_on_vs_off_{protocol}_at_concurrency_{at}"] = _best(
                    points, model, protocol, True, at
                ) / _best(points, model, protocol, False, at)
            off = _best(points, model, None, False, at)
            out[f"{model}: most_dynamic_batching_could_give_at_concurrency_{at}"] = ceiling / off
            if "torch_eager_fp32" in baselines:
                out[f"{model}: embedded_triton_vs_torch_eager_fp32"] = (
                    triton / baselines["torch_eager_fp32"]
                )
            out[f"{model}: embedded_triton_vs_onnxruntime_direct_best_batch"] = triton / ceiling
    for model, int8 in (results.get("int8") or {}).items():
        out[f"{model}: int8_vs_fp32_onnxruntime_batch1"] = int8["int8_speedup"]
    out |= _latency_ratios(results.get("last_store_to_seg") or [])
    out |= _whole_study_ratios(results.get("whole_study") or {})
    ingest = {
        (r["receiver"], r["associations"]): r["instances_per_second"]
        for r in results.get("ingest") or []
    }
    for count in sorted({count for _, count in ingest}):
        listener = ingest[("thighseg-listener", count)]
        out[f"ingest_listener_vs_storescp_tcp_nodelay_{count}_associations"] = (
            listener / ingest[("dcmtk-storescp", count)]
        )
        out[f"ingest_listener_vs_storescp_nagle_default_{count}_associations"] = (
            listener / ingest[("dcmtk-storescp-nagle-default", count)]
        )
        out[f"ingest_listener_vs_bare_pynetdicom_{count}_associations"] = (
            listener / ingest[("pynetdicom-bare", count)]
        )
        out[f"ingest_bare_pynetdicom_vs_storescp_tcp_nodelay_{count}_associations"] = (
            ingest[("pynetdicom-bare", count)] / ingest[("dcmtk-storescp", count)]
        )
        for (receiver, at), speed in ingest.items():
            if at == count and receiver.endswith("-processes"):
                name = receiver.removeprefix("thighseg-").replace("-", "_")
                out[f"ingest_{name}_vs_storescp_tcp_nodelay_{count}_associations"] = (
                    speed / ingest[("dcmtk-storescp", count)]
                )
                out[f"ingest_{name}_vs_one_process_{count}_associations"] = speed / listener
    return {k: round(v, 3) for k, v in out.items()}


def _batching_section(results: dict) -> list[str]:
    points, baselines_by_model = results["perf_analyzer"], results["baselines_slices_per_second"]
    at = _compared_concurrency(points)
    lines = [
        f"## Dynamic batching against the compute ceiling (concurrency {at})",
        "",
        "| model | batching off, slices/s | batching on | ONNX Runtime direct, batch 1 / 8 "
        f"| off ÷ ceiling | {DYNAMIC_BATCHING_TARGET}× off would need |",
        "|---|---|---|---|---|---|",
    ]
    for model, baselines in baselines_by_model.items():
        off, on = _best(points, model, None, False, at), _best(points, model, None, True, at)
        ceiling = _ceiling(baselines)
        lines.append(
            f"| {model} | {off:.1f} | {on:.1f} | {baselines['onnxruntime_fp32_batch1']:.1f} / "
            f"{baselines['onnxruntime_fp32']:.1f} | {off / ceiling:.0%} | "
            f"{DYNAMIC_BATCHING_TARGET * off:.1f} |"
        )
    return lines + [
        "",
        "Batching pays where a bigger batch runs more slices per second. On this CPU a model "
        "runs no faster at batch 8 than at batch 1, so the CPU configuration batches without "
        "waiting and runs the slices one at a time: batching saves only the per-request round "
        "trip, and the server without batching already runs at the share of the ceiling shown. "
        "GPU figures come from scripts/gpu_check.sh.",
        "",
    ]


def _perf_section(points: list[dict]) -> list[str]:
    lines = []
    for model in dict.fromkeys(p["architecture"] for p in points):
        lines += [
            f"## perf_analyzer: {model} (embedded Triton, CPU; slices/s and ms)",
            "",
            "| protocol | dynamic batching | concurrency | slices/s | p50 | p95 | p99 |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {p['protocol']} | {'on' if p['dynamic_batching'] else 'off'} | "
            f"{p['concurrency']} | {p['throughput']:.1f} | {p['p50_ms']:.0f} | "
            f"{p['p95_ms']:.0f} | {p['p99_ms']:.0f} |"
            for p in sorted(
                (p for p in points if p["architecture"] == model),
                key=lambda p: (p["protocol"], not p["dynamic_batching"], p["concurrency"]),
            )
        ]
        lines.append("")
    return lines


def _baselines_section(baselines_by_model: dict) -> list[str]:
    lines = [
        "## Baselines on the same slices (slices/s; batch 8 unless named)",
        "",
        "| model | runtime | slices/s |",
        "|---|---|---|",
    ]
    lines += [
        f"| {model} | {runtime} | {value:.1f} |"
        for model, baselines in baselines_by_model.items()
        for runtime, value in baselines.items()
    ]
    return lines + [""]


def _int8_section(int8_by_model: dict) -> list[str]:
    lines = [
        "## INT8 against FP32 (ONNX Runtime on this CPU, batch 1)",
        "",
        "Static QDQ quantisation calibrated on phantom slices (`thighseg export --format int8`); "
        "accuracy on other phantom slices with their truth. The CPU server runs INT8 only where "
        "it holds accuracy and is faster.",
        "",
        "| model | FP32 slices/s | INT8 slices/s | speed-up | argmax agreement | max DSC drop "
        "| served on CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, r in int8_by_model.items():
        speed, check = r["slices_per_s_batch1"], r["int8_vs_fp32"]
        lines.append(
            f"| {model} | {speed['fp32']} | {speed['int8']} | {r['int8_speedup']}× "
            f"| {check['argmax_agreement']:.4f} | {check['max_dice_drop']:.4f} | {r['onnx']} |"
        )
    return [*lines, ""]


def _latency_section(runs: list[dict]) -> list[str]:
    lines = [
        "## Last C-STORE to SEG",
        "",
        "One study in one association, the sender paced like a modality; a fresh listener "
        "each run, "
        f"completion {runs[0]['idle_s']} s after the association's release. Streaming infers and "
        "measures each slice as it arrives; without it the series is inferred once complete. A "
        "head start processes the series from its release, during the completion wait, and "
        "publishes once it completes. Stage seconds are the processing's own (a head start's "
        "begin at the release).",
        "",
        "| sender pace | streaming | head start | sending s | last C-STORE → SEG s | assemble "
        "| infer | measure | emit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        stages = r["stage_seconds"]
        pace = "full speed" if r["rate_per_s"] == "full" else f"{r['rate_per_s']:g}/s"
        lines.append(
            f"| {pace} | {'on' if r['streaming'] else 'off'} "
            f"| {'on' if r.get('head_start') else 'off'} | {r['seconds_sending']} "
            f"| {r['seconds_last_store_to_seg']} | "
            + " | ".join(
                f"{stages.get(k, 0):.2f}" for k in ("assemble", "infer", "measure", "emit")
            )
            + " |"
        )
    return [*lines, ""]


def _sustained_section(run: dict) -> list[str]:
    latency = run["latency_s"]
    return [
        "## Sustained load",
        "",
        f"{run['studies']} studies of {run['instances_per_study']} instances ({run['model']}) "
        f"sent back to back over {run['associations']} parallel associations (one study each, "
        f"then the next) to one listener running {run['listener_workers']} series at once.",
        "",
        "| studies/hour | seconds | latency p50 s | p95 s | max s |",
        "|---|---|---|---|---|",
        f"| {run['studies_per_hour']} | {run['seconds']} | {latency['p50']} | {latency['p95']} "
        f"| {latency['max']} |",
        "",
    ]


def _ingest_section(runs: list[dict]) -> list[str]:
    lines = [
        "## C-STORE ingest (DCMTK storescu as sender)",
        "",
        "storescp and storescu with `TCP_NODELAY=1` (the fair baseline; the listener gets the same "
        "sender) and in DCMTK's default configuration, which leaves Nagle's algorithm on "
        "(`-nagle-default`, labelled, for comparison with earlier figures). storescp writes "
        "without fsync; the listener fsyncs each instance and its index entry before Success. "
        "`pynetdicom-bare` answers Success and keeps nothing: the ceiling of the library the "
        "listener is built on (one process). `thighseg-listener-N-processes` receives in N ingest "
        "processes sharing the listening socket (`--ingest-processes N`); every listener is "
        "measured once its /readyz says all its processes accept. Each receiver runs in "
        "interleaved rounds (the Nagle default once); seconds and instances/s are the median "
        "round's, every round's seconds beside them.",
        "",
        "| receiver | associations | instances | seconds | instances/s | rounds (s) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['receiver']} | {r['associations']} | {r['instances']} | {r['seconds']:.2f} | "
        f"{r['instances_per_second']:.1f} | "
        f"{', '.join(f'{s:.2f}' for s in r.get('rounds_seconds') or [r['seconds']])} |"
        for r in runs
    ]
    return lines + [""]


def _whole_study_section(whole: dict, warmup_slices: int) -> list[str]:
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in whole["stage_seconds"].items())
    return [
        "## Whole study",
        "",
        f"{whole['instances']} instances ({whole['model']}): first C-STORE to SEG in "
        f"{whole['seconds_first_store_to_seg']} s (receive {whole['seconds_receive']} s); "
        f"stages {stages}. Listener peak RSS for {whole['study_voxel_mb']} MB of voxels: "
        f"{whole['listener_peak_rss_mb']} MB ({whole['peak_rss_over_voxel_bytes']}×"
        f"{_parts(whole.get('process_peak_rss_mb'))}) in a fresh "
        f"listener, {whole['warm_listener_peak_rss_mb']} MB "
        f"({whole['warm_peak_rss_over_voxel_bytes']}×) in one that processed a "
        f"{warmup_slices}-slice study first."
        + _together_sentence(whole, "")
        + _together_sentence(whole, "warm_")
        + _seg_in_listener_sentence(whole.get("seg_in_listener")),
        "",
    ]


def _together_sentence(whole: dict, prefix: str) -> str:
    """The fresh (`prefix` "") or warm ("warm_") listener's processes at once (absent from runs
    before they were sampled)."""
    if f"{prefix}together_peak_rss_mb" not in whole:
        return ""
    whose = "The warm listener's" if prefix else "The fresh listener's"
    return (
        f" {whose} processes held at most {whole[f'{prefix}together_peak_rss_mb']} MB at once "
        f"({whole[f'{prefix}together_peak_rss_over_voxel_bytes']}×, sampled every 20 ms)."
    )


def _parts(peaks_mb: list[float] | None) -> str:
    """The summed peaks, process by process (absent from runs before they were recorded)."""
    if not peaks_mb or len(peaks_mb) < 2:
        return ""
    children = " + ".join(f"{mb}" for mb in peaks_mb[1:])
    return f": the listener {peaks_mb[0]} MB, its children {children} MB, each at its own peak"


def _seg_in_listener_sentence(lean: dict | None) -> str:
    if not lean:
        return ""
    at_once = (
        f", {lean['together_peak_rss_mb']} MB at once "
        f"({lean['together_peak_rss_over_voxel_bytes']}×)"
        if "together_peak_rss_mb" in lean  # absent from runs before it was sampled
        else ""
    )
    return (
        f" With the SEG written in the listener (`--seg-in-listener`): "
        f"{lean['listener_peak_rss_mb']} MB ({lean['peak_rss_over_voxel_bytes']}×){at_once}, "
        f"first C-STORE to SEG in {lean['seconds_first_store_to_seg']} s."
    )


def markdown(results: dict) -> str:
    """bench.md: the ratios, then each part that finished; failed parts with their reason."""
    lines = [
        "# thighseg benchmark",
        "",
        f"Machine: {results['machine']['platform']}, "
        f"{results['machine']['cpus']} CPUs. GPU: {results['gpu']}",
        "",
        "Measured (UTC; these VMs change hosts between boots, so each part names its CPU): "
        + (
            "; ".join(
                f"{part} {at} on {results.get('measured_on', {}).get(part, 'an unrecorded CPU')}"
                for part, at in results.get("measured_at", {}).items()
            )
            or "n/a"
        )
        + ".",
        "",
        "## Ratios",
        "",
        "| ratio | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in results["ratios"].items()]
    lines.append("")
    if results.get("errors"):
        lines += ["## Parts that failed", ""]
        lines += [f"- {part}: {reason}" for part, reason in results["errors"].items()]
        lines.append("")
    if "perf_analyzer" in results and "baselines_slices_per_second" in results:
        lines += _batching_section(results)
    if "perf_analyzer" in results:
        lines += _perf_section(results["perf_analyzer"])
    if "baselines_slices_per_second" in results:
        lines += _baselines_section(results["baselines_slices_per_second"])
    if "int8" in results:
        lines += _int8_section(results["int8"])
    if "ingest" in results:
        lines += _ingest_section(results["ingest"])
    if results.get("last_store_to_seg"):
        lines += _latency_section(results["last_store_to_seg"])
    if "sustained" in results:
        lines += _sustained_section(results["sustained"])
    if "whole_study" in results:
        lines += _whole_study_section(results["whole_study"], results["config"]["warmup_slices"])
    return "\n".join(lines)


def plot(results: dict, out: Path) -> None:
    """perf_analyzer.png and baselines_ingest.png, from the parts they need that finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if {"perf_analyzer", "baselines_slices_per_second"} <= results.keys():
        _plot_perf(results, out, plt)
    if {"perf_analyzer", "baselines_slices_per_second", "ingest"} <= results.keys():
        _plot_baselines_ingest(results, out, plt)


def _plot_perf(results: dict, out: Path, plt) -> None:  # noqa: ANN001 - matplotlib.pyplot
    served = list(results["baselines_slices_per_second"])
    figure, axes = plt.subplots(len(served), 2, figsize=(11, 3.6 * len(served)), squeeze=False)
    for (throughput, latency), model in zip(axes, served, strict=False):
        for protocol in ("http", "grpc"):
            for batching in (True, False):
                points = sorted(
                    (
                        p
                        for p in results["perf_analyzer"]
                        if p["architecture"] == model
                        and p["protocol"] == protocol
                        and p["dynamic_batching"] == batching
                    ),
                    key=lambda p: p["concurrency"],
                )
                label = f"{protocol}, batching {'on' if batching else 'off'}"
                style = "-" if batching else "--"
                concurrency = [p["concurrency"] for p in points]
                throughput.plot(
                    concurrency, [p["throughput"] for p in points], style, marker="o", label=label
                )
                latency.plot(
                    concurrency, [p["p95_ms"] for p in points], style, marker="o", label=label
                )
        throughput.axhline(
            _ceiling(results["baselines_slices_per_second"][model]),
            color="grey",
            linestyle=":",
            label="ONNX Runtime direct (ceiling)",
        )
        for axis, title, unit in (
            (throughput, "throughput", "slices/s"),
            (latency, "p95 latency", "ms"),
        ):
            axis.set_xscale("log", base=2)
            axis.set_xlabel("concurrency")
            axis.set_ylabel(unit)
            axis.set_title(f"{model}: {title}")
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "perf_analyzer.png", dpi=120)
    plt.close(figure)


def _plot_baselines_ingest(results: dict, out: Path, plt) -> None:  # noqa: ANN001
    figure, (runtimes, ingest) = plt.subplots(1, 2, figsize=(12, 4.5))
    bars = {
        f"{model}: {runtime}": value
        for model, baselines in results["baselines_slices_per_second"].items()
        for runtime, value in baselines.items()
    }
    bars.update(
        {
            f"{model}: triton (best)": _best(results["perf_analyzer"], model, None, True)
            for model in results["baselines_slices_per_second"]
        }
    )
    runtimes.barh(list(bars), list(bars.values()))
    runtimes.tick_params(axis="y", labelsize=7)
    runtimes.set_xlabel("slices/s")
    runtimes.set_title("Same slices, same CPU")
    labels = [f"{r['receiver']}\n{r['associations']} assoc." for r in results["ingest"]]
    ingest.barh(labels, [r["instances_per_second"] for r in results["ingest"]])
    ingest.set_xlabel("instances/s")
    ingest.set_title("C-STORE ingest")
    figure.tight_layout()
    figure.savefig(out / "baselines_ingest.png", dpi=120)
    plt.close(figure)
