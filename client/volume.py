"""Segment a whole CT volume: slices to the model tile, batches in flight together, labels back."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from thighseg.core.labels import normalise_hu
from thighseg.core.resample import tile_logits_to_labels, tiles_of

InferFn = Callable[[np.ndarray], np.ndarray]


def segment_volume(
    hu: np.ndarray,
    infer: InferFn,
    input_size: int,
    pixel_mm: tuple[float, float],
    batch_size: int = 8,
    concurrency: int = 4,
) -> np.ndarray:
    """(z, y, x) HU with (row, column) pixel size in mm -> (z, y, x) uint8 labels; `infer` maps
    (n, 1, s, s) inputs to (n, C, s, s) logits.

    Batches are prepared and resampled inside the worker, so at most `concurrency` batches of
    logits exist at once, whatever the number of slices.
    """
    if hu.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {hu.shape}")
    labels = np.empty(hu.shape, dtype=np.uint8)

    def run(start: int) -> None:
        chunk = np.asarray(hu[start : start + batch_size])
        tiles, windows = tiles_of(chunk, pixel_mm, input_size)
        logits = infer(normalise_hu(tiles)[:, None])
        for k, window in enumerate(windows):
            labels[start + k] = tile_logits_to_labels(logits[k], window, chunk.shape[1:])

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        list(pool.map(run, range(0, hu.shape[0], batch_size)))  # list() re-raises worker errors
    return labels


def flip_averaged(infer: InferFn) -> InferFn:
    """Test-time augmentation: the mean of the logits of each slice and of its left-right mirror
    (the groups have no side, so the mirror's labels map back by flipping)."""

    def run(images: np.ndarray) -> np.ndarray:
        mirrored = infer(np.ascontiguousarray(images[..., ::-1]))[..., ::-1]
        return (infer(images) + mirrored) / 2

    return run
