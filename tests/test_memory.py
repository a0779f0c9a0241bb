"""Memory bounds of the listener's stages: the HU volume kept on disk and read back slab by slab
gives the same results as the array in memory; memory is handed back between studies."""

from __future__ import annotations

import platform

import numpy as np
import pydicom
import pytest

from thighseg.client.volume import segment_volume
from thighseg.core.memory import (
    fix_mmap_threshold,
    limit_arenas,
    release_free_heap,
    release_highdicom_tables,
)
from thighseg.measure import qc
from thighseg.measure.anatomy import body_midline
from thighseg.measure.indices import volume_indices
from thighseg.pipeline.assemble import HUStack, assemble
from thighseg.pipeline.outputs import write_seg
from thighseg.pipeline.summary import Preview


@pytest.fixture(scope="module")
def series(study_factory):
    return study_factory(4646, size=96, slices=20)


def test_hu_stack_reads_back_what_the_array_holds(series, tmp_path):
    in_memory = assemble(list(series)).hu
    on_disk = assemble(list(series), scratch=tmp_path).hu
    assert (
        isinstance(on_disk, HUStack)
        and on_disk.shape == in_memory.shape
        and on_disk.dtype == in_memory.dtype
    )
    # the scratch file is unnamed: nothing to clean up after a crash
    assert list(tmp_path.iterdir()) == []
    assert np.array_equal(on_disk[0 : len(on_disk)], in_memory)
    assert np.array_equal(on_disk[5:9], in_memory[5:9]) and np.array_equal(
        on_disk[-1], in_memory[-1]
    )
    assert on_disk[18:40].shape[0] == 2 and on_disk[30:40].shape[0] == 0  # clipped like numpy
    chunk = on_disk[3:5]
    chunk[:] = 0  # a new array: changing it leaves the stack alone
    assert np.array_equal(on_disk[3:5], in_memory[3:5])
    with pytest.raises(IndexError):
        on_disk[20]
    with pytest.raises(IndexError):
        on_disk[0:10:2]


def test_stages_give_the_same_results_from_disk_as_from_memory(series, tmp_path):
    in_memory = assemble(list(series))
    on_disk = assemble(list(series), scratch=tmp_path)
    labels = np.zeros(in_memory.hu.shape, np.uint8)
    labels[(in_memory.hu > 0) & (in_memory.hu < 100)] = 1  # any labelling: the point is equality
    labels[:, :, 60:][labels[:, :, 60:] == 1] = 3

    def infer(images):  # logits from intensity: deterministic, no server needed
        logits = np.zeros((len(images), 4, *images.shape[2:]), np.float32)
        logits[:, 1] = images[:, 0]
        return logits

    spacing = in_memory.spacing_zyx
    assert np.array_equal(
        segment_volume(on_disk.hu, infer, 64, spacing[1:], 4, 2),
        segment_volume(in_memory.hu, infer, 64, spacing[1:], 4, 2),
    )
    assert volume_indices(on_disk.hu, labels, spacing) == volume_indices(
        in_memory.hu, labels, spacing
    )
    assert qc.check(on_disk.hu, labels, spacing) == qc.check(in_memory.hu, labels, spacing)
    disk_preview, memory_preview = Preview.of(on_disk.hu, labels), Preview.of(in_memory.hu, labels)
    assert np.array_equal(disk_preview.axial_hu, memory_preview.axial_hu)
    assert np.array_equal(disk_preview.coronal_hu, memory_preview.coronal_hu)
    assert disk_preview.coronal_hu.base is None  # a copy, not a view keeping every slice alive


def test_seg_is_streamed_to_disk_and_the_returned_dataset_keeps_its_pixels(series, tmp_path):
    volume = assemble(list(series))
    labels = np.zeros(volume.hu.shape, np.uint8)
    labels[:, 10:40, 10:40], labels[:, 50:70, 20:40], labels[:, 50:70, 50:80] = 1, 2, 3
    seg = write_seg(volume.sources, labels, body_midline(volume.hu), tmp_path / "seg.dcm", "test")
    assert isinstance(seg.PixelData, bytes)
    assert pydicom.dcmread(tmp_path / "seg.dcm").PixelData == seg.PixelData


def test_highdicom_tables_are_released_and_reloaded(series, tmp_path):
    from highdicom import _standard_utils

    volume = assemble(list(series))
    write_seg(
        volume.sources,
        np.ones(volume.hu.shape, np.uint8),
        body_midline(volume.hu),
        tmp_path / "a.dcm",
        "test",
    )
    assert _standard_utils.get_module_attribute_map.cache_info().currsize == 1
    release_highdicom_tables()
    release_free_heap()
    assert _standard_utils.get_module_attribute_map.cache_info().currsize == 0
    # reloads them
    write_seg(
        volume.sources,
        np.ones(volume.hu.shape, np.uint8),
        body_midline(volume.hu),
        tmp_path / "b.dcm",
        "test",
    )
    assert pydicom.dcmread(tmp_path / "b.dcm").NumberOfFrames == 6 * len(volume.sources)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc's")
def test_mmap_threshold_is_fixed_on_glibc():
    assert fix_mmap_threshold() is True


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc's")
def test_arenas_are_limited_on_glibc():
    assert limit_arenas() is True
