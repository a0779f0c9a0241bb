"""Results as DICOM SEG and SR, built with highdicom (in the SEG process, when the listener runs
one: `seg_process`)."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

import thighseg
from thighseg.core.labels import MUSCLE_GROUPS, Group
from thighseg.measure.indices import TissueVolumes, VolumeIndices
from thighseg.measure.qc import Flag
from thighseg.pipeline import coding
from thighseg.pipeline.seg_inputs import sided_labels


def _algorithm(model: str, algorithm_version: str | None) -> hd.AlgorithmIdentificationSequence:
    """The algorithm that made the segments: its version names the package and, when known, the
    served model version and weights hash."""
    return hd.AlgorithmIdentificationSequence(
        name=f"thighseg {model}",
        version=algorithm_version or thighseg.__version__,
        family=codes.cid7162.ArtificialIntelligence,
    )


def build_seg(
    sources: list[Dataset],
    sided: np.ndarray,
    model: str,
    algorithm_version: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.seg.Segmentation:
    """A binary SEG of segment numbers (`sided_labels`) with one frame per source slice and
    segment (six segments: each group in each leg), referencing every source instance. UIDs given
    in advance let the SR reference a SEG still being built elsewhere."""
    if sided.shape[0] != len(sources):
        raise ValueError(f"{sided.shape[0]} mask slices for {len(sources)} source instances")
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=sided,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=coding.segment_descriptions(_algorithm(model, algorithm_version)),
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=int(sources[0].get("SeriesNumber", 1) or 1) + 1000,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer="thighseg",
        manufacturer_model_name=f"thighseg {model}",
        software_versions=thighseg.__version__,
        device_serial_number="thighseg-embedded",
        series_description="Thigh muscle groups (thighseg)",
        content_creator_name=coding.CONTENT_CREATOR,
        content_label="THIGHMUSCLE",
        content_description="Thigh muscle groups, automatic",
        omit_empty_frames=False,
    )


def save_seg(seg: hd.seg.Segmentation, path: Path) -> None:
    """Write a SEG, its pixel data streamed to the file rather than copied twice first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = seg.PixelData
    seg.PixelData = io.BytesIO(pixels)
    try:
        seg.save_as(path)
    finally:
        seg.PixelData = pixels


def write_seg(
    sources: list[Dataset],
    labels: np.ndarray,
    midline: float,
    path: Path,
    model: str,
    algorithm_version: str | None = None,
) -> Dataset:
    """The SEG of group labels (1-3), each group split at the body `midline` into the patient's
    right and left leg."""
    if labels.shape[0] != len(sources):
        raise ValueError(f"{labels.shape[0]} mask slices for {len(sources)} source instances")
    seg = build_seg(sources, sided_labels(labels, midline), model, algorithm_version)
    save_seg(seg, path)
    return seg


def _measurement(
    name: hd.sr.CodedConcept, value: float, unit: hd.sr.CodedConcept, algorithm, derivation=None
) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=name,
        value=round(float(value), 2),
        unit=unit,
        derivation=derivation,
        algorithm_id=algorithm,
    )


def _tissue_measurements(tissue: TissueVolumes, algorithm) -> list[hd.sr.Measurement]:
    """Volumes and lean-muscle density of one group (or all muscle) in one leg or both."""
    items = [
        _measurement(codes.SCT.Volume, tissue.total_ml, coding.MILLILITRE, algorithm),
        _measurement(coding.LEAN_VOLUME, tissue.lean_ml, coding.MILLILITRE, algorithm),
        _measurement(coding.IMAT_VOLUME, tissue.imat_ml, coding.MILLILITRE, algorithm),
        _measurement(
            coding.LOW_DENSITY_VOLUME, tissue.low_density_ml, coding.MILLILITRE, algorithm
        ),
    ]
    for statistic, value in (
        (codes.SCT.Mean, tissue.mean_hu),
        (codes.SCT.StandardDeviation, tissue.sd_hu),
    ):
        if value is not None:
            items.append(
                _measurement(
                    codes.DCM.AttenuationCoefficient, value, coding.HOUNSFIELD, algorithm, statistic
                )
            )
    return items


def _site(leg: str) -> list[hd.sr.FindingSite]:
    return [hd.sr.FindingSite(codes.SCT.Thigh, laterality=coding.LATERALITY[leg])]


def _tracking(identifier: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=identifier[:64])


