"""Spooled CT instances -> one HU volume (z, y, x) with its geometry, checked for consistency."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

MAX_SLICE_SPACING_MM = 20.0
# values this large (pixel data) are read from the file when used, not when the header is parsed
DEFERRED_BYTES = 16 << 10


class SeriesError(ValueError):
    """The series cannot be segmented; the message is the reason given in the report."""


class HUStack:
    """(z, y, x) HU slices kept in an unnamed scratch file and read back on demand, so that a study
    is never held whole in memory: the stages work slab by slab. Slices are written one at a time
    (`stack[z] = image`); reading an int or a contiguous slice returns a new array."""

    ndim = 3

    def __init__(self, shape: tuple[int, int, int], dtype: np.dtype, directory: Path):
        self.shape, self.dtype = shape, np.dtype(dtype)
        # unlinked: gone with the process, whatever happens
        self._file = tempfile.TemporaryFile(dir=directory)
        self._slice_bytes = shape[1] * shape[2] * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __setitem__(self, index: int, image: np.ndarray) -> None:
        data = np.ascontiguousarray(np.broadcast_to(image, self.shape[1:]), dtype=self.dtype)
        if (
            os.pwrite(self._file.fileno(), data, range(len(self))[index] * self._slice_bytes)
            != self._slice_bytes
        ):
            raise OSError("short write to the HU scratch file")

    def __getitem__(self, index: int | slice) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("HUStack supports contiguous slices only")
            out = np.empty((max(0, stop - start), *self.shape[1:]), self.dtype)
        else:
            start = range(len(self))[index]  # negative indices, IndexError past the end
            out = np.empty(self.shape[1:], self.dtype)
        if (
            out.nbytes
            and os.preadv(self._file.fileno(), [out], start * self._slice_bytes) != out.nbytes
        ):
            raise OSError("short read from the HU scratch file")
        return out


@dataclass
class Volume:
    """An assembled series: HU volume, spacing and the headers of its slices, all in z order."""

    hu: np.ndarray | HUStack  # (z, y, x) HU, z ascending along the normal, int16 or float32
    spacing_zyx: tuple[float, float, float]
    # headers in the same order as hu, pixel data dropped (other values over DEFERRED_BYTES, if
    # any, are read from `paths` when used)
    sources: list[Dataset]
    paths: list[Path]


def _normal(ds: Dataset) -> np.ndarray:
    orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    return np.cross(orientation[:3], orientation[3:])


def _check_count(paths: list[Path], min_slices: int) -> None:
    if len(paths) < min_slices:
        raise SeriesError(f"series has {len(paths)} instances; at least {min_slices} are needed")


def _check_attributes(headers: list[Dataset]) -> None:
    for attribute in (
        "ImageOrientationPatient",
        "ImagePositionPatient",
        "PixelSpacing",
        "Rows",
        "Columns",
        "RescaleSlope",
        "RescaleIntercept",
    ):
        missing = [h for h in headers if attribute not in h]
        if missing:
            raise SeriesError(f"{len(missing)} instance(s) lack {attribute}")


def _check_axial(first: Dataset) -> None:
    if abs(_normal(first)[2]) < 0.99:
        raise SeriesError("series is not axial (slice normal is not along the patient z axis)")


def _check_consistent(headers: list[Dataset]) -> None:
    """One frame of reference, matrix, orientation and pixel spacing for every instance."""
    first = headers[0]
    if len({str(h.get("FrameOfReferenceUID", "")) for h in headers}) > 1:
        raise SeriesError("instances differ in FrameOfReferenceUID")
    orientation, spacing = _floats(first.ImageOrientationPatient), _floats(first.PixelSpacing)
    for h in headers:
        if (h.Rows, h.Columns) != (first.Rows, first.Columns):
            raise SeriesError("instances differ in Rows/Columns")
        if not np.allclose(_floats(h.ImageOrientationPatient), orientation, atol=1e-3):
            raise SeriesError("instances differ in ImageOrientationPatient")
        if not np.allclose(_floats(h.PixelSpacing), spacing, atol=1e-4):
            raise SeriesError("instances differ in PixelSpacing")


def slice_position(ds: Dataset) -> float:
    """Where the slice lies along its normal (mm): the volume's slices ascend in it."""
    return float(np.dot(_normal(ds), _floats(ds.ImagePositionPatient)))


