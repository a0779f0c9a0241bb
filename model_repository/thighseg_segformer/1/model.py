"""Triton python-backend model: one ONNX Runtime session serving whole dynamic batches.

Triton's dynamic batcher hands `execute` several requests together, which saves a round trip between
the server and this process per request. The slices then go to ONNX Runtime `inference_batch` at a
time (0: all at once): on CPU a big batch runs no faster per slice than a small one and falls out of
cache, so the CPU configuration runs them one by one.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _parameter(config: dict, key: str, default: str) -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(_parameter(config, "intra_op_threads", "0"))
        self.inference_batch = int(_parameter(config, "inference_batch", "0"))
        folder = Path(args["model_repository"]) / args["model_version"]
        # `thighseg export --format int8` records which ONNX file is faster and accurate here
        record = folder / "cpu_runtime.json"
        chosen = json.loads(record.read_text())["onnx"] if record.exists() else "model.onnx"
        model_file = folder / chosen
        self.session = ort.InferenceSession(
            str(model_file), options, providers=["CPUExecutionProvider"]
        )

    def execute(self, requests):
        images = [pb_utils.get_input_tensor_by_name(r, "image").as_numpy() for r in requests]
        batch = np.concatenate(images).astype(np.float32, copy=False)
        step = self.inference_batch or len(batch)
        logits = np.concatenate(
            [
                self.session.run(["logits"], {"image": batch[start : start + step]})[0]
                for start in range(0, len(batch), step)
            ]
        )
        responses, start = [], 0
        for image in images:
            part = logits[start : start + len(image)]
            start += len(image)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("logits", part)]))
        return responses
