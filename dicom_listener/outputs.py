"""Results as DICOM SEG (highdicom) and a JSON report."""
from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

import thighseg
from thighseg.labels import Group, MUSCLE_GROUPS

# SNOMED CT has no single concept per functional group in pydicom's code tables; the segmented
# property type is "Skeletal muscle" and the segment label names the group.
_GROUP_DESCRIPTIONS = {
    Group.EXTENSOR: "Thigh extensor group (quadriceps, sartorius)",
    Group.FLEXOR: "Thigh flexor group (hamstrings)",
    Group.ADDUCTOR: "Thigh adductor group (adductors, gracilis)",
}


def segment_descriptions(model: str) -> list[hd.seg.SegmentDescription]:
    algorithm = hd.AlgorithmIdentificationSequence(name=f"thighseg {model}", version=thighseg.__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    return [
        hd.seg.SegmentDescription(
            segment_number=int(group),
            segment_label=group.name.capitalize(),
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.SkeletalMuscle,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=hd.UID(),
            tracking_id=_GROUP_DESCRIPTIONS[group],
        )
        for group in MUSCLE_GROUPS
    ]


def write_seg(sources: list[Dataset], labels: np.ndarray, path: Path, model: str) -> Dataset:
    """A binary SEG with one frame per source slice and segment, referencing every source instance."""
    if labels.shape[0] != len(sources):
        raise ValueError(f"{labels.shape[0]} mask slices for {len(sources)} source instances")
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=labels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(model),
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
    seg.save_as(path)
    return seg


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".part")
    temporary.write_text(json.dumps(report, indent=2, sort_keys=True))
    temporary.replace(path)
