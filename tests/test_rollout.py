"""A site's model rolls out as a new Triton version beside the old one; every result names the
version and weights that made it, and rollback is one option."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys

import numpy as np
import pydicom
from conftest import MODEL, REPO_ROOT, free_port, needs_torch

from thighseg.learning import models


def _text_values(dataset) -> list[str]:
    """Every TEXT content item of an SR, however deep."""
    texts: list[str] = []
    dataset.walk(
        lambda _, element: texts.append(str(element.value))
        if element.keyword == "TextValue"
        else None
    )
    return texts


def _perturbed_weights(path):
    """The shipped weights with the extensor logit raised: a model that answers differently."""
    import torch

    checkpoint = torch.load(models.weights_path(MODEL), weights_only=True)
    state = checkpoint["state_dict"]
    key = [k for k, v in state.items() if tuple(v.shape) == (4,)][-1]
    state[key] = state[key] + torch.tensor([0.0, 2.0, 0.0, 0.0], dtype=state[key].dtype)
    torch.save({**checkpoint, "state_dict": state}, path)
    return path


def _repository_without_exports(tmp_path, *exports: str):
    """The shipped model's folder of model_repository, copied without the files named."""
    name = models.triton_name(MODEL)
    repository = tmp_path / "repository"
    shutil.copytree(
        REPO_ROOT / "model_repository" / name,
        repository / name,
        ignore=shutil.ignore_patterns(*exports, "__pycache__"),
    )
    return repository


def test_two_versions_served_at_once_and_reports_name_theirs(tmp_path, study_factory):
    needs_torch()
    from thighseg.client.triton import TritonSegmenter
    from thighseg.core.labels import normalise_hu
    from thighseg.core.resample import tiles_of
    from thighseg.export.onnx_export import export_to_repository, next_version
    from thighseg.export.validation import onnx_backend
    from thighseg.pipeline.stages import process_series, settings_for
    from thighseg.serving.embedded_triton import EmbeddedTriton, Ports
    from thighseg.synthetic import phantom

    name = models.triton_name(MODEL)
    repository = _repository_without_exports(tmp_path, "*.onnx")
    export_to_repository(MODEL, repository)
    site_weights = _perturbed_weights(tmp_path / "site.pt")
    assert next_version(repository / name) == 2
    export_to_repository(MODEL, repository, site_weights, version=2)
    sha = {
        "1": hashlib.sha256(models.weights_path(MODEL).read_bytes()).hexdigest(),
        "2": hashlib.sha256(site_weights.read_bytes()).hexdigest(),
    }
    study = phantom.generate(5, size=128, slices=2)
    images = normalise_hu(tiles_of(study.hu, (study.geometry.pixel_spacing,) * 2)[0])[:, None]
    ports = Ports(free_port(), free_port(), free_port())
    with EmbeddedTriton(repository, ports, log_file=tmp_path / "triton.log") as server:
        answers = {}
        for version in ("1", "2"):
            segmenter = TritonSegmenter(server.http_url, name, version=version)
            assert segmenter.is_ready()
            answers[version] = segmenter.infer(images)
            assert segmenter.weights_sha256(version) == sha[version]
            local = onnx_backend(repository / name / version / "model.onnx")(images)
            assert np.allclose(answers[version], local, atol=1e-3)
        assert not np.allclose(answers["1"], answers["2"], atol=0.5)
        latest = TritonSegmenter(server.http_url, name, protocol="http")
        assert latest.served_version() == "2" and latest.why_not_ready() is None
        # a pinned version the server no longer loads: /readyz names it, not "unreachable"
        unloaded = TritonSegmenter(server.http_url, name, version="9")
        assert (
            unloaded.why_not_ready()
            == f"triton at {server.http_url} does not serve {name} version 9"
        )

        paths = study_factory(41, size=96, slices=3)
        for version in ("latest", "1"):  # the default, then the rollback
            settings = settings_for(TritonSegmenter(server.http_url, name, version=version), MODEL)
            result = process_series(paths, tmp_path / f"out-{version}", settings)
            expected = "2" if version == "latest" else "1"
            assert result.report.model_version == expected
            assert result.report.weights_sha256 == sha[expected]
            seg = pydicom.dcmread(result.seg_path)
            algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
            assert f"model v{expected}" in algorithm.AlgorithmVersion
            assert sha[expected][:12] in algorithm.AlgorithmVersion
            texts = _text_values(pydicom.dcmread(result.seg_path.with_name("sr.dcm")))
            assert any(f"model v{expected} weights sha256:{sha[expected][:12]}" in t for t in texts)


def test_a_model_version_that_is_not_a_number_is_a_usage_error():
    done = subprocess.run(
        [sys.executable, "-m", "thighseg.cli", "listen", "--model-version", "newest"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "'newest' is not a version number" in done.stderr


def test_an_export_of_older_shipped_weights_is_replaced(tmp_path):
    """After a pull with new shipped weights, version 1 is exported again, not served stale."""
    needs_torch()
    import json

    from thighseg.apps.demo import ensure_exported

    repository = _repository_without_exports(tmp_path, "*.onnx", "weights.json")
    onnx_path = ensure_exported(MODEL, repository)
    record = onnx_path.with_name("weights.json")
    shipped = hashlib.sha256(models.weights_path(MODEL).read_bytes()).hexdigest()
    assert json.loads(record.read_text())["sha256"] == shipped
    exported_at = onnx_path.stat().st_mtime_ns
    assert ensure_exported(MODEL, repository).stat().st_mtime_ns == exported_at  # current: kept
    record.write_text(json.dumps({"model": MODEL, "version": 1, "sha256": "0" * 64}))
    onnx_path.write_bytes(b"an export of other weights")
    ensure_exported(MODEL, repository)
    assert json.loads(record.read_text())["sha256"] == shipped
    assert onnx_path.read_bytes().startswith(b"\x08")  # an ONNX protobuf again
