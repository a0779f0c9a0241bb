"""Entry step of the production Triton container: (re)build every TensorRT engine that is missing
or was built for another GPU, TensorRT version or profile, then let tritonserver start.

    python -m thighseg.export.engines /models
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from thighseg.export.tensorrt_engine import (
    BuildInfo,
    TensorRTUnavailable,
    build_engine,
    current_build_info,
    read_build_info,
)


def needs_rebuild(existing: BuildInfo | None, current: BuildInfo) -> str | None:
    """Why the plan must be rebuilt, or None when it can be served as it is."""
    if existing is None:
        return "no engine yet"
    if not existing.matches(current):
        return (
            f"built for {existing.gpu} / TensorRT {existing.tensorrt_version} / profile "
            f"{existing.profile_min_opt_max}, running on {current.gpu} / TensorRT "
            f"{current.tensorrt_version}"
        )
    return None


def tensorrt_models(repository: Path) -> list[Path]:
    """Model folders whose production config is a tensorrt_plan."""
    return sorted(
        p.parent for p in repository.glob("*/config.pbtxt") if "tensorrt_plan" in p.read_text()
    )


def ensure_engines(repository: Path) -> list[str]:
    """A current TensorRT plan in every exported version folder of every TensorRT model."""
    actions = []
    for model_dir in tensorrt_models(repository):
        versions = sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
        for folder in versions or [model_dir / "1"]:
            onnx_fp16 = folder / "model_fp16.onnx"
            plan = folder / "model.plan"
            if not onnx_fp16.exists():
                raise FileNotFoundError(
                    f"{onnx_fp16} is missing: build the image with `thighseg export --format fp16`"
                )
            reason = needs_rebuild(
                read_build_info(plan), current_build_info(onnx_fp16, strongly_typed=True)
            )
            name = f"{model_dir.name}/{folder.name}"
            if reason is None:
                actions.append(f"{name}: engine up to date")
                continue
            build_engine(onnx_fp16, plan, repository / ".tensorrt_timing.cache")
            actions.append(f"{name}: built ({reason})")
    return actions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repository", type=Path)
    args = parser.parse_args(argv)
    try:
        for line in ensure_engines(args.repository):
            print(line, flush=True)
    except (TensorRTUnavailable, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
