"""Cohort batch mode through the real Triton server: DICOM folders and NIfTI, errors listed not
fatal, indices against truth, resume after kill -9."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import MODEL

from thighseg.measure.indices import volume_indices
from thighseg.synthetic import phantom
from thighseg.synthetic.ct_series import write_series

SEGMENT = [sys.executable, "-m", "thighseg.cli", "segment", "--model", MODEL]


def _cohort(root: Path, seeds: range) -> dict[str, float]:
    """DICOM study folders (and one NIfTI) with their true total muscle volumes."""
    nib = pytest.importorskip("nibabel")
    truth = {}
    for seed in seeds:
        study = phantom.generate(seed, size=128, slices=12, slice_spacing=5.0)
        write_series(study, root / f"study{seed}")
        g = study.geometry
        spacing = (g.slice_spacing, g.pixel_spacing, g.pixel_spacing)
        truth[f"study{seed}"] = volume_indices(study.hu, study.labels, spacing).headline()[
            "total_muscle_ml"
        ]
    study = phantom.generate(seeds[-1] + 1, size=128, slices=12, slice_spacing=5.0)
    g = study.geometry
    affine = np.diag([g.pixel_spacing, g.pixel_spacing, g.slice_spacing, 1.0])
    ras = np.ascontiguousarray(study.hu.transpose(2, 1, 0)[::-1, ::-1, :])
    nib.save(nib.Nifti1Image(ras, affine), root / "volume.nii.gz")
    return truth


def _rows(out: Path) -> dict[str, dict]:
    with (out / "results.csv").open() as handle:
        return {r["study"]: r for r in csv.DictReader(handle)}


def test_cohort_with_a_broken_study_reports_it_and_finishes_the_rest(triton, tmp_path):
    inputs = tmp_path / "in"
    truth = _cohort(inputs, range(9100, 9102))
    broken = inputs / "broken"
    broken.mkdir()
    broken_series = pydicom.uid.generate_uid()
    slices = sorted((inputs / "study9100").glob("CT-*.dcm"))
    for path in slices[:5] + slices[6:]:  # one slice missing: a gap
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = broken_series
        ds.save_as(broken / path.name)
    out = tmp_path / "out"
    result = subprocess.run(
        [
            *SEGMENT,
            str(inputs / "study9100"),
            str(inputs / "study9101"),
            str(broken),
            str(inputs / "volume.nii.gz"),
            "--out",
            str(out),
            "--triton-url",
            triton.http_url,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "failed: broken_" in result.stdout and "not evenly spaced" in result.stdout
    rows = _rows(out)
    assert len(rows) == 4
    assert [r["status"] for r in rows.values()].count("done") == 3
    for key, true_ml in truth.items():
        row = next(r for k, r in rows.items() if k.startswith(key))
        assert abs(float(row["total_muscle_ml"]) - true_ml) <= 0.10 * true_ml
        assert "PARTIAL_COVERAGE" in row["qc_flags"]  # 12 slices 5 mm apart
    assert (out / "volume" / "labels.nii.gz").exists() and (out / "volume" / "summary.pdf").exists()
    assert any((out / k / "seg.dcm").exists() for k in rows if k.startswith("study9100"))


def test_batch_resumes_after_kill_9(triton, tmp_path):
    inputs = tmp_path / "in"
    _cohort(inputs, range(9200, 9204))
    (inputs / "volume.nii.gz").unlink()
    folders = [str(p) for p in sorted(inputs.iterdir())]
    out = tmp_path / "out"
    command = [*SEGMENT, *folders, "--out", str(out), "--triton-url", triton.http_url]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(out.glob("*/report.json")):
        time.sleep(0.1)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    finished_first = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/report.json")}
    assert 1 <= len(finished_first) < 4
    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    rows = _rows(out)
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows.values())
    for key, mtime in finished_first.items():  # done studies were not processed again
        assert (out / key / "report.json").stat().st_mtime_ns == mtime


def test_an_empty_input_is_an_error_and_a_url_with_a_scheme_is_accepted(triton, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run(
        [
            *SEGMENT,
            str(empty),
            "--out",
            str(tmp_path / "out"),
            "--triton-url",
            f"http://{triton.http_url}/",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "no DICOM series or NIfTI volume found" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_folder_done_with_another_model_is_processed_again(tmp_path):
    from thighseg.apps.batch import _done
    from thighseg.pipeline.report import SeriesReport

    SeriesReport(model="manet", status="done").write(tmp_path / "report.json")
    try:
        assert _done(tmp_path, "manet") and not _done(tmp_path, "segformer")
    finally:  # a bare done report, not one the pipeline would write: kept out of the schema check
        (tmp_path / "report.json").unlink()


def test_version():
    result = subprocess.run(
        [sys.executable, "-m", "thighseg.cli", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.startswith("thighseg ")


def test_segment_refuses_what_the_listener_refuses(triton, tmp_path):
    study = phantom.generate(9300, size=64, slices=6, slice_spacing=5.0)
    paths = write_series(study, tmp_path / "ct")
    mr = tmp_path / "mr"
    mr.mkdir()
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(mr / path.name)
    out = tmp_path / "out"
    result = subprocess.run(
        [*SEGMENT, str(mr), "--out", str(out), "--triton-url", triton.http_url],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    row = next(iter(_rows(out).values()))
    assert row["status"] == "failed" and "is not CT" in row["reason"], row


def test_segment_without_a_server_predicts_in_process(model_repository, tmp_path):
    import onnxruntime as ort

    study = phantom.generate(9301, size=192, slices=6, slice_spacing=5.0)
    write_series(study, tmp_path / "ct")
    out = tmp_path / "out"
    common = ["--out", str(out), "--repository", str(model_repository), "--model", "segformer"]
    result = subprocess.run(
        [*SEGMENT, str(tmp_path / "ct"), *common], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(next(out.glob("*/report.json")).read_text())
    assert report["status"] == "done" and report["model_version"] == "1"
    assert len(report["weights_sha256"]) == 64
    assert report["volumes_ml"]["extensor"] > 0
    if not {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(
        ort.get_available_providers()
    ):
        result = subprocess.run(
            [*SEGMENT, str(tmp_path / "ct"), *common, "--device", "gpu"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode != 0 and "no GPU execution provider" in result.stderr
        assert "Traceback" not in result.stderr
