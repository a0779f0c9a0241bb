"""Start the real `tritonserver` binary that nvidia-pytriton ships, on CPU, over a model repository.

PyTriton's own `Triton()` API wraps Python callables; we instead launch the binary directly on a
standard Triton model repository so that the embedded default and the production container serve
the same repository layout, model names and protocols.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from thighseg.core.constants import TRITON_GRPC_PORT, TRITON_HTTP_PORT, TRITON_METRICS_PORT

log = logging.getLogger(__name__)

CPU_CONFIG_NAME = "cpu"


@dataclass(frozen=True)
class Ports:
    """The server's HTTP, gRPC and metrics ports."""

    http: int = TRITON_HTTP_PORT
    grpc: int = TRITON_GRPC_PORT
    metrics: int = TRITON_METRICS_PORT

    def check_free(self) -> None:
        """Raise if another process listens on one of the ports: tritonserver would exit, and the
        other server would answer the readiness checks meant for this one."""
        for name, port in (("http", self.http), ("grpc", self.grpc), ("metrics", self.metrics)):
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
                try:
                    probe.bind(("0.0.0.0", port))
                except OSError as error:
                    raise OSError(
                        error.errno,
                        f"the Triton {name} port {port} is in use (another server?); stop it or "
                        f"choose other ports (--http-port, --grpc-port, --metrics-port)",
                    ) from error


def _pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError as error:  # pragma: no cover - install problem
        raise RuntimeError(
            "nvidia-pytriton is not installed; it provides the tritonserver binary"
        ) from error
    return Path(pytriton.__file__).parent / "tritonserver"


def backend_directory(cache: Path) -> Path:
    """A backends/ folder holding the python backend with the stub for this interpreter."""
    root = _pytriton_root()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"nvidia-pytriton has no python backend stub for Python {version}")
    backends = cache / "backends"
    python_backend = backends / "python"
    if not (python_backend / "triton_python_backend_stub").exists():
        shutil.copytree(root / "backends" / "python", python_backend, dirs_exist_ok=True)
        shutil.copy2(stub, python_backend / "triton_python_backend_stub")
    return backends


def server_environment() -> dict[str, str]:
    """Library path and PATH so the server and its python stub use this virtual environment."""
    root = _pytriton_root()
    libs = root.parent.parent / "nvidia_pytriton.libs"
    env = dict(os.environ)
    library_path = [str(libs), sysconfig.get_config_var("LIBDIR") or ""]
    if env.get("LD_LIBRARY_PATH"):
        library_path.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(p for p in library_path if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


@dataclass
class EmbeddedTriton:
    """A tritonserver child process; use as a context manager or call start()/stop()."""

    model_repository: Path
    ports: Ports = field(default_factory=Ports)
    models: tuple[str, ...] | None = None  # default: every model whose ONNX file has been exported
    log_file: Path | None = None
    startup_timeout_s: float = 120.0
    process: subprocess.Popen | None = None
    _cache: tempfile.TemporaryDirectory | None = None

    @property
    def http_url(self) -> str:
        """host:port of the HTTP endpoint."""
        return f"127.0.0.1:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        """host:port of the gRPC endpoint."""
        return f"127.0.0.1:{self.ports.grpc}"

    def served_models(self) -> tuple[str, ...]:
        """The repository's models that have an exported ONNX file to serve."""
        if self.models is not None:
            return self.models
        return tuple(sorted(self.exported()))

    def exported(self) -> dict[str, tuple[int, ...]]:
        """Each model of the repository with an exported ONNX file, and its exported versions."""
        versions: dict[str, list[int]] = {}
        for path in self.model_repository.glob("*/*/model.onnx"):
            if path.parent.name.isdigit():
                versions.setdefault(path.parent.parent.name, []).append(int(path.parent.name))
        return {name: tuple(sorted(found)) for name, found in versions.items()}

    def load_new_exports(self, known: dict[str, tuple[int, ...]]) -> list[str]:
        """Ask the running server to load every model exported, or given a new version, since
        `known` (updated in place): exports reach clients without a restart. Returns one line per
        model loaded, or why it could not be."""
        import tritonclient.http as http
        from tritonclient.utils import InferenceServerException

        client = http.InferenceServerClient(self.http_url)
        lines = []
        for name, versions in sorted(self.exported().items()):
            if self.models is not None and name not in self.models:
                continue
            if known.get(name) == versions:
                continue
            known[name] = versions
            try:
                client.load_model(name)  # explicit mode: loads, or reloads with the new versions
                lines.append(f"loaded {name} (exported versions {', '.join(map(str, versions))})")
            except InferenceServerException as error:
                lines.append(f"could not load {name}: {error.message()}")
        return lines

    def command(self, backends: Path) -> list[str]:
        """The tritonserver command line for this repository and these ports."""
        return [
            str(_pytriton_root() / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository.resolve()}",
            f"--backend-directory={backends}",
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            "--exit-on-error=false",
            "--log-verbose=0",
            "--exit-timeout-secs=5",  # do not wait 30 s for idle client connections on stop
            f"--model-config-name={CPU_CONFIG_NAME}",  # <model>/configs/cpu.pbtxt: python backend
            "--model-control-mode=explicit",  # load what was exported, not every folder
            *(f"--load-model={name}" for name in self.served_models()),
        ]

    def start(self) -> EmbeddedTriton:
        """Start tritonserver and wait until every served model is ready."""
        if not self.model_repository.is_dir():
            raise FileNotFoundError(f"model repository {self.model_repository} does not exist")
        self.ports.check_free()
        if not self.served_models():
            raise FileNotFoundError(
                f"no exported model in {self.model_repository}; run `thighseg export`"
            )
        self._cache = tempfile.TemporaryDirectory(prefix="thighseg-triton-")
        backends = backend_directory(Path(self._cache.name))
        output = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        self.process = subprocess.Popen(
            self.command(backends),
            env=server_environment(),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.info(
            "tritonserver pid %d on http %d / grpc %d / metrics %d",
            self.process.pid,
            self.ports.http,
            self.ports.grpc,
            self.ports.metrics,
        )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def check_alive(self) -> None:
        """Raise if tritonserver has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"tritonserver exited with code {self.process.returncode}"
                f"{'; see ' + str(self.log_file) if self.log_file else ''}"
            )

    def wait_ready(self) -> None:
        """Block until the server and every model in the repository report ready."""
        import tritonclient.http as http

        client = http.InferenceServerClient(self.http_url)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if client.is_server_ready() and all(
                    client.is_model_ready(m) for m in self.served_models()
                ):
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)
        raise TimeoutError(f"tritonserver not ready after {self.startup_timeout_s:.0f} s")

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (Triton ignores SIGINT in the background), then SIGKILL if it lingers; then
        whatever is left of its process group: the backend stubs of a tritonserver that was
        killed outright outlive it (~190 MB each) otherwise."""
        if self.process is not None:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait()
            with contextlib.suppress(ProcessLookupError):  # none left: the usual case
                os.killpg(self.process.pid, signal.SIGKILL)
        if self._cache is not None:
            self._cache.cleanup()
            self._cache = None

    def __enter__(self) -> EmbeddedTriton:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