def _leg_summary(
    leg: str, indices: VolumeIndices, algorithm
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """All muscle of one leg (or both) and the fat between its groups; totals add the fractions and
    the volume index."""
    values = indices.leg(leg)
    measurements = _tissue_measurements(values.muscle, algorithm)
    measurements.append(
        _measurement(
            coding.INTERMUSCULAR_FAT, values.intermuscular_fat_ml, coding.MILLILITRE, algorithm
        )
    )
    if leg == "total":
        total = indices.total
        measurements += [
            _measurement(
                coding.IMAT_FRACTION, 100 * total.imat_fraction, coding.PERCENT, algorithm
            ),
            _measurement(
                coding.INTERMUSCULAR_FRACTION,
                100 * total.intermuscular_fat_fraction,
                coding.PERCENT,
                algorithm,
            ),
            _measurement(
                coding.ASYMMETRY, indices.asymmetry_percent.muscle, coding.PERCENT, algorithm
            ),
        ]
        if total.muscle_volume_index_ml_per_m2 is not None:
            measurements.append(
                _measurement(
                    coding.VOLUME_INDEX,
                    total.muscle_volume_index_ml_per_m2,
                    coding.ML_PER_M2,
                    algorithm,
                )
            )
    name = "Both thighs" if leg == "total" else f"{leg.capitalize()} thigh"
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(f"{name}, all muscle groups"),
        finding_type=codes.SCT.MuscleOfLowerLimb,
        finding_sites=_site(leg),
        measurements=measurements,
    )


def _group_total(
    group: Group, indices: VolumeIndices, algorithm
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One group over both legs, with its right-left asymmetry."""
    name = group.name.lower()
    measurements = _tissue_measurements(indices.total.tissue(name), algorithm)
    measurements.append(
        _measurement(
            coding.ASYMMETRY, getattr(indices.asymmetry_percent, name), coding.PERCENT, algorithm
        )
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(f"{coding.GROUP_DESCRIPTIONS[group]}, both thighs"),
        finding_type=coding.GROUP_CODES[group],
        finding_sites=_site("total"),
        measurements=measurements,
    )


def _quality_control(flags: list[Flag]) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """Every QC flag as a coded evaluation, or one that says none was raised."""
    values = [coding.private(flag.code, flag.reason) for flag in flags] or [coding.QC_PASSED]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking("Quality control"),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(coding.QC_FLAG, v) for v in values],
    )


def write_sr(
    seg: Dataset,
    sources: list[Dataset],
    indices: VolumeIndices,
    path: Path,
    model: str,
    flags: list[Flag] | None = None,
    algorithm_version: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Comprehensive 3D SR, TID 1500 measurement report: one volumetric ROI group per muscle group
    and leg, each referencing its SEG segment, with every index of report.json (volumes, lean
    muscle, intramuscular and low-density muscle, density); per leg and for both thighs all muscle
    with intermuscular fat, fractions, asymmetry and volume index; the QC flags as coded
    evaluations. Every measurement names the algorithm that made it (TID 4019). UIDs given in
    advance let the report name an SR still being built elsewhere."""
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
    source_series = hd.sr.SourceSeriesForSegmentation(sources[0].SeriesInstanceUID)
    groups: list = []
    for group in MUSCLE_GROUPS:
        for leg in coding.SIDES:
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=_tracking(f"{coding.GROUP_DESCRIPTIONS[group]}, {leg}"),
                    referenced_segment=hd.sr.ReferencedSegment(
                        sop_class_uid=seg.SOPClassUID,
                        sop_instance_uid=seg.SOPInstanceUID,
                        segment_number=coding.segment_number(group, leg),
                        source_series=source_series,
                    ),
                    finding_type=coding.GROUP_CODES[group],
                    finding_sites=_site(leg),
                    measurements=_tissue_measurements(
                        indices.leg(leg).tissue(group.name.lower()), algorithm
                    ),
                )
            )
    groups += [_group_total(group, indices, algorithm) for group in MUSCLE_GROUPS]
    groups += [_leg_summary(leg, indices, algorithm) for leg in (*coding.SIDES, "total")]
    groups.append(_quality_control(flags or []))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*sources, seg],
        content=report,
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=int(sources[0].get("SeriesNumber", 1) or 1) + 2000,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer="thighseg",
        series_description="Thigh muscle indices (thighseg)",
    )
    sr.CodingSchemeIdentificationSequence = [coding.coding_scheme_identification()]
    path.parent.mkdir(parents=True, exist_ok=True)
    sr.save_as(path)
    return sr
