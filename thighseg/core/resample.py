"""Moving slices between their acquired matrix and the model's fixed input grid.

The served models take square slices of `MODEL_INPUT_SIZE` pixels covering the whole field of
view: muscle groups are large structures, and a fixed grid keeps Triton batching and TensorRT
profiles simple. Logits (not labels) are resampled back, so boundaries stay smooth.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MODEL_INPUT_SIZE = 256


def to_model_grid(slices: np.ndarray, size: int = MODEL_INPUT_SIZE) -> np.ndarray:
    """(n, H, W) -> (n, size, size), linear interpolation on pixel areas."""
    n, height, width = slices.shape
    if (height, width) == (size, size):
        return slices.astype(np.float32, copy=False)
    zoom = (1.0, size / height, size / width)
    return ndimage.zoom(
        slices.astype(np.float32, copy=False), zoom, order=1, grid_mode=True, mode="nearest"
    )


def labels_to_model_grid(labels: np.ndarray, size: int = MODEL_INPUT_SIZE) -> np.ndarray:
    """(n, H, W) uint8 labels -> (n, size, size), nearest neighbour (for training targets)."""
    n, height, width = labels.shape
    if (height, width) == (size, size):
        return labels
    zoom = (1.0, size / height, size / width)
    return ndimage.zoom(labels, zoom, order=0, grid_mode=True, mode="nearest")


def logits_to_labels(logits: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(n, C, h, w) logits -> (n, H, W) uint8 labels on the acquired matrix, one slice at a time
    (full-resolution logits of a whole batch would be 16 bytes per voxel)."""
    n, channels, height, width = logits.shape
    labels = np.empty((n, *shape), dtype=np.uint8)
    zoom = (1.0, shape[0] / height, shape[1] / width)
    for k in range(n):
        upsampled = (
            logits[k]
            if (height, width) == tuple(shape)
            else ndimage.zoom(
                logits[k].astype(np.float32, copy=False),
                zoom,
                order=1,
                grid_mode=True,
                mode="nearest",
            )
        )
        labels[k] = np.argmax(upsampled, axis=0)
    return labels
