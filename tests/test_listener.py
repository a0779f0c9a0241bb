"""Real associations on localhost into the real listener, inference by the real Triton server."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import urllib.request

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import MRImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from thighseg.dicom_listener.scu import send_files
from thighseg.measure.metrics import dice_per_group, group_volumes_ml
from thighseg.pipeline.assemble import assemble
from thighseg.pipeline.loaders import labels_from_seg
from thighseg.synthetic.ct_series import read_truth


@pytest.fixture
def listener(listener_factory):
    return listener_factory()


def series_uid(paths) -> str:
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)


def storescu(paths, port: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            "storescu",
            "-aet",
            "MODALITY",
            "-aec",
            "THIGHSEG",
            "127.0.0.1",
            str(port),
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_accurate_seg(result, paths) -> None:
    assert result.report.status == "done", result.report
    truth, uids = read_truth(paths[0].parent)
    seg = hd.seg.segread(result.seg_path)
    referenced = {
        i.ReferencedSOPInstanceUID
        for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    assert referenced == set(uids)
    predicted = labels_from_seg(result.seg_path, uids)
    dsc = dice_per_group(predicted, truth)
    assert min(dsc.values()) >= 0.80, dsc
    spacing = tuple(result.report.spacing_zyx_mm)
    true_total = group_volumes_ml(truth, spacing)["total_muscle"]
    assert abs(result.report.volumes_ml["total_muscle"] - true_total) <= 0.10 * true_total


@pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK storescu not installed")
def test_storescu_study_becomes_an_accurate_seg(listener, study_factory):
    paths = study_factory(4242)
    sent = storescu(paths, listener.config.port)
    assert sent.returncode == 0, sent.stderr
    result = listener.wait_for(series_uid(paths), timeout_s=300)
    assert_accurate_seg(result, paths)
    assert len(list(listener.config.spool_dir.rglob("*.dcm"))) == len(paths)
    metrics = urllib.request.urlopen(
        f"http://127.0.0.1:{listener.config.metrics_port}/metrics", timeout=10
    ).read()
    assert f"thighseg_instances_received_total {float(len(paths))}" in metrics.decode()
    assert 'thighseg_series_total{status="done"} 1.0' in metrics.decode()
    # every slice went to the model as it arrived, before the series was complete
    assert f"thighseg_slices_streamed_total {float(len(paths))}" in metrics.decode()
    if shutil.which("promtool"):  # Prometheus' own linter: names, types, help, units
        lint = subprocess.run(["promtool", "check", "metrics"], input=metrics, capture_output=True)
        assert lint.returncode == 0 and lint.stdout + lint.stderr == b"", lint
    out_dir = result.seg_path.parent
    assert {"seg.dcm", "sr.dcm", "summary_sc.dcm", "summary.png", "summary.pdf", "overlay.png"} <= {
        p.name for p in out_dir.iterdir()
    }
    if shutil.which("dciodvfy"):
        for name in ("seg.dcm", "sr.dcm", "summary_sc.dcm"):
            check = subprocess.run(
                ["dciodvfy", str(out_dir / name)], capture_output=True, text=True
            )
            errors = [
                line
                for line in (check.stdout + check.stderr).splitlines()
                if line.startswith("Error")
            ]
            assert errors == [], name
    sr = hd.sr.srread(out_dir / "sr.dcm")
    assert len(sr.content.get_volumetric_roi_measurement_groups()) == 6  # group x leg
    # 12 slices 5 mm apart: the QC must say the thigh is not fully covered, in the JSON and the SR
    assert "PARTIAL_COVERAGE" in {f.code for f in result.report.qc_flags}
    assert "PARTIAL_COVERAGE" in repr(sr.to_json_dict())
    picture = np.asarray(Image.open(out_dir / "summary.png").convert("RGB")).astype(float)
    # coloured groups
    assert picture.std() > 20 and (picture[..., 0] - picture[..., 2] > 60).mean() > 0.002
    assert result.report.indices.total.muscle.total_ml > 0


def test_streaming_gives_the_labels_and_figures_of_processing_the_completed_series(
    listener_factory, study_factory
):
    paths = study_factory(4545)
    batches: list[int] = []

    def counting(infer):
        def run(images):
            batches.append(len(images))
            return infer(images)

        return run

    streaming = listener_factory(wrap_infer=counting)
    whole = listener_factory(stream_slices=0, seg_process=False)  # its SEG in the listener
    labels, reports = [], []
    for receiver in (streaming, whole):
        assert send_files(paths, "127.0.0.1", receiver.config.port) == [0] * len(paths)
        result = receiver.wait_for(series_uid(paths), timeout_s=300)
        assert result.report.status == "done", result.report
        uids = [s.SOPInstanceUID for s in assemble(list(paths)).sources]
        labels.append(labels_from_seg(result.seg_path, uids))
        reports.append(result.report)
    assert np.array_equal(labels[0], labels[1])
    # slices measured as they arrived add up to the figures of measuring the whole volume
    assert reports[0].indices == reports[1].indices and reports[0].indices.total.muscle.total_ml > 0
    assert (reports[0].volumes_ml, reports[0].qc_flags) == (
        reports[1].volumes_ml,
        reports[1].qc_flags,
    )
    # every slice was inferred on its own as it arrived: none was left for the completed series
    assert batches == [1] * len(paths)
    assert whole.telemetry.registry.get_sample_value("thighseg_slices_streamed_total") == 0


def test_second_study_pushed_while_first_is_processing(listener, study_factory):
    first, second = study_factory(4343), study_factory(4444)
    assert send_files(first, "127.0.0.1", listener.config.port) == [0] * len(first)
    time.sleep(listener.config.idle_s + 0.3)  # the first series is now in the pipeline
    statuses: list[int] = []
    pusher = threading.Thread(
        target=lambda: statuses.extend(send_files(second, "127.0.0.1", listener.config.port))
    )
    pusher.start()
    pusher.join(timeout=120)
    assert statuses == [0] * len(second)
    for paths in (first, second):
        assert_accurate_seg(listener.wait_for(series_uid(paths), timeout_s=300), paths)


def _variant(path, folder, name, change) -> list:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    out = folder / f"{name}.dcm"
    ds.save_as(out, enforce_file_format=True)
    return [out]


def test_non_ct_and_unusable_instances_are_refused_and_not_spooled(
    listener, study_factory, tmp_path
):
    source = study_factory(4242)[0]

    def to_mr(ds):
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.Modality = "MR"

    def wrong_modality(ds):
        ds.Modality = "MR"

    def no_pixels(ds):
        del ds.PixelData

    cases = {
        "mr": (to_mr, 0x0122),
        "modality": (wrong_modality, 0xA900),
        "pixels": (no_pixels, 0xA900),
    }
    for name, (change, expected) in cases.items():
        statuses = send_files(
            _variant(source, tmp_path, name, change), "127.0.0.1", listener.config.port
        )
        assert statuses == [expected], name
    assert list(listener.config.spool_dir.rglob("*.dcm")) == []
    registry = listener.telemetry.registry
    for reason in ("sop_class", "modality", "no_pixel_data"):
        assert (
            registry.get_sample_value("thighseg_instances_rejected_total", {"reason": reason})
            == 1.0
        )

    ae = AE(ae_title="ECHO")
    ae.add_requested_context(Verification)
    association = ae.associate("127.0.0.1", listener.config.port, ae_title="THIGHSEG")
    assert association.is_established
    assert association.send_c_echo().Status == 0
    association.release()
    assert send_files([source], "127.0.0.1", listener.config.port) == [0]
