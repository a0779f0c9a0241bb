"""Overlap and volume measures computed from label volumes (pure numpy)."""

from __future__ import annotations

import numpy as np

from thighseg.core.labels import MUSCLE_GROUPS


def dice(prediction: np.ndarray, truth: np.ndarray, label: int) -> float:
    """Sørensen–Dice coefficient of one label; 1.0 when both are empty."""
    p, t = prediction == label, truth == label
    denominator = int(p.sum()) + int(t.sum())
    return 1.0 if denominator == 0 else 2.0 * int((p & t).sum()) / denominator


def dice_per_group(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    return {g.name.lower(): dice(prediction, truth, g) for g in MUSCLE_GROUPS}


def voxel_volume_ml(spacing_zyx: tuple[float, float, float]) -> float:
    return float(np.prod(spacing_zyx)) / 1000.0


def group_volumes_ml(
    labels: np.ndarray, spacing_zyx: tuple[float, float, float]
) -> dict[str, float]:
    """Volume of each muscle group and their total, in mL."""
    # counted slice by slice: no volume-sized temporary
    images = labels.reshape(-1, *labels.shape[-2:])
    voxels = {
        g.name.lower(): sum(np.count_nonzero(image == g) for image in images) for g in MUSCLE_GROUPS
    }
    return volumes_ml(voxels, spacing_zyx)


def volumes_ml(voxels: dict[str, int], spacing_zyx: tuple[float, float, float]) -> dict[str, float]:
    """Voxel counts by group as mL, with their total."""
    voxel_ml = voxel_volume_ml(spacing_zyx)
    volumes = {group: float(count * voxel_ml) for group, count in voxels.items()}
    volumes["total_muscle"] = float(sum(volumes.values()))
    return volumes


def confusion_counts(
    prediction: np.ndarray, truth: np.ndarray, label: int
) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) of one label against the rest, over every voxel."""
    p, t = prediction == label, truth == label
    tp = int((p & t).sum())
    fp = int(p.sum()) - tp
    fn = int(t.sum()) - tp
    return tp, fp, fn, p.size - tp - fp - fn


def overlap_metrics(prediction: np.ndarray, truth: np.ndarray) -> dict[str, dict[str, float]]:
    """DSC, sensitivity, specificity and accuracy per group (3D, one study), as in the paper."""
    out = {}
    for group in MUSCLE_GROUPS:
        tp, fp, fn, tn = confusion_counts(prediction, truth, group)
        out[group.name.lower()] = {
            "dsc": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
            "sensitivity": tp / (tp + fn) if tp + fn else 1.0,
            "specificity": tn / (tn + fp) if tn + fp else 1.0,
            "accuracy": (tp + tn) / (tp + fp + fn + tn),
        }
    return out
