"""Builds and validates the TensorRT engines of every model; see gpu_check.sh."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from thighseg.export.build import export_model
from thighseg.learning import models

REPOSITORY = models.REPOSITORY


def serve_engines() -> str:
    """Load the tensorrt_plan configs in a GPU tritonserver, if this machine has one."""
    binary = shutil.which("tritonserver")
    if binary is None:
        return "skipped: no tritonserver on PATH (run inside the official Triton container)"
    process = subprocess.Popen(
        [
            binary,
            f"--model-repository={REPOSITORY}",
            "--http-port=18000",
            "--grpc-port=18001",
            "--metrics-port=18002",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        import tritonclient.http as http

        client = http.InferenceServerClient("127.0.0.1:18000")
        for _ in range(240):
            try:
                if client.is_server_ready():
                    states = {
                        m["name"]: m.get("state") for m in client.get_model_repository_index()
                    }
                    return f"served: {states}"
            except Exception:
                pass
            time.sleep(0.5)
        return "failed: tritonserver did not become ready"
    finally:
        process.terminate()
        process.wait(30)


def main() -> int:
    results = {}
    for model in sorted(models.BUILDERS):
        if not models.weights_path(model).exists():
            results[model] = {"error": "no shipped weights"}
            continue
        started = time.perf_counter()
        report = export_model(model, REPOSITORY, "tensorrt")
        report["seconds"] = round(time.perf_counter() - started, 1)
        results[model] = report
    results["triton"] = serve_engines()
    Path("gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    print(
        f"{'model':<12}{'GPU':<28}{'TensorRT':<12}{'agreement':>10}"
        f"{'max DSC drop':>14}{'build s':>9}"
    )
    for model, report in results.items():
        if model == "triton" or "error" in report:
            continue
        check, info = report["onnx_vs_tensorrt"], report["build_info"]
        print(
            f"{model:<12}{info['gpu'][:27]:<28}{info['tensorrt_version']:<12}{check['argmax_agreement']:>10.5f}"
            f"{check['max_dice_drop']:>14.4f}{report['seconds']:>9}"
        )
    print(f"triton: {results['triton']}")
    ok = all(
        "error" not in r
        and r["onnx_vs_tensorrt"]["argmax_agreement"] >= 0.995
        and r["onnx_vs_tensorrt"]["max_dice_drop"] <= 0.005
        for m, r in results.items()
        if m != "triton"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
