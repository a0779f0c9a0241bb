"""SEG and SR as viewers and PACS read them: colours, laterality, creator, every index coded, and
the readers 3D Slicer uses (dcmqi) and dciodvfy read them without complaint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from conftest import assembled_with_truth, comparable_elements

from thighseg.measure.anatomy import body_midline, leg_masks
from thighseg.measure.indices import TISSUES, volume_indices
from thighseg.measure.qc import Flag
from thighseg.pipeline import coding
from thighseg.pipeline.loaders import labels_from_seg
from thighseg.pipeline.outputs import build_seg, write_seg, write_sr
from thighseg.pipeline.seg_header import SegHeader
from thighseg.pipeline.seg_inputs import seg_reference, sided_labels, slim_sources

BIN = Path(sys.executable).parent  # dcmqi installs its readers beside the interpreter
FLAGS = [Flag("PARTIAL_COVERAGE", "12 slices cover 55 mm of the thigh")]


@pytest.fixture(scope="module")
def outputs(study_factory, tmp_path_factory):
    """SEG and SR of a phantom study from its true labels."""
    volume, labels = assembled_with_truth(study_factory(77, size=128, slices=6))
    indices = volume_indices(volume.hu, labels, volume.spacing_zyx)
    out = tmp_path_factory.mktemp("outputs")
    seg = write_seg(
        volume.sources, labels, body_midline(volume.hu), out / "seg.dcm", "denseunet", "0.1.0 v2"
    )
    write_sr(seg, volume.sources, indices, out / "sr.dcm", "denseunet", FLAGS, "0.1.0 v2")
    # as the SEG process writes it: after a header built ahead of the labels
    SegHeader.of(slim_sources(volume.sources), "denseunet", "0.1.0 v2", "1.2.3", "1.2.3.4").write(
        sided_labels(labels, body_midline(volume.hu)), out / "seg_ahead.dcm"
    )
    return volume, labels, indices, out


def test_seg_has_a_segment_per_group_and_leg_with_colour_laterality_and_creator(outputs):
    volume, labels, _, out = outputs
    seg = hd.seg.segread(out / "seg.dcm")
    assert str(seg.ContentCreatorName) == coding.CONTENT_CREATOR
    descriptions = [seg.get_segment_description(n) for n in seg.segment_numbers]
    assert [d.SegmentLabel for d in descriptions] == [
        f"{side} {group}"
        for group in ("extensor", "flexor", "adductor")
        for side in ("Right", "Left")
    ]
    colours = {
        d.SegmentLabel.split()[1]: tuple(d.RecommendedDisplayCIELabValue) for d in descriptions
    }
    assert len(set(colours.values())) == 3  # one distinct colour per group
    sides = [
        d.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
        for d in descriptions
    ]
    assert [m.CodeValue for m in sides] == ["24028007", "7771000"] * 3  # SCT Right, Left
    # TotalSegmentator's codes: quadriceps femoris, posterior and medial muscle of thigh
    group_codes = [d.SegmentedPropertyTypeCodeSequence[0].CodeValue for d in descriptions]
    assert group_codes == [c for c in ("21989003", "128511007", "1179657002") for _ in "RL"]
    assert {d.AnatomicRegionSequence[0].CodeValue for d in descriptions} == {"68367000"}  # thigh
    # each leg's segment lies in that leg's columns, and the groups read back whole
    uids = [s.SOPInstanceUID for s in volume.sources]
    legs = leg_masks(volume.hu)
    for number, side in ((1, "right"), (2, "left")):
        mask = np.asarray(
            seg.get_pixels_by_source_instance(uids, segment_numbers=[number], combine_segments=True)
        )
        assert mask.any() and not (mask.astype(bool) & ~legs[side]).any()
    assert np.array_equal(labels_from_seg(out / "seg.dcm", uids), labels)


def _measurements(group) -> dict[str, float]:
    return {
        f"{m.name.meaning}|{m.derivation.meaning if m.derivation else ''}": m.value
        for m in group.get_measurements()
    }


def test_sr_carries_every_index_per_group_and_leg_and_the_qc_flags(outputs):
    _, _, indices, out = outputs
    sr = hd.sr.srread(out / "sr.dcm")
    rois = sr.content.get_volumetric_roi_measurement_groups()
    assert len(rois) == 6
    for roi in rois:
        group, side = roi.tracking_identifier.rsplit(", ", 1)
        name = next(n for n in TISSUES if n in group.lower())
        expected = indices.leg(side).tissue(name)
        values = _measurements(roi)
        assert values["Volume|"] == pytest.approx(expected.total_ml, abs=0.01)
        assert values["Lean muscle volume|"] == pytest.approx(expected.lean_ml, abs=0.01)
        assert values["Intramuscular adipose tissue volume|"] == pytest.approx(
            expected.imat_ml, abs=0.01
        )
        assert values["Attenuation Coefficient|Mean"] == pytest.approx(expected.mean_hu, abs=0.01)
        group_code = next(g for g in coding.GROUP_DESCRIPTIONS if g.name.lower() == name)
        assert roi.referenced_segment.referenced_segment_numbers == [
            coding.segment_number(group_code, side)
        ]
        assert roi.finding_type == coding.GROUP_CODES[group_code]
    document = json.dumps(sr.to_json_dict())
    for value in (
        indices.total.intermuscular_fat_ml,
        indices.left.intermuscular_fat_ml,
        round(100 * indices.total.imat_fraction, 2),
        indices.asymmetry_percent.adductor,
    ):
        assert str(round(value, 2)) in document
    assert "PARTIAL_COVERAGE" in document and "99THIGHSEG" in document
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99THIGHSEG"


def _complaints(output: str) -> list[str]:
    return [
        line
        for line in output.splitlines()
        if any(word in line.lower() for word in ("warn", "error", "failed"))
    ]


@pytest.mark.skipif(not (BIN / "segimage2itkimage").exists(), reason="dcmqi not installed")
@pytest.mark.parametrize("seg_name", ["seg.dcm", "seg_ahead.dcm"])
def test_dcmqi_reads_seg_and_sr_without_warnings(outputs, tmp_path, seg_name):
    _, _, _, out = outputs
    seg = subprocess.run(
        [BIN / "segimage2itkimage", "--inputDICOM", out / seg_name, "--outputDirectory", tmp_path],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert seg.returncode == 0 and _complaints(seg.stdout + seg.stderr) == [], seg.stdout
    meta = json.loads((tmp_path / "meta.json").read_text())
    colours = {tuple(s[0]["recommendedDisplayRGBValue"]) for s in meta["segmentAttributes"]}
    assert len(colours) == 3
    types = [
        s[0]["SegmentedPropertyTypeCodeSequence"]["CodeValue"] for s in meta["segmentAttributes"]
    ]
    assert sorted(set(types)) == ["1179657002", "128511007", "21989003"]
    sr = subprocess.run(
        [
            BIN / "tid1500reader",
            "--inputDICOM",
            out / "sr.dcm",
            "--outputMetadata",
            tmp_path / "sr.json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sr.returncode == 0 and _complaints(sr.stdout + sr.stderr) == [], sr.stdout
    groups = json.loads((tmp_path / "sr.json").read_text())["Measurements"]
    assert sum("ReferencedSegment" in g for g in groups) == 6
    assert {g["Laterality"]["CodeMeaning"] for g in groups if "Laterality" in g} >= {
        "Right",
        "Left",
    }


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) not installed")
@pytest.mark.parametrize("name", ["seg.dcm", "seg_ahead.dcm", "sr.dcm"])
def test_dciodvfy_finds_no_error(outputs, name):
    _, _, _, out = outputs
    check = subprocess.run(["dciodvfy", out / name], capture_output=True, text=True)
    assert [
        line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")
    ] == []


def test_seg_and_sr_from_slim_source_headers_are_those_from_whole_headers(outputs, tmp_path):
    """The SEG process is handed `slim_sources` (a fifth of the pickling): nothing highdicom writes
    may depend on what they leave out."""
    volume, labels, indices, _ = outputs
    midline = body_midline(volume.hu)
    slim = slim_sources(volume.sources)
    assert len(slim) == len(volume.sources) and len(slim[1]) < len(volume.sources[1]) / 2
    made = {}
    for name, sources in (("whole", volume.sources), ("slim", slim)):
        seg = build_seg(sources, sided_labels(labels, midline), "m", "v", "1.2.3", "1.2.3.4")
        sr = write_sr(
            seg_reference(sources[0], "1.2.3", "1.2.3.4"),
            sources,
            indices,
            tmp_path / f"{name}.dcm",
            "m",
            FLAGS,
            "v",
            "1.2.5",
            "1.2.5.6",
        )
        made[name] = (list(comparable_elements(seg)), list(comparable_elements(sr)))
    assert len(made["whole"][0]) > 6 * len(volume.sources) * 5  # the per-frame items were compared
    assert made["slim"] == made["whole"]
