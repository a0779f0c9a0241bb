"""Static INT8 quantisation of an exported model, calibrated on phantom slices.

One calibration (MinMax over CALIBRATION_SEEDS, deterministic) feeds two QDQ models and a table:
- `model_int8.onnx`: unsigned activations, signed per-channel weights (U8S8), the form ONNX Runtime
  runs fastest on x86 (VNNI) — the CPU candidate;
- `model_int8_symmetric.onnx`: signed symmetric activations, the explicit-quantisation form
  TensorRT builds an INT8 engine from (`export --format tensorrt-int8`, on a GPU);
- `calibration.json` / `calibration.cache`: the activation ranges, for ONNX Runtime's TensorRT
  execution provider and for audit.

The CPU candidate is served only if it holds accuracy and is faster: `choose_cpu_model` writes the
decision, with its figures, to `cpu_runtime.json`, which the python-backend runner reads.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from thighseg.export.validation import Comparison, compare, onnx_backend, phantom_tiles

CALIBRATION_SEEDS = (7101, 7102, 7103, 7104)  # outside training and validation seeds
CALIBRATION_SLICES = 8  # per seed, spread over the thigh
CPU_INT8 = "model_int8.onnx"
TENSORRT_INT8 = "model_int8_symmetric.onnx"
RUNTIME_RECORD = "cpu_runtime.json"
# what INT8 must hold against FP32 on the validation slices (issue targets)
MIN_AGREEMENT = 0.99
MAX_DICE_DROP = 0.005


def calibration_images(context: int = 0) -> np.ndarray:
    """Normalised phantom tiles (n, 2·context+1, s, s) to calibrate activation ranges on."""
    return phantom_tiles(CALIBRATION_SEEDS, CALIBRATION_SLICES, context=context)[0]


def _reader(images: np.ndarray):
    from onnxruntime.quantization import CalibrationDataReader

    class Slices(CalibrationDataReader):
        def __init__(self) -> None:
            self._next = iter(range(len(images)))

        def get_next(self) -> dict | None:
            index = next(self._next, None)
            return None if index is None else {"image": images[index : index + 1]}

    return Slices()


def quantise(onnx_fp32: Path, images: np.ndarray) -> dict[str, Path]:
    """Both QDQ models and the calibration table, beside `onnx_fp32`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator
    from onnxruntime.quantization.quant_utils import write_calibration_table
    from onnxruntime.quantization.shape_inference import quant_pre_process

    folder = onnx_fp32.parent
    with tempfile.TemporaryDirectory(prefix="thighseg-int8-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(onnx_fp32), str(prepared), skip_symbolic_shape=True)
        outputs = {
            "cpu": (folder / CPU_INT8, QuantType.QUInt8, False),
            "tensorrt": (folder / TENSORRT_INT8, QuantType.QInt8, True),
        }
        for path, activations, symmetric in outputs.values():
            quantize_static(
                str(prepared),
                str(path),
                _reader(images),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=activations,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": symmetric},
            )
        calibrator = create_calibrator(
            str(prepared),
            augmented_model_path=str(Path(scratch) / "augmented.onnx"),
            calibrate_method=CalibrationMethod.MinMax,
        )
        calibrator.collect_data(_reader(images))
        write_calibration_table(calibrator.compute_data(), dir=str(folder))
    return {name: path for name, (path, _, _) in outputs.items()} | {
        "calibration": folder / "calibration.cache"
    }


def slices_per_second(onnx_path: Path, images: np.ndarray, batch: int, threads: int) -> float:
    """ONNX Runtime throughput, best of three passes after a warm-up."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    session.run(["logits"], {"image": images[:batch]})
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for start in range(0, len(images), batch):
            session.run(["logits"], {"image": images[start : start + batch]})
        best = min(best, time.perf_counter() - started)
    return len(images) / best


def choose_cpu_model(
    onnx_fp32: Path, onnx_int8: Path, images: np.ndarray, truth: np.ndarray, threads: int
) -> dict:
    """Compare INT8 with FP32 (accuracy on `images`, speed at batch 1, the CPU configuration's),
    and record in cpu_runtime.json which one the CPU server runs: INT8 only if it holds accuracy
    and is faster."""
    comparison: Comparison = compare(
        onnx_backend(onnx_fp32), onnx_backend(onnx_int8), images, truth
    )
    speed = {"fp32": [], "int8": []}
    for _ in range(2):  # alternate, so drift on a busy machine hits both alike
        speed["fp32"].append(slices_per_second(onnx_fp32, images, 1, threads))
        speed["int8"].append(slices_per_second(onnx_int8, images, 1, threads))
    fp32, int8 = max(speed["fp32"]), max(speed["int8"])
    accurate = (
        comparison.argmax_agreement >= MIN_AGREEMENT
        and (comparison.max_dice_drop or 0.0) <= MAX_DICE_DROP
    )
    record = {
        "onnx": onnx_int8.name if accurate and int8 > fp32 else onnx_fp32.name,
        "int8_vs_fp32": comparison.as_dict(),
        "slices_per_s_batch1": {"fp32": round(fp32, 2), "int8": round(int8, 2)},
        "int8_speedup": round(int8 / fp32, 3),
        "accuracy_held": accurate,
        "threads": threads,
        "rule": f"INT8 if agreement >= {MIN_AGREEMENT}, DSC drop <= {MAX_DICE_DROP} and faster",
    }
    (onnx_fp32.parent / RUNTIME_RECORD).write_text(json.dumps(record, indent=2))
    return record
