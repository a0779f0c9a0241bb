"""The export chain for one model: torch -> ONNX FP32 -> ONNX FP16 -> TensorRT FP16, and
ONNX FP32 -> ONNX INT8 (QDQ, calibrated on phantom slices) -> TensorRT INT8; each step validated
against the previous one on phantom slices with ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from thighseg.core.resample import stack_context
from thighseg.export.fp16 import convert_to_fp16
from thighseg.export.onnx_export import export_to_repository, measure_parity
from thighseg.export.validation import compare, onnx_backend, phantom_tiles
from thighseg.learning import models

FORMATS = ("onnx", "fp16", "tensorrt", "int8", "tensorrt-int8")
VALIDATION_SEEDS = (7001, 7002)  # outside the training seeds


def export_model(
    model: str,
    repository: Path,
    fmt: str = "onnx",
    weights: Path | None = None,
    timing_cache: Path | None = None,
    slices_per_subject: int = 8,
    version: int = 1,
) -> dict:
    """Write the requested format (and the ones it is built from) into version `version` of the
    repository entry; report parity."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt.startswith("tensorrt"):
        from thighseg.export.tensorrt_engine import require_gpu_tensorrt

        require_gpu_tensorrt()
    onnx_fp32 = export_to_repository(model, repository, weights, version)
    network = models.load_trained(model, weights)
    context = models.context_of(network)
    images, truth = phantom_tiles(VALIDATION_SEEDS, slices_per_subject, context=context)
    report: dict = {
        "model": model,
        "version": version,
        "onnx": str(onnx_fp32),
        "torch_vs_onnx": measure_parity(network, onnx_fp32, images, truth).as_dict(),
    }
    if fmt == "onnx":
        return report
    if fmt in ("int8", "tensorrt-int8"):
        timing = timing_cache or repository / ".tensorrt_timing.cache"
        return report | _export_int8(onnx_fp32, images, truth, fmt, timing)
    onnx_fp16 = convert_to_fp16(onnx_fp32, onnx_fp32.with_name("model_fp16.onnx"))
    report["onnx_fp16"] = str(onnx_fp16)
    report["onnx_vs_onnx_fp16"] = compare(
        onnx_backend(onnx_fp32), onnx_backend(onnx_fp16), images, truth
    ).as_dict()
    if fmt == "tensorrt":
        from thighseg.export.tensorrt_engine import EngineRunner, build_engine

        plan = onnx_fp32.with_name("model.plan")
        info = build_engine(onnx_fp16, plan, timing_cache or repository / ".tensorrt_timing.cache")
        report["plan"], report["build_info"] = str(plan), info.__dict__
        report["onnx_vs_tensorrt"] = compare(
            onnx_backend(onnx_fp32), EngineRunner(plan), images, truth
        ).as_dict()
    return report


def _export_int8(
    onnx_fp32: Path, images: np.ndarray, truth: np.ndarray, fmt: str, timing_cache: Path
) -> dict:
    """INT8 QDQ models from one calibration; the CPU choice recorded; the TensorRT INT8 engine
    (explicit quantisation from the symmetric QDQ model) on a GPU."""
    import os

    from thighseg.export.int8 import calibration_images, choose_cpu_model, quantise

    paths = quantise(onnx_fp32, calibration_images(stack_context(images.shape[1])))
    report: dict = {name: str(path) for name, path in paths.items()}
    report["cpu_choice"] = choose_cpu_model(
        onnx_fp32, paths["cpu"], images, truth, threads=len(os.sched_getaffinity(0))
    )
    if fmt == "tensorrt-int8":
        from thighseg.export.tensorrt_engine import EngineRunner, build_engine

        plan = onnx_fp32.with_name("model_int8.plan")
        info = build_engine(paths["tensorrt"], plan, timing_cache)
        report["plan_int8"], report["build_info_int8"] = str(plan), info.__dict__
        report["onnx_vs_tensorrt_int8"] = compare(
            onnx_backend(onnx_fp32), EngineRunner(plan), images, truth
        ).as_dict()
    return report
