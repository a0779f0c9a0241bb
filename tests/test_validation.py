"""The bad-input catalogue: each unusable instance gets its C-STORE status, each unusable series
its reason. Instance checks run on the real validator; series checks on real spooled files."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, RLELossless

from thighseg.dicom_listener.config import Limits
from thighseg.dicom_listener.validation import check_instance
from thighseg.pipeline import assemble as assemble_module
from thighseg.pipeline.assemble import SeriesError, assemble

A900, X0122 = 0xA900, 0x0122


@pytest.fixture(scope="module")
def series(study_factory):
    return study_factory(4545, size=128, slices=6)


def _check(
    ds, sop_class=CTImageStorage, sop_instance=None, ts=ExplicitVRLittleEndian, limits=Limits()
):
    return check_instance(
        sop_class, sop_instance or str(ds.get("SOPInstanceUID", "")), ds, ts, limits
    )


def _set(keyword, value):
    def change(ds):
        setattr(ds, keyword, value)

    return change


def _delete(keyword):
    def change(ds):
        delattr(ds, keyword)

    return change


INSTANCE_CASES = {
    "mr_sop_class": (None, {"sop_class": MRImageStorage}, X0122, "sop_class"),
    "modality_mr": (_set("Modality", "MR"), {}, A900, "modality"),
    "modality_missing": (_delete("Modality"), {}, A900, "modality"),
    "no_study_uid": (_delete("StudyInstanceUID"), {}, A900, "uid"),
    "bad_series_uid": (_set("SeriesInstanceUID", "1.2.3.4x"), {}, A900, "uid"),
    "uid_mismatch": (None, {"sop_instance": "1.2.3.4"}, A900, "uid"),
    "no_pixel_data": (_delete("PixelData"), {}, A900, "no_pixel_data"),
    "rows_missing": (_delete("Rows"), {}, A900, "matrix"),
    "absurd_matrix": (_set("Rows", 16384), {}, A900, "matrix"),
    "tiny_matrix": (_set("Columns", 4), {}, A900, "matrix"),
    "colour": (_set("SamplesPerPixel", 3), {}, A900, "not_grayscale"),
    "bits_32": (_set("BitsAllocated", 32), {}, A900, "bits"),
    "multiframe": (_set("NumberOfFrames", 4), {}, A900, "multiframe"),
    "no_position": (_delete("ImagePositionPatient"), {}, A900, "geometry"),
    "bad_orientation": (_set("ImageOrientationPatient", [1, 0, 0]), {}, A900, "geometry"),
    "absurd_spacing": (_set("PixelSpacing", [40.0, 40.0]), {}, A900, "geometry"),
    "truncated_pixels": (
        lambda ds: setattr(ds, "PixelData", ds.PixelData[:1000]),
        {},
        A900,
        "pixel_length",
    ),
}


@pytest.mark.parametrize("name", INSTANCE_CASES)
def test_unusable_instance_is_refused_with_its_status(series, name):
    change, kwargs, status, reason = INSTANCE_CASES[name]
    ds = pydicom.dcmread(series[0])
    if change:
        change(ds)
    refusal = _check(ds, **kwargs)
    assert refusal is not None and (refusal.status, refusal.reason) == (status, reason)


def test_a_good_instance_and_a_compressed_one_pass(series):
    ds = pydicom.dcmread(series[0])
    assert _check(ds) is None
    ds.compress(RLELossless)
    assert _check(ds, ts=RLELossless) is None  # compressed length is not checked against the matrix


def _write_variant(paths, folder, change_by_index):
    out = []
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        if k in change_by_index:
            change_by_index[k](ds)
        target = folder / f"{k}.dcm"
        ds.save_as(target)
        out.append(target)
    return out


def _shift_z(dz):
    def change(ds):
        ds.ImagePositionPatient = [
            *ds.ImagePositionPatient[:2],
            float(ds.ImagePositionPatient[2]) + dz,
        ]

    return change


def _resample(ds):
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[::2, ::2]).tobytes()
    ds.Rows, ds.Columns = ds.Rows // 2, ds.Columns // 2


SERIES_CASES = {
    "gap": ({3: "drop"}, "not evenly spaced"),
    "non_axial": (
        {k: _set("ImageOrientationPatient", [0, 1, 0, 0, 0, -1]) for k in range(6)},
        "not axial",
    ),
    "matrix_differs": ({4: _resample}, "Rows/Columns"),
    "spacing_differs": ({1: _set("PixelSpacing", [0.5, 0.5])}, "PixelSpacing"),
    "orientation_differs": (
        {2: _set("ImageOrientationPatient", [1, 0, 0, 0, 0.9, 0.1])},
        "ImageOrientationPatient",
    ),
    "uneven_positions": ({5: _shift_z(7.0)}, "not evenly spaced"),
    "frame_of_reference_differs": (
        {1: _set("FrameOfReferenceUID", "1.2.3.4.5")},
        "FrameOfReferenceUID",
    ),
}


@pytest.mark.parametrize("name", list(SERIES_CASES))
def test_unusable_series_fails_with_a_reason(series, tmp_path, name):
    changes, reason = SERIES_CASES[name]
    paths = list(series)
    if any(v == "drop" for v in changes.values()):
        paths = [p for k, p in enumerate(paths) if changes.get(k) != "drop"]
        changes = {}
    with pytest.raises(SeriesError, match=reason):
        assemble(_write_variant(paths, tmp_path, changes))


def test_duplicate_positions_and_too_few_slices_fail(series, tmp_path):
    position = pydicom.dcmread(series[1]).ImagePositionPatient
    duplicated = _write_variant(series, tmp_path, {2: _set("ImagePositionPatient", position)})
    with pytest.raises(SeriesError, match="same slice position"):
        assemble(duplicated)
    with pytest.raises(SeriesError, match="at least"):
        assemble(list(series[:2]))


def test_slices_too_far_apart_fail(series, tmp_path):
    spread = _write_variant(series, tmp_path, {k: _shift_z(-40.0 * k) for k in range(6)})
    with pytest.raises(SeriesError, match="slice spacing"):
        assemble(spread)


def test_status_names_mean_what_pynetdicom_says():
    from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS

    from thighseg.dicom_listener.validation import (
        CANNOT_UNDERSTAND,
        DATASET_DOES_NOT_MATCH_SOP_CLASS,
        OUT_OF_RESOURCES,
        SOP_CLASS_NOT_SUPPORTED,
    )

    assert STORAGE_SERVICE_CLASS_STATUS[OUT_OF_RESOURCES][1] == "Refused: Out of Resources"
    assert (
        STORAGE_SERVICE_CLASS_STATUS[DATASET_DOES_NOT_MATCH_SOP_CLASS][1]
        == "Data Set Does Not Match SOP Class"
    )
    assert STORAGE_SERVICE_CLASS_STATUS[CANNOT_UNDERSTAND][1] == "Cannot Understand"
    assert GENERAL_STATUS[SOP_CLASS_NOT_SUPPORTED][1] == "Refused: SOP Class Not Supported"


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless])
def test_deferred_pixel_data_assembles_as_whole_reads(series, tmp_path, monkeypatch, syntax):
    """Assembly reads each header once and its pixel data later, in slice order (deferred by
    pydicom, encapsulated data too): the volume is the one whole reads give, headers keep no
    pixels."""
    paths = []
    for k, path in enumerate(reversed(series)):  # not in slice order
        ds = pydicom.dcmread(path)
        if syntax == RLELossless:
            ds.compress(RLELossless)
        paths.append(tmp_path / f"{k}.dcm")
        ds.save_as(paths[-1])
    monkeypatch.setattr(assemble_module, "DEFERRED_BYTES", 64)  # these small slices too
    volume = assemble(paths)
    whole = np.stack([pydicom.dcmread(p).pixel_array for p in volume.paths]).astype(np.int32)
    intercept = int(float(volume.sources[0].RescaleIntercept))  # slope 1: integer HU
    assert np.array_equal(volume.hu, whole + intercept)
    assert not any("PixelData" in source for source in volume.sources)
