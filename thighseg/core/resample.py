"""Moving slices between their acquired matrix and the model's input tile.

The served models take square tiles of `MODEL_INPUT_SIZE` pixels at a fixed physical pixel size,
`MODEL_PIXEL_MM` (the median pixel size of the training slices, nnU-Net's rule), centred on the
body: the same thigh then looks the same to the model whatever field of view it was scanned with.
A body wider than the tile is shrunk to fit rather than cut. Logits (not labels) are resampled
back, so boundaries stay smooth. Training and INT8 calibration frame their slices the same way
(the randomised generator renders on a grid of its own random scale: scale augmentation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

MODEL_INPUT_SIZE = 256
MODEL_PIXEL_MM = 1.55
BODY_HU = -500.0  # above: skin, fat, muscle, bone; below: air and the couch's foam
AIR_HU = -1000.0
_TABLE_OPENING_MM = 4.0  # removes the couch's thin shell (and wires, sheets) from the body mask
_MASK_PIXEL_MM = 2.0
_MARGIN = 1.08  # tile side / body extent when the body is wider than the tile


@dataclass(frozen=True)
class TileWindow:
    """Where the model tile lies on the acquired matrix, in acquired pixels (rows, columns):
    the outer edge of its first pixel, and the length of one tile pixel."""

    origin: tuple[float, float]
    step: tuple[float, float]


def body_window(
    hu: np.ndarray,
    pixel_mm: tuple[float, float],
    size: int = MODEL_INPUT_SIZE,
    target_mm: float = MODEL_PIXEL_MM,
) -> TileWindow:
    """A square tile of `size` pixels of `target_mm` centred on the body of a (H, W) HU slice
    (on the slice centre when there is none), widened to the body's extent if it does not fit."""
    rows, cols = hu.shape
    every = max(1, int(_MASK_PIXEL_MM / min(pixel_mm)))  # the mask at ~2 mm is enough to frame
    radius = max(1, round(_TABLE_OPENING_MM / (min(pixel_mm) * every)))
    disk = np.hypot(*np.ogrid[-radius : radius + 1, -radius : radius + 1]) <= radius
    body = ndimage.binary_opening(hu[::every, ::every] > BODY_HU, structure=disk)
    side_mm = size * target_mm
    if body.any():
        r = np.flatnonzero(body.any(axis=1)) * every
        c = np.flatnonzero(body.any(axis=0)) * every
        centre = ((r[0] + r[-1] + every) / 2, (c[0] + c[-1] + every) / 2)
        extent_mm = max((r[-1] + every - r[0]) * pixel_mm[0], (c[-1] + every - c[0]) * pixel_mm[1])
        side_mm = max(side_mm, extent_mm * _MARGIN)
    else:
        centre = (rows / 2, cols / 2)
    step = (side_mm / size / pixel_mm[0], side_mm / size / pixel_mm[1])
    origin = (centre[0] - step[0] * size / 2, centre[1] - step[1] * size / 2)
    return TileWindow(origin, step)


def to_tile(hu: np.ndarray, window: TileWindow, size: int = MODEL_INPUT_SIZE) -> np.ndarray:
    """(H, W) HU -> (size, size) HU on the tile, linear interpolation, air outside the slice."""
    return _onto_tile(hu.astype(np.float32, copy=False), window, size, order=1, outside=AIR_HU)


def _onto_tile(
    image: np.ndarray, window: TileWindow, size: int, order: int, outside: float
) -> np.ndarray:
    """One (H, W) image sampled on the tile's pixel centres; `outside` beyond the slice."""
    return ndimage.affine_transform(
        image,
        np.asarray(window.step),
        offset=_offset(window),
        output_shape=(size, size),
        order=order,
        mode="constant",
        cval=outside,
    )


def _offset(window: TileWindow) -> list[float]:
    """affine_transform's offset: tile pixel centres in acquired pixel-centre coordinates."""
    return [o + s / 2 - 0.5 for o, s in zip(window.origin, window.step, strict=True)]


def _linear_taps(
    count: int, step: float, origin: float, size: int
) -> tuple[slice, np.ndarray, np.ndarray, np.ndarray]:
    """For the acquired pixels 0..count-1 along one axis: the run of them inside the tile, and for
    each the two tile pixels it lies between and the weight of the second (edges clamped, as
    ndimage's mode="nearest")."""
    position = (np.arange(count) + 0.5 - origin) / step - 0.5
    inside = np.flatnonzero((position >= -0.5) & (position <= size - 0.5))
    if inside.size == 0:
        nowhere = np.empty(0, dtype=np.intp)
        return slice(0, 0), nowhere, nowhere, np.empty(0)
    position = position[inside]
    low = np.floor(position)
    weight = position - low
    low = low.astype(np.intp)
    run = slice(int(inside[0]), int(inside[-1]) + 1)
    return run, np.clip(low, 0, size - 1), np.clip(low + 1, 0, size - 1), weight


