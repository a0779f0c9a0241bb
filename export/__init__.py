"""torch -> ONNX export, parity checks and model-repository writing (needs the `train` extra)."""
