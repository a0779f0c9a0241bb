"""Export a trained network to ONNX with a dynamic batch axis and measure parity with torch."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np

from thighseg.core.resample import MODEL_INPUT_SIZE, stack_channels
from thighseg.export.validation import (
    Comparison,
    compare,
    onnx_backend,
    onnx_channels,
    torch_backend,
)
from thighseg.learning import models

OPSET = 17


def export_onnx(network, path: Path, size: int = MODEL_INPUT_SIZE) -> Path:
    """Legacy (TorchScript) exporter: one self-contained file, opset 17, dynamic batch."""
    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, stack_channels(models.context_of(network)), size, size)
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (one self-contained file, opset 17); its
        # deprecation
        # and tracer notices about a shape check in smp's decoder are expected.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            network.eval(),
            (example,),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def measure_parity(
    network, onnx_path: Path, images: np.ndarray, truth: np.ndarray | None = None
) -> Comparison:
    """torch vs ONNX Runtime (FP32) on normalised slices (n, channels, H, W)."""
    return compare(torch_backend(network), onnx_backend(onnx_path), images, truth)


def exported_versions(model_dir: Path) -> list[int]:
    """Version folders of a repository entry that hold an exported model, ascending."""
    return sorted(
        int(p.parent.name) for p in model_dir.glob("*/model.onnx") if p.parent.name.isdigit()
    )


def next_version(model_dir: Path) -> int:
    return max(exported_versions(model_dir), default=0) + 1


def export_to_repository(
    model: str, repository: Path, weights: Path | None = None, version: int = 1
) -> Path:
    """Write <repository>/thighseg_<model>/<version>/model.onnx next to its version-controlled
    config, with the python-backend runner and a record of the weights it came from; the
    weights' hash is also published in the configs, where clients read it from Triton."""
    model_dir = repository / models.triton_name(model)
    if not (model_dir / "configs" / "cpu.pbtxt").exists():
        raise FileNotFoundError(
            f"{model_dir}/configs/cpu.pbtxt is missing; the repository has no entry for {model!r}"
        )
    weights = weights or models.weights_path(model)
    network = models.load_trained(model, weights)  # unreadable weights leave no version behind
    channels = stack_channels(models.context_of(network))
    _refuse_other_inputs(model_dir, version, channels)
    folder = model_dir / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    for derived in DERIVED_FILES:  # made from the previous model.onnx: stale from now on
        (folder / derived).unlink(missing_ok=True)
    runner = model_dir / "1" / "model.py"
    if version != 1 and runner.exists():
        shutil.copy2(runner, folder / "model.py")
    # model.onnx appears last, whole: a running `thighseg serve` loads a version when it appears
    partial = export_onnx(network, folder / "model.onnx.partial")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    (folder / "weights.json").write_text(
        json.dumps({"model": model, "version": version, "weights": weights.name, "sha256": digest})
    )
    for config in (model_dir / "config.pbtxt", model_dir / "configs" / "cpu.pbtxt"):
        if config.exists():
            text = set_input_channels(config.read_text(), channels)
            config.write_text(set_parameter(text, weights_key(version), digest))
    return partial.replace(folder / "model.onnx")


def export_to_new_repository(model: str, repository: Path, weights: Path | None = None) -> Path:
    """A scratch repository: the model's version-controlled entry copied into `repository`
    without any export a checkout may hold, and `weights` (default: the shipped ones) exported
    into it as version 1. Returns the repository."""
    name = models.triton_name(model)
    exports = ("model.onnx", "*.onnx.data", "weights.json", "build_info.json", *DERIVED_FILES)
    shutil.copytree(
        models.REPOSITORY / name,
        repository / name,
        ignore=shutil.ignore_patterns(*exports, "__pycache__"),
    )
    export_to_repository(model, repository, weights)
    return repository


def _refuse_other_inputs(model_dir: Path, version: int, channels: int) -> None:
    """Triton declares one input for all of a model's versions: a 2.5D version cannot join 2D
    ones (nor the reverse)."""
    others = {
        v: onnx_channels(model_dir / str(v) / "model.onnx")
        for v in exported_versions(model_dir)
        if v != version
    }
    different = {v: c for v, c in others.items() if c != channels}
    if different:
        listed = ", ".join(f"{v} ({c})" for v, c in different.items())
        raise ValueError(
            f"version(s) {listed} of {model_dir.name} take other input channels than these "
            f"weights ({channels}); a model's versions share one input: export to another "
            "repository, or remove those versions"
        )


def set_input_channels(config_text: str, channels: int) -> str:
    """A Triton config whose "image" input (and its warm-up request) has `channels` channels."""
    declared = re.compile(r'(name: "image"\n\s*data_type: TYPE_FP32\n\s*dims: \[ )\d+(,)')
    warmup = re.compile(r'(key: "image"\n\s*value: \{ data_type: TYPE_FP32, dims: \[ )\d+(,)')
    for pattern in (declared, warmup):
        config_text = pattern.sub(lambda m: f"{m.group(1)}{channels}{m.group(2)}", config_text)
    return config_text


# What later export steps derive from a version's model.onnx.
DERIVED_FILES = (
    "model_fp16.onnx",
    "model.plan",
    "model_int8.onnx",
    "model_int8_symmetric.onnx",
    "model_int8.plan",
    "cpu_runtime.json",
    "calibration.json",
    "calibration.cache",
    "calibration.flatbuffers",
)


def weights_key(version: int) -> str:
    """The config parameter that names a version's weights hash."""
    return f"weights_sha256_v{version}"


def set_parameter(config_text: str, key: str, value: str) -> str:
    """A Triton config (pbtxt) with `parameters` entry `key` set to `value` (added or replaced)."""
    entry = f'parameters: {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}\n'
    pattern = re.compile(
        r'parameters: \{\n  key: "'
        + re.escape(key)
        + r'"\n  value: \{ string_value: "[^"]*" \}\n\}\n'
    )
    if pattern.search(config_text):
        return pattern.sub(lambda _: entry, config_text)
    return config_text.rstrip("\n") + "\n" + entry
