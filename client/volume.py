"""Segment a whole CT volume: slices to the model tile, batches in flight together, labels back."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from thighseg.core.labels import normalise_hu
from thighseg.core.resample import stacked_tiles, tile_logits_to_labels

InferFn = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Backend:
    """A model to run on slices: its batch function and the input it takes, so that a 2.5D model
    can never be handed single slices (`context`: neighbour slices on either side; 0 is 2D)."""

    infer: InferFn
    context: int = 0


def segment_volume(
    hu: np.ndarray,
    infer: InferFn,
    input_size: int,
    pixel_mm: tuple[float, float],
    batch_size: int = 8,
    concurrency: int = 4,
    context: int = 0,
) -> np.ndarray:
    """(z, y, x) HU with (row, column) pixel size in mm -> (z, y, x) uint8 labels; `infer` maps
    (n, 2·context+1, s, s) inputs (each slice with its `context` neighbours on either side, in
    the volume's order) to (n, C, s, s) logits."""
    if hu.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {hu.shape}")
    labels = np.empty(hu.shape, dtype=np.uint8)
    segment_slices(
        hu,
        range(hu.shape[0]),
        labels,
        infer,
        input_size,
        pixel_mm,
        batch_size,
        concurrency,
        context,
    )
    return labels


def segment_slices(
    hu: np.ndarray,
    indices: Sequence[int],
    labels: np.ndarray,
    infer: InferFn,
    input_size: int,
    pixel_mm: tuple[float, float],
    batch_size: int = 8,
    concurrency: int = 4,
    context: int = 0,
) -> None:
    """`labels[k]` for the slices `indices` of the volume `hu` (their neighbours come from it).

    Batches are prepared and resampled inside the worker, so at most `concurrency` batches of
    logits exist at once, whatever the number of slices.
    """

    def run(start: int) -> None:
        centres = indices[start : start + batch_size]
        tiles, windows = stacked_tiles(hu, pixel_mm, context, input_size, centres)
        logits = infer(normalise_hu(tiles))
        for k, (centre, window) in enumerate(zip(centres, windows, strict=True)):
            labels[centre] = tile_logits_to_labels(logits[k], window, hu.shape[1:])

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        list(pool.map(run, range(0, len(indices), batch_size)))  # list() re-raises worker errors


def flip_averaged(infer: InferFn) -> InferFn:
    """Test-time augmentation: the mean of the logits of each slice and of its left-right mirror
    (the groups have no side, so the mirror's labels map back by flipping)."""

    def run(images: np.ndarray) -> np.ndarray:
        mirrored = infer(np.ascontiguousarray(images[..., ::-1]))[..., ::-1]
        return (infer(images) + mirrored) / 2

    return run
