"""Volume indices of thigh muscle, per group and per leg (definitions in ../shared/DESIGN.md).

- total muscle volume: every voxel labelled with a group;
- lean muscle volume: group voxels inside the skeletal-muscle window (-29..+150 HU);
- intramuscular fat (IMAT): group voxels inside the adipose window (-190..-30 HU);
- intermuscular fat: adipose-window voxels between the groups inside the deep fascia. The fascia
  envelope of each leg is approximated per slice from the group masks: their union is closed with a
  disc of FASCIA_CLOSING_MM (bridging the fat septa between muscles) and its holes are filled; bone
  (cortex above 300 HU and what it encloses: marrow is fat-dense) is excluded.
Legs are split at the body midline: the mean column of all labelled voxels (patient left is +x in
LPS, i.e. higher columns for an axial image in standard orientation).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from thighseg.labels import ADIPOSE_HU, MUSCLE_GROUPS, MUSCLE_HU

FASCIA_CLOSING_MM = 6.0
CORTEX_HU = 300.0
LEGS = ("right", "left")


def leg_masks(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Column masks (broadcastable to the volume) for the patient's right and left leg."""
    columns = np.nonzero(labels)[2]
    midline = float(columns.mean()) if columns.size else labels.shape[2] / 2
    index = np.arange(labels.shape[2])[None, None, :]
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


def volume_indices(hu: np.ndarray, labels: np.ndarray, spacing_zyx: tuple[float, float, float]) -> dict:
    """{leg: {group: {total, lean, imat}, intermuscular_fat}, total: {...}} in mL."""
    voxel_ml = float(np.prod(spacing_zyx)) / 1000
    lean = (hu >= MUSCLE_HU[0]) & (hu <= MUSCLE_HU[1])
    adipose = (hu >= ADIPOSE_HU[0]) & (hu <= ADIPOSE_HU[1])
    bone = bone_mask(hu)
    result: dict = {}
    for leg, columns in leg_masks(labels).items():
        in_leg = np.broadcast_to(columns, labels.shape)
        leg_result = {}
        for group in MUSCLE_GROUPS:
            mask = (labels == group) & in_leg
            leg_result[group.name.lower()] = {"total_ml": mask.sum() * voxel_ml, "lean_ml": (mask & lean).sum() * voxel_ml,
                                              "imat_ml": (mask & adipose).sum() * voxel_ml}
        muscle = (labels > 0) & in_leg
        envelope = fascia_envelope(muscle, spacing_zyx[1]) & in_leg
        leg_result["intermuscular_fat_ml"] = (envelope & ~muscle & ~bone & adipose).sum() * voxel_ml
        result[leg] = leg_result
    result["total"] = _sum_legs(result)
    return _rounded(result)


def _sum_legs(per_leg: dict) -> dict:
    total = {"intermuscular_fat_ml": sum(per_leg[leg]["intermuscular_fat_ml"] for leg in LEGS)}
    for group in MUSCLE_GROUPS:
        name = group.name.lower()
        total[name] = {k: sum(per_leg[leg][name][k] for leg in LEGS) for k in ("total_ml", "lean_ml", "imat_ml")}
    for k in ("total_ml", "lean_ml", "imat_ml"):
        total[f"muscle_{k}"] = sum(total[g.name.lower()][k] for g in MUSCLE_GROUPS)
    return total


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(float(value), 3)


def headline(indices: dict) -> dict[str, float]:
    """The four volumes compared with ICC: total muscle, lean muscle, IMAT, intermuscular fat."""
    total = indices["total"]
    return {"total_muscle_ml": total["muscle_total_ml"], "lean_muscle_ml": total["muscle_lean_ml"],
            "intramuscular_fat_ml": total["muscle_imat_ml"], "intermuscular_fat_ml": total["intermuscular_fat_ml"]}
