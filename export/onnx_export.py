"""Export a trained network to ONNX with a dynamic batch axis and measure parity with torch."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from thighseg import models
from thighseg.labels import NUM_CLASSES
from thighseg.resample import MODEL_INPUT_SIZE

OPSET = 17


@dataclass(frozen=True)
class Parity:
    """Agreement of ONNX Runtime with torch on the same inputs."""

    slices: int
    max_abs_logit_diff: float
    argmax_agreement: float

    def as_dict(self) -> dict:
        return asdict(self)


def export_onnx(network, path: Path, size: int = MODEL_INPUT_SIZE) -> Path:
    """Legacy (TorchScript) exporter: one self-contained file, opset 17, dynamic batch."""
    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, 1, size, size)
    with torch.no_grad():
        torch.onnx.export(network.eval(), (example,), str(path), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=OPSET,
                          do_constant_folding=True, dynamo=False)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def measure_parity(network, onnx_path: Path, images: np.ndarray, batch_size: int = 8) -> Parity:
    """Run torch and ONNX Runtime on normalised slices (n, 1, H, W); compare logits and labels."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    max_diff, agree, total = 0.0, 0, 0
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].astype(np.float32)
        with torch.no_grad():
            expected = network(torch.from_numpy(batch)).numpy()
        actual = session.run(["logits"], {"image": batch})[0]
        if actual.shape != expected.shape or actual.shape[1] != NUM_CLASSES:
            raise AssertionError(f"ONNX output shape {actual.shape} != torch {expected.shape}")
        max_diff = max(max_diff, float(np.abs(actual - expected).max()))
        agree += int((actual.argmax(1) == expected.argmax(1)).sum())
        total += expected.shape[0] * expected.shape[2] * expected.shape[3]
    return Parity(slices=len(images), max_abs_logit_diff=max_diff, argmax_agreement=agree / total)


def export_to_repository(model: str, repository: Path, weights: Path | None = None) -> Path:
    """Write <repository>/thighseg_<model>/1/model.onnx next to its version-controlled config."""
    model_dir = repository / models.triton_name(model)
    if not (model_dir / "config.pbtxt").exists():
        raise FileNotFoundError(f"{model_dir}/config.pbtxt is missing; the repository has no entry for {model!r}")
    return export_onnx(models.load_trained(model, weights), model_dir / "1" / "model.onnx")
