"""Volume indices of thigh muscle, per group and per leg (definitions in ../shared/DESIGN.md).

- total muscle volume: every voxel labelled with a group;
- lean muscle volume: group voxels inside the skeletal-muscle window (-29..+150 HU);
- intramuscular fat (IMAT): group voxels inside the adipose window (-190..-30 HU);
- low-density muscle: group voxels from -29 to +29 HU (Aubrey et al. 2014; Goodpaster et al. 2000);
- mean and SD of HU over the lean-muscle voxels (muscle density, "myosteatosis");
- fractions: IMAT / total muscle, intermuscular fat / (total muscle + intermuscular fat);
- left/right asymmetry: 100 × |R − L| / mean(R, L) of total muscle volume, per group and overall;
- muscle volume index: total muscle volume / height² (mL/m²) when PatientSize (m) is known, by analogy
  with the skeletal muscle index of CT body composition;
- intermuscular fat: adipose-window voxels between the groups inside the deep fascia. The fascia
  envelope of each leg is approximated per slice from the group masks: their union is closed with a
  disc of FASCIA_CLOSING_MM (bridging the fat septa between muscles) and its holes are filled; bone
  (cortex above 300 HU and what it encloses: marrow is fat-dense) is excluded.
Legs are split at the body midline: the narrowest column of the body (soft tissue and bone) in the
middle half of its width, i.e. the gap between the thighs; it does not move when one leg's muscle is
smaller or missing. Patient left is +x in LPS, i.e. higher columns for an axial image in standard
orientation.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from thighseg.labels import ADIPOSE_HU, MUSCLE_GROUPS, MUSCLE_HU

FASCIA_CLOSING_MM = 6.0
LOW_DENSITY_HU = (-29.0, 29.0)
CORTEX_HU = 300.0
LEGS = ("right", "left")


def body_midline(hu: np.ndarray) -> float:
    """Column of the gap between the thighs (see module docstring)."""
    profile = np.zeros(hu.shape[2])
    for start in range(0, hu.shape[0], CHUNK_SLICES):  # slab by slab: bounded memory
        slab = hu[start:start + CHUNK_SLICES]
        profile += ((slab > -300) & (slab < 3000)).sum(axis=(0, 1))
    if profile.max() == 0:
        return hu.shape[2] / 2
    columns = np.nonzero(profile > 0.05 * profile.max())[0]
    low, high = int(columns[0]), int(columns[-1])
    quarter = (high - low) // 4
    smooth = np.convolve(profile, np.ones(5) / 5, mode="same")
    return float(low + quarter + np.argmin(smooth[low + quarter:high - quarter + 1]))


def leg_masks(hu: np.ndarray) -> dict[str, np.ndarray]:
    """Column masks (broadcastable to the volume) for the patient's right and left leg."""
    midline = body_midline(hu)
    index = np.arange(hu.shape[2])[None, None, :]
    return {"right": index < midline, "left": index >= midline}


def bone_mask(hu: np.ndarray) -> np.ndarray:
    """Cortex and the marrow it encloses, slice by slice."""
    cortex = hu > CORTEX_HU
    return np.stack([ndimage.binary_fill_holes(s) for s in cortex])


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
        box = (slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1))  # work on the leg only
        padded = np.pad(mask[box], radius + 1)
        dilated = ndimage.distance_transform_edt(~padded) <= radius
        closed = ndimage.distance_transform_edt(dilated) > radius
        envelope[z][box] = ndimage.binary_fill_holes(closed[radius + 1:-radius - 1, radius + 1:-radius - 1])
    return envelope


CHUNK_SLICES = 16  # indices are accumulated over slabs: memory stays bounded whatever the study size
_STATS = ("total", "lean", "imat", "low_density", "hu_sum", "hu_sq")


def _accumulate(stats: dict, hu: np.ndarray, mask: np.ndarray, lean: np.ndarray, adipose: np.ndarray,
                low_density: np.ndarray) -> None:
    lean_hu = hu[mask & lean].astype(np.float64)
    for key, value in (("total", mask.sum()), ("lean", lean_hu.size), ("imat", (mask & adipose).sum()),
                       ("low_density", (mask & low_density).sum()), ("hu_sum", lean_hu.sum()),
                       ("hu_sq", np.square(lean_hu).sum())):
        stats[key] = stats.get(key, 0) + value


