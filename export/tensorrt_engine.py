"""FP16 TensorRT engines from ONNX, built and validated on the GPU that will run them.

Engines are specific to a GPU model and a TensorRT version, so production builds them on the target
machine (the Triton container's entry step) and writes `build_info.json` beside the plan to tell
later starts whether the plan still fits. FP16 comes from the FP16 ONNX through a strongly typed
network, since recent TensorRT deprecates the FP16 builder flag; older TensorRT falls back to it.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from thighseg.core.resample import MODEL_INPUT_SIZE
from thighseg.export.validation import onnx_channels

# The optimisation profile covers every batch Triton may form: max_batch_size and the preferred
# batch sizes in the tensorrt_plan config.pbtxt must stay inside [PROFILE_MIN, PROFILE_MAX]
# (a batch outside the profile makes Triton fail the request).
PROFILE_MIN, PROFILE_OPT, PROFILE_MAX = 1, 16, 64
WORKSPACE_BYTES = 4 << 30


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing on this machine."""


@dataclass(frozen=True)
class BuildInfo:
    gpu: str
    compute_capability: str
    tensorrt_version: str
    profile_min_opt_max: tuple[int, int, int]
    input_size: int
    strongly_typed: bool
    onnx_file: str

    def matches(self, other: BuildInfo) -> bool:
        """Same GPU, TensorRT and profile: the plan can be reused."""
        keys = (
            "gpu",
            "compute_capability",
            "tensorrt_version",
            "profile_min_opt_max",
            "input_size",
        )
        return all(getattr(self, k) == getattr(other, k) for k in keys)


def _tensorrt():
    try:
        import tensorrt
    except ImportError as error:
        raise TensorRTUnavailable(
            "the tensorrt Python package is not installed (pip install tensorrt)"
        ) from error
    return tensorrt


def gpu_identity() -> tuple[str, str]:
    """(name, compute capability) of GPU 0 from nvidia-smi (present wherever a GPU is usable)."""
    try:
        output = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (FileNotFoundError, subprocess.SubprocessError) as error:
        raise TensorRTUnavailable(f"no CUDA GPU is visible (nvidia-smi: {error})") from error
    name, capability = (part.strip() for part in output.splitlines()[0].split(","))
    return name, capability


def require_gpu_tensorrt() -> None:
    """Fail early, before minutes of export work, when no engine can be built here."""
    _tensorrt()
    gpu_identity()


def current_build_info(onnx_file: Path, strongly_typed: bool) -> BuildInfo:
    name, capability = gpu_identity()
    return BuildInfo(
        gpu=name,
        compute_capability=capability,
        tensorrt_version=_tensorrt().__version__,
        profile_min_opt_max=(PROFILE_MIN, PROFILE_OPT, PROFILE_MAX),
        input_size=MODEL_INPUT_SIZE,
        strongly_typed=strongly_typed,
        onnx_file=onnx_file.name,
    )


def read_build_info(plan: Path) -> BuildInfo | None:
    info_file = plan.with_name("build_info.json")
    if not plan.exists() or not info_file.exists():
        return None
    data = json.loads(info_file.read_text())
    data["profile_min_opt_max"] = tuple(data["profile_min_opt_max"])
    return BuildInfo(**data)


def build_engine(onnx_fp16: Path, plan: Path, timing_cache: Path | None = None) -> BuildInfo:
    """Build `plan` from an FP16 ONNX file; reuse and update the timing cache if given."""
    trt = _tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    if not strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_fp16)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_fp16}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    shape = (onnx_channels(onnx_fp16), MODEL_INPUT_SIZE, MODEL_INPUT_SIZE)
    profile.set_shape("image", (PROFILE_MIN, *shape), (PROFILE_OPT, *shape), (PROFILE_MAX, *shape))
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_fp16}")
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_bytes(bytes(serialized))
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    info = current_build_info(onnx_fp16, strongly_typed)
    plan.with_name("build_info.json").write_text(json.dumps(asdict(info), indent=2))
    return info


class EngineRunner:
    """Runs a plan on the GPU with torch-allocated buffers (validation and benchmarks)."""

    def __init__(self, plan: Path) -> None:
        import torch

        trt = _tensorrt()
        self._torch = torch
        self._engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
            plan.read_bytes()
        )
        if self._engine is None:
            raise RuntimeError(f"{plan} does not deserialize on this GPU/TensorRT")
        self._context = self._engine.create_execution_context()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        torch = self._torch
        batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).cuda()
        self._context.set_input_shape("image", tuple(batch.shape))
        logits = torch.empty(
            tuple(self._context.get_tensor_shape("logits")), dtype=torch.float32, device="cuda"
        )
        self._context.set_tensor_address("image", batch.data_ptr())
        self._context.set_tensor_address("logits", logits.data_ptr())
        stream = torch.cuda.current_stream()
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return logits.cpu().numpy()
