"""The real embedded tritonserver: readiness, HTTP and gRPC, dynamic batching, metrics."""

import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpc
import tritonclient.http as http

from thighseg.client.triton import TritonSegmenter, TritonUnavailable

NAME = "thighseg_segformer"


def test_model_config_batches_dynamically(triton):
    config = http.InferenceServerClient(triton.http_url).get_model_config(NAME)
    assert config["max_batch_size"] >= 16
    assert "dynamic_batching" in config
    grpc_config = grpc.InferenceServerClient(triton.grpc_url).get_model_config(NAME).config
    assert grpc_config.max_batch_size == config["max_batch_size"]


def test_http_and_grpc_return_the_same_logits(triton):
    x = np.random.default_rng(0).uniform(-1, 1, (2, 1, 256, 256)).astype(np.float32)
    via_http = TritonSegmenter(triton.http_url, NAME, "http").infer(x)
    via_grpc = TritonSegmenter(triton.grpc_url, NAME, "grpc").infer(x)
    assert via_http.shape == (2, 4, 256, 256)
    assert np.allclose(via_http, via_grpc, atol=1e-5)


def test_concurrent_requests_are_batched_and_counted_in_metrics(triton):
    segmenter = TritonSegmenter(triton.http_url, NAME)
    x = np.zeros((1, 1, 256, 256), np.float32)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: segmenter.infer(x), range(32)))
    metrics = (
        urllib.request.urlopen(f"http://127.0.0.1:{triton.ports.metrics}/metrics", timeout=10)
        .read()
        .decode()
    )

    def counter(name: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith(name + "{") and f'model="{NAME}"' in line
        )

    assert counter("nv_inference_count") >= 32
    assert counter("nv_inference_exec_count") < counter("nv_inference_count"), (
        "no request was batched"
    )


def test_wrong_input_shape_is_a_clear_error(triton):
    segmenter = TritonSegmenter(triton.http_url, NAME, retries=0)
    with pytest.raises(TritonUnavailable, match="failed"):
        segmenter.infer(np.zeros((1, 1, 64, 64), np.float32))
    with pytest.raises(ValueError, match=r"takes \(n, 1, H, W\) batches, got shape \(64, 64\)"):
        segmenter.infer(np.zeros((64, 64), np.float32))
    # channels the served model does not take: refused here, never retried as an outage
    with pytest.raises(ValueError, match=r"got shape \(1, 3, 256, 256\)"):
        segmenter.infer(np.zeros((1, 3, 256, 256), np.float32))


def test_unreachable_server_is_reported_not_hung():
    segmenter = TritonSegmenter("127.0.0.1:9", NAME, retries=1, backoff_s=0.05)
    assert not segmenter.is_ready()
    assert segmenter.why_not_ready() == "triton unreachable at 127.0.0.1:9"
    with pytest.raises(TritonUnavailable):
        segmenter.infer(np.zeros((1, 1, 256, 256), np.float32))
