"""Shared fixtures: small phantom studies, a model repository exported for the test session, a real
embedded Triton server and a real listener on free localhost ports."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from thighseg.core.ports import free_port
from thighseg.learning import models
from thighseg.pipeline.assemble import assemble
from thighseg.serving.embedded_triton import EmbeddedTriton, Ports
from thighseg.synthetic import phantom
from thighseg.synthetic.ct_series import read_truth, write_series


def wait_until(condition, timeout_s: float, poll_s: float = 0.1) -> bool:
    """Poll `condition` until it holds or the time is up; its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll_s)
    return condition()


REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL = "segformer"
TEST_SIZE = 256
TEST_SLICES = 12
TEST_SLICE_SPACING_MM = 5.0


def needs_torch():
    return pytest.importorskip(
        "segmentation_models_pytorch", reason="training/export extra not installed"
    )


@pytest.fixture(scope="session", autouse=True)
def every_report_matches_the_published_schema(tmp_path_factory):
    """After the session: each report.json any test (or a CLI it started) wrote validates against
    the published JSON Schema."""
    yield
    from jsonschema import Draft202012Validator

    from thighseg.pipeline.report import schema

    validator = Draft202012Validator(schema())
    problems = []
    for path in tmp_path_factory.getbasetemp().rglob("report.json"):
        errors = list(validator.iter_errors(json.loads(path.read_text())))
        problems += [f"{path}: {error.message}" for error in errors[:3]]
    assert not problems, "\n".join(problems[:20])


@pytest.fixture(scope="session")
def study_factory(tmp_path_factory):
    """write_study(seed, size, slices) -> list of CT files (cached per arguments)."""
    cache: dict[tuple, list[Path]] = {}

    def write_study(seed: int, size: int = TEST_SIZE, slices: int = TEST_SLICES) -> list[Path]:
        key = (seed, size, slices)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"study-{seed}-{size}-{slices}")
            study = phantom.generate(
                seed, size=size, slices=slices, slice_spacing=TEST_SLICE_SPACING_MM
            )
            cache[key] = write_series(study, folder)
        return cache[key]

    return write_study


def exported_repository(folder: Path, weights: Path | None = None) -> Path:
    """The version-controlled repository entry of MODEL copied into `folder`, with `weights`
    (default: the shipped ones) exported into it as version 1."""
    needs_torch()
    from thighseg.export.onnx_export import export_to_new_repository

    return export_to_new_repository(MODEL, folder, weights)


@contextmanager
def running_triton(repository: Path, log_dir: Path) -> Iterator[EmbeddedTriton]:
    """The real tritonserver binary on CPU over `repository`, stopped by PID on the way out."""
    ports = Ports(free_port(), free_port(), free_port())
    server = EmbeddedTriton(repository, ports, log_file=log_dir / "triton.log").start()
    try:
        yield server
    finally:
        server.stop()
    assert server.process.poll() is not None, "tritonserver still running after stop()"


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory) -> Path:
    """A copy of the version-controlled repository entry with the shipped weights exported into
    it."""
    return exported_repository(tmp_path_factory.mktemp("model_repository"))


@pytest.fixture(scope="session")
def triton(model_repository, tmp_path_factory):
    """The real tritonserver binary on CPU, stopped by PID at the end of the session."""
    with running_triton(model_repository, tmp_path_factory.mktemp("triton")) as server:
        yield server


@pytest.fixture
def listener_factory(triton, tmp_path):
    """make(**ListenerConfig overrides) -> a started Listener on free ports, stopped after the
    test."""
    from thighseg.client.triton import TritonSegmenter
    from thighseg.dicom_listener.config import ListenerConfig
    from thighseg.dicom_listener.service import Listener
    from thighseg.pipeline.stages import settings_for

    started = []
    segmenters = []

    def make(triton_url: str | None = None, wrap_infer=None, **overrides):
        """`wrap_infer(infer) -> infer` puts a test's hook (e.g. a gate) around the real
        inference."""
        segmenter = TritonSegmenter(
            triton_url or triton.http_url, models.triton_name(MODEL), retries=1, backoff_s=0.2
        )
        segmenters.append(segmenter)
        settings = settings_for(segmenter, MODEL)
        if wrap_infer is not None:
            settings = dataclasses.replace(settings, infer=wrap_infer(settings.infer))
        options = dict(
            spool_dir=tmp_path / f"spool{len(started)}",
            output_dir=tmp_path / f"out{len(started)}",
            host="127.0.0.1",
            port=free_port(),
            idle_s=0.5,
            metrics_port=free_port(),
        )
        listener = Listener(ListenerConfig(**{**options, **overrides}), settings).start()
        started.append(listener)
        return listener

    yield make
    for listener in started:
        listener.stop()
    for segmenter in segmenters:
        segmenter.close()


GENERATED_UID = re.compile(r"2\.25\.\d+|1\.2\.826\.0\.1\.3680043\.10\.511\.\d+\.\d+")


def comparable_elements(dataset, prefix: str = ""):
    """(path, value) of every element, nested items included, UIDs made anew for each object
    and the time of writing masked."""
    for element in dataset:
        if element.VR == "SQ":
            for k, item in enumerate(element.value):
                yield from comparable_elements(item, f"{prefix}{element.keyword}[{k}].")
        elif element.keyword == "PixelData":
            yield prefix + element.keyword, bytes(element.value)
        elif element.keyword.endswith(("Date", "Time")):
            yield prefix + element.keyword, "*"
        else:
            yield prefix + element.keyword, GENERATED_UID.sub("*", str(element.value))


def assembled_with_truth(paths: list[Path]):
    """A phantom study's assembled volume and its true group labels (uint8) in the volume's
    slice order."""
    volume = assemble(list(paths))
    truth, uids = read_truth(paths[0].parent)
    return volume, truth[[uids.index(s.SOPInstanceUID) for s in volume.sources]].astype(np.uint8)
