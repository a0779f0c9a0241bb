"""Each QC flag is raised by a study built to trip it and is silent on a clean one."""

import inspect
import re

import numpy as np
import pytest

from thighseg.measure import qc
from thighseg.synthetic import phantom


@pytest.fixture(scope="module")
def clean():
    study = phantom.generate(71, size=256, slices=24, slice_spacing=5.0)
    g = study.geometry
    return study.hu, study.labels, (g.slice_spacing, g.pixel_spacing, g.pixel_spacing)


def codes(hu, labels, spacing) -> set[str]:
    return {flag.code for flag in qc.check(hu, labels, spacing)}


def test_clean_study_raises_no_flag(clean):
    assert qc.check(*clean) == []


def _trip(clean, name):
    hu, labels, spacing = clean[0].copy(), clean[1].copy(), clean[2]
    if name == "TOO_FEW_SLICES":
        return hu[:6], labels[:6], spacing
    if name == "PARTIAL_COVERAGE":
        return hu[:15], labels[:15], (3.0, *spacing[1:])
    if name == "MASK_AT_FOV_EDGE":
        columns = np.nonzero(labels.any(axis=(0, 1)))[0]
        return hu[:, :, columns[0] + 10 :], labels[:, :, columns[0] + 10 :], spacing
    if name == "IMPLAUSIBLE_VOL":
        labels[:, ::2, :] = 0
        labels[:, :, ::2] = 0
        labels[:, 1::4, :] = 0
        return hu, labels, spacing
    if name == "IMPLAUSIBLE_HU":
        hu[labels > 0] += 150  # contrast-enhanced or miscalibrated
        return hu, labels, spacing
    if name == "LEFT_RIGHT_DIFF":
        columns = np.nonzero(labels.any(axis=(0, 1)))[0]
        labels[:, :, (columns[0] + columns[-1]) // 2 + 20 :] = 0
        return hu, labels, spacing
    if name == "SLICE_JUMP":
        labels[12] = 0
        return hu, labels, spacing
    if name == "METAL_ARTEFACT":
        hu[:, 100:106, 100:106] = 3000.0  # an implant
        hu[:, 60:62, :] = np.where(labels[:, 60:62, :] > 0, -600.0, hu[:, 60:62, :])  # dark streak
        return hu, labels, spacing
    raise AssertionError(name)


@pytest.mark.parametrize(
    "code",
    [
        "TOO_FEW_SLICES",
        "PARTIAL_COVERAGE",
        "MASK_AT_FOV_EDGE",
        "IMPLAUSIBLE_VOL",
        "IMPLAUSIBLE_HU",
        "LEFT_RIGHT_DIFF",
        "SLICE_JUMP",
        "METAL_ARTEFACT",
    ],
)
def test_each_flag_is_raised_with_a_reason(clean, code):
    flags = qc.check(*_trip(clean, code))
    matching = [f for f in flags if f.code == code]
    assert matching, [f.code for f in flags]
    assert len(matching[0].reason) > 20


def test_flag_codes_fit_a_dicom_code_value():
    source = inspect.getsource(qc)
    assert all(len(code) <= 16 for code in re.findall(r'Flag\("([A-Z_]+)"', source))
