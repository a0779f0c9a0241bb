"""Where an INT8 model's time goes on this CPU, next to FP32: ONNX Runtime's own profiler.

Each model is exported from its shipped weights, quantised as `thighseg export --format int8`
does (static QDQ, the phantom calibration), and run at batch 1 with the CPU configuration's two
threads; the profiler's kernel times are summed per operator type. Written to show why INT8 does
or does not pay for a model, not to time it (the bench does that).

    .venv/bin/python scripts/int8_profile.py --models denseunet manet segformer \
        --out docs/benchmark/int8_profile.json
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np

from thighseg.export.int8 import calibration_images, quantise
from thighseg.export.onnx_export import export_to_new_repository
from thighseg.export.validation import onnx_context
from thighseg.learning import models

WARM_UP, RUNS, THREADS = 3, 20, 2


def kernel_times(onnx_path: Path, images: np.ndarray, disabled: tuple[str, ...] = ()) -> dict:
    """Mean kernel milliseconds per slice, by operator type, and how many nodes of each run
    (`disabled`: ONNX Runtime graph optimisers left out)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.enable_profiling = True
    options.profile_file_prefix = str(onnx_path.with_suffix(""))
    session = ort.InferenceSession(
        str(onnx_path),
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(disabled),
    )
    for k in range(WARM_UP + RUNS):
        session.run(["logits"], {"image": images[k % len(images)][None]})
    events = json.loads(Path(session.end_profiling()).read_text())
    micros, nodes = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            micros[event["args"]["op_name"]] += event["dur"]
            nodes[event["args"]["op_name"]] += 1
    runs = WARM_UP + RUNS
    return {
        "ms_per_slice": round(sum(micros.values()) / runs / 1000, 2),
        "ms_by_operator": {op: round(us / runs / 1000, 2) for op, us in micros.most_common()},
        "nodes_per_slice": {op: n // runs for op, n in nodes.most_common()},
    }


def profile(model: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="thighseg-int8-profile-") as scratch:
        repository = export_to_new_repository(model, Path(scratch))
        fp32 = repository / models.triton_name(model) / "1" / "model.onnx"
        images = calibration_images(onnx_context(fp32)).astype(np.float32)
        int8 = quantise(fp32, images)["cpu"]
        figures = {
            "fp32": kernel_times(fp32, images),
            "int8": kernel_times(int8, images),
            # QLinearConv runs in NHWC; the rewrite adds transposes around float ops between
            "int8_without_nhwc_rewrite": kernel_times(int8, images, ("NhwcTransformer",)),
        }
    fp32_ms = figures["fp32"]["ms_per_slice"]
    for variant in ("int8", "int8_without_nhwc_rewrite"):
        figures[f"{variant}_vs_fp32_kernel_time"] = round(
            fp32_ms / figures[variant]["ms_per_slice"], 3
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=sorted(models.BUILDERS))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    report: dict = {"threads": THREADS, "runs": RUNS, "batch": 1, "models": {}}
    for model in args.models:  # each model's figures are written as soon as they exist
        try:
            report["models"][model] = profile(model)
        except Exception as error:  # noqa: BLE001 - a failing model is reported, the others go on
            report["models"][model] = {"error": f"{type(error).__name__}: {error}"}
        args.out.write_text(json.dumps(report, indent=2))
        print(model, json.dumps(report["models"][model])[:400])


if __name__ == "__main__":
    main()
