"""A SEG written after its header was built ahead is the one highdicom writes from the labels:
element by element (UIDs made anew and times of writing masked), bit for bit in its frames."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from conftest import assembled_with_truth, comparable_elements

from thighseg.measure.anatomy import body_midline
from thighseg.pipeline.outputs import build_seg, save_seg
from thighseg.pipeline.seg_header import SegHeader
from thighseg.pipeline.seg_inputs import sided_labels, slim_sources
from thighseg.pipeline.seg_process import SegHeaderJob


@pytest.fixture(scope="module")
def study(study_factory):
    volume, labels = assembled_with_truth(study_factory(78, size=128, slices=6))
    return volume, sided_labels(labels, body_midline(volume.hu))


def one_segment_in_one_corner(sided: np.ndarray) -> np.ndarray:
    only = np.zeros_like(sided)
    only[2, :5, -3:] = 4  # some segments absent, and a corner that tests the bit order
    return only


@pytest.mark.parametrize("labelled", [lambda sided: sided, one_segment_in_one_corner])
def test_the_seg_written_after_its_header_is_highdicoms(study, tmp_path, labelled):
    volume, sided = study
    sided = labelled(sided)
    sources = slim_sources(volume.sources)
    whole = build_seg(sources, sided, "m", "v", "1.2.3", "1.2.3.4")
    save_seg(whole, tmp_path / "whole.dcm")
    before = [list(comparable_elements(source)) for source in sources]
    header = SegHeader.of(sources, "m", "v", "1.2.3", "1.2.3.4")
    assert [list(comparable_elements(source)) for source in sources] == before  # built on stand-ins
    header.save(tmp_path / "header.npz")
    SegHeader.load(tmp_path / "header.npz").write(sided, tmp_path / "ahead.dcm")
    written = {name: pydicom.dcmread(tmp_path / f"{name}.dcm") for name in ("whole", "ahead")}
    assert written["ahead"].file_meta == written["whole"].file_meta
    elements = {name: list(comparable_elements(seg)) for name, seg in written.items()}
    assert len(elements["whole"]) > 6 * len(sources) * 5  # the per-frame items were compared
    assert elements["ahead"] == elements["whole"]
    frames = written["ahead"].pixel_array  # decoded as readers decode it
    assert frames.shape == (6 * len(sources), *sided.shape[1:])
    assert frames.sum() == sum(np.count_nonzero(sided == s) for s in range(1, 7))


def test_a_header_serves_only_its_own_seg(study, tmp_path):
    volume, _ = study
    sources = slim_sources(volume.sources)
    job = SegHeaderJob(sources, tmp_path / "header.npz", "m", "v", "1.2.3", "1.2.3.4")
    assert job.built() is None  # not built yet
    job.run()
    assert job.built() is not None
    other = SegHeaderJob(sources, tmp_path / "header.npz", "m", "v", "1.2.3", "1.2.3.5")
    assert other.built() is None  # another SEG's header is never written with these labels
    assert not (tmp_path / "header.npz.partial").exists()


def test_labels_of_another_study_size_are_refused(study, tmp_path):
    volume, sided = study
    header = SegHeader.of(slim_sources(volume.sources), "m", "v", "1.2.3", "1.2.3.4")
    with pytest.raises(ValueError, match="frames for"):
        header.write(sided[:-1], tmp_path / "seg.dcm")
    with pytest.raises(ValueError, match="128x120 labels for 128x128 frames"):
        header.write(sided[:, :, :120], tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()
