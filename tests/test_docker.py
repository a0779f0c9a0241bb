"""What can be checked of the images without a Docker engine: lint, paths, entry steps run here."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from thighseg.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = sorted((REPO_ROOT / "docker").glob("*.Dockerfile"))
ENTRYPOINT = REPO_ROOT / "docker" / "triton-entrypoint.sh"


def _hadolint() -> str | None:
    local = Path(os.sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_two_images():
    assert [p.name for p in DOCKERFILES] == ["listener.Dockerfile", "triton.Dockerfile"]


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile):
    result = subprocess.run([_hadolint(), str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_paths_exist_and_images_are_pinned_and_non_root(dockerfile):
    steps = instructions(dockerfile)
    for op, argument in steps:
        if op == "COPY" and "--from" not in argument:
            for source in shlex.split(argument)[:-1]:
                assert (REPO_ROOT / source).exists(), (
                    f"{dockerfile.name}: COPY {source} does not exist"
                )
        if op == "FROM":
            image = argument.split()[0]
            assert ":" in image and not image.endswith(":latest"), image
    users = [argument for op, argument in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_listener_image_entrypoint_is_a_valid_listen_command():
    steps = dict(instructions(REPO_ROOT / "docker" / "listener.Dockerfile"))
    entrypoint, command = yaml.safe_load(steps["ENTRYPOINT"]), yaml.safe_load(steps["CMD"])
    assert entrypoint[:2] == ["thighseg", "listen"]
    args = build_parser().parse_args(entrypoint[1:] + command)
    assert str(args.spool).startswith("/var/lib/thighseg") and args.triton_wait > 0


def test_compose_file_refers_to_existing_dockerfiles():
    compose = yaml.safe_load((REPO_ROOT / "docker" / "compose.yaml").read_text())
    for service in compose["services"].values():
        assert (
            REPO_ROOT / "docker" / service["build"]["context"] / service["build"]["dockerfile"]
        ).exists()
    assert compose["services"]["listener"]["read_only"] is True
    assert (
        compose["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"]
        == "nvidia"
    )


def _run_entrypoint(tmp_path, **env) -> subprocess.CompletedProcess:
    fake_server = tmp_path / "tritonserver"
    fake_server.write_text('#!/bin/sh\necho "tritonserver $*"\n')
    fake_server.chmod(0o755)
    environment = {
        **os.environ,
        "TRITONSERVER": str(fake_server),
        "PYTHON": os.sys.executable,
        **env,
    }
    return subprocess.run(
        ["bash", str(ENTRYPOINT), "--log-verbose=1"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )


def test_entry_step_seeds_the_repository_and_serves_the_cpu_variant(tmp_path):
    models = tmp_path / "models"
    result = _run_entrypoint(
        tmp_path,
        MODEL_REPOSITORY=str(models),
        MODEL_CONFIG_NAME="cpu",
        MODEL_REPOSITORY_SEED=str(REPO_ROOT / "model_repository"),
    )
    assert result.returncode == 0, result.stderr
    assert (models / "thighseg_segformer" / "configs" / "cpu.pbtxt").exists()
    assert (
        f"tritonserver --model-repository={models} --model-config-name=cpu --log-verbose=1"
        in result.stdout
    )


def test_entry_step_without_gpu_stops_before_serving(tmp_path):
    from thighseg.export.tensorrt_engine import TensorRTUnavailable, require_gpu_tensorrt

    try:
        require_gpu_tensorrt()
        pytest.skip("this machine has a GPU and TensorRT")
    except TensorRTUnavailable:
        pass
    models = tmp_path / "models"
    shutil.copytree(REPO_ROOT / "model_repository", models, ignore=shutil.ignore_patterns("*.onnx"))
    (models / "thighseg_segformer" / "1" / "model_fp16.onnx").write_bytes(
        b"not parsed without a GPU"
    )
    result = _run_entrypoint(tmp_path, MODEL_REPOSITORY=str(models))
    assert result.returncode == 1
    assert "error:" in result.stderr and "tritonserver" not in result.stdout
