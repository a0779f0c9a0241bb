"""Volume indices on a phantom whose fat and muscle volumes are known by construction."""

import numpy as np
import pytest

from thighseg.core.labels import Group
from thighseg.measure.anatomy import body_midline, leg_masks
from thighseg.measure.indices import VolumeIndices, volume_indices

SPACING = (2.0, 1.0, 1.0)  # 2 µL voxels
VOXEL_ML = 0.002


def analytic_volume():
    """Two legs; in each, an extensor block and an adductor block separated by a 3-voxel fat septum
    closed by muscle at both ends,
    10 fat voxels inside the extensor (IMAT), 6 dense voxels (200 HU: neither lean nor fat) inside
    the adductor, and a 'femur' ring of cortex around fat-dense marrow that must not count."""
    hu = np.full((2, 80, 120), -1000.0)
    labels = np.zeros(hu.shape, np.uint8)
    for x0 in (10, 70):  # right leg columns 10-49, left leg 70-109
        hu[:, 20:60, x0 : x0 + 40] = -100.0  # subcutaneous-like fat around; outside the envelope
        labels[:, 25:55, x0 + 5 : x0 + 18] = Group.EXTENSOR
        labels[:, 25:55, x0 + 21 : x0 + 35] = Group.ADDUCTOR
        hu[:, 25:55, x0 + 5 : x0 + 18] = 50.0
        hu[:, 25:55, x0 + 21 : x0 + 35] = 50.0
        for rows in (slice(25, 28), slice(52, 55)):  # muscle bridges close the septum at both ends
            labels[:, rows, x0 + 18 : x0 + 21] = Group.EXTENSOR
            hu[:, rows, x0 + 18 : x0 + 21] = 50.0
        # the enclosed septum (2 slices x 24 rows x 3 columns) stays at -100 HU
        hu[:, 30:32, x0 + 8 : x0 + 13] = -80.0  # IMAT: 2 x 2 x 5 = 20 voxels per leg
        hu[:, 40:43, x0 + 25 : x0 + 26] = 200.0  # 2 x 3 x 1 = 6 dense voxels per leg
    return hu, labels


def test_indices_match_the_construction():
    hu, labels = analytic_volume()
    indices = volume_indices(hu, labels, SPACING)
    for leg in ("right", "left"):
        extensor, adductor = indices.leg(leg).extensor, indices.leg(leg).adductor
        extensor_voxels = 2 * 30 * 13 + 2 * 6 * 3
        assert extensor.total_ml == pytest.approx(extensor_voxels * VOXEL_ML)
        assert extensor.imat_ml == pytest.approx(20 * VOXEL_ML)
        assert extensor.lean_ml == pytest.approx((extensor_voxels - 20) * VOXEL_ML)
        assert adductor.total_ml == pytest.approx(2 * 30 * 14 * VOXEL_ML)
        assert adductor.lean_ml == pytest.approx((2 * 30 * 14 - 6) * VOXEL_ML)
        assert adductor.imat_ml == 0
        assert indices.leg(leg).intermuscular_fat_ml == pytest.approx(2 * 24 * 3 * VOXEL_ML)
    summary = indices.headline()
    assert summary["total_muscle_ml"] == pytest.approx(2 * (2 * 30 * 27 + 2 * 6 * 3) * VOXEL_ML)
    assert summary["intramuscular_fat_ml"] == pytest.approx(2 * 20 * VOXEL_ML)


def test_bone_marrow_inside_the_envelope_is_not_intermuscular_fat():
    hu, labels = analytic_volume()
    yy, xx = np.mgrid[:80, :120]
    ring = np.hypot(yy - 40, xx - 29.5) < 4
    hu[:, ring] = -40.0  # marrow (fat-dense)
    # cortex
    hu[:, (np.hypot(yy - 40, xx - 29.5) >= 4) & (np.hypot(yy - 40, xx - 29.5) < 6)] = 1400.0
    labels[:, np.hypot(yy - 40, xx - 29.5) < 6] = 0
    before = volume_indices(*analytic_volume(), SPACING).right.intermuscular_fat_ml
    after = volume_indices(hu, labels, SPACING).right.intermuscular_fat_ml
    # the marrow is excluded; only the septum voxels the bone replaced are lost
    assert after <= before


