"""The `thighseg` command as users run it: real processes, real ports, clean shutdown."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tritonclient.http as http
from conftest import MODEL, free_port

from thighseg.apps.ingest import child_pids

THIGHSEG = [sys.executable, "-m", "thighseg.cli"]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*THIGHSEG, *args], capture_output=True, text=True, timeout=timeout)


def test_phantom_command_writes_a_series(tmp_path):
    result = run(
        "phantom", "--seed", "9", "--size", "64", "--slices", "3", "--out", str(tmp_path / "s")
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["files"] == 3 and len(list((tmp_path / "s").glob("CT-*.dcm"))) == 3
    assert summary["group_volumes_ml"]["extensor"] > 0


def test_listen_without_triton_fails_with_a_clear_message():
    result = run(
        "listen", "--triton-url", f"127.0.0.1:{free_port()}", "--port", str(free_port()), timeout=60
    )
    assert result.returncode == 2
    assert "is not ready" in result.stderr and "thighseg serve" in result.stderr


SIGNAL_IN_ANOTHER_THREAD = """
import signal, threading, time
from thighseg.cli import _wait_for_signal

def stop_from_a_worker():
    time.sleep(0.5)  # the main thread is blocked in its wait by now
    signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

threading.Thread(target=stop_from_a_worker).start()
_wait_for_signal()
print("stopped")
"""


def test_a_stop_signal_handled_in_another_thread_still_stops_the_command():
    # the kernel may hand SIGTERM to any thread, or deliver it just before the main thread blocks:
    # the listener hung on `kubectl delete pod` / the benchmark's stop until killed
    result = subprocess.run(
        [sys.executable, "-c", SIGNAL_IN_ANOTHER_THREAD], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0 and result.stdout.strip() == "stopped", result.stderr


def test_bad_arguments_get_a_message_not_a_traceback(tmp_path):
    result = run("phantom", "--size", "8", "--out", str(tmp_path))
    assert result.returncode == 1
    assert "error: phantom needs size >= 32" in result.stderr and "Traceback" not in result.stderr


def test_serve_starts_triton_loads_new_exports_and_stops_on_sigterm(model_repository, tmp_path):
    repository = tmp_path / "repository"
    shutil.copytree(model_repository, repository)
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    process = subprocess.Popen(
        [
            *THIGHSEG,
            "serve",
            "--repository",
            str(repository),
            "--http-port",
            str(http_port),
            "--grpc-port",
            str(grpc_port),
            "--metrics-port",
            str(metrics_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert "triton ready" in line, process.stderr.read() if process.poll() is not None else line
        triton_pid = int(re.search(r"pid (\d+)", line).group(1))
        client = http.InferenceServerClient(f"127.0.0.1:{http_port}")
        assert client.is_model_ready("thighseg_segformer")
        assert not client.is_model_ready("thighseg_segformer", "2")
        # a new version exported while it runs is served without a restart
        entry = repository / "thighseg_segformer"
        shutil.copytree(entry / "1", entry / "2", ignore=shutil.ignore_patterns("model.onnx"))
        shutil.copy2(entry / "1" / "model.onnx", entry / "2" / "model.onnx")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not client.is_model_ready("thighseg_segformer", "2"):
            time.sleep(0.5)
        assert client.is_model_ready("thighseg_segformer", "2")
        assert client.is_model_ready("thighseg_segformer", "1")  # the policy keeps the latest two
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while (
            time.monotonic() < deadline
            and Path(f"/proc/{triton_pid}").exists()
            and "zombie" not in Path(f"/proc/{triton_pid}/status").read_text().lower()
        ):
            time.sleep(0.2)
        assert (
            not Path(f"/proc/{triton_pid}").exists()
            or "zombie" in Path(f"/proc/{triton_pid}/status").read_text().lower()
        )
    finally:
        if process.poll() is None:
            process.kill()


def test_demo_runs_end_to_end(model_repository, tmp_path):
    ports = [str(free_port()) for _ in range(4)]
    result = run(
        "demo",
        "--model",
        MODEL,  # the model the session's repository holds
        "--size",
        "256",
        "--slices",
        "16",
        "--repository",
        str(model_repository),
        "--http-port",
        ports[0],
        "--grpc-port",
        ports[1],
        "--metrics-port",
        ports[2],
        "--port",
        ports[3],
        "--work",
        str(tmp_path),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {
        line.split()[0]: line.split()[1:]
        for line in result.stdout.splitlines()
        if line.split() and line.split()[0] in ("extensor", "flexor", "adductor")
    }
    assert set(rows) == {"extensor", "flexor", "adductor"}
    assert all(float(values[2]) >= 0.8 for values in rows.values()), result.stdout
    assert list(tmp_path.rglob("seg.dcm")) and list(tmp_path.rglob("report.json"))


def test_cli_defaults_are_the_configs_own():
    from thighseg.cli import build_parser
    from thighseg.core.constants import AE_TITLE, DICOM_PORT, LISTENER_METRICS_PORT
    from thighseg.dicom_listener.config import default
    from thighseg.learning.training import TrainConfig

    listen = build_parser().parse_args(["listen"])
    assert (listen.ae_title, listen.port, listen.metrics_port) == (
        AE_TITLE,
        DICOM_PORT,
        LISTENER_METRICS_PORT,
    )
    assert (
        listen.idle,
        listen.expiry,
        listen.workers,
        listen.ingest_processes,
        listen.network_timeout,
        listen.host,
    ) == tuple(
        default(name)
        for name in (
            "idle_s",
            "expiry_s",
            "workers",
            "ingest_processes",
            "network_timeout_s",
            "host",
        )
    )
    train = build_parser().parse_args(["train"])
    assert (train.steps, train.subjects, train.batch_size) == (
        TrainConfig().steps,
        TrainConfig().subjects,
        TrainConfig().batch_size,
    )


def test_readme_states_the_defaults_the_code_has():
    from pathlib import Path

    from thighseg.core.constants import (
        AE_TITLE,
        DICOM_PORT,
        LISTENER_METRICS_PORT,
        TRITON_GRPC_PORT,
        TRITON_HTTP_PORT,
        TRITON_METRICS_PORT,
    )

    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    ports = f"HTTP {TRITON_HTTP_PORT}, gRPC {TRITON_GRPC_PORT}, metrics {TRITON_METRICS_PORT}"
    assert ports in readme
    assert f"(AE `{AE_TITLE}`, port {DICOM_PORT})" in readme
    assert f"`--metrics-port` ({LISTENER_METRICS_PORT})" in readme


def test_a_model_the_running_server_does_not_serve_is_named_with_what_to_do(triton):
    result = run(
        "listen",
        "--model",
        "manet",
        "--triton-url",
        triton.http_url,
        "--port",
        str(free_port()),
        timeout=60,
    )
    assert result.returncode == 2
    assert "does not serve it" in result.stderr and "thighseg export --model manet" in result.stderr


def listen_on_loopback(triton, *options: str) -> subprocess.CompletedProcess:
    """`thighseg listen` on 127.0.0.1 with the served model, no metrics port, and `options`: for
    the mistakes that stop it at start."""
    return run(
        "listen",
        "--model",
        MODEL,
        "--triton-url",
        triton.http_url,
        "--host",
        "127.0.0.1",
        "--metrics-port",
        "0",
        *options,
        timeout=60,
    )


def test_a_port_in_use_is_named_in_one_line(triton):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = listen_on_loopback(triton, "--port", str(port))
    assert result.returncode == 1
    assert f"cannot listen for DICOM on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_on_the_port_of_a_running_server_says_so_instead_of_reporting_ready(
    triton, model_repository
):
    result = run(
        "serve",
        "--repository",
        str(model_repository),
        "--http-port",
        str(triton.ports.http),  # the other server would answer this one's readiness checks
        "--grpc-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
        timeout=60,
    )
    assert result.returncode == 1
    assert f"the Triton http port {triton.ports.http} is in use" in result.stderr
    assert "triton ready" not in result.stdout and "Traceback" not in result.stderr


def test_an_output_path_that_is_a_file_is_named_with_what_to_do(tmp_path):
    (tmp_path / "inputs").mkdir()
    taken = tmp_path / "results"
    taken.write_text("not a folder")
    result = run("segment", str(tmp_path / "inputs"), "--out", str(taken))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{taken} is a file: name a folder" in result.stderr


def test_every_option_of_every_command_has_help_that_names_its_default():
    import argparse

    from thighseg.cli import _all_subparsers, build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in _all_subparsers(commands):
        text = command.format_help()
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, (command.prog, action.option_strings)
                if action.default not in (None, argparse.SUPPRESS):
                    assert "default" in action.help or "(default:" in text, action.option_strings


def _process_group(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(group) == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


def _gone_within(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _process_group(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _process_group(pgid)


def test_a_tritonserver_killed_outright_leaves_no_backend_stub_behind(model_repository, tmp_path):
    """Its Python backend stubs outlived a `kill -9` of tritonserver (~190 MB each, for minutes):
    stopping the server clears its whole process group."""
    import os

    from thighseg.serving.embedded_triton import EmbeddedTriton, Ports

    server = EmbeddedTriton(
        model_repository, Ports(free_port(), free_port(), free_port()), log_file=tmp_path / "t.log"
    ).start()
    pgid = server.process.pid
    try:
        stubs = [pid for pid in _process_group(pgid) if pid != pgid]
        assert stubs  # the Python backend's, one per model instance
        for stub in stubs:  # busy, as it was: an idle stub notices its server's death itself
            os.kill(stub, signal.SIGSTOP)
        os.kill(pgid, signal.SIGKILL)
        server.process.wait(30)
    finally:
        server.stop()
    assert _gone_within(pgid, 10), _process_group(pgid)


def test_sigterm_to_a_command_stops_the_server_it_started(model_repository, tmp_path):
    """`timeout` or a job scheduler stopping `thighseg bench` left its tritonserver running."""
    process = subprocess.Popen(
        [
            *THIGHSEG,
            "bench",
            "--tiny",
            "--models",
            MODEL,
            "--parts",
            "perf_analyzer",
            "--repository",
            str(model_repository),
            "--out",
            str(tmp_path / "bench"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline, servers = time.monotonic() + 120, []
        while not servers and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            servers = [
                pid
                for pid in child_pids(process.pid)
                if b"tritonserver" in _read(Path(f"/proc/{pid}/cmdline"))
            ]
        assert servers, process.stderr.read() if process.poll() is not None else "no server"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
        assert _gone_within(servers[0], 30), _process_group(servers[0])
    finally:
        if process.poll() is None:
            process.kill()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


BAD_LISTENER_VALUES = [
    ("--batch-size", "0"),  # accepted, then every series failed in its infer stage
    ("--concurrency", "0"),
    ("--idle", "-1"),
    ("--idle", "nan"),
    ("--expiry", "0"),  # would free every stored instance at once
    ("--expiry", "-5"),
    ("--drain", "-1"),
    ("--network-timeout", "0"),
    ("--stream-slices", "-1"),
    ("--triton-wait", "inf"),
    ("--port", "70000"),
    ("--metrics-port", "-1"),
    ("--triton-url", "nonsense:abc"),  # printed tritonclient tracebacks, then "no server"
    ("--triton-url", "127.0.0.1:99999"),
    ("--triton-url", "http://127.0.0.1"),
    ("--ae-title", "SEVENTEEN_LETTERS"),  # was printed twice, by pynetdicom's log and the CLI
    ("--allow-aet", "   "),
]


@pytest.mark.parametrize(("option", "value"), BAD_LISTENER_VALUES)
def test_a_listener_value_that_cannot_work_is_refused_before_it_starts(option, value):
    result = run("listen", option, value, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"argument {option}: '{value}' is not" in result.stderr


def test_a_triton_url_with_a_scheme_is_the_address_it_names():
    from thighseg.cli import _triton_address

    assert _triton_address("http://127.0.0.1:8000/") == "127.0.0.1:8000"
    assert _triton_address("grpc://triton.example:8001") == "triton.example:8001"
    assert _triton_address("[::1]:8000") == "[::1]:8000"


def test_a_results_folder_that_is_a_file_stops_the_listener_at_start(triton, tmp_path):
    """It started and said ready, then kept every series queued as 'results not writable'."""
    taken = tmp_path / "results"
    taken.write_text("not a folder")
    result = listen_on_loopback(
        triton, "--port", str(free_port()), "--spool", str(tmp_path / "spool"), "--out", str(taken)
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{taken} is a file: name a folder" in result.stderr
    assert "listening as" not in result.stdout
