"""Triton python-backend model: one ONNX Runtime session, whole dynamic batches at once.

Triton's dynamic batcher hands `execute` several requests together; concatenating them into one
ONNX Runtime call is what makes batching pay off on CPU.
"""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        threads = int(config.get("parameters", {}).get("intra_op_threads", {}).get("string_value", "0"))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        model_file = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        images = [pb_utils.get_input_tensor_by_name(r, "image").as_numpy() for r in requests]
        logits = self.session.run(["logits"], {"image": np.concatenate(images).astype(np.float32, copy=False)})[0]
        responses, start = [], 0
        for image in images:
            part = logits[start:start + len(image)]
            start += len(image)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("logits", part)]))
        return responses
