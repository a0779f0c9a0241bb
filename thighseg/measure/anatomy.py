"""What the indices split and enclose, slice by slice: the body midline between the thighs, bone
(cortex and the marrow it encloses) and each leg's deep-fascia envelope. Definitions in
`thighseg.measure.indices`."""

from __future__ import annotations

from collections.abc import Mapping

import edt
import numpy as np
from scipy import ndimage

FASCIA_CLOSING_MM = 6.0
CORTEX_HU = 300.0
BODY_HU = (-300, 3000)  # soft tissue and bone: what the midline profile counts
LEGS = ("right", "left")


def body_columns(hu: np.ndarray) -> np.ndarray:
    """Body voxels (soft tissue and bone) per column of a (z, y, x) stack or (y, x) slice: summed
    over slices, the profile `midline_of` reads."""
    body = (hu > BODY_HU[0]) & (hu < BODY_HU[1])
    return body.reshape(-1, hu.shape[-1]).sum(axis=0)


def midline_of(profile: np.ndarray) -> float:
    """Column of the gap between the thighs: the narrowest column of the body profile in the
    middle half of its width (see `thighseg.measure.indices`)."""
    if profile.max() == 0:
        return len(profile) / 2
    columns = np.nonzero(profile > 0.05 * profile.max())[0]
    low, high = int(columns[0]), int(columns[-1])
    quarter = (high - low) // 4
    smooth = np.convolve(profile, np.ones(5) / 5, mode="same")
    return float(low + quarter + np.argmin(smooth[low + quarter : high - quarter + 1]))


def body_midline(hu: np.ndarray, profiles: Mapping[int, np.ndarray] | None = None) -> float:
    """Column of the gap between the thighs in a (z, y, x) volume, read slice by slice (bounded
    memory); `profiles`: slices' `body_columns` already counted (streamed), by slice index."""
    profiles = profiles or {}
    profile = np.zeros(hu.shape[2], dtype=np.int64)
    for z in range(hu.shape[0]):
        profile += profiles[z] if z in profiles else body_columns(hu[z])
    return midline_of(profile)


def leg_masks(hu: np.ndarray) -> dict[str, np.ndarray]:
    """Column masks (broadcastable to the volume) for the patient's right and left leg."""
    midline = body_midline(hu)
    index = np.arange(hu.shape[2])[None, None, :]
    return {"right": index < midline, "left": index >= midline}


# 4-connected within a slice, never across slices: what binary_fill_holes uses for one slice
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def fill_holes_per_slice(masks: np.ndarray) -> np.ndarray:
    """`binary_fill_holes` of each (y, x) slice of a (z, y, x) stack, in one labelling pass: a
    hole is a background component that touches no edge of its slice. (Filling by propagation
    from the border, as scipy does, costs an iteration per pixel of the widest region.)"""
    background, count = ndimage.label(~masks, structure=_IN_PLANE)
    open_to_edge = np.zeros(count + 1, dtype=bool)
    for edge in (
        background[:, 0, :],
        background[:, -1, :],
        background[:, :, 0],
        background[:, :, -1],
    ):
        open_to_edge[edge.ravel()] = True
    open_to_edge[0] = True  # label 0 is the mask itself
    return masks | ~open_to_edge[background]


def bone_mask(hu: np.ndarray) -> np.ndarray:
    """Cortex and the marrow it encloses, slice by slice. Filled within the cortex's bounding box
    (plus a pixel): background outside that box always reaches the image edge, so the result is
    the same as filling whole slices, at a fraction of the cost."""
    cortex = hu > CORTEX_HU
    rows, columns = np.nonzero(cortex.any(axis=(0, 2)))[0], np.nonzero(cortex.any(axis=(0, 1)))[0]
    if rows.size == 0:
        return cortex
    box = (
        slice(None),
        slice(max(0, rows[0] - 1), rows[-1] + 2),
        slice(max(0, columns[0] - 1), columns[-1] + 2),
    )
    cortex[box] = fill_holes_per_slice(cortex[box])
    return cortex


def fascia_envelope(group_mask: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Approximate deep-fascia envelope of one leg from its group mask (see module docstring)."""
    radius = max(1, int(round(FASCIA_CLOSING_MM / pixel_mm)))
    envelope = np.zeros_like(group_mask)
    for z, mask in enumerate(group_mask):
        if not mask.any():
            continue
        # closing with a Euclidean disc through distance transforms: linear in the slice size,
        # whatever the radius (a structuring element of radius r costs r² per pixel)
        rows, columns = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        # work on the leg only
        box = (
            slice(rows[0], rows[-1] + 1),
            slice(columns[0], columns[-1] + 1),
        )
        padded = np.pad(mask[box], radius + 1)
        # edt (exact, as scipy's; ~3x faster): distances to the nearest zero inside the array
        dilated = edt.edt(~padded, black_border=False) <= radius
        closed = edt.edt(dilated, black_border=False) > radius
        envelope[z][box] = fill_holes_per_slice(
            closed[None, radius + 1 : -radius - 1, radius + 1 : -radius - 1]
        )[0]
    return envelope
