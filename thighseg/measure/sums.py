"""What the indices and QC flags need from one slice, as sums per image column: a study's figures
are sums of its slices', split between the legs at the body midline once every slice is known.

So a slice can be measured the moment it arrives (streaming) and the study combined when it
completes. Only the intermuscular fat depends on the midline beyond a column split (each leg's
fascia envelope is built from that leg's muscle), so each slice records the midline it used and the
columns its muscle and envelopes reach: its count holds for another midline when no reached column
lies between the two, and the slice is measured again otherwise. Combined, the figures are those
of measuring the whole volume at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from thighseg.core.labels import ADIPOSE_HU, MUSCLE_GROUPS, MUSCLE_HU
from thighseg.measure.anatomy import (
    LEGS,
    body_columns,
    body_midline,
    bone_mask,
    fascia_envelope,
    midline_of,
)

LOW_DENSITY_HU = (-29.0, 29.0)
DARK_HU = -200.0  # muscle voxels below this: streaks, air
QC_BODY_HU = -500.0  # body voxels, the denominator of the metal fraction
METAL_HU = 2500.0
STATS = ("total", "lean", "imat", "low_density", "hu_sum", "hu_sq", "hu_all")
LABELS = len(MUSCLE_GROUPS) + 1  # background and the groups


@dataclass(frozen=True)
class SliceSums:
    """One slice, measured."""

    columns: np.ndarray  # (x, label, statistic) over the labelled voxels of each column
    body: np.ndarray  # (x,) body voxels per column, for the study's midline
    pixel_mm: float  # row spacing the fascia closing used
    midline: float  # where `intermuscular` split the legs
    intermuscular: np.ndarray  # (leg,) adipose voxels between the groups inside the fascia
    reach: np.ndarray  # (x,) columns holding muscle or either leg's fascia envelope
    edge: int  # muscle voxels on the image border
    dark: int  # muscle voxels below DARK_HU
    body_voxels: int  # voxels above QC_BODY_HU
    metal: int  # voxels above METAL_HU

    def holds_for(self, midline: float, pixel_mm: float) -> bool:
        """Is `intermuscular` what splitting at `midline` would count?"""
        index = np.arange(len(self.reach))
        moved = (index < self.midline) != (index < midline)
        return pixel_mm == self.pixel_mm and not self.reach[moved].any()


def measure_slice(
    hu: np.ndarray, labels: np.ndarray, pixel_mm: float, midline: float | None = None
) -> SliceSums:
    """Sums of one (y, x) slice; `midline` None: the slice's own (a provisional split, checked by
    `holds_for` when the study's midline is known)."""
    hu, labels = np.asarray(hu), np.asarray(labels)
    if labels.max(initial=0) >= LABELS:
        raise ValueError(f"labels must be 0..{LABELS - 1}, found {int(labels.max())}")
    body = body_columns(hu)
    midline = midline_of(body) if midline is None else midline
    labelled = labels > 0
    rows, cols = np.nonzero(labelled)
    h = hu[rows, cols].astype(np.float64)
    key = cols * LABELS + labels[rows, cols]
    lean = (h >= MUSCLE_HU[0]) & (h <= MUSCLE_HU[1])
    adipose = (h >= ADIPOSE_HU[0]) & (h <= ADIPOSE_HU[1])
    low_density = (h >= LOW_DENSITY_HU[0]) & (h <= LOW_DENSITY_HU[1])
    bins = hu.shape[1] * LABELS
    lean_key, lean_hu = key[lean], h[lean]
    columns = np.stack(
        [
            np.bincount(key, minlength=bins),
            np.bincount(lean_key, minlength=bins),
            np.bincount(key[adipose], minlength=bins),
            np.bincount(key[low_density], minlength=bins),
            np.bincount(lean_key, weights=lean_hu, minlength=bins),
            np.bincount(lean_key, weights=np.square(lean_hu), minlength=bins),
            np.bincount(key, weights=h, minlength=bins),
        ],
        axis=-1,
    ).reshape(hu.shape[1], LABELS, len(STATS))
    intermuscular, reach = _intermuscular(hu, labelled, pixel_mm, midline)
    return SliceSums(
        columns=columns,
        body=body,
        pixel_mm=pixel_mm,
        midline=midline,
        intermuscular=intermuscular,
        reach=reach,
        edge=int(labelled[[0, -1], :].sum() + labelled[1:-1, [0, -1]].sum()),
        dark=int((h < DARK_HU).sum()),
        body_voxels=int((hu > QC_BODY_HU).sum()),
        metal=int((hu > METAL_HU).sum()),
    )


