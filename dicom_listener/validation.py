"""Instance checks at C-STORE time: refuse, with a DICOM status and a comment, what can never be
segmented or measured, so no series is accepted only to fail late (or worse, succeed wrongly).

Problems that only show across a series (gaps, mixed geometry) are left to assembly, which fails
the series with a reason in its report; the instance itself is accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from thighseg.dicom_listener.config import Limits
from thighseg.dicom_listener.spool import is_valid_uid

SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000

UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"}
ERROR_COMMENT_CHARS = 64  # Error Comment (0000,0902) is LO


@dataclass(frozen=True)
class Refusal:
    """Why an instance is refused: its DICOM status, a metrics reason and a comment."""

    status: int
    reason: str  # short machine-readable reason (metrics label)
    detail: str

    @property
    def error_comment(self) -> str:
        """The detail as the C-STORE response's Error Comment (LO: 64 characters, no backslash)."""
        return self.detail.replace("\\", "/")[:ERROR_COMMENT_CHARS]


def check_instance(
    sop_class: str,
    sop_instance: str,
    dataset: Dataset,
    transfer_syntax: str,
    limits: Limits = Limits(),
) -> Refusal | None:
    """None when the instance may be stored, otherwise why not.

    pydicom decodes element values lazily, so a malformed encoding surfaces here: it is answered
    with 0xC000 (cannot understand) rather than an exception in the handler.
    """
    try:
        return _check_header(sop_class, sop_instance, dataset) or _check_image(
            dataset, transfer_syntax, limits
        )
    except Exception as error:  # noqa: BLE001 - any decoding failure is the sender's data, not our bug
        return undecodable(error)


def undecodable(error: Exception) -> Refusal:
    """0xC000 for a data set that cannot be decoded, naming only the kind of failure."""
    return Refusal(
        CANNOT_UNDERSTAND, "undecodable", f"cannot decode the data set ({type(error).__name__})"
    )


def _refuse(reason: str, detail: str) -> Refusal:
    return Refusal(DATASET_DOES_NOT_MATCH_SOP_CLASS, reason, detail)


def _check_header(sop_class: str, sop_instance: str, dataset: Dataset) -> Refusal | None:
    if sop_class != CTImageStorage:
        return Refusal(
            SOP_CLASS_NOT_SUPPORTED, "sop_class", f"SOP class {sop_class} is not CT Image Storage"
        )
    if dataset.get("Modality") != "CT":
        return _refuse("modality", f"Modality {dataset.get('Modality')!r} is not CT")
    keywords = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
    bad = [k for k in keywords if dataset.get(k) is None or not is_valid_uid(str(dataset.get(k)))]
    if bad:
        return _refuse("uid", f"missing or invalid {', '.join(bad)}")
    if str(dataset.SOPInstanceUID) != sop_instance:
        return _refuse("uid", "SOPInstanceUID differs from the request's")
    charsets = dataset.get("SpecificCharacterSet") or []
    unknown = [
        c
        for c in ([charsets] if isinstance(charsets, str) else charsets)
        if c and c.strip() not in python_encoding
    ]
    if unknown:
        return _refuse("charset", f"unknown SpecificCharacterSet {unknown[0][:24]!r}")
    if "PixelData" not in dataset:
        return _refuse("no_pixel_data", "no Pixel Data")
    return None


def _numbers(dataset: Dataset, keyword: str, count: int) -> list[float] | None:
    """The values of a multi-valued numeric attribute, or None when missing, short or not finite."""
    value = dataset.get(keyword)
    if value is None:
        return None
    values = [value] if count == 1 and not isinstance(value, (list, tuple)) else list(value)
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(math.isfinite(n) for n in numbers) else None


def _check_image(dataset: Dataset, transfer_syntax: str, limits: Limits) -> Refusal | None:
    return (
        _check_matrix(dataset, limits)
        or _check_geometry(dataset, limits)
        or _check_rescale(dataset, limits)
        or _check_pixel_length(dataset, transfer_syntax)
    )


def _check_matrix(dataset: Dataset, limits: Limits) -> Refusal | None:
    rows, columns = dataset.get("Rows"), dataset.get("Columns")
    if rows is None or columns is None:
        return _refuse("matrix", "Rows/Columns missing")
    if not (
        limits.min_matrix <= rows <= limits.max_matrix
        and limits.min_matrix <= columns <= limits.max_matrix
    ):
        return _refuse(
            "matrix", f"matrix {rows}x{columns} outside {limits.min_matrix}..{limits.max_matrix}"
        )
    if dataset.get("SamplesPerPixel", 1) != 1:
        return _refuse("not_grayscale", "SamplesPerPixel != 1")
    bits = dataset.get("BitsAllocated")
    if bits not in (8, 16):
        return _refuse("bits", f"BitsAllocated {bits} (8 or 16 expected)")
    if dataset.get("NumberOfFrames", 1) not in (1, "1", None):
        return _refuse("multiframe", "multi-frame CT is not supported")
    return None


def _check_geometry(dataset: Dataset, limits: Limits) -> Refusal | None:
    for keyword, count in (
        ("ImagePositionPatient", 3),
        ("ImageOrientationPatient", 6),
        ("PixelSpacing", 2),
    ):
        if _numbers(dataset, keyword, count) is None:
            return _refuse("geometry", f"{keyword} missing or not {count} numbers")
    low, high = limits.pixel_spacing_mm
    if not all(low <= v <= high for v in _numbers(dataset, "PixelSpacing", 2)):
        return _refuse("geometry", "PixelSpacing is implausible")
    return None


def _check_rescale(dataset: Dataset, limits: Limits) -> Refusal | None:
    """Rescale Slope and Intercept are Type 1 in the CT Image module: without them no HU exist."""
    slope, intercept = (
        _numbers(dataset, "RescaleSlope", 1),
        _numbers(dataset, "RescaleIntercept", 1),
    )
    if slope is None or intercept is None:
        return _refuse("rescale", "RescaleSlope/RescaleIntercept missing or not numeric")
    low, high = limits.rescale_slope
    if not low <= slope[0] <= high:
        return _refuse("rescale", f"RescaleSlope {slope[0]:g} is implausible for CT")
    return None


def _check_pixel_length(dataset: Dataset, transfer_syntax: str) -> Refusal | None:
    if transfer_syntax in UNCOMPRESSED:
        expected = dataset.Rows * dataset.Columns * dataset.BitsAllocated // 8
        if len(dataset.PixelData) not in (expected, expected + 1):
            return _refuse(
                "pixel_length",
                f"Pixel Data has {len(dataset.PixelData)} bytes, expected {expected}",
            )
    return None
