"""C-STORE ingest side by side: the thighseg listener and DCMTK storescp receive the same files from
the same sender (DCMTK storescu), both writing to disk on loopback.

DCMTK leaves Nagle's algorithm on unless TCP_NODELAY=1 is in its environment (about 45 ms an
instance on loopback), so the fair baseline sets it for storescp and for every storescu; the
default configuration is measured too and labelled as such. The listener always gets the same
sender as the fair baseline, and so does a bare pynetdicom SCP (thighseg.apps.bare_scp): the
ceiling of the library the listener is built on.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import tomllib

from thighseg.core.constants import AE_TITLE, DEFAULT_MODEL
from thighseg.core.ports import free_port
from thighseg.pipeline.report import SeriesReport

NODELAY = {"TCP_NODELAY": "1"}  # DCMTK's documented switch


@dataclass(frozen=True)
class IngestRun:
    receiver: str
    associations: int
    instances: int
    seconds: float  # the median of the rounds
    rounds_seconds: tuple[float, ...] = ()

    @staticmethod
    def of_rounds(
        receiver: str, associations: int, instances: int, rounds: list[float]
    ) -> IngestRun:
        """One receiver's figure from its rounds: the median, the rounds kept beside it."""
        return IngestRun(
            receiver,
            associations,
            instances,
            statistics.median(rounds),
            tuple(rounds),
        )

    @property
    def instances_per_second(self) -> float:
        return self.instances / self.seconds

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "rounds_seconds": list(self.rounds_seconds),  # as JSON reads it back
            "instances_per_second": round(self.instances_per_second, 2),
        }


def wait_for_port(
    port: int,
    timeout_s: float = 60,
    process: subprocess.Popen | None = None,
    stderr: IO[bytes] | None = None,
) -> None:
    """Until something listens on `port`; a `process` that exits meanwhile fails at once with its
    `stderr` file (a listener that cannot start says why instead of a blind wait)."""

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    _poll(listening, f"nothing listening on port {port}", timeout_s, process, stderr)


def wait_for_ready(
    url: str, process: subprocess.Popen, stderr: IO[bytes], timeout_s: float = 120
) -> None:
    """Until `url` answers 200 (a listener's /readyz: every ingest process accepting, Triton
    reachable); a port that accepts connections is not enough, the kernel queues them before
    anyone takes them. A `process` that exits meanwhile fails at once with its `stderr`."""

    def ready() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return reply.status == 200
        except OSError:  # not serving yet, or 503: not ready yet
            return False

    _poll(ready, f"{url} not ready", timeout_s, process, stderr)