def _slice_order(headers: list[Dataset]) -> tuple[np.ndarray, float]:
    """Instances sorted along the slice normal, and the slice spacing; refuses duplicate positions,
    gaps, uneven steps and slices too far apart."""
    normal = _normal(headers[0])
    positions = np.array([np.dot(normal, _floats(h.ImagePositionPatient)) for h in headers])
    order = np.argsort(positions)
    steps = np.diff(positions[order])
    if np.any(steps < 1e-3):
        raise SeriesError("two or more instances share the same slice position")
    spacing = float(np.median(steps))
    if spacing > MAX_SLICE_SPACING_MM:
        raise SeriesError(f"slice spacing {spacing:.1f} mm exceeds {MAX_SLICE_SPACING_MM:.0f} mm")
    if np.any(np.abs(steps - spacing) > 0.1 * spacing + 0.01):
        raise SeriesError(
            f"slice positions are not evenly spaced (gap or missing slice; steps "
            f"{steps.min():.2f}-{steps.max():.2f} mm)"
        )
    return order, spacing


def _floats(values) -> list[float]:
    return [float(v) for v in values]


def _rescale(ds: Dataset) -> tuple[float, float]:
    return float(ds.RescaleSlope), float(ds.RescaleIntercept)


def slice_hu(ds: Dataset) -> np.ndarray:
    """One instance's pixels in HU (float32)."""
    slope, intercept = _rescale(ds)
    return ds.pixel_array.astype(np.float32) * slope + intercept


def assemble(
    paths: list[Path],
    min_slices: int = 3,
    scratch: Path | None = None,
    sorted_headers: Callable[[list[Dataset]], None] | None = None,
) -> Volume:
    """Sort by ImagePositionPatient along the slice normal, check spacing and orientation, rescale.

    Each check is a named function above that raises SeriesError with the reason for the report.
    With `scratch`, the HU volume is an HUStack in a file there instead of an array in memory.
    `sorted_headers` is given the checked headers in slice order before the pixels are read
    (work that needs only them starts meanwhile); their Pixel Data is dropped afterwards.
    """
    _check_count(paths, min_slices)
    # each file parsed once: its pixel data is read from it later, in slice order, then dropped
    headers = [pydicom.dcmread(p, defer_size=DEFERRED_BYTES) for p in paths]
    _check_attributes(headers)
    _check_axial(headers[0])
    _check_consistent(headers)
    order, spacing = _slice_order(headers)
    if sorted_headers is not None:
        sorted_headers([headers[i] for i in order])
    first = headers[0]
    rescales = {_rescale(h) for h in headers}
    # Integer HU (slope 1, integer intercepts: nearly every CT) fit in int16: half the memory of
    # float32.
    exact = all(slope == 1 and intercept.is_integer() for slope, intercept in rescales)
    shape, dtype = (
        (len(paths), int(first.Rows), int(first.Columns)),
        np.int16 if exact else np.float32,
    )
    hu = np.empty(shape, dtype) if scratch is None else HUStack(shape, dtype, scratch)
    for target, index in enumerate(order):
        ds = headers[index]
        # clip: no tissue is outside int16, and a 16-bit unsigned value plus intercept could be
        if exact:
            intercept = int(_rescale(ds)[1])
            hu[target] = np.clip(ds.pixel_array.astype(np.int32) + intercept, -32768, 32767)
        else:
            hu[target] = slice_hu(ds)
        del ds.PixelData  # the header is kept, its pixels are in `hu`
    row_mm, column_mm = _floats(first.PixelSpacing)
    return Volume(
        hu=hu,
        spacing_zyx=(spacing, row_mm, column_mm),
        sources=[headers[i] for i in order],
        paths=[paths[i] for i in order],
    )
