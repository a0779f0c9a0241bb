"""Label map, HU windows and the intensity normalisation shared by training and inference.

Keeping these in one place guarantees that the model sees the same input in training, in
ONNX parity checks and behind Triton.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Group(IntEnum):
    """Functional muscle groups of the thigh (Kim et al. 2025, Diagnostics 15:2823)."""

    BACKGROUND = 0
    EXTENSOR = 1  # quadriceps femoris + sartorius
    FLEXOR = 2  # hamstrings (biceps femoris, semitendinosus, semimembranosus)
    ADDUCTOR = 3  # adductor longus/brevis/magnus + gracilis


MUSCLE_GROUPS: tuple[Group, ...] = (Group.EXTENSOR, Group.FLEXOR, Group.ADDUCTOR)
NUM_CLASSES = len(Group)

# HU windows for tissue classification. Skeletal muscle -29..+150 HU and adipose -190..-30 HU are
# the standard CT body-composition thresholds (Mitsiopoulos et al., J Appl Physiol 1998;
# Aubrey et al., Acta Physiol 2014).
MUSCLE_HU = (-29.0, 150.0)
ADIPOSE_HU = (-190.0, -30.0)

# The network input window: wide enough to separate fat, muscle and bone, narrow enough to keep
# soft-tissue contrast. Maps [-250, 250] HU to [-1, 1].
INPUT_WINDOW_HU = (-250.0, 250.0)


def normalise_hu(hu: np.ndarray) -> np.ndarray:
    """Clip HU to the input window and scale to [-1, 1] (float32)."""
    low, high = INPUT_WINDOW_HU
    clipped = np.clip(np.asarray(hu, dtype=np.float32), low, high)
    return (clipped - (low + high) / 2) / ((high - low) / 2)
