"""A thin, explicit Triton client over HTTP or gRPC with bounded retries.

Every request runs on one of the segmenter's own long-lived I/O threads, each with its own
tritonclient connection (the HTTP client is not thread-safe), so several batches can be in
flight at once and Triton's dynamic batcher can merge them. Callers may come from any thread,
short-lived ones included: tritonclient.http ties a client to an event loop of the thread that
made it, and the loop of a thread that has ended is never freed, so clients made on callers'
threads (a pool per volume, a thread per health probe) leaked descriptors until select() failed
past 1024 and every DICOM association of the process aborted.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from thighseg.core.constants import TRITON_URL
from thighseg.core.resample import stack_context

log = logging.getLogger(__name__)

T = TypeVar("T")

PROTOCOLS = ("http", "grpc")


class TritonUnavailable(RuntimeError):
    """Triton could not be reached or kept failing after the retries."""


@dataclass
class TritonSegmenter:
    """Sends (n, channels, H, W) float32 batches to a model and returns its (n, C, H, W) logits
    (channels: 1 for a 2D model, 2·context+1 for a 2.5D one, as the served model declares)."""

    url: str = TRITON_URL
    model: str = "thighseg_segformer"
    protocol: str = "http"
    version: str = ""  # "" or "latest": the newest version Triton serves; else a number
    retries: int = 3
    backoff_s: float = 0.5
    timeout_s: float = 120.0
    connections: int = 8  # requests in flight at once: one I/O thread and client each
    _local: threading.local = field(default_factory=threading.local, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _io: ThreadPoolExecutor | None = field(default=None, repr=False)
    _clients: list[object] = field(default_factory=list, repr=False)
    _channels: int | None = field(default=None, repr=False)

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
        """This I/O thread's connection, made on first use."""
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
            with self._lock:
                self._clients.append(client)
        return client

    def _drop_client(self) -> None:
        """Close this I/O thread's connection after a failure; the next call makes a new one."""
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
            client.close()

    def _on_io_thread(self, call: Callable[[], T]) -> T:
        """Run `call` (which uses `_client`) on one of the segmenter's own I/O threads."""
        with self._lock:
            if self._io is None:
                self._io = ThreadPoolExecutor(self.connections, thread_name_prefix="triton-io")
                atexit.register(_close_at_exit, weakref.ref(self))
            io = self._io
        return io.submit(call).result()

    def close(self) -> None:
        """Close every connection and stop the I/O threads (a later call starts them again)."""
        with self._lock:
            io, self._io = self._io, None
            clients, self._clients = self._clients, []
        if io is not None:
            io.shutdown(wait=True)
        for client in clients:
            client.close()

    def is_ready(self) -> bool:
        """Is the server up and the model loaded (for /readyz)?"""
        try:
            return bool(
                self._on_io_thread(lambda: self._client().is_model_ready(self.model, self.version))
            )
        except Exception:  # connection refused, DNS, ...
            return False

    def why_not_ready(self) -> str | None:
        """None when the model answers; otherwise whether the server or only the model (a pinned
        version unloaded by the version policy, say) is missing, for /readyz and logs."""
        if self.is_ready():
            return None
        if not self.server_is_live():
            return f"triton unreachable at {self.url}"
        version = f" version {self.version}" if self.version else ""
        return f"triton at {self.url} does not serve {self.model}{version}"

    def server_is_live(self) -> bool:
        """Does a Triton server answer at the URL (whether or not it serves this model)?"""
        try:
            return bool(self._on_io_thread(lambda: self._client().is_server_live()))
        except Exception:  # connection refused, DNS, ...
            return False

    def served_version(self) -> str:
        """The version that answers: the pinned one, or the newest Triton has loaded."""
        if self.version:
            return self.version
        metadata = self._on_io_thread(lambda: self._client().get_model_metadata(self.model))
        versions = metadata["versions"] if isinstance(metadata, dict) else metadata.versions
        return str(max(int(v) for v in versions))

    def weights_sha256(self, version: str) -> str | None:
        """The hash `thighseg export` published for a version in the model's config."""
        config = self._on_io_thread(lambda: self._client().get_model_config(self.model))
        if not isinstance(config, dict):  # gRPC: a protobuf response
            from google.protobuf.json_format import MessageToDict

            config = MessageToDict(config, preserving_proto_field_name=True)
        config = config.get("config", config)
        entry = config.get("parameters", {}).get(f"weights_sha256_v{version}", {})
        return entry.get("string_value") or None

    def input_shape(self) -> tuple[int, int, int]:
        """(channels, H, W) the served model expects, read from its metadata."""
        metadata = self._on_io_thread(lambda: self._client().get_model_metadata(self.model))
        inputs = (
            metadata["inputs"]
            if isinstance(metadata, dict)
            else [{"shape": list(i.shape)} for i in metadata.inputs]
        )
        shape = [int(s) for s in inputs[0]["shape"]][-3:]
        return shape[0], shape[1], shape[2]

    def channels(self) -> int:
        """Input channels of the served model (asked once: a model's inputs do not change
        between its versions)."""
        if self._channels is None:
            try:
                self._channels = self.input_shape()[0]
            except Exception as error:  # unreachable or not loaded: the caller retries later
                raise TritonUnavailable(
                    f"no metadata for {self.model} at {self.url}: {error}"
                ) from error
        return self._channels

    def context(self) -> int:
        """Neighbour slices on either side the served model takes (0: 2D)."""
        return stack_context(self.channels())

    def infer(self, images: np.ndarray) -> np.ndarray:
        """Logits for one batch; retries transient failures with exponential backoff."""
        channels = self.channels()
        if images.ndim != 4 or images.shape[1] != channels:
            raise ValueError(
                f"{self.model} takes (n, {channels}, H, W) batches, got shape {images.shape}"
            )
        batch = np.ascontiguousarray(images, dtype=np.float32)
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return self._on_io_thread(lambda: self._infer_once(batch))
            # tritonclient raises InferenceServerException and socket errors
            except Exception as error:
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

    def _infer_once(self, batch: np.ndarray) -> np.ndarray:
        """One request on this I/O thread's connection; a failed connection is closed."""
        module = self._module()
        binary = {"binary_data": True} if self.protocol == "http" else {}
        tensor = module.InferInput("image", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch, **binary)
        output = module.InferRequestedOutput("logits", **binary)
        try:
            result = self._client().infer(
                self.model, [tensor], model_version=self.version, outputs=[output]
            )
        except Exception:
            self._drop_client()
            raise
        return result.as_numpy("logits")


def _close_at_exit(segmenter: weakref.ref[TritonSegmenter]) -> None:
    """Close a segmenter still open at exit while its modules are intact (tritonclient's own
    finaliser fails once the interpreter is shutting down)."""
    alive = segmenter()
    if alive is not None:
        alive.close()
