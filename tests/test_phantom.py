import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from conftest import TEST_SLICE_SPACING_MM
from pydicom.uid import CTImageStorage

from thighseg.core.labels import MUSCLE_GROUPS, MUSCLE_HU, Group
from thighseg.synthetic import phantom
from thighseg.synthetic.ct_series import read_truth


def test_same_seed_same_study_and_different_seeds_differ():
    a, b = phantom.generate(3, size=96, slices=4), phantom.generate(3, size=96, slices=4)
    c = phantom.generate(4, size=96, slices=4)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)
    assert a.subject != c.subject


def test_every_group_present_on_both_legs_with_muscle_density():
    study = phantom.generate(11, size=192, slices=6)
    midline = study.labels.shape[2] // 2
    for group in MUSCLE_GROUPS:
        mask = study.labels == group
        assert mask[:, :, :midline].sum() > 100 and mask[:, :, midline:].sum() > 100, group
        mean_hu = float(study.hu[mask].mean())
        assert MUSCLE_HU[0] < mean_hu < MUSCLE_HU[1], (group, mean_hu)
    fat = (study.labels == Group.BACKGROUND) & (study.hu > -190) & (study.hu < -30)
    assert fat.sum() > 0.2 * (study.labels > 0).sum(), "subcutaneous and intermuscular fat missing"
    assert (study.hu > 700).sum() > 0, "femur cortex missing"


def test_adductors_shrink_from_proximal_to_distal():
    study = phantom.generate(5, size=128, slices=10)
    share = [(s == Group.ADDUCTOR).sum() / max(1, (s > 0).sum()) for s in study.labels]
    assert share[0] > 1.5 * share[-1]


def test_series_is_valid_ct_with_rescale_and_positions(study_factory):
    paths = study_factory(21, size=128, slices=5)
    datasets = [pydicom.dcmread(p) for p in paths]
    truth, uids = read_truth(paths[0].parent)
    study = phantom.generate(21, size=128, slices=5, slice_spacing=TEST_SLICE_SPACING_MM)
    assert [d.SOPInstanceUID for d in datasets] == uids
    assert len({d.SeriesInstanceUID for d in datasets}) == 1
    for k, ds in enumerate(datasets):
        assert ds.SOPClassUID == CTImageStorage and ds.Modality == "CT"
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        # rounding to integer HU
        assert np.abs(hu - np.clip(study.hu[k], -1024, 3071)).max() <= 0.501
    z = [float(d.ImagePositionPatient[2]) for d in datasets]
    assert np.allclose(np.diff(z), -float(datasets[0].SliceThickness), atol=1e-3)
    assert truth.shape == (5, 128, 128)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) not installed")
def test_ct_instances_pass_dciodvfy(study_factory):
    result = subprocess.run(
        ["dciodvfy", str(study_factory(21, size=128, slices=5)[0])], capture_output=True, text=True
    )
    errors = [
        line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")
    ]
    assert errors == []
