"""Ingest in several processes on one listening socket: real associations over loopback, the
real Triton server, processes stopped and killed by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from conftest import MODEL, free_port

from thighseg.apps.ingest import child_pids, push, wait_for_port
from thighseg.core.constants import AE_TITLE
from thighseg.dicom_listener.config import ListenerConfig
from thighseg.dicom_listener.index import Arrival, SpoolIndex
from thighseg.dicom_listener.series import SeriesKey, SeriesTracker
from thighseg.dicom_listener.service import Listener
from thighseg.pipeline.stages import InferenceSettings

needs_storescu = pytest.mark.skipif(
    shutil.which("storescu") is None, reason="DCMTK storescu not installed"
)


def _series_uid(paths) -> str:
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)


def _metric(listener: Listener, name: str, labels: dict | None = None) -> float | None:
    return listener.telemetry.registry.get_sample_value(name, labels or {})


def _wait_until(condition, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@needs_storescu
def test_a_series_over_ten_associations_into_two_processes_completes_once(
    listener_factory, study_factory
):
    listener = listener_factory(ingest_processes=2)
    pids = listener.ingest.pids()
    assert len(pids) == 2 and os.getpid() not in pids
    paths = study_factory(4646)
    # ten storescu processes, each its own association: whichever process is free takes the next
    push(paths, listener.config.port, 10, AE_TITLE)
    result = listener.wait_for(_series_uid(paths), timeout_s=300)
    assert result.report.status == "done", result.report
    assert result.report.instances == len(paths)
    # the counters the ingest processes incremented are the listener's own metrics
    assert _metric(listener, "thighseg_instances_received_total") == len(paths)
    assert _metric(listener, "thighseg_series_total", {"status": "done"}) == 1
    assert _metric(listener, "thighseg_slices_streamed_total") == len(paths)
    health = urllib.request.urlopen(
        f"http://127.0.0.1:{listener.config.metrics_port}/healthz", timeout=10
    )
    assert health.status == 200
    time.sleep(listener.config.idle_s + 0.5)
    assert len(listener.results) == 1  # one series, one result: never a part of it on its own


@needs_storescu
def test_a_killed_ingest_process_is_started_again_and_receiving_goes_on(
    listener_factory, study_factory
):
    listener = listener_factory(ingest_processes=2)
    victim = listener.ingest.pids()[0]
    os.kill(victim, signal.SIGKILL)
    assert _wait_until(lambda: not listener.accepting(), 10)
    assert _wait_until(listener.accepting, 90), "the killed process was not replaced"
    assert victim not in listener.ingest.pids() and len(listener.ingest.pids()) == 2
    paths = study_factory(4747)
    push(paths, listener.config.port, 4, AE_TITLE)
    result = listener.wait_for(_series_uid(paths), timeout_s=300)
    assert result.report.status == "done" and result.report.instances == len(paths)


@needs_storescu
def test_associations_waiting_for_a_process_that_dies_are_served_by_another(
    listener_factory, study_factory
):
    listener = listener_factory(ingest_processes=2)
    doomed, survivor = listener.ingest.pids()
    paths = study_factory(4848)
    for pid in (doomed, survivor):
        os.kill(pid, signal.SIGSTOP)  # nobody accepts: the connections wait in the backlog
    failures: list[Exception] = []

    def send() -> None:
        try:
            push(paths, listener.config.port, 4, AE_TITLE)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            failures.append(error)

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(1.5)  # four associations requested, none accepted yet
    os.kill(doomed, signal.SIGKILL)
    os.kill(survivor, signal.SIGCONT)
    sender.join(120)
    # one listening socket for every process: what waited for the dead one is taken by the other
    # (with a socket per process, SO_REUSEPORT, its queued connections were reset)
    assert not sender.is_alive() and failures == []
    result = listener.wait_for(_series_uid(paths), timeout_s=300)
    assert result.report.status == "done" and result.report.instances == len(paths)
    # stopped and continued, the survivor goes on (an empty siginfo once ended its wait for
    # SIGTERM: it stopped accepting, drained its associations and exited)
    time.sleep(2)
    assert _running(survivor) and survivor in listener.ingest.pids() and listener.ingest.alive()


def test_a_port_taken_by_another_program_is_a_clear_error(tmp_path):
    def refuse(_batch):
        raise AssertionError("nothing is processed")

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = ListenerConfig(
            tmp_path / "spool", tmp_path / "out", host="127.0.0.1", port=port, ingest_processes=2
        )
        with pytest.raises(OSError, match=f"cannot listen for DICOM on 127.0.0.1:{port}"):
            Listener(config, InferenceSettings(refuse, "denseunet", 256)).start()


def test_associations_of_a_dead_process_count_as_aborted(tmp_path):
    completed: list[SeriesKey] = []
    index = SpoolIndex(tmp_path / "index.sqlite3")
    tracker = SeriesTracker(index, completed.append, lambda _: None, idle_s=0.2, poll_s=0.05)
    tracker.start()
    key = SeriesKey("1.2.3", "1.2.3.4")

    def arrive(association: tuple, sop: str, digest: str = "d") -> None:
        arrival = index.record_instance(key.study_uid, key.series_uid, sop, digest)
        tracker.note_arrival(association, key, arrival)

    try:
        arrive((202, 1), "1.2.3.4.1")
        tracker.association_closed((202, 1), released=True)  # process 202: a part, released
        arrive((101, 1), "1.2.3.4.2")  # process 101 goes on with the series, then dies
        tracker.abandon(lambda association: association[0] == 101)
        time.sleep(0.6)
        assert completed == []  # its sender was cut off mid-series: no result from a part
        arrive((303, 7), "1.2.3.4.2", "e")  # the sender sends again, to another process
        assert index.record_instance(key.study_uid, key.series_uid, "1.2.3.4.2", "e") == (
            Arrival.DUPLICATE
        )
        tracker.association_closed((303, 7), released=True)
        assert _wait_until(lambda: completed == [key], 5)
    finally:
        tracker.stop()
        index.close()


def test_ingest_processes_must_be_at_least_one(capsys):
    from thighseg.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["listen", "--ingest-processes", "0"])
    assert stop.value.code == 2
    assert "--ingest-processes: '0' is not a whole number of at least 1" in capsys.readouterr().err


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie holds no port


def test_ingest_processes_exit_when_the_listener_is_killed(triton, tmp_path):
    port = free_port()
    command = [
        sys.executable, "-m", "thighseg.cli", "listen", "--triton-url", triton.http_url,
        "--model", MODEL, "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
        "--spool", str(tmp_path / "spool"), "--out", str(tmp_path / "out"),
        "--ingest-processes", "2",
    ]  # fmt: skip
    listener = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, process=listener)
        assert _wait_until(lambda: len(child_pids(listener.pid)) >= 2, 30)
        children = child_pids(listener.pid)
    finally:
        listener.kill()  # kill -9: no chance to stop its ingest processes itself
        listener.wait()
    # orphaned ingest processes would keep accepting instances nobody processes (and SEG
    # processes would hold memory for nothing)
    survivors = lambda: [pid for pid in children if _running(pid)]  # noqa: E731
    assert _wait_until(lambda: not survivors(), 15), [
        Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in survivors()
    ]
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
