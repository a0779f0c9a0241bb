"""C-STORE ingest side by side: the thighseg listener and DCMTK storescp receive the same files from
the same sender (DCMTK storescu), both writing to disk on loopback."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from thighseg.core.constants import AE_TITLE


@dataclass(frozen=True)
class IngestRun:
    receiver: str
    associations: int
    instances: int
    seconds: float

    @property
    def instances_per_second(self) -> float:
        return self.instances / self.seconds

    def as_dict(self) -> dict:
        return {**asdict(self), "instances_per_second": round(self.instances_per_second, 2)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on port {port} after {timeout_s:.0f} s")


def push(files: list[Path], port: int, associations: int, called_ae: str) -> float:
    """Seconds to send all files with `associations` parallel storescu processes."""
    if shutil.which("storescu") is None:
        raise FileNotFoundError("DCMTK storescu is needed (Debian package dcmtk)")
    parts = [files[k::associations] for k in range(associations)]
    started = time.perf_counter()
    senders = [
        subprocess.Popen(
            ["storescu", "-aec", called_ae, "127.0.0.1", str(port), *map(str, part)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for part in parts
        if part
    ]
    for sender in senders:
        _, error = sender.communicate(timeout=900)
        if sender.returncode != 0:
            raise RuntimeError(f"storescu failed: {error.decode()[-500:]}")
    return time.perf_counter() - started


@contextmanager
def storescp(folder: Path, fork: bool) -> Iterator[int]:
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    command = ["storescp", "-aet", "STORESCP", "-od", str(folder), "--max-pdu", "131072", str(port)]
    if fork:
        command.insert(1, "--fork")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield port
    finally:
        process.terminate()
        process.wait(30)


@contextmanager
def listener_process(
    triton_url: str,
    spool: Path,
    out: Path,
    idle_s: float,
    port: int | None = None,
    model: str = "segformer",
) -> Iterator[tuple[int, subprocess.Popen]]:
    """`thighseg listen` in its own process (so its memory can be read from /proc)."""
    port = port or free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "thighseg.cli",
            "listen",
            "--triton-url",
            triton_url,
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--spool",
            str(spool),
            "--out",
            str(out),
            "--idle",
            str(idle_s),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port)
        yield port, process
    finally:
        process.terminate()
        process.wait(60)


def peak_rss_bytes(pid: int) -> int:
    """VmHWM: the highest resident set size the process reached."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def compare_ingest(
    files: list[Path], triton_url: str, work: Path, associations: tuple[int, ...]
) -> list[IngestRun]:
    runs = []
    for count in associations:
        with storescp(work / f"storescp-{count}", fork=count > 1) as port:
            runs.append(
                IngestRun("dcmtk-storescp", count, len(files), push(files, port, count, "STORESCP"))
            )
        # idle far longer than the run: measure receiving only, not the segmentation that follows
        with listener_process(
            triton_url, work / f"spool-{count}", work / f"out-{count}", idle_s=1e6
        ) as (port, _):
            runs.append(
                IngestRun(
                    "thighseg-listener", count, len(files), push(files, port, count, AE_TITLE)
                )
            )
    return runs
