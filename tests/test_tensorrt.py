"""TensorRT FP16 engines: built and validated only where a GPU and TensorRT are present."""

import shutil
import subprocess
import sys

import pytest
from conftest import MODEL, REPO_ROOT, needs_torch


def _gpu_tensorrt_missing() -> str | None:
    try:
        from thighseg.export.tensorrt_engine import require_gpu_tensorrt

        require_gpu_tensorrt()
    except Exception as error:  # TensorRTUnavailable, ImportError
        return str(error)
    return None


def test_tensorrt_export_without_gpu_is_a_clear_cli_error(tmp_path):
    if _gpu_tensorrt_missing() is None:
        pytest.skip("this machine can build engines; the GPU test covers it")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "thighseg.cli",
            "export",
            "--format",
            "tensorrt",
            "--repository",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error:") and (
        "tensorrt" in result.stderr or "GPU" in result.stderr
    )


@pytest.mark.gpu
def test_fp16_engine_matches_onnx_runtime(tmp_path):
    reason = _gpu_tensorrt_missing()
    if reason:
        pytest.skip(f"TensorRT engine build needs a GPU: {reason}")
    needs_torch()
    from thighseg.export.build import export_model
    from thighseg.export.tensorrt_engine import read_build_info
    from thighseg.learning import models

    name = models.triton_name(MODEL)
    shutil.copytree(
        REPO_ROOT / "model_repository" / name,
        tmp_path / name,
        ignore=shutil.ignore_patterns("*.onnx", "*.plan", "__pycache__"),
    )
    report = export_model(MODEL, tmp_path, "tensorrt")
    check = report["onnx_vs_tensorrt"]
    assert check["argmax_agreement"] >= 0.995, check
    assert check["max_dice_drop"] <= 0.005, check
    info = read_build_info(tmp_path / name / "1" / "model.plan")
    assert info is not None and info.profile_min_opt_max[2] >= 64
    assert (tmp_path / ".tensorrt_timing.cache").stat().st_size > 0


def _info(**changes):
    from thighseg.export.tensorrt_engine import BuildInfo

    base = dict(
        gpu="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        tensorrt_version="10.7.0",
        profile_min_opt_max=(1, 16, 64),
        input_size=256,
        strongly_typed=True,
        onnx_file="model_fp16.onnx",
    )
    return BuildInfo(**{**base, **changes})


def test_engine_rebuild_decision():
    from thighseg.export.engines import needs_rebuild

    current = _info()
    assert needs_rebuild(None, current) == "no engine yet"
    assert needs_rebuild(_info(), current) is None
    assert "NVIDIA L4" in needs_rebuild(_info(gpu="NVIDIA L4"), current)
    assert "TensorRT 10.3" in needs_rebuild(_info(tensorrt_version="10.3"), current)
    assert needs_rebuild(_info(profile_min_opt_max=(1, 8, 32)), current) is not None


def test_entry_step_finds_the_tensorrt_models():
    from thighseg.export.engines import tensorrt_models

    assert [p.name for p in tensorrt_models(REPO_ROOT / "model_repository")] == [
        "thighseg_denseunet",
        "thighseg_manet",
        "thighseg_segformer",
    ]
