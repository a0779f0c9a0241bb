"""Writing a phantom as a CT Image Storage series, with its ground truth beside it."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from thighseg.synthetic.phantom import Phantom, describe

RESCALE_INTERCEPT = -1024.0
TRUTH_FILE = "truth.npz"


def write_series(phantom: Phantom, folder: Path, patient_id: str | None = None) -> list[Path]:
    """One file per slice (CT-<n>.dcm) plus truth.npz / truth.json; returns the slice paths."""
    folder.mkdir(parents=True, exist_ok=True)
    g = phantom.geometry
    seed = phantom.subject.seed
    study_uid, series_uid, frame_uid = (
        generate_uid(entropy_srcs=[f"thighseg-{seed}-{what}"])
        for what in ("study", "series", "frame")
    )
    now = dt.datetime(2026, 1, 1, 8, 0, 0) + dt.timedelta(minutes=seed % 10000)
    x0, y0 = g.origin_xy
    stored = np.clip(np.rint(phantom.hu - RESCALE_INTERCEPT), 0, 4095).astype(np.uint16)
    paths, sop_uids = [], []
    for k, z in enumerate(g.slice_positions):
        sop_uid = generate_uid(
            entropy_srcs=[f"thighseg-{seed}-{g.size}-{len(g.slice_positions)}-{k}"]
        )
        ds = _slice_dataset(
            phantom,
            stored[k],
            k,
            float(z),
            (x0, y0),
            study_uid,
            series_uid,
            frame_uid,
            sop_uid,
            now,
            patient_id or f"PHANTOM{seed:05d}",
        )
        path = folder / f"CT-{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        sop_uids.append(sop_uid)
    np.savez_compressed(
        folder / TRUTH_FILE,
        labels=phantom.labels,
        sop_instance_uids=np.array(sop_uids),
        slice_positions=g.slice_positions,
    )
    (folder / "truth.json").write_text(json.dumps(describe(phantom), indent=2))
    return paths


def _slice_dataset(
    phantom: Phantom,
    pixels: np.ndarray,
    index: int,
    z: float,
    origin: tuple[float, float],
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    sop_uid: str,
    when: dt.datetime,
    patient_id: str,
) -> Dataset:
    g = phantom.geometry
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.AccessionNumber = f"ACC{phantom.subject.seed:06d}"
    ds.Modality = "CT"
    ds.Manufacturer = "thighseg phantom"
    ds.ManufacturerModelName = "synthetic thigh CT"
    ds.InstitutionName = "thighseg"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT LOWER EXTREMITY"
    ds.SeriesDescription = "Thigh axial non-contrast"
    ds.BodyPartExamined = "THIGH"
    ds.PatientName = f"Phantom^{phantom.subject.seed}"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientAge = f"{int(phantom.subject.age):03d}Y"
    ds.SliceThickness = round(g.slice_spacing, 4)
    ds.KVP = 120
    ds.PatientPosition = "FFS"
    ds.ImageLaterality = "B"  # both thighs
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.StudyID = f"{phantom.subject.seed}"
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [round(origin[0], 4), round(origin[1], 4), round(z, 4)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = round(z, 4)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [round(g.pixel_spacing, 6), round(g.pixel_spacing, 6)]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    ds.RescaleIntercept = RESCALE_INTERCEPT
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.PixelData = pixels.tobytes()
    return ds


def read_truth(folder: Path) -> tuple[np.ndarray, list[str]]:
    """Ground-truth labels (z, y, x) in slice-file order and the SOP Instance UIDs they belong
    to."""
    with np.load(folder / TRUTH_FILE) as truth:
        return truth["labels"], [str(u) for u in truth["sop_instance_uids"]]
