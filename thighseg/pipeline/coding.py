"""The coded vocabulary of thighseg's SEG and SR: what each segment and measurement means to a
viewer or a PACS that reads codes, not labels.

Sources. The three groups' codes and the laterality modifiers are those TotalSegmentator gives its
thigh-muscle classes (wasserth/TotalSegmentator, totalsegmentator/resources/
totalsegmentator_snomed_mapping.csv at commit 8a7a8b761d35bb6faabb8bc49838ce7e1d8c6b64):
quadriceps_femoris SCT 21989003 "Quadriceps femoris muscle" (our extensor group: the quadriceps
with sartorius, which TotalSegmentator codes apart and we do not separate), thigh_posterior_
compartment SCT 128511007 "Posterior muscle of thigh structure" (flexor group, the hamstrings),
thigh_medial_compartment SCT 1179657002 "Structure of medial muscle of thigh" (adductor group), each
with a Right 24028007 / Left 7771000 property-type modifier as in its *_left/*_right rows. The
other standard codes are in DICOM PS3.16 (read through pydicom's code dictionary, generated from
it): Muscle of lower limb (SCT 102292000, all groups together), Thigh (SCT 68367000), Right and
left (SCT 51440002, CID 244 Laterality), Volume (SCT 118565006), Mean / Standard deviation (SCT
373098007 / 386136009), Attenuation Coefficient (DCM 112031). Indices that no standard codes (lean
muscle, intramuscular fat, low-density muscle, QC flags) use thighseg's private scheme 99THIGHSEG,
declared in the SR's Coding Scheme Identification.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from thighseg.core.labels import MUSCLE_GROUPS, Group
from thighseg.pipeline.summary import COLOURS

SCHEME = "99THIGHSEG"
# The SEG's Content Creator's Name: the software, since no person drew the contours.
CONTENT_CREATOR = "thighseg^automatic"

GROUP_DESCRIPTIONS = {
    Group.EXTENSOR: "Thigh extensor group (quadriceps, sartorius)",
    Group.FLEXOR: "Thigh flexor group (hamstrings)",
    Group.ADDUCTOR: "Thigh adductor group (adductors, gracilis)",
}

# SNOMED CT concept of each group, from TotalSegmentator's mapping (see the module docstring)
# (pydicom Codes, not CodedConcepts: highdicom makes a new item of each per segment, which the
# laterality modifier is then added to)
GROUP_CODES = {
    Group.EXTENSOR: Code("21989003", "SCT", "Quadriceps femoris muscle"),
    Group.FLEXOR: Code("128511007", "SCT", "Posterior muscle of thigh structure"),
    Group.ADDUCTOR: Code("1179657002", "SCT", "Structure of medial muscle of thigh"),
}

SIDES = ("right", "left")  # the order of thighseg.measure.indices.LEGS
LATERALITY = {"right": codes.SCT.Right, "left": codes.SCT.Left, "total": codes.SCT.RightAndLeft}

MILLILITRE = hd.sr.CodedConcept("mL", "UCUM", "milliliter")
HOUNSFIELD = hd.sr.CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")
PERCENT = hd.sr.CodedConcept("%", "UCUM", "percent")
ML_PER_M2 = hd.sr.CodedConcept("mL/m2", "UCUM", "milliliter per square meter")


def private(value: str, meaning: str) -> hd.sr.CodedConcept:
    """A concept of thighseg's own scheme (code values at most 16 characters)."""
    return hd.sr.CodedConcept(value[:16], SCHEME, meaning[:64])


LEAN_VOLUME = private("LEANVOL", "Lean muscle volume")
IMAT_VOLUME = private("IMATVOL", "Intramuscular adipose tissue volume")
LOW_DENSITY_VOLUME = private("LOWDENSVOL", "Low-density muscle volume")
INTERMUSCULAR_FAT = private("INTERMUSCFAT", "Intermuscular adipose tissue volume")
IMAT_FRACTION = private("IMATFRAC", "Intramuscular fat fraction of muscle volume")
INTERMUSCULAR_FRACTION = private("INTERMUSCFRAC", "Intermuscular fat fraction")
VOLUME_INDEX = private("MUSCVOLINDEX", "Muscle volume index (volume / height squared)")
ASYMMETRY = private("ASYMMETRY", "Right-left asymmetry of muscle volume")
QC_FLAG = private("QC", "Quality control flag")
QC_PASSED = private("QCPASSED", "No quality control flag raised")


def segment_number(group: Group, side: str) -> int:
    """Segments 1-6: right then left of extensor, flexor, adductor."""
    return 2 * (int(group) - 1) + SIDES.index(side) + 1


def segment_label(group: Group, side: str) -> str:
    """What viewers list: "Right extensor"; readers match the group by name in it."""
    return f"{side.capitalize()} {group.name.lower()}"


def display_colour(group: Group) -> hd.color.CIELabColor:
    """The group's colour on the summary page, as DICOM's recommended display CIELab value."""
    red, green, blue = (round(255 * c) for c in COLOURS[int(group)])
    return hd.color.CIELabColor.from_rgb(red, green, blue)


def segment_descriptions(
    algorithm: hd.AlgorithmIdentificationSequence,
) -> list[hd.seg.SegmentDescription]:
    """Six segments, one per group and leg, with colour, laterality and tracking identifiers."""
    descriptions = []
    for group in MUSCLE_GROUPS:
        for side in SIDES:
            description = hd.seg.SegmentDescription(
                segment_number=segment_number(group, side),
                segment_label=segment_label(group, side),
                segmented_property_category=codes.SCT.AnatomicalStructure,
                segmented_property_type=GROUP_CODES[group],
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=hd.UID(),
                tracking_id=f"{GROUP_DESCRIPTIONS[group]}, {side}",
                anatomic_regions=[codes.SCT.Thigh],
                display_color=display_colour(group),
            )
            laterality = LATERALITY[side]
            description.SegmentedPropertyTypeCodeSequence[
                0
            ].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept(
                    laterality.value, laterality.scheme_designator, laterality.meaning
                )
            ]
            descriptions.append(description)
    return descriptions


def coding_scheme_identification() -> Dataset:
    """The Coding Scheme Identification item that declares 99THIGHSEG in the SR."""
    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = "thighseg indices and quality-control flags"
    item.CodingSchemeResponsibleOrganization = "thighseg"
    return item
