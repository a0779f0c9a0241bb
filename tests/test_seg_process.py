"""The DICOM outputs written in a process of their own: the same SEG as in this process, the SR
references it, the report names what was written there, a dead SEG process never costs an output,
and a series that fails later leaves none behind."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import weakref

import highdicom as hd
import jsonschema
import numpy as np
import pydicom
import pytest
from conftest import assembled_with_truth
from highdicom import _standard_utils

from thighseg.measure.anatomy import body_midline
from thighseg.pipeline import seg_process, stages
from thighseg.pipeline.outputs import write_seg
from thighseg.pipeline.seg_inputs import sided_labels
from thighseg.pipeline.stages import InferenceSettings, process_series


@pytest.fixture(scope="module")
def study(study_factory):
    paths = study_factory(91, size=128, slices=6)
    return paths, *assembled_with_truth(paths)


def started(volume, labels, path, separate_process=True) -> seg_process.PendingSeg:
    """A SEG of `labels` (made segment numbers in place at `wait`) prepared and labelled."""
    pending = seg_process.prepare_seg(volume.sources, path, "m", None, separate_process)
    pending.label(labels, body_midline(volume.hu))
    return pending


def _frames(path) -> np.ndarray:
    return pydicom.dcmread(path).pixel_array


def test_the_seg_process_writes_the_seg_this_process_would(study, tmp_path):
    _, volume, labels = study
    pending = started(volume, labels.copy(), tmp_path / "a.dcm")
    assert pending.header_future is not None  # the header really built elsewhere
    path = pending.wait()
    write_seg(volume.sources, labels, body_midline(volume.hu), tmp_path / "b.dcm", "m")
    assert np.array_equal(_frames(path), _frames(tmp_path / "b.dcm"))
    seg = hd.seg.segread(path)
    # the identity the SR was given before the SEG existed is the SEG's
    assert seg.SOPInstanceUID == pending.reference.SOPInstanceUID
    assert seg.SeriesInstanceUID == pending.reference.SeriesInstanceUID
    assert seg.StudyInstanceUID == pending.reference.StudyInstanceUID
    assert not (tmp_path / seg_process.HEADER_FILE).exists()


def test_a_seg_whose_header_was_not_built_ahead_has_it_built_here(study, tmp_path):
    _, volume, labels = study
    pending = seg_process.prepare_seg(volume.sources, tmp_path / "a.dcm", "m")
    pending.header_future.result()
    (tmp_path / seg_process.HEADER_FILE).unlink()  # as if the SEG process had died building it
    pending.label(labels.copy(), body_midline(volume.hu))
    path = pending.wait()
    write_seg(volume.sources, labels, body_midline(volume.hu), tmp_path / "b.dcm", "m")
    assert np.array_equal(_frames(path), _frames(tmp_path / "b.dcm"))


def test_a_killed_seg_process_never_costs_the_seg(study, tmp_path):
    _, volume, labels = study
    seg_process.warm()
    pending = started(volume, labels.copy(), tmp_path / "x.dcm")
    pending.wait()
    for pid in list(seg_process._executor()._processes):  # noqa: SLF001 - the pool's own PIDs
        os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would
    path = started(volume, labels.copy(), tmp_path / "seg.dcm").wait()
    assert pydicom.dcmread(path).NumberOfFrames == 6 * len(volume.sources)
    # and the next SEG goes to a fresh SEG process again
    again = started(volume, labels.copy(), tmp_path / "y.dcm")
    assert again.header_future is not None and again.wait().exists()


def test_a_seg_process_killed_building_the_header_never_costs_the_seg(study, tmp_path):
    _, volume, labels = study
    seg_process.warm()
    pending = seg_process.prepare_seg(volume.sources, tmp_path / "a.dcm", "m")
    for pid in list(seg_process._executor()._processes):  # noqa: SLF001 - the pool's own PIDs
        os.kill(pid, signal.SIGKILL)
    pending.label(labels.copy(), body_midline(volume.hu))
    path = pending.wait()
    write_seg(volume.sources, labels, body_midline(volume.hu), tmp_path / "b.dcm", "m")
    assert np.array_equal(_frames(path), _frames(tmp_path / "b.dcm"))


def muscle_in_the_middle(images: np.ndarray) -> np.ndarray:
    logits = np.zeros((len(images), 4, *images.shape[2:]), np.float32)
    logits[:, 1, 40:80, 40:80] = 1
    return logits


@pytest.mark.parametrize(
    ("broken", "stage"),
    [
        ("measure_stage", "measure"),  # after the SEG started
        ("render", "emit"),  # after the SR started too
    ],
)
def test_a_series_failing_after_its_outputs_started_leaves_none_of_them(
    study, tmp_path, monkeypatch, broken, stage
):
    paths, _, _ = study

    def fail(*_):
        raise RuntimeError("broke")

    monkeypatch.setattr(stages, broken, fail)
    result = process_series(
        list(paths), tmp_path / "out", InferenceSettings(muscle_in_the_middle, "m", 128)
    )
    assert result.report.reason == f"{stage} failed: RuntimeError: broke"
    assert result.seg_path is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json"]


def test_the_studys_labels_are_let_go_before_the_summary_is_drawn(study, tmp_path, monkeypatch):
    """The summary needs only a few planes; the listener's peak was the study's labels (~75 MB
    at 300 x 512²) still held while matplotlib drew."""
    paths, _, _ = study
    inferred, held_at_render = [], []
    infer, render = stages.infer_stage, stages.render

    def infer_and_watch(*args, **kwargs):
        labels = infer(*args, **kwargs)
        inferred.append(weakref.ref(labels))
        return labels

    def render_and_look(*args, **kwargs):
        gc.collect()
        held_at_render.append(inferred[0]() is not None)
        return render(*args, **kwargs)

    monkeypatch.setattr(stages, "infer_stage", infer_and_watch)
    monkeypatch.setattr(stages, "render", render_and_look)
    result = process_series(
        list(paths), tmp_path / "out", InferenceSettings(muscle_in_the_middle, "m", 128)
    )
    assert result.report.done, result.report.reason
    assert held_at_render == [False]
    seg = pydicom.dcmread(result.seg_path)  # written from them before they were let go
    assert seg.NumberOfFrames == 6 * len(paths) and seg.pixel_array.any()


def test_the_seg_can_be_written_in_this_process(study, tmp_path):
    _, volume, labels = study
    mine = labels.copy()
    pending = started(volume, mine, tmp_path / "a.dcm", separate_process=False)
    assert pending.header_future is None
    seg = hd.seg.segread(pending.wait())
    assert seg.SOPInstanceUID == pending.reference.SOPInstanceUID
    assert seg.NumberOfFrames == 6 * len(volume.sources)
    write_seg(volume.sources, labels, body_midline(volume.hu), tmp_path / "b.dcm", "m")
    assert np.array_equal(_frames(tmp_path / "a.dcm"), _frames(tmp_path / "b.dcm"))
    # no copy of the study's labels was made: they became the SEG's segment numbers
    assert np.array_equal(mine, sided_labels(labels, body_midline(volume.hu)))
    pending.wait()  # waiting again writes nothing again (the labels are not split twice)
    assert np.array_equal(mine, sided_labels(labels, body_midline(volume.hu)))


def test_sr_and_sc_are_written_in_the_seg_process_and_the_report_names_them(study, tmp_path):
    paths, _, _ = study
    _standard_utils.get_module_attribute_map.cache_clear()
    result = process_series(
        list(paths), tmp_path / "out", InferenceSettings(muscle_in_the_middle, "m", 128)
    )
    assert result.report.done, result.report.reason
    # highdicom's module tables were never needed here: every DICOM output was built elsewhere
    assert _standard_utils.get_module_attribute_map.cache_info().currsize == 0
    out = tmp_path / "out"
    sr, sc = pydicom.dcmread(out / "sr.dcm"), pydicom.dcmread(out / "summary_sc.dcm")
    assert sr.SOPInstanceUID == result.report.sr_sop_instance_uid
    assert sc.SOPInstanceUID == result.report.sc_sop_instance_uid
    seg_reference = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    referenced = {
        i.ReferencedSOPInstanceUID for s in seg_reference for i in s.ReferencedSOPSequence
    }
    assert result.report.seg_sop_instance_uid in referenced


def tables_loaded() -> int:
    """How many of highdicom's module tables are loaded (1 or 0), wherever this is called (the
    SEG process imports this module to call it)."""
    return _standard_utils.get_module_attribute_map.cache_info().currsize


def _seg_process_tables() -> int:
    return seg_process._executor().submit(tables_loaded).result()  # noqa: SLF001


class LoadsTables:
    """An output job that needs highdicom's tables, as every real one does."""

    def __init__(self, path, keeps_tables: bool):
        self.path, self.keeps_tables = path, keeps_tables

    def run(self) -> None:
        _standard_utils.get_module_attribute_map()