def test_legs_split_between_the_legs_even_when_they_differ():
    hu, labels = analytic_volume()
    labels[:, 25:55, 91:105] = 0  # the left adductor is gone (atrophy, resection)
    indices = volume_indices(hu, labels, SPACING)
    assert indices.left.adductor.total_ml == 0
    assert indices.right.adductor.total_ml == pytest.approx(2 * 30 * 14 * VOXEL_ML)
    assert indices.left.extensor.total_ml == indices.right.extensor.total_ml


def test_density_fraction_asymmetry_and_height_indices():
    hu, labels = analytic_volume()
    hu[:, 45:47, 16:21] = 10.0  # low-density muscle in the right extensor: 2 x 2 x 5 = 20 voxels
    indices = volume_indices(hu, labels, SPACING, height_m=1.6)
    right = indices.right.extensor
    assert right.low_density_ml == pytest.approx(20 * VOXEL_ML)
    assert indices.left.extensor.low_density_ml == 0
    assert indices.left.adductor.mean_hu == 50.0 and indices.left.adductor.sd_hu == 0.0
    assert right.mean_hu < 50.0  # the 10 HU voxels pull the lean-muscle mean down
    total = indices.total
    assert total.imat_fraction == pytest.approx(
        total.muscle.imat_ml / total.muscle.total_ml, abs=1e-3
    )
    assert total.muscle_volume_index_ml_per_m2 == pytest.approx(
        total.muscle.total_ml / 1.6**2, abs=1e-3
    )
    assert indices.asymmetry_percent.muscle == 0.0
    labels[:, 25:55, 91:105] = 0
    lopsided = volume_indices(hu, labels, SPACING).asymmetry_percent
    assert lopsided.adductor == pytest.approx(200.0) and 0 < lopsided.muscle < 100


def test_indices_round_trip_through_report_json():
    hu, labels = analytic_volume()
    indices = volume_indices(hu, labels, SPACING, height_m=1.7)
    assert VolumeIndices.from_dict(indices.to_dict()) == indices
    without_height = volume_indices(hu, labels, SPACING)
    assert "muscle_volume_index_ml_per_m2" not in without_height.to_dict()["total"]
    assert VolumeIndices.from_dict(without_height.to_dict()) == without_height


