"""The embedded Triton server (CPU): tritonserver from nvidia-pytriton on model_repository/."""
