"""What a SEG and its SR are made from, kept free of highdicom: the listener prepares every SEG
and fills its frames in, while highdicom (~20 MB of imports, ~65 MB of tables once used) is loaded
in the SEG process alone (`seg_process`)."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage


def sided_labels(labels: np.ndarray, midline: float, in_place: bool = False) -> np.ndarray:
    """Group labels (1-3) as segment numbers (1-6): each group split at the body midline (column)
    into the patient's right and left leg, the split the indices use. `in_place` reuses `labels`
    (uint8) for the result: a study-sized array less to allocate and fault in."""
    midline = int(np.ceil(midline))
    reusable = in_place and labels.dtype == np.uint8 and labels.flags.c_contiguous
    sided = labels if reusable else np.array(labels, dtype=np.uint8, order="C")
    for image in sided.reshape(-1, *sided.shape[-2:]):  # slice by slice: small temporaries
        image <<= 1  # left leg: 2, 4, 6
        right = image[:, :midline]  # a view: the right columns become 1, 3, 5
        right -= (right > 0).view(np.uint8)
    return sided


PIXEL_DATA = 0x7FE00010

# What highdicom reads of each source instance but the first, for the SEG and the SR: its identity
# and its plane.
PER_SOURCE_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "Rows",
    "Columns",
)


def slim_sources(sources: list[Dataset]) -> list[Dataset]:
    """The source headers the SEG and SR are built from, copies: the first whole but for its
    pixels (patient, study, equipment and frame of reference come from it), the others reduced
    to `PER_SOURCE_KEYWORDS`. The SEG and SR are the same as from whole headers (tested);
    handing them to the SEG process costs a fifth of the pickling."""
    first = Dataset()
    for tag in sources[0].keys():
        if tag != PIXEL_DATA:  # each other value read now, deferred ones included
            first.add(sources[0][tag])
    slim = [first]
    for source in sources[1:]:
        header = Dataset()
        for keyword in PER_SOURCE_KEYWORDS:
            if keyword in source:
                header[keyword] = source[keyword]
        slim.append(header)
    return slim


def seg_reference(source: Dataset, series_instance_uid: str, sop_instance_uid: str) -> Dataset:
    """What the SR needs of its SEG (as evidence and referenced segments): the SEG's identity in
    the source's study."""
    reference = Dataset()
    reference.StudyInstanceUID = source.StudyInstanceUID
    reference.SeriesInstanceUID = series_instance_uid
    reference.SOPClassUID = SegmentationStorage
    reference.SOPInstanceUID = sop_instance_uid
    return reference