def _poll(
    done: Callable[[], bool],
    failure: str,
    timeout_s: float,
    process: subprocess.Popen | None,
    stderr: IO[bytes] | None,
) -> None:
    """Every 0.1 s until `done()`; RuntimeError with the `stderr` of a `process` that exited
    meanwhile, TimeoutError saying `failure` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            error = _tail(stderr) if stderr is not None else ""
            raise RuntimeError(
                f"{Path(process.args[0]).name} exited ({process.returncode}): {error}"
            )
        if done():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{failure} after {timeout_s:.0f} s")


def _tail(stderr: IO[bytes]) -> str:
    """The last lines a child wrote to its stderr file."""
    stderr.seek(0)
    return stderr.read().decode(errors="replace")[-1500:]


def _environment(nodelay: bool) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    return {**environment, **NODELAY} if nodelay else environment


def push(
    files: list[Path], port: int, associations: int, called_ae: str, nodelay: bool = True
) -> float:
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
            env=_environment(nodelay),
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
def serving(
    argv: list[str],
    port: int,
    env: dict[str, str] | None = None,
    stop_s: float = 30,
    ready_url: str | None = None,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen]:
    """A server process listening on `port` (and ready by `ready_url`, where it has one) until
    the block ends; if it exits first, its stderr says why at once."""
    stderr = tempfile.TemporaryFile()  # a file, not a pipe nobody drains: it never blocks the child
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=cwd)
    try:
        wait_for_port(port, process=process, stderr=stderr)
        if ready_url is not None:
            wait_for_ready(ready_url, process, stderr)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(stop_s)
        except subprocess.TimeoutExpired:
            process.kill()  # never left running behind the benchmark
            process.wait()
            raise RuntimeError(
                f"{Path(process.args[0]).name} did not stop within {stop_s:.0f} s of SIGTERM "
                f"(killed): {_tail(stderr)}"
            ) from None
        finally:
            stderr.close()


@contextmanager
def storescp(folder: Path, fork: bool, nodelay: bool = True) -> Iterator[int]:
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    # 128 KiB PDUs: faster for storescp than DCMTK's default of 16 KiB
    command = ["storescp", "-aet", "STORESCP", "-od", str(folder), "--max-pdu", "131072", str(port)]
    if fork:
        command.insert(1, "--fork")
    with serving(command, port, env=_environment(nodelay)):
        yield port


@contextmanager
def bare_pynetdicom() -> Iterator[int]:
    """pynetdicom acknowledging and discarding every instance, in its own process."""
    port = free_port()
    with serving([sys.executable, "-m", "thighseg.apps.bare_scp", str(port)], port):
        yield port


@contextmanager
def listener_process(
    triton_url: str,
    spool: Path,
    out: Path,
    idle_s: float,
    port: int | None = None,
    model: str = DEFAULT_MODEL,
    options: tuple[str, ...] = (),
    checkout: Path | None = None,
) -> Iterator[tuple[int, subprocess.Popen]]:
    """`thighseg listen` in its own process (so its memory can be read from /proc), ready to
    receive (its /readyz); `options` are further command-line options; `checkout`: another
    checkout of thighseg whose listener runs instead (an A/B of two versions)."""
    port, metrics_port = port or free_port(), free_port()
    defaults = {
        "--triton-url": triton_url,
        "--model": model,
        "--host": "127.0.0.1",
        "--port": port,
        "--metrics-port": metrics_port,
        "--spool": spool,
        "--out": out,
        "--idle": idle_s,
    }
    argv = [sys.executable, "-m", "thighseg.cli", "listen"]
    argv += [str(item) for option in defaults.items() for item in option] + list(options)
    ready = f"http://127.0.0.1:{metrics_port}/readyz"
    with tempfile.TemporaryDirectory(prefix="thighseg-checkout-") as overlay:
        cwd = None if checkout is None else importable(checkout, Path(overlay))
        with serving(argv, port, stop_s=60, ready_url=ready, cwd=cwd) as process:
            yield port, process


def importable(checkout: Path, into: Path) -> Path:
    """`into`, made a working directory from which `python -m thighseg...` imports every module
    of `checkout` (`python -m` imports from its working directory first): a `thighseg` folder of
    links to the checkout's, and to the folders its pyproject maps under thighseg
    (thighseg.dicom_listener is dicom_listener/, ...), which the editable install would
    otherwise take from this checkout."""
    with (checkout / "pyproject.toml").open("rb") as file:
        mapped = tomllib.load(file)["tool"]["setuptools"]["package-dir"]
    package = into / "thighseg"
    package.mkdir()
    for entry in (checkout / mapped["thighseg"]).iterdir():
        (package / entry.name).symlink_to(entry.resolve())
    for name, folder in mapped.items():
        if name.startswith("thighseg."):
            (package / name.removeprefix("thighseg.")).symlink_to((checkout / folder).resolve())
    return into


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _rss_and_peak(pid: int) -> tuple[int, int]:
    """VmRSS and VmHWM (its highest so far) of a process, in bytes, from one read of
    /proc/PID/status; zeros for a process that has ended (or a kernel thread)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # ended meanwhile
        return 0, 0
    sizes = dict.fromkeys(("VmRSS", "VmHWM"), 0)
    for line in status.splitlines():
        field, _, value = line.partition(":")
        if field in sizes:
            sizes[field] = int(value.split()[0]) * 1024  # "  123456 kB"
    return sizes["VmRSS"], sizes["VmHWM"]


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, theirs, ...)."""
    found, pending = [], child_pids(pid)
    while pending:
        found.append(pending.pop())
        pending += child_pids(found[-1])
    return found


class TreeRss:
    """The resident set sizes of a process and its descendants (SEG writers, ingest processes),
    sampled every `interval_s` while the block runs. `peak`: their highest sum at one sample, what
    a pod's memory limit meets (a spike shorter than the interval may be missed). `peaks`: each
    process's own highest (VmHWM) by PID, the process first, kept for those that ended before the
    block did; their sum bounds `peak` from above, as they peak at different times. The process
    tree is looked up again every half second (a /proc scan), the sizes read at each sample."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self.pid, self.interval_s, self.peak = pid, interval_s, 0
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="tree-rss", daemon=True)

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        pids, looked_up, last = [self.pid], 0.0, False
        while not last:
            last = self._stop.is_set()  # one more sample once stopped: the peaks as they end
            if time.monotonic() - looked_up > 0.5 or last:
                pids, looked_up = [self.pid, *descendants(self.pid)], time.monotonic()
            total = 0
            for pid in pids:
                rss, highest = _rss_and_peak(pid)
                total += rss
                self.peaks[pid] = max(self.peaks.get(pid, 0), highest)
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval_s)