def _intermuscular(
    hu: np.ndarray, labelled: np.ndarray, pixel_mm: float, midline: float
) -> tuple[np.ndarray, np.ndarray]:
    """Adipose voxels inside each leg's fascia envelope but in no group, bone excluded; and the
    columns the muscle and the envelopes reach."""
    index = np.arange(hu.shape[1])
    counts = np.zeros(len(LEGS), dtype=np.int64)
    reach = labelled.any(axis=0)
    bone = None
    for leg, columns in enumerate((index < midline, index >= midline)):
        muscle = labelled & columns
        if not muscle.any():
            continue
        envelope = fascia_envelope(muscle[None], pixel_mm)[0]
        reach |= envelope.any(axis=0)
        between = envelope & columns & ~muscle
        if not between.any():
            continue
        bone = bone_mask(hu[None])[0] if bone is None else bone
        values = hu[between & ~bone]
        counts[leg] = int(((values >= ADIPOSE_HU[0]) & (values <= ADIPOSE_HU[1])).sum())
    return counts, reach


@dataclass(frozen=True)
class StudySums:
    """A study's slices, combined at its midline."""

    midline: float
    by_leg: np.ndarray  # (leg, label, statistic)
    intermuscular: np.ndarray  # (leg,) voxels
    leg_area: np.ndarray  # (leg, z) muscle voxels per slice
    edge_voxels: int  # muscle voxels on the image border
    dark_muscle_voxels: int  # below DARK_HU
    body_voxels: int  # above QC_BODY_HU
    metal_voxels: int  # above METAL_HU

    @property
    def slices(self) -> int:
        """Slices in the study."""
        return self.leg_area.shape[1]

    @property
    def muscle_voxels(self) -> int:
        """Voxels labelled with any group."""
        return int(self.by_leg[:, 1:, STATS.index("total")].sum())

    @property
    def muscle_hu_sum(self) -> float:
        """Sum of HU over every labelled voxel."""
        return float(self.by_leg[:, 1:, STATS.index("hu_all")].sum())

    def group_voxels(self) -> dict[str, int]:
        """Voxels of each group, both legs."""
        totals = self.by_leg[:, :, STATS.index("total")].sum(axis=0)
        return {g.name.lower(): int(totals[g]) for g in MUSCLE_GROUPS}

    @classmethod
    def of(
        cls,
        hu: np.ndarray,
        labels: np.ndarray,
        pixel_mm: float,
        known: Mapping[int, SliceSums] | None = None,
        midline: float | None = None,
    ) -> StudySums:
        """Every slice of a (z, y, x) study: those `known` (measured as they arrived, by slice
        index) where they hold for the study's midline, the others measured now. `midline`: the
        study's, when `body_midline` has already found it."""
        known = known or {}
        if midline is None:
            midline = body_midline(hu, {z: sums.body for z, sums in known.items()})
        right = np.arange(hu.shape[2]) < midline
        by_leg = np.zeros((len(LEGS), LABELS, len(STATS)))
        intermuscular = np.zeros(len(LEGS), dtype=np.int64)
        leg_area = np.zeros((len(LEGS), hu.shape[0]), dtype=np.int64)
        counts = np.zeros(4, dtype=np.int64)
        for z in range(hu.shape[0]):
            sums = known.get(z)
            if sums is None or not sums.holds_for(midline, pixel_mm):
                sums = measure_slice(hu[z], labels[z], pixel_mm, midline)
            by_leg += (sums.columns[right].sum(axis=0), sums.columns[~right].sum(axis=0))
            intermuscular += sums.intermuscular
            area = sums.columns[:, 1:, 0].sum(axis=1)
            leg_area[:, z] = area[right].sum(), area[~right].sum()
            counts += (sums.edge, sums.dark, sums.body_voxels, sums.metal)
        return cls(midline, by_leg, intermuscular, leg_area, *(int(c) for c in counts))
