"""FP16 ONNX: the input of a strongly typed TensorRT build (and a smaller model file).

Inputs and outputs stay FP32 so clients and Triton configs are the same for every variant.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
from onnx import TensorProto, helper


def convert_to_fp16(source: Path, target: Path) -> Path:
    """Cast weights and activations to FP16, keeping FP32 graph inputs and outputs."""
    from onnxconverter_common import float16

    model = onnx.load(str(source))
    with warnings.catch_warnings():  # tiny weights are clamped to FP16's range; reported per value
        warnings.simplefilter("ignore", UserWarning)
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
    _cast_outputs_to_fp32(converted)
    onnx.checker.check_model(converted)
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(converted, str(target))
    return target


def _cast_outputs_to_fp32(model: onnx.ModelProto) -> None:
    """Some converters leave an FP16 graph output; append a Cast so the contract stays FP32."""
    for output in model.graph.output:
        if output.type.tensor_type.elem_type != TensorProto.FLOAT16:
            continue
        internal = f"{output.name}_fp16"
        for node in model.graph.node:
            node.output[:] = [internal if name == output.name else name for name in node.output]
            node.input[:] = [internal if name == output.name else name for name in node.input]
        model.graph.node.append(
            helper.make_node(
                "Cast",
                [internal],
                [output.name],
                to=TensorProto.FLOAT,
                name=f"{output.name}_to_fp32",
            )
        )
        output.type.tensor_type.elem_type = TensorProto.FLOAT