def compare_ingest(
    files: list[Path],
    triton_url: str,
    work: Path,
    associations: tuple[int, ...],
    model: str = DEFAULT_MODEL,
    ingest_processes: int | None = None,
    rounds: int = 3,
) -> list[IngestRun]:
    """storescp with TCP_NODELAY=1 (the fair baseline), bare pynetdicom (no disk) and the listener
    (also with `ingest_processes` ingest processes, default one per core), each at every
    association count, in `rounds` interleaved rounds (one run of 300 instances takes a fraction
    of a second: the median of the rounds is the figure); storescp in DCMTK's default
    configuration (labelled, ~45 ms an instance) once."""
    if rounds < 1:
        raise ValueError(f"ingest rounds must be at least 1, not {rounds}")
    processes = ingest_processes or os.cpu_count() or 1
    runs = []
    for count in associations:
        seconds: dict[str, list[float]] = {}
        for round_ in range(rounds):
            baselines = [(True, "dcmtk-storescp")]
            if round_ == 0:
                baselines.append((False, "dcmtk-storescp-nagle-default"))
            for nodelay, label in baselines:
                folder = work / f"{label}-{count}"
                with storescp(folder, fork=count > 1, nodelay=nodelay) as port:
                    seconds.setdefault(label, []).append(
                        push(files, port, count, "STORESCP", nodelay=nodelay)
                    )
                shutil.rmtree(folder, ignore_errors=True)
            with bare_pynetdicom() as port:
                seconds.setdefault("pynetdicom-bare", []).append(push(files, port, count, AE_TITLE))
            for receivers in sorted({1, processes}):
                seconds.setdefault(listener_label(receivers), []).append(
                    _listener_ingest(files, triton_url, work, model, count, receivers)
                )
        runs += [
            IngestRun.of_rounds(label, count, len(files), taken) for label, taken in seconds.items()
        ]
    return runs


def _listener_ingest(
    files: list[Path], triton_url: str, work: Path, model: str, count: int, receivers: int
) -> float:
    """Seconds for a fresh listener with `receivers` ingest processes to receive `files` over
    `count` associations. Idle far longer than the run, no streaming, no head start: receiving
    only, not the segmentation that follows or overlaps it (on a small machine it competes for
    the cores)."""
    spool = work / f"spool-{count}-{receivers}"
    with listener_process(
        triton_url,
        spool,
        work / f"out-{count}-{receivers}",
        1e6,
        model=model,
        options=("--stream-slices", "0", "--no-head-start", "--ingest-processes", str(receivers)),
    ) as (port, _):
        seconds = push(files, port, count, AE_TITLE)
    shutil.rmtree(spool, ignore_errors=True)
    return seconds


def listener_label(ingest_processes: int) -> str:
    """The receiver's name in the ingest figures."""
    if ingest_processes == 1:
        return "thighseg-listener"
    return f"thighseg-listener-{ingest_processes}-processes"


def wait_for_report(out: Path, study_uid: str, timeout_s: float = 1800) -> SeriesReport:
    """The finished report of the study's series once it is published in `out` (the listener's
    layout, out/<study>/<series>/report.json: only that study's folder is polled, so waiting
    reads nothing of the other studies the listener is busy with)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for path in (out / study_uid).glob("*/report.json"):
            report = SeriesReport.read(path)
            if not report.done:
                raise RuntimeError(f"series failed: {report.reason}")
            return report
        time.sleep(0.05)
    raise TimeoutError(f"no report in {timeout_s:.0f} s")


def last_store_to_seg(
    files: list[Path],
    triton_url: str,
    work: Path,
    model: str,
    rate: float | None,
    streaming: bool,
    idle_s: float,
    head_start: bool = True,
    checkout: Path | None = None,
) -> dict:
    """One study sent in one association at `rate` instances/s (None: full speed) to a fresh
    listener (of `checkout`, if given), streaming or not, with a head start or not: seconds from
    the last C-STORE's answer to the published SEG."""
    import pydicom

    from thighseg.dicom_listener.scu import send_files

    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    label = (
        f"{rate or 'full'}-{'stream' if streaming else 'whole'}-{'head' if head_start else 'late'}"
    )
    out, spool = work / f"latency-out-{label}", work / f"latency-spool-{label}"
    options = (() if streaming else ("--stream-slices", "0")) + (
        () if head_start else ("--no-head-start",)
    )
    with listener_process(
        triton_url, spool, out, idle_s, model=model, options=options, checkout=checkout
    ) as (port, _):
        started = time.perf_counter()
        statuses = send_files(files, "127.0.0.1", port, rate=rate)
        last = time.perf_counter()
        report = wait_for_report(out, study_uid)
        finished = time.perf_counter()
    if set(statuses) != {0}:
        raise RuntimeError(f"C-STORE statuses {sorted(set(statuses))}")
    shutil.rmtree(spool, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "rate_per_s": rate or "full",
        "streaming": streaming,
        "head_start": head_start,
        "instances": len(files),
        "idle_s": idle_s,
        "seconds_sending": round(last - started, 2),
        "seconds_last_store_to_seg": round(finished - last, 2),
        "stage_seconds": report.stage_seconds,
    }
