"""Results as DICOM SEG (highdicom) and a JSON report."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

import thighseg
from thighseg.core.labels import MUSCLE_GROUPS, Group
from thighseg.pipeline.summary import Preview, blend

# The segmented property type is SNOMED CT "Muscle of lower limb" (102292000, in DICOM's anatomic
# context groups); the functional group is named by the segment label and tracking identifier,
# because concepts for the three groups could not be verified against DICOM's code tables here.
_GROUP_DESCRIPTIONS = {
    Group.EXTENSOR: "Thigh extensor group (quadriceps, sartorius)",
    Group.FLEXOR: "Thigh flexor group (hamstrings)",
    Group.ADDUCTOR: "Thigh adductor group (adductors, gracilis)",
}


def segment_descriptions(
    model: str, algorithm_version: str | None = None
) -> list[hd.seg.SegmentDescription]:
    """The three muscle-group segments of every SEG, with the algorithm that made them (its
    version names the package and, when known, the served model version and weights hash)."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"thighseg {model}",
        version=algorithm_version or thighseg.__version__,
        family=codes.cid7162.ArtificialIntelligence,
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=int(group),
            segment_label=group.name.capitalize(),
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.MuscleOfLowerLimb,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=hd.UID(),
            tracking_id=_GROUP_DESCRIPTIONS[group],
        )
        for group in MUSCLE_GROUPS
    ]


def write_seg(
    sources: list[Dataset],
    labels: np.ndarray,
    path: Path,
    model: str,
    algorithm_version: str | None = None,
) -> Dataset:
    """A binary SEG with one frame per source slice and segment, referencing every source
    instance."""
    if labels.shape[0] != len(sources):
        raise ValueError(f"{labels.shape[0]} mask slices for {len(sources)} source instances")
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=labels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(model, algorithm_version),
        series_instance_uid=hd.UID(),
        series_number=int(sources[0].get("SeriesNumber", 1) or 1) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="thighseg",
        manufacturer_model_name=f"thighseg {model}",
        software_versions=thighseg.__version__,
        device_serial_number="thighseg-embedded",
        series_description="Thigh muscle groups (thighseg)",
        omit_empty_frames=False,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = seg.PixelData
    # a buffered value is streamed to the file, not copied twice first
    seg.PixelData = io.BytesIO(pixels)
    try:
        seg.save_as(path)
    finally:
        seg.PixelData = pixels
    return seg


MILLILITRE = hd.sr.CodedConcept("mL", "UCUM", "milliliter")


QC_FLAG = hd.sr.CodedConcept("QC", "99THIGHSEG", "Quality control flag")


def _qc_evaluations(flags: list) -> list[hd.sr.QualitativeEvaluation]:
    """QC flags as qualitative evaluations, coded in thighseg's private scheme (99THIGHSEG)."""
    return [
        hd.sr.QualitativeEvaluation(
            QC_FLAG, hd.sr.CodedConcept(flag.code, "99THIGHSEG", flag.reason[:64])
        )
        for flag in flags
    ]


def write_sr(
    seg: hd.seg.Segmentation,
    sources: list[Dataset],
    volumes_ml: dict[str, float],
    path: Path,
    model: str,
    flags: list | None = None,
    algorithm_version: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Comprehensive 3D SR, TID 1500 measurement report: one volumetric ROI group per muscle group,
    each referencing its SEG segment, with the group's volume in mL (and the algorithm that
    measured it, TID 4019); QC flags as qualitative evaluations of the whole report."""
    algorithm = hd.sr.AlgorithmIdentification(
        name=f"thighseg {model}", version=algorithm_version or thighseg.__version__
    )
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(),
            name=f"thighseg {model}",
            manufacturer_name="thighseg",
            model_name=model,
            serial_number="thighseg-embedded",
        ),
    )
    groups = []
    for group in MUSCLE_GROUPS:
        segment = hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=int(group),
            source_series=hd.sr.SourceSeriesForSegmentation(sources[0].SeriesInstanceUID),
        )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=hd.UID(), identifier=_GROUP_DESCRIPTIONS[group]
                ),
                referenced_segment=segment,
                finding_type=codes.SCT.MuscleOfLowerLimb,
                measurements=[
                    hd.sr.Measurement(
                        name=codes.SCT.Volume,
                        value=round(volumes_ml[group.name.lower()], 2),
                        unit=MILLILITRE,
                        algorithm_id=algorithm,
                    )
                ],
            )
        )
    if flags:
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=hd.UID(), identifier="Quality control"
                ),
                qualitative_evaluations=_qc_evaluations(flags),
            )
        )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg, *sources],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=int(sources[0].get("SeriesNumber", 1) or 1) + 2000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="thighseg",
        series_description="Thigh muscle volumes (thighseg)",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    sr.save_as(path)
    return sr


def write_overlay_png(preview: Preview, path: Path) -> Path:
    """Three axial levels (distal, middle, proximal) side by side, coloured as in the summary page,
    so a reader can judge the result at a glance."""
    from PIL import Image

    tiles = [
        (blend(hu, labels) * 255).astype(np.uint8)
        for hu, labels in zip(preview.axial_hu, preview.axial_labels, strict=False)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(tiles, axis=1)).save(path)
    return path
