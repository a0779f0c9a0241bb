"""Side-by-side comparison of two inference backends on the same phantom slices.

Used for every step of the export chain: torch vs ONNX Runtime FP32, ONNX FP32 vs FP16, and
ONNX Runtime FP32 vs the TensorRT FP16 engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from thighseg.core.labels import normalise_hu
from thighseg.core.resample import labels_on_tiles, stack_context, stacked_tiles
from thighseg.measure.metrics import dice_per_group
from thighseg.synthetic import phantom

# (n, 2·context+1, H, W) float32 -> (n, C, H, W) logits
Backend = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Comparison:
    slices: int
    max_abs_logit_diff: float
    argmax_agreement: float
    dice_reference: dict[str, float] | None = None  # against ground truth, when given
    dice_candidate: dict[str, float] | None = None

    @property
    def max_dice_drop(self) -> float | None:
        if self.dice_reference is None or self.dice_candidate is None:
            return None
        return max(self.dice_reference[g] - self.dice_candidate[g] for g in self.dice_reference)

    def as_dict(self) -> dict:
        return {**asdict(self), "max_dice_drop": self.max_dice_drop}


def phantom_tiles(
    seeds: tuple[int, ...], slices_per_subject: int = 8, size: int = 384, context: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised model tiles (n, 2·context+1, s, s) of phantom series and their true labels."""
    images, truth = [], []
    for seed in seeds:
        study = phantom.generate(seed, size=size, slices=slices_per_subject)
        tiles, windows = stacked_tiles(study.hu, (study.geometry.pixel_spacing,) * 2, context)
        images.append(normalise_hu(tiles))
        truth.append(labels_on_tiles(study.labels, windows))
    return np.concatenate(images).astype(np.float32), np.concatenate(truth)


def compare(
    reference: Backend,
    candidate: Backend,
    images: np.ndarray,
    truth: np.ndarray | None = None,
    batch_size: int = 8,
) -> Comparison:
    """Run both backends batch by batch; compare logits, labels and (optionally) DSC to truth."""
    max_diff, agree, total = 0.0, 0, 0
    labels_reference, labels_candidate = [], []
    for start in range(0, len(images), batch_size):
        batch = np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32)
        expected, actual = reference(batch), candidate(batch)
        if actual.shape != expected.shape:
            raise AssertionError(
                f"candidate output shape {actual.shape} != reference {expected.shape}"
            )
        max_diff = max(max_diff, float(np.abs(actual.astype(np.float32) - expected).max()))
        labels_reference.append(expected.argmax(1).astype(np.uint8))
        labels_candidate.append(actual.argmax(1).astype(np.uint8))
        agree += int((labels_reference[-1] == labels_candidate[-1]).sum())
        total += labels_reference[-1].size
    dice_reference = dice_candidate = None
    if truth is not None:
        dice_reference = dice_per_group(np.concatenate(labels_reference), truth)
        dice_candidate = dice_per_group(np.concatenate(labels_candidate), truth)
    return Comparison(len(images), max_diff, agree / total, dice_reference, dice_candidate)


def onnx_channels(path) -> int:
    """Input channels of an exported model (its input's channel axis)."""
    import onnx

    image = onnx.load(str(path), load_external_data=False).graph.input[0]
    return image.type.tensor_type.shape.dim[1].dim_value


def onnx_context(path) -> int:
    """Neighbour slices on either side an exported model takes."""
    return stack_context(onnx_channels(path))


def onnx_backend(path) -> Backend:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda batch: session.run(["logits"], {"image": batch})[0]


def torch_backend(network) -> Backend:
    import torch

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return network(torch.from_numpy(batch)).numpy()

    return run
