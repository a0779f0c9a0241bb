"""Inference in this process, without a server: `thighseg segment --device cpu|gpu` predicts in one
local command, as TotalSegmentator and nnU-Net do, on the same exported ONNX model Triton serves."""

from __future__ import annotations

import json
from pathlib import Path

from thighseg.core.resample import MODEL_INPUT_SIZE, stack_context
from thighseg.learning import models
from thighseg.pipeline.stages import InferenceSettings

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def providers_for(device: str) -> list[str]:
    """ONNX Runtime execution providers for a device, or a clear error when it has none here."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = [p for p in GPU_PROVIDERS if p in ort.get_available_providers()]
    if not available:
        raise RuntimeError(
            "no GPU execution provider in this onnxruntime (install onnxruntime-gpu on a machine "
            "with CUDA), or use --device cpu"
        )
    return [*available, "CPUExecutionProvider"]


def local_settings(model: str, device: str, repository: Path) -> InferenceSettings:
    """The newest exported version of `model` (exported from the shipped weights if none is)."""
    import onnxruntime as ort

    from thighseg.apps.demo import ensure_exported
    from thighseg.export.onnx_export import exported_versions

    model_dir = repository / models.triton_name(model)
    ensure_exported(model, repository)  # version 1: the shipped weights, current
    onnx_path = model_dir / str(exported_versions(model_dir)[-1]) / "model.onnx"
    record = onnx_path.with_name("weights.json")
    weights_sha256 = json.loads(record.read_text())["sha256"] if record.exists() else None
    session = ort.InferenceSession(str(onnx_path), providers=providers_for(device))
    return InferenceSettings(
        lambda batch: session.run(["logits"], {"image": batch})[0],
        model,
        MODEL_INPUT_SIZE,
        context=stack_context(session.get_inputs()[0].shape[1]),
        concurrency=1,  # ONNX Runtime already uses every core for one batch
        model_version=onnx_path.parent.name,
        weights_sha256=weights_sha256,
    )
