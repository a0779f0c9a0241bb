"""Instance checks at C-STORE time: refuse, with a DICOM status, what can never be segmented.

Problems that only show across a series (gaps, mixed geometry) are left to assembly, which fails
the series with a reason in its report; the instance itself is accepted.
"""
from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from thighseg.dicom_listener.spool import is_valid_uid

SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"}


@dataclass(frozen=True)
class Limits:
    max_matrix: int = 2048  # rows/columns
    min_matrix: int = 32
    max_instance_bytes: int = 64 << 20
    pixel_spacing_mm: tuple[float, float] = (0.05, 5.0)


@dataclass(frozen=True)
class Refusal:
    status: int
    reason: str  # short machine-readable reason (metrics label)
    detail: str


def check_instance(sop_class: str, sop_instance: str, dataset: Dataset, transfer_syntax: str,
                   limits: Limits = Limits()) -> Refusal | None:
    """None when the instance may be stored, otherwise why not."""
    if sop_class != CTImageStorage:
        return Refusal(SOP_CLASS_NOT_SUPPORTED, "sop_class", f"SOP class {sop_class} is not CT Image Storage")
    if dataset.get("Modality") != "CT":
        return Refusal(DATASET_DOES_NOT_MATCH_SOP_CLASS, "modality", f"Modality {dataset.get('Modality')!r} != CT")
    uids = {k: dataset.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
    bad = [k for k, v in uids.items() if v is None or not is_valid_uid(str(v))]
    if bad:
        return Refusal(DATASET_DOES_NOT_MATCH_SOP_CLASS, "uid", f"missing or invalid {', '.join(bad)}")
    if str(uids["SOPInstanceUID"]) != sop_instance:
        return Refusal(DATASET_DOES_NOT_MATCH_SOP_CLASS, "uid", "SOPInstanceUID differs from the request's")
    if "PixelData" not in dataset:
        return Refusal(DATASET_DOES_NOT_MATCH_SOP_CLASS, "no_pixel_data", "no Pixel Data")
    return _check_image(dataset, transfer_syntax, limits)


def _check_image(dataset: Dataset, transfer_syntax: str, limits: Limits) -> Refusal | None:
    def refuse(reason: str, detail: str) -> Refusal:
        return Refusal(DATASET_DOES_NOT_MATCH_SOP_CLASS, reason, detail)

    rows, columns = dataset.get("Rows"), dataset.get("Columns")
    if rows is None or columns is None:
        return refuse("matrix", "Rows/Columns missing")
    if not (limits.min_matrix <= rows <= limits.max_matrix and limits.min_matrix <= columns <= limits.max_matrix):
        return refuse("matrix", f"matrix {rows}x{columns} outside {limits.min_matrix}..{limits.max_matrix}")
    if dataset.get("SamplesPerPixel", 1) != 1:
        return refuse("not_grayscale", "SamplesPerPixel != 1")
    bits = dataset.get("BitsAllocated")
    if bits not in (8, 16):
        return refuse("bits", f"BitsAllocated {bits} (8 or 16 expected)")
    if dataset.get("NumberOfFrames", 1) not in (1, "1", None):
        return refuse("multiframe", "multi-frame CT is not supported")
    for keyword, count in (("ImagePositionPatient", 3), ("ImageOrientationPatient", 6), ("PixelSpacing", 2)):
        value = dataset.get(keyword)
        if value is None or len(value) != count:
            return refuse("geometry", f"{keyword} missing or malformed")
    low, high = limits.pixel_spacing_mm
    if not all(low <= float(v) <= high for v in dataset.PixelSpacing):
        return refuse("geometry", f"PixelSpacing {list(dataset.PixelSpacing)} mm is implausible")
    if transfer_syntax in UNCOMPRESSED:
        expected = rows * columns * bits // 8
        if len(dataset.PixelData) not in (expected, expected + 1):
            return refuse("pixel_length", f"Pixel Data has {len(dataset.PixelData)} bytes, expected {expected}")
    return None
