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

Everything is computed from per-slice sums (`thighseg.measure.sums`), so slices may be measured as
they arrive; the midline, bone and fascia envelope are in `thighseg.measure.anatomy`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from thighseg.core.labels import MUSCLE_GROUPS
from thighseg.measure.anatomy import LEGS
from thighseg.measure.sums import STATS, StudySums


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
    return indices_of(StudySums.of(hu, labels, spacing_zyx[1]), spacing_zyx, height_m)


def indices_of(
    study: StudySums, spacing_zyx: tuple[float, float, float], height_m: float | None = None
) -> VolumeIndices:
    """`volume_indices` from a study's slice sums."""
    voxel_ml = float(np.prod(spacing_zyx)) / 1000
    sums, intermuscular = study.by_leg, dict(zip(LEGS, study.intermuscular.tolist(), strict=True))
    stats = {}
    for index, leg in enumerate(LEGS):
        for group in MUSCLE_GROUPS:
            stats[(leg, group.name.lower())] = dict(zip(STATS, sums[index, group], strict=True))
        stats[(leg, "muscle")] = dict(zip(STATS, sums[index, 1:].sum(axis=0), strict=True))
    for name in TISSUES:
        stats[("total", name)] = {k: sum(stats[(leg, name)][k] for leg in LEGS) for k in STATS}
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