def tile_logits_to_labels(
    logits: np.ndarray, window: TileWindow, shape: tuple[int, int]
) -> np.ndarray:
    """(C, s, s) logits of a tile -> (H, W) uint8 labels on the acquired matrix: the argmax of the
    bilinearly interpolated logits, background outside the tile.

    Interpolating every channel over the whole matrix cost as much as the model itself. A pixel
    whose four surrounding tile pixels share a winner keeps it (a convex combination of logits
    cannot change it), so only pixels between tile pixels that disagree — boundaries, about 2 % —
    are interpolated, in double precision as ndimage does.
    """
    labels = np.zeros(shape, dtype=np.uint8)
    rows, r0, r1, wy = _linear_taps(shape[0], window.step[0], window.origin[0], logits.shape[1])
    columns, c0, c1, wx = _linear_taps(shape[1], window.step[1], window.origin[1], logits.shape[2])
    if r0.size == 0 or c0.size == 0:
        return labels
    winner = np.argmax(logits, axis=0).astype(np.uint8)
    top, bottom = winner[r0], winner[r1]
    corners = (top[:, c0], top[:, c1], bottom[:, c0], bottom[:, c1])
    result = corners[0]
    disputed = np.nonzero(
        (corners[0] != corners[1]) | (corners[0] != corners[2]) | (corners[0] != corners[3])
    )
    if disputed[0].size:
        y0, y1, x0, x1 = r0[disputed[0]], r1[disputed[0]], c0[disputed[1]], c1[disputed[1]]
        v, u = wy[disputed[0]], wx[disputed[1]]
        values = (logits[:, y0, x0] * (1 - u) + logits[:, y0, x1] * u) * (1 - v) + (
            logits[:, y1, x0] * (1 - u) + logits[:, y1, x1] * u
        ) * v
        result[disputed] = np.argmax(values, axis=0)
    labels[rows, columns] = result
    return labels


def tiles_of(
    slices: np.ndarray, pixel_mm: tuple[float, float], size: int = MODEL_INPUT_SIZE
) -> tuple[np.ndarray, list[TileWindow]]:
    """(n, H, W) HU -> (n, size, size) HU tiles, and where each lies on its slice."""
    windows = [body_window(s, pixel_mm, size) for s in slices]
    tiles = np.stack([to_tile(s, w, size) for s, w in zip(slices, windows, strict=True)])
    return tiles, windows


def stack_channels(context: int) -> int:
    """Input channels of a model that takes each slice with `context` neighbours on either side."""
    return 2 * context + 1


def stack_context(channels: int) -> int:
    """Neighbours on either side of a model that takes `channels` input channels (1: 2D)."""
    return (channels - 1) // 2


def stacked_tiles(
    slices: Sequence[np.ndarray] | np.ndarray,
    pixel_mm: tuple[float, float],
    context: int = 0,
    size: int = MODEL_INPUT_SIZE,
    centres: Sequence[int] | None = None,
) -> tuple[np.ndarray, list[TileWindow]]:
    """(n, 2·context+1, size, size) HU tiles: each centre slice of the ordered stack `slices`
    with its `context` neighbours on either side (2.5D input), all on the centre's window; a
    neighbour beyond the stack repeats the end slice. With context 0 this is `tiles_of` with a
    channel axis."""
    centres = range(len(slices)) if centres is None else centres
    last = len(slices) - 1
    stacks, windows = [], []
    for centre in centres:
        window = body_window(np.asarray(slices[centre]), pixel_mm, size)
        neighbours = [min(max(centre + d, 0), last) for d in range(-context, context + 1)]
        stacks.append(np.stack([to_tile(np.asarray(slices[k]), window, size) for k in neighbours]))
        windows.append(window)
    return np.stack(stacks), windows


def labels_on_tiles(
    labels: np.ndarray, windows: list[TileWindow], size: int = MODEL_INPUT_SIZE
) -> np.ndarray:
    """(n, H, W) uint8 labels -> (n, size, size) on the tiles of their slices, nearest
    neighbour, background outside the slice (training targets)."""
    return np.stack(
        [
            _onto_tile(slice_labels, window, size, order=0, outside=0)
            for slice_labels, window in zip(labels, windows, strict=True)
        ]
    )
