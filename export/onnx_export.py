"""Export a trained network to ONNX with a dynamic batch axis and measure parity with torch."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from thighseg.core.resample import MODEL_INPUT_SIZE
from thighseg.export.validation import Comparison, compare, onnx_backend, torch_backend
from thighseg.learning import models

OPSET = 17


def export_onnx(network, path: Path, size: int = MODEL_INPUT_SIZE) -> Path:
    """Legacy (TorchScript) exporter: one self-contained file, opset 17, dynamic batch."""
    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 1, size, size)
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (one self-contained file, opset 17); its
        # deprecation
        # and tracer notices about a shape check in smp's decoder are expected.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            network.eval(),
            (example,),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def measure_parity(
    network, onnx_path: Path, images: np.ndarray, truth: np.ndarray | None = None
) -> Comparison:
    """torch vs ONNX Runtime (FP32) on normalised slices (n, 1, H, W)."""
    return compare(torch_backend(network), onnx_backend(onnx_path), images, truth)


def export_to_repository(model: str, repository: Path, weights: Path | None = None) -> Path:
    """Write <repository>/thighseg_<model>/1/model.onnx next to its version-controlled config."""
    model_dir = repository / models.triton_name(model)
    if not (model_dir / "configs" / "cpu.pbtxt").exists():
        raise FileNotFoundError(
            f"{model_dir}/configs/cpu.pbtxt is missing; the repository has no entry for {model!r}"
        )
    return export_onnx(models.load_trained(model, weights), model_dir / "1" / "model.onnx")