def _finish(stats: dict, voxel_ml: float) -> dict:
    n = stats.get("lean", 0)
    mean = stats["hu_sum"] / n if n else float("nan")
    sd = float(np.sqrt(max(0.0, stats["hu_sq"] / n - mean * mean))) if n else float("nan")
    return {"total_ml": stats["total"] * voxel_ml, "lean_ml": stats["lean"] * voxel_ml,
            "imat_ml": stats["imat"] * voxel_ml, "low_density_ml": stats["low_density"] * voxel_ml,
            "mean_hu": mean, "sd_hu": sd}


def volume_indices(hu: np.ndarray, labels: np.ndarray, spacing_zyx: tuple[float, float, float],
                   height_m: float | None = None) -> dict:
    """{leg: {group: {...}, muscle: {...}, intermuscular_fat_ml}, total: {...}, asymmetry_percent: {...}}
    in mL, HU and %."""
    voxel_ml = float(np.prod(spacing_zyx)) / 1000
    names = [g.name.lower() for g in MUSCLE_GROUPS] + ["muscle"]
    stats = {(leg, name): {} for leg in (*LEGS, "total") for name in names}
    intermuscular = {leg: 0 for leg in LEGS}
    legs = leg_masks(hu)
    for start in range(0, hu.shape[0], CHUNK_SLICES):
        h, lab = hu[start:start + CHUNK_SLICES], labels[start:start + CHUNK_SLICES]
        lean = (h >= MUSCLE_HU[0]) & (h <= MUSCLE_HU[1])
        adipose = (h >= ADIPOSE_HU[0]) & (h <= ADIPOSE_HU[1])
        low_density = (h >= LOW_DENSITY_HU[0]) & (h <= LOW_DENSITY_HU[1])
        bone = bone_mask(h)
        for leg, columns in legs.items():
            in_leg = np.broadcast_to(columns, lab.shape)
            muscle = (lab > 0) & in_leg
            for group in MUSCLE_GROUPS:
                _accumulate(stats[(leg, group.name.lower())], h, (lab == group) & in_leg, lean, adipose, low_density)
            _accumulate(stats[(leg, "muscle")], h, muscle, lean, adipose, low_density)
            envelope = fascia_envelope(muscle, spacing_zyx[1]) & in_leg
            intermuscular[leg] += int((envelope & ~muscle & ~bone & adipose).sum())
    for name in names:
        stats[("total", name)] = {k: sum(stats[(leg, name)].get(k, 0) for leg in LEGS) for k in _STATS}
    result: dict = {leg: {name: _finish(stats[(leg, name)], voxel_ml) for name in names} for leg in (*LEGS, "total")}
    for leg in LEGS:
        result[leg]["intermuscular_fat_ml"] = intermuscular[leg] * voxel_ml
    total = result["total"]
    total["intermuscular_fat_ml"] = sum(intermuscular.values()) * voxel_ml
    total["imat_fraction"] = total["muscle"]["imat_ml"] / total["muscle"]["total_ml"] if total["muscle"]["total_ml"] else 0.0
    envelope_ml = total["muscle"]["total_ml"] + total["intermuscular_fat_ml"]
    total["intermuscular_fat_fraction"] = total["intermuscular_fat_ml"] / envelope_ml if envelope_ml else 0.0
    if height_m:
        total["muscle_volume_index_ml_per_m2"] = total["muscle"]["total_ml"] / height_m ** 2
    result["asymmetry_percent"] = {name: _asymmetry(result["right"][name]["total_ml"], result["left"][name]["total_ml"])
                                   for name in names}
    return _rounded(result)


def _asymmetry(right: float, left: float) -> float:
    mean = (right + left) / 2
    return 100 * abs(right - left) / mean if mean else 0.0


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return None if np.isnan(value) else round(float(value), 3)  # JSON has no NaN


def headline(indices: dict) -> dict[str, float]:
    """The four volumes compared with ICC: total muscle, lean muscle, IMAT, intermuscular fat."""
    total = indices["total"]
    return {"total_muscle_ml": total["muscle"]["total_ml"], "lean_muscle_ml": total["muscle"]["lean_ml"],
            "intramuscular_fat_ml": total["muscle"]["imat_ml"], "intermuscular_fat_ml": total["intermuscular_fat_ml"]}
