"""Volume indices of thigh muscle, per group and per leg (definitions in ../shared/DESIGN.md).

- total muscle volume: every voxel labelled with a group;
- lean muscle volume: group voxels inside the skeletal-muscle window (-29..+150 HU);
- intramuscular fat (IMAT): group voxels inside the adipose window (-190..-30 HU);
- low-density muscle: group voxels from -29 to +29 HU (Aubrey et al. 2014; Goodpaster et al. 2000);
- mean and SD of HU over the lean-muscle voxels (muscle density, "myosteatosis");
- fractions: IMAT / total muscle, intermuscular fat / (total muscle + intermuscular fat);
- left/right asymmetry: 100 × |R − L| / mean(R, L) of total muscle volume, per group and overall;
- muscle volume index: total muscle volume / height² (mL/m²) when PatientSize (m) is known, by
  analogy with the skeletal muscle index of CT body composition;
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

from dataclasses import asdict, dataclass

import edt
import numpy as np
from scipy import ndimage

from thighseg.core.labels import ADIPOSE_HU, MUSCLE_GROUPS, MUSCLE_HU


@dataclass(frozen=True)
class TissueVolumes:
    """One group (or all muscle) in one leg or both: volumes in mL, density of the lean voxels in
    HU."""

    total_ml: float
    lean_ml: float
    imat_ml: float
    low_density_ml: float
    mean_hu: float | None  # None when there is no lean voxel
    sd_hu: float | None


@dataclass(frozen=True)
class LegIndices:
    extensor: TissueVolumes
    flexor: TissueVolumes
    adductor: TissueVolumes
    muscle: TissueVolumes  # the three groups together
    intermuscular_fat_ml: float

    def tissue(self, name: str) -> TissueVolumes:
        """By name: extensor, flexor, adductor or muscle."""
        return getattr(self, name)


@dataclass(frozen=True)
class TotalIndices(LegIndices):
    imat_fraction: float = 0.0
    intermuscular_fat_fraction: float = 0.0
    muscle_volume_index_ml_per_m2: float | None = None  # only when PatientSize is known


@dataclass(frozen=True)
class Asymmetry:
    """100 × |right − left| / mean(right, left) of total muscle volume."""

    extensor: float
    flexor: float
    adductor: float
    muscle: float


@dataclass(frozen=True)
class VolumeIndices:
    right: LegIndices
    left: LegIndices
    total: TotalIndices
    asymmetry_percent: Asymmetry

    def leg(self, name: str) -> LegIndices:
        """By name: right, left or total."""
        return getattr(self, name)

    def headline(self) -> dict[str, float]:
        """The four volumes compared with ICC: total muscle, lean muscle, IMAT, intermuscular
        fat."""
        muscle = self.total.muscle
        return {
            "total_muscle_ml": muscle.total_ml,
            "lean_muscle_ml": muscle.lean_ml,
            "intramuscular_fat_ml": muscle.imat_ml,
            "intermuscular_fat_ml": self.total.intermuscular_fat_ml,
        }

    def to_dict(self) -> dict:
        """Plain data for report.json (an unknown height leaves the volume index out)."""
        data = asdict(self)
        if data["total"]["muscle_volume_index_ml_per_m2"] is None:
            del data["total"]["muscle_volume_index_ml_per_m2"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> VolumeIndices:
        def leg(values: dict, kind: type[LegIndices]) -> LegIndices:
            tissues = {name: TissueVolumes(**values[name]) for name in TISSUES}
            return kind(**tissues, **{k: v for k, v in values.items() if k not in TISSUES})

        return cls(
            leg(data["right"], LegIndices),
            leg(data["left"], LegIndices),
            leg(data["total"], TotalIndices),
            Asymmetry(**data["asymmetry_percent"]),
        )


TISSUES = tuple(g.name.lower() for g in MUSCLE_GROUPS) + ("muscle",)


FASCIA_CLOSING_MM = 6.0
LOW_DENSITY_HU = (-29.0, 29.0)
CORTEX_HU = 300.0
LEGS = ("right", "left")


def body_midline(hu: np.ndarray) -> float:
    """Column of the gap between the thighs (see module docstring)."""
    profile = np.zeros(hu.shape[2])
    for start in range(0, hu.shape[0], CHUNK_SLICES):  # slab by slab: bounded memory
        slab = hu[start : start + CHUNK_SLICES]
        profile += ((slab > -300) & (slab < 3000)).sum(axis=(0, 1))
    if profile.max() == 0:
        return hu.shape[2] / 2
    columns = np.nonzero(profile > 0.05 * profile.max())[0]
    low, high = int(columns[0]), int(columns[-1])
    quarter = (high - low) // 4
    smooth = np.convolve(profile, np.ones(5) / 5, mode="same")
    return float(low + quarter + np.argmin(smooth[low + quarter : high - quarter + 1]))


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


# indices are accumulated over slabs: memory stays bounded whatever the study size
CHUNK_SLICES = 16
_STATS = ("total", "lean", "imat", "low_density", "hu_sum", "hu_sq")
_LABELS = len(MUSCLE_GROUPS) + 1  # background and the groups


def _slab_sums(hu: np.ndarray, labels: np.ndarray, leg_of_column: np.ndarray) -> np.ndarray:
    """(leg, label, statistic) sums over one slab's labelled voxels: one bincount per statistic
    over a (leg, label) key, instead of a masked pass over the slab per group, leg and
    statistic."""
    labelled = labels > 0
    if labels.max(initial=0) >= _LABELS:
        raise ValueError(f"labels must be 0..{_LABELS - 1}, found {int(labels.max())}")
    key = (leg_of_column * _LABELS + labels)[labelled]
    h = hu[labelled].astype(np.float64)
    lean = (h >= MUSCLE_HU[0]) & (h <= MUSCLE_HU[1])
    adipose = (h >= ADIPOSE_HU[0]) & (h <= ADIPOSE_HU[1])
    low_density = (h >= LOW_DENSITY_HU[0]) & (h <= LOW_DENSITY_HU[1])
    bins = len(LEGS) * _LABELS
    lean_key, lean_hu = key[lean], h[lean]
    sums = [
        np.bincount(key, minlength=bins),
        np.bincount(lean_key, minlength=bins),
        np.bincount(key[adipose], minlength=bins),
        np.bincount(key[low_density], minlength=bins),
        np.bincount(lean_key, weights=lean_hu, minlength=bins),
        np.bincount(lean_key, weights=np.square(lean_hu), minlength=bins),
    ]
    return np.stack(sums, axis=-1).reshape(len(LEGS), _LABELS, len(_STATS))


def _finish(stats: dict, voxel_ml: float) -> dict:
    n = stats.get("lean", 0)
    mean = stats["hu_sum"] / n if n else float("nan")
    sd = float(np.sqrt(max(0.0, stats["hu_sq"] / n - mean * mean))) if n else float("nan")
    return {
        "total_ml": stats["total"] * voxel_ml,
        "lean_ml": stats["lean"] * voxel_ml,
        "imat_ml": stats["imat"] * voxel_ml,
        "low_density_ml": stats["low_density"] * voxel_ml,
        "mean_hu": mean,
        "sd_hu": sd,
    }


def volume_indices(
    hu: np.ndarray,
    labels: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    height_m: float | None = None,
) -> VolumeIndices:
    """Per leg and in total: each group's and all muscle's volumes and density, intermuscular fat,
    fractions and asymmetry (definitions in the module docstring)."""
    voxel_ml = float(np.prod(spacing_zyx)) / 1000
    sums = np.zeros((len(LEGS), _LABELS, len(_STATS)))
    intermuscular = {leg: 0 for leg in LEGS}
    legs = leg_masks(hu)
    leg_of_column = legs["left"].astype(np.uint8)  # LEGS order: right 0, left 1
    for start in range(0, hu.shape[0], CHUNK_SLICES):
        h, lab = hu[start : start + CHUNK_SLICES], labels[start : start + CHUNK_SLICES]
        sums += _slab_sums(h, lab, leg_of_column)
        bone = None
        for leg, columns in legs.items():
            muscle = (lab > 0) & columns
            envelope = fascia_envelope(muscle, spacing_zyx[1]) & columns & ~muscle
            if not envelope.any():
                continue
            bone = bone_mask(h) if bone is None else bone
            between = h[envelope & ~bone]
            intermuscular[leg] += int(
                ((between >= ADIPOSE_HU[0]) & (between <= ADIPOSE_HU[1])).sum()
            )
    stats = {}
    for index, leg in enumerate(LEGS):
        for group in MUSCLE_GROUPS:
            stats[(leg, group.name.lower())] = dict(zip(_STATS, sums[index, group], strict=True))
        stats[(leg, "muscle")] = dict(zip(_STATS, sums[index, 1:].sum(axis=0), strict=True))
    for name in TISSUES:
        stats[("total", name)] = {k: sum(stats[(leg, name)][k] for leg in LEGS) for k in _STATS}
    volumes = {
        leg: {name: _finish(stats[(leg, name)], voxel_ml) for name in TISSUES}
        for leg in (*LEGS, "total")
    }
    intermuscular_ml = {leg: intermuscular[leg] * voxel_ml for leg in LEGS}
    intermuscular_ml["total"] = sum(intermuscular.values()) * voxel_ml
    muscle_ml, imat_ml = (
        volumes["total"]["muscle"]["total_ml"],
        volumes["total"]["muscle"]["imat_ml"],
    )
    envelope_ml = muscle_ml + intermuscular_ml["total"]

    def leg_indices(
        leg: str, kind: type[LegIndices] = LegIndices, **extra: float | None
    ) -> LegIndices:
        tissues = {
            name: TissueVolumes(**{k: _round(v) for k, v in volumes[leg][name].items()})
            for name in TISSUES
        }
        return kind(
            **tissues,
            intermuscular_fat_ml=_round(intermuscular_ml[leg]),
            **{k: _round(v) for k, v in extra.items()},
        )

    total = leg_indices(
        "total",
        TotalIndices,
        imat_fraction=imat_ml / muscle_ml if muscle_ml else 0.0,
        intermuscular_fat_fraction=intermuscular_ml["total"] / envelope_ml if envelope_ml else 0.0,
        muscle_volume_index_ml_per_m2=muscle_ml / height_m**2 if height_m else None,
    )
    asymmetry = Asymmetry(
        **{
            name: _round(
                _asymmetry(volumes["right"][name]["total_ml"], volumes["left"][name]["total_ml"])
            )
            for name in TISSUES
        }
    )
    return VolumeIndices(leg_indices("right"), leg_indices("left"), total, asymmetry)


def _asymmetry(right: float, left: float) -> float:
    mean = (right + left) / 2
    return 100 * abs(right - left) / mean if mean else 0.0


def _round(value: float | None) -> float | None:
    """Three decimals; NaN (no voxel to average) becomes None, as JSON has no NaN."""
    return None if value is None or np.isnan(value) else round(float(value), 3)