def test_summary_page_has_a_colour_key_and_large_pictures(tmp_path):
    from PIL import Image

    from thighseg.measure.indices import volume_indices
    from thighseg.pipeline.summary import COLOURS, Preview, render
    from thighseg.synthetic import phantom

    study = phantom.generate(5, size=128, slices=6, slice_spacing=10.0)
    g = study.geometry
    spacing = (g.slice_spacing, g.pixel_spacing, g.pixel_spacing)
    indices = volume_indices(study.hu, study.labels, spacing)
    png = render(Preview.of(study.hu, study.labels), spacing, indices, [], "t", tmp_path / "s.png")
    page = np.asarray(Image.open(png).convert("RGB")).astype(int)
    height, width, _ = page.shape
    key = page[: height // 12, width // 2 :]  # the colour key, top right
    for colour in COLOURS.values():
        target = np.array(colour) * 255
        assert (np.abs(key - target).sum(axis=2) < 30).sum() > 50, colour
    pictures = page[height // 12 :, : int(width * 0.55)]
    assert (pictures.sum(axis=2) < 600).mean() > 0.6, "the axial panels fill the left of the page"


def test_warming_the_summary_loads_what_rendering_needs_without_pyplots_figures():
    import subprocess
    import sys

    warmed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from thighseg.pipeline import summary\n"
            "assert 'matplotlib' not in sys.modules\n"
            "summary.warm().join(60)\n"
            "import matplotlib.pyplot as plt\n"
            "print(sorted(m for m in ('matplotlib.pyplot', 'matplotlib.backends.backend_agg',"
            " 'matplotlib.backends.backend_pdf') if m in sys.modules), plt.get_fignums())",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert warmed.stdout.split() == [
        "['matplotlib.backends.backend_agg',",
        "'matplotlib.backends.backend_pdf',",
        "'matplotlib.pyplot']",
        "[]",
    ]


def test_fill_holes_per_slice_is_scipys_fill_of_each_slice():
    from scipy import ndimage

    from thighseg.measure.anatomy import fill_holes_per_slice

    rng = np.random.default_rng(5)
    masks = ndimage.binary_opening(rng.random((6, 40, 50)) > 0.45, np.ones((1, 2, 2)))
    masks[2] = False  # an empty slice
    masks[3, 10:30, 10:30], masks[3, 15:25, 15:25] = True, False  # a ring with a hole
    expected = np.stack([ndimage.binary_fill_holes(m) for m in masks])
    assert np.array_equal(fill_holes_per_slice(masks), expected)
    assert fill_holes_per_slice(masks)[3, 20, 20]


def test_bone_mask_filled_within_the_cortex_box_equals_whole_slices():
    from scipy import ndimage

    from thighseg.measure.anatomy import CORTEX_HU, bone_mask

    rng = np.random.default_rng(9)
    hu = np.full((4, 60, 80), -100.0)
    hu[0, 20:40, 30:50], hu[0, 25:35, 35:45] = 1000, -80  # a femur: cortex around fat marrow
    hu[1, 0:12, 0:12], hu[1, 3:9, 3:9] = 1000, -80  # a ring touching the image corner
    hu[2] = np.where(rng.random((60, 80)) > 0.6, 1000, -100)  # speckle
    expected = np.stack([ndimage.binary_fill_holes(s > CORTEX_HU) for s in hu])
    assert np.array_equal(bone_mask(hu), expected)
    assert bone_mask(hu)[0, 30, 40] and not bone_mask(hu)[3].any()


def test_sided_labels_split_each_group_at_the_midline():
    from thighseg.pipeline.seg_inputs import sided_labels

    hu, labels = analytic_volume()
    sided = sided_labels(labels, body_midline(hu))
    midline = int(np.ceil(leg_masks(hu)["left"].argmax()))
    right, left = sided[..., :midline], sided[..., midline:]
    for group in (1, 2, 3):
        assert np.array_equal(right == 2 * group - 1, labels[..., :midline] == group)
        assert np.array_equal(left == 2 * group, labels[..., midline:] == group)
    assert np.array_equal(sided == 0, labels == 0)


def test_a_label_outside_the_groups_is_refused():
    hu, labels = analytic_volume()
    labels[0, 30, 30] = 255  # e.g. an "ignore" value left in
    with pytest.raises(ValueError, match="labels must be 0..3, found 255"):
        volume_indices(hu, labels, SPACING)


def test_slices_measured_as_they_arrive_combine_to_the_whole_volume_figures():
    """Streaming measures each slice with its own midline; combined at the study's midline the
    figures are those of the whole volume, and a slice whose split moved is measured again."""
    from thighseg.measure import qc
    from thighseg.measure.indices import indices_of
    from thighseg.measure.sums import StudySums, measure_slice
    from thighseg.synthetic import phantom

    study = phantom.generate(12, size=128, slices=8, slice_spacing=5.0)
    g = study.geometry
    spacing = (g.slice_spacing, g.pixel_spacing, g.pixel_spacing)
    hu, labels = study.hu, study.labels
    known = {z: measure_slice(hu[z], labels[z], spacing[1]) for z in range(len(hu))}
    muscle_columns = np.nonzero(labels[3].any(axis=0))[0]
    known[3] = measure_slice(hu[3], labels[3], spacing[1], midline=float(muscle_columns[5]))
    combined = StudySums.of(hu, labels, spacing[1], known)
    assert not known[3].holds_for(combined.midline, spacing[1])  # split through a leg: redone
    assert sum(s.holds_for(combined.midline, spacing[1]) for s in known.values()) >= 6
    assert indices_of(combined, spacing).to_dict() == volume_indices(hu, labels, spacing).to_dict()
    assert qc.check_sums(combined, spacing) == qc.check(hu, labels, spacing)
