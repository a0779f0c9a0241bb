"""A thin, explicit Triton client over HTTP or gRPC with bounded retries.

One tritonclient connection per worker thread (the HTTP client is not thread-safe), so several
batches can be in flight at once and Triton's dynamic batcher can merge them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from thighseg.core.constants import TRITON_URL

log = logging.getLogger(__name__)

PROTOCOLS = ("http", "grpc")


class TritonUnavailable(RuntimeError):
    """Triton could not be reached or kept failing after the retries."""


@dataclass
class TritonSegmenter:
    """Sends (n, 1, H, W) float32 batches to a model and returns its (n, C, H, W) logits."""

    url: str = TRITON_URL
    model: str = "thighseg_segformer"
    protocol: str = "http"
    version: str = ""  # "" or "latest": the newest version Triton serves; else a number
    retries: int = 3
    backoff_s: float = 0.5
    timeout_s: float = 120.0
    _local: threading.local = field(default_factory=threading.local, repr=False)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        self.version = "" if self.version in ("", "latest") else str(int(self.version))

    def _module(self):
        if self.protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        return module

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            module = self._module()
            if self.protocol == "grpc":
                client = module.InferenceServerClient(self.url)
            else:
                client = module.InferenceServerClient(
                    self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
                )
            self._local.client = client
        return client

    def is_ready(self) -> bool:
        """Is the server up and the model loaded (for /readyz)?"""
        try:
            return bool(self._client().is_model_ready(self.model, self.version))
        except Exception:  # connection refused, DNS, ...
            return False

    def server_is_live(self) -> bool:
        """Does a Triton server answer at the URL (whether or not it serves this model)?"""
        try:
            return bool(self._client().is_server_live())
        except Exception:  # connection refused, DNS, ...
            return False

    def served_version(self) -> str:
        """The version that answers: the pinned one, or the newest Triton has loaded."""
        if self.version:
            return self.version
        metadata = self._client().get_model_metadata(self.model)
        versions = metadata["versions"] if isinstance(metadata, dict) else metadata.versions
        return str(max(int(v) for v in versions))

    def weights_sha256(self, version: str) -> str | None:
        """The hash `thighseg export` published for a version in the model's config."""
        config = self._client().get_model_config(self.model)
        if not isinstance(config, dict):  # gRPC: a protobuf response
            from google.protobuf.json_format import MessageToDict

            config = MessageToDict(config, preserving_proto_field_name=True)
        config = config.get("config", config)
        entry = config.get("parameters", {}).get(f"weights_sha256_v{version}", {})
        return entry.get("string_value") or None

    def input_shape(self) -> tuple[int, int, int]:
        """(channels, H, W) the served model expects, read from its metadata."""
        metadata = self._client().get_model_metadata(self.model)
        inputs = (
            metadata["inputs"]
            if isinstance(metadata, dict)
            else [{"shape": list(i.shape)} for i in metadata.inputs]
        )
        shape = [int(s) for s in inputs[0]["shape"]][-3:]
        return shape[0], shape[1], shape[2]

    def infer(self, images: np.ndarray) -> np.ndarray:
        """Logits for one batch; retries transient failures with exponential backoff."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"expected a (n, 1, H, W) batch, got shape {images.shape}")
        module = self._module()
        batch = np.ascontiguousarray(images, dtype=np.float32)
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                tensor = module.InferInput("image", list(batch.shape), "FP32")
                tensor.set_data_from_numpy(
                    batch, **({"binary_data": True} if self.protocol == "http" else {})
                )
                output = module.InferRequestedOutput(
                    "logits", **({"binary_data": True} if self.protocol == "http" else {})
                )
                result = self._client().infer(
                    self.model, [tensor], model_version=self.version, outputs=[output]
                )
                return result.as_numpy("logits")
            # tritonclient raises InferenceServerException and socket errors
            except Exception as error:
                self._local.client = None
                if attempt == self.retries:
                    raise TritonUnavailable(
                        f"inference on {self.model} at {self.url} failed after "
                        f"{attempt + 1} attempts: {error}"
                    ) from error
                log.warning(
                    "triton request failed (%s); retry %d in %.1f s", error, attempt + 1, delay
                )
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")