def test_the_seg_process_holds_highdicoms_tables_only_from_the_sr_to_the_sc(study, tmp_path):
    """~65 MB the SEG process would otherwise hold while the study is inferred and measured."""
    paths, _, _ = study
    result = process_series(
        list(paths), tmp_path / "out", InferenceSettings(muscle_in_the_middle, "m", 128)
    )
    assert result.report.done, result.report.reason
    assert _seg_process_tables() == 0  # let go after the SC, the study's last output
    assert not seg_process.SegHeaderJob.keeps_tables and not seg_process.ScJob.keeps_tables
    assert seg_process.SrJob.keeps_tables  # the SC follows at once
    _standard_utils.get_module_attribute_map.cache_clear()
    seg_process._run(LoadsTables(tmp_path / "sr.dcm", keeps_tables=True))  # noqa: SLF001
    assert tables_loaded() == 1
    seg_process._run(LoadsTables(tmp_path / "sc.dcm", keeps_tables=False))  # noqa: SLF001
    assert tables_loaded() == 0


def test_flip_tta_is_recorded_in_the_report_and_the_segs_algorithm_version(study, tmp_path):
    from thighseg.client.volume import flip_averaged
    from thighseg.pipeline.report import schema

    paths, _, _ = study
    settings = InferenceSettings(flip_averaged(muscle_in_the_middle), "m", 128, tta="flip")
    result = process_series(list(paths), tmp_path / "out", settings)
    assert result.report.done and result.report.tta == "flip"
    seg = pydicom.dcmread(result.seg_path)
    version = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert version.AlgorithmVersion.endswith("flip TTA")
    document = json.loads(result.report_path.read_text())
    jsonschema.validate(document, schema())
    assert document["tta"] == "flip"


HIGHDICOM_FREE_SERIES = """
import sys
from pathlib import Path

import numpy as np

from thighseg.pipeline.stages import InferenceSettings, process_series


def muscle_in_the_middle(images):
    logits = np.zeros((len(images), 4, *images.shape[2:]), np.float32)
    logits[:, 1, 40:80, 40:80] = 1
    return logits


out, paths = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
result = process_series(paths, out, InferenceSettings(muscle_in_the_middle, "m", 128))
assert result.report.done, result.report.reason
print(sorted(name for name in sys.modules if name.split(".")[0] == "highdicom"))
"""


def test_a_series_written_through_the_seg_process_never_imports_highdicom_here(study, tmp_path):
    """The listener prepares the SEG, fills its frames in and renders the summary; highdicom
    (~20 MB of every listener pod) is loaded in the SEG process alone."""
    paths, _, _ = study
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-c", HIGHDICOM_FREE_SERIES, str(out), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    seg = hd.seg.segread(out / "seg.dcm")  # the outputs are whole all the same
    assert seg.number_of_segments == 6
    assert {p.name for p in out.iterdir()} >= {"seg.dcm", "sr.dcm", "summary_sc.dcm"}
