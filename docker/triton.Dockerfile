# thighseg Triton image (GPU). Build from the repository root:
#   docker build -f docker/triton.Dockerfile -t thighseg/triton:0.1.0 .
# Stage 1 exports the shipped weights to ONNX FP32 + FP16 on CPU; stage 2 is the official Triton
# image, which builds FP16 TensorRT engines for the GPU it runs on at start (triton-entrypoint.sh).

FROM python:3.11-slim-bookworm AS export
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md ./
COPY thighseg thighseg
COPY client client
COPY export export
COPY dicom_listener dicom_listener
COPY model_repository model_repository
# CPU wheels of torch are enough for export (and much smaller than the CUDA build). Versions are
# pinned in pyproject.toml, which hadolint cannot see.
# hadolint ignore=DL3013
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[serve,train]" \
    && for model in denseunet manet segformer; do \
         thighseg export --model "$model" --format fp16 --repository /src/model_repository; done

# Triton 24.10 = Triton 2.51, the same release as the embedded CPU server (nvidia-pytriton 0.7.0);
# it ships TensorRT 10.5, so the Python builder is pinned to the same TensorRT.
FROM nvcr.io/nvidia/tritonserver:24.10-py3
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    MODEL_REPOSITORY=/models MODEL_REPOSITORY_SEED=/opt/thighseg/model_repository
WORKDIR /opt/thighseg
COPY pyproject.toml README.md ./
COPY thighseg thighseg
COPY client client
COPY export export
COPY dicom_listener dicom_listener
RUN pip install "numpy==1.26.4" "scipy==1.17.1" "tensorrt==10.5.0" "onnxruntime==1.32.0" \
    && pip install --no-deps .
COPY --from=export /src/model_repository /opt/thighseg/model_repository
COPY docker/triton-entrypoint.sh /opt/thighseg/triton-entrypoint.sh
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin thighseg \
    && mkdir -p /models && chown 10001 /models
USER 10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s CMD ["curl", "-fsS", "http://127.0.0.1:8000/v2/health/ready"]
ENTRYPOINT ["/opt/thighseg/triton-entrypoint.sh"]
