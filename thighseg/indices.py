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
    profile = ((hu > -300) & (hu < 3000)).sum(axis=(0, 1)).astype(float)
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


def _disc(radius_px: int) -> np.ndarray:
    y, x = np.ogrid[-radius_px:radius_px + 1, -radius_px:radius_px + 1]
    return (x * x + y * y <= radius_px * radius_px)[None]


def bone_mask(hu: np.ndarray) -> np.ndarray:
    """Cortex and the marrow it encloses, slice by slice."""
    cortex = hu > CORTEX_HU
    return np.stack([ndimage.binary_fill_holes(s) for s in cortex])


def fascia_envelope(group_mask: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Approximate deep-fascia envelope of one leg from its group mask (see module docstring)."""
    radius = max(1, int(round(FASCIA_CLOSING_MM / pixel_mm)))
    padded = np.pad(group_mask, ((0, 0), (radius, radius), (radius, radius)))
    closed = ndimage.binary_closing(padded, structure=_disc(radius))[:, radius:-radius, radius:-radius]
    return np.stack([ndimage.binary_fill_holes(s) for s in closed])


def _group_indices(hu: np.ndarray, mask: np.ndarray, lean: np.ndarray, adipose: np.ndarray,
                   low_density: np.ndarray, voxel_ml: float) -> dict:
    lean_hu = hu[mask & lean]
    return {"total_ml": mask.sum() * voxel_ml, "lean_ml": (mask & lean).sum() * voxel_ml,
            "imat_ml": (mask & adipose).sum() * voxel_ml, "low_density_ml": (mask & low_density).sum() * voxel_ml,
            "mean_hu": float(lean_hu.mean()) if lean_hu.size else float("nan"),
            "sd_hu": float(lean_hu.std()) if lean_hu.size else float("nan")}


def volume_indices(hu: np.ndarray, labels: np.ndarray, spacing_zyx: tuple[float, float, float],
                   height_m: float | None = None) -> dict:
    """{leg: {group: {...}, intermuscular_fat_ml}, total: {...}, asymmetry_percent: {...}} (mL, HU, %)."""
    voxel_ml = float(np.prod(spacing_zyx)) / 1000
    lean = (hu >= MUSCLE_HU[0]) & (hu <= MUSCLE_HU[1])
    adipose = (hu >= ADIPOSE_HU[0]) & (hu <= ADIPOSE_HU[1])
    low_density = (hu >= LOW_DENSITY_HU[0]) & (hu <= LOW_DENSITY_HU[1])
    bone = bone_mask(hu)
    result: dict = {}
    for leg, columns in leg_masks(hu).items():
        in_leg = np.broadcast_to(columns, labels.shape)
        leg_result = {}
        for group in MUSCLE_GROUPS:
            mask = (labels == group) & in_leg
            leg_result[group.name.lower()] = _group_indices(hu, mask, lean, adipose, low_density, voxel_ml)
        muscle = (labels > 0) & in_leg
        envelope = fascia_envelope(muscle, spacing_zyx[1]) & in_leg
        leg_result["intermuscular_fat_ml"] = (envelope & ~muscle & ~bone & adipose).sum() * voxel_ml
        leg_result["muscle"] = _group_indices(hu, muscle, lean, adipose, low_density, voxel_ml)
        result[leg] = leg_result
    result["total"] = _sum_legs(result, hu, labels, lean, adipose, low_density, voxel_ml)
    total = result["total"]
    total["imat_fraction"] = total["muscle"]["imat_ml"] / total["muscle"]["total_ml"] if total["muscle"]["total_ml"] else 0.0
    envelope_ml = total["muscle"]["total_ml"] + total["intermuscular_fat_ml"]
    total["intermuscular_fat_fraction"] = total["intermuscular_fat_ml"] / envelope_ml if envelope_ml else 0.0
    if height_m:
        total["muscle_volume_index_ml_per_m2"] = total["muscle"]["total_ml"] / height_m ** 2
    result["asymmetry_percent"] = {name: _asymmetry(result["right"][name]["total_ml"], result["left"][name]["total_ml"])
                                   for name in [g.name.lower() for g in MUSCLE_GROUPS] + ["muscle"]}
    return _rounded(result)


def _asymmetry(right: float, left: float) -> float:
    mean = (right + left) / 2
    return 100 * abs(right - left) / mean if mean else 0.0


def _sum_legs(per_leg: dict, hu, labels, lean, adipose, low_density, voxel_ml) -> dict:
    total: dict = {"intermuscular_fat_ml": sum(per_leg[leg]["intermuscular_fat_ml"] for leg in LEGS)}
    for group in MUSCLE_GROUPS:
        total[group.name.lower()] = _group_indices(hu, labels == group, lean, adipose, low_density, voxel_ml)
    total["muscle"] = _group_indices(hu, labels > 0, lean, adipose, low_density, voxel_ml)
    return total


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return None if np.isnan(value) else round(float(value), 3)  # JSON has no NaN


def headline(indices: dict) -> dict[str, float]:
    """The four volumes compared with ICC: total muscle, lean muscle, IMAT, intermuscular fat."""
    total = indices["total"]
    return {"total_muscle_ml": total["muscle"]["total_ml"], "lean_muscle_ml": total["muscle"]["lean_ml"],
            "intramuscular_fat_ml": total["muscle"]["imat_ml"], "intermuscular_fat_ml": total["intermuscular_fat_ml"]}
