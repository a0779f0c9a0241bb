"""Quality-control flags: when a reader should not trust a result, and why.

Each check is a small pure function of a study's `StudySums` (per-slice and whole-study counts,
gathered slice by slice, so memory stays bounded whatever the study size) and the geometry; a flag
carries a stable code (for the CSV, the SR and dashboards) and a human-readable reason.
Thresholds are deliberately generous: a flag asks for a look, it does not reject the study.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from thighseg.measure.anatomy import LEGS
from thighseg.measure.sums import METAL_HU, StudySums

MIN_SLICES = 10
MIN_COVERAGE_MM = 100.0
LEG_CSA_CM2 = (15.0, 350.0)  # mean muscle cross-section per leg per slice; thighs are ~60-200 cm²
MUSCLE_MEAN_HU = (10.0, 80.0)
MAX_ASYMMETRY_PERCENT = 30.0
MAX_ADJACENT_CHANGE = 0.5  # relative change of muscle area between neighbouring interior slices
MAX_METAL_VOXEL_FRACTION = 1e-4
MAX_DARK_MUSCLE_FRACTION = 0.02  # group voxels below -200 HU: streak artefacts, air


@dataclass(frozen=True)
class Flag:
    code: str  # at most 16 characters: it is a DICOM code value in the SR
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def check(
    hu: np.ndarray, labels: np.ndarray, spacing_zyx: tuple[float, float, float]
) -> list[Flag]:
    """The flags of a (z, y, x) study and its labels."""
    return check_sums(StudySums.of(hu, labels, spacing_zyx[1]), spacing_zyx)


def check_sums(study: StudySums, spacing_zyx: tuple[float, float, float]) -> list[Flag]:
    """The flags of a study's slice sums."""
    flags = []
    for test in (
        _coverage,
        _fov_edge,
        _plausible_volume,
        _plausible_hu,
        _left_right,
        _slice_consistency,
        _metal,
    ):
        flags.extend(test(study, spacing_zyx))
    return flags


def _coverage(study: StudySums, spacing) -> list[Flag]:
    flags = []
    if study.slices < MIN_SLICES:
        flags.append(
            Flag(
                "TOO_FEW_SLICES",
                f"{study.slices} slices; at least {MIN_SLICES} are expected for a thigh study",
            )
        )
    if study.slices * spacing[0] < MIN_COVERAGE_MM:
        flags.append(
            Flag(
                "PARTIAL_COVERAGE",
                f"z-coverage {study.slices * spacing[0]:.0f} mm is under "
                f"{MIN_COVERAGE_MM:.0f} mm: volumes cover part of the thigh only",
            )
        )
    return flags


def _fov_edge(study: StudySums, spacing) -> list[Flag]:
    if study.edge_voxels:
        return [
            Flag(
                "MASK_AT_FOV_EDGE",
                f"{study.edge_voxels} muscle voxels on the image border: "
                "the thigh may be cut off by the field of view",
            )
        ]
    return []


def _plausible_volume(study: StudySums, spacing) -> list[Flag]:
    flags = []
    pixel_cm2 = spacing[1] * spacing[2] / 100
    for leg, area in zip(LEGS, study.leg_area, strict=True):
        mean_area = float(area.mean()) * pixel_cm2
        if not LEG_CSA_CM2[0] <= mean_area <= LEG_CSA_CM2[1]:
            flags.append(
                Flag(
                    "IMPLAUSIBLE_VOL",
                    f"{leg} thigh muscle cross-section {mean_area:.0f} cm² per slice "
                    f"is outside {LEG_CSA_CM2[0]:.0f}-{LEG_CSA_CM2[1]:.0f} cm²",
                )
            )
    return flags


def _plausible_hu(study: StudySums, spacing) -> list[Flag]:
    if study.muscle_voxels == 0:
        return [Flag("IMPLAUSIBLE_HU", "no muscle was segmented")]
    mean = study.muscle_hu_sum / study.muscle_voxels
    if not MUSCLE_MEAN_HU[0] <= mean <= MUSCLE_MEAN_HU[1]:
        return [
            Flag(
                "IMPLAUSIBLE_HU",
                f"mean muscle density {mean:.0f} HU is outside "
                f"{MUSCLE_MEAN_HU[0]:.0f}-{MUSCLE_MEAN_HU[1]:.0f} HU (contrast? calibration?)",
            )
        ]
    return []


def _left_right(study: StudySums, spacing) -> list[Flag]:
    right, left = (int(area.sum()) for area in study.leg_area)
    mean = (right + left) / 2
    asymmetry = 100 * abs(right - left) / mean if mean else 0.0
    if asymmetry > MAX_ASYMMETRY_PERCENT:
        return [
            Flag(
                "LEFT_RIGHT_DIFF",
                f"left/right muscle volumes differ by {asymmetry:.0f} % "
                f"(over {MAX_ASYMMETRY_PERCENT:.0f} %): one leg missing or cut off?",
            )
        ]
    return []


def _slice_consistency(study: StudySums, spacing) -> list[Flag]:
    area = study.leg_area.sum(axis=0).astype(float)
    if area.size < 3:
        return []
    change = np.abs(np.diff(area[1:-1])) / np.maximum(area[1:-1][:-1], 1.0)
    worst = float(change.max()) if change.size else 0.0
    if worst > MAX_ADJACENT_CHANGE:
        return [
            Flag(
                "SLICE_JUMP", f"muscle area changes by {100 * worst:.0f} % between adjacent slices"
            )
        ]
    return []


def _metal(study: StudySums, spacing) -> list[Flag]:
    metal_fraction = study.metal_voxels / max(1, study.body_voxels)
    dark_fraction = study.dark_muscle_voxels / study.muscle_voxels if study.muscle_voxels else 0.0
    if metal_fraction > MAX_METAL_VOXEL_FRACTION or dark_fraction > MAX_DARK_MUSCLE_FRACTION:
        return [
            Flag(
                "METAL_ARTEFACT",
                f"{100 * metal_fraction:.3f} % of body voxels above {METAL_HU:.0f} HU and "
                f"{100 * dark_fraction:.1f} % of muscle below -200 HU: metal or streaks",
            )
        ]
    return []
