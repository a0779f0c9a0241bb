"""What users would run instead of Triton, timed on the same slices: PyTorch eager (FP32 and bf16
autocast) and ONNX Runtime called directly."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

Runner = Callable[[np.ndarray], np.ndarray]


def slices_per_second(
    run: Runner, images: np.ndarray, batch_size: int = 8, warmup_batches: int = 1
) -> float:
    """Throughput over all slices in batches, after warm-up batches (first calls allocate)."""
    for start in range(0, min(len(images), warmup_batches * batch_size), batch_size):
        run(images[start : start + batch_size])
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        run(images[start : start + batch_size])
    return len(images) / (time.perf_counter() - started)


def torch_runner(network, dtype: str = "fp32") -> Runner:
    import torch

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(batch)
            if dtype == "bf16":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return network(x).float().numpy()
            return network(x).numpy()

    return run


def onnxruntime_runner(path) -> Runner:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda batch: session.run(["logits"], {"image": batch})[0]
