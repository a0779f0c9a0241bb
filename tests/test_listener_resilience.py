"""Nothing lost: concurrency, duplicates, expiry, unwritable spool, crash and restart, Triton
outage, forwarding with bounded retries, compressed transfer syntaxes, no identifiers in logs."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import MODEL, free_port, wait_until
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts

from thighseg.apps.ingest import listener_process
from thighseg.dicom_listener.forward import Destination
from thighseg.dicom_listener.index import DONE, FAILED
from thighseg.dicom_listener.scu import send_files
from thighseg.pipeline.assemble import assemble
from thighseg.serving.embedded_triton import EmbeddedTriton, Ports

SMALL = dict(size=128, slices=6)


def series_uid(paths) -> str:
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)


def http_status(url: str) -> int:
    try:
        return urllib.request.urlopen(url, timeout=5).status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK storescu not installed")
def test_ten_concurrent_associations_every_instance_accounted_for(listener_factory, study_factory):
    listener = listener_factory(workers=2)
    studies = [study_factory(5000 + k, **SMALL) for k in range(10)]
    statuses: dict[int, object] = {}

    def push(k: int) -> None:
        if k % 2:  # half from DCMTK, half from pynetdicom
            result = subprocess.run(
                [
                    "storescu",
                    "-aec",
                    "THIGHSEG",
                    "127.0.0.1",
                    str(listener.config.port),
                    *map(str, studies[k]),
                ],
                capture_output=True,
                timeout=120,
            )
            statuses[k] = result.returncode
        else:
            statuses[k] = send_files(studies[k], "127.0.0.1", listener.config.port)

    threads = [threading.Thread(target=push, args=(k,)) for k in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert all(statuses[k] == (0 if k % 2 else [0] * 6) for k in range(10)), statuses
    for paths in studies:
        result = listener.wait_for(series_uid(paths), timeout_s=300)
        assert result.report.status == "done" and result.report.instances == 6
    assert len(list(listener.config.spool_dir.rglob("*.dcm"))) == 60
    assert listener.index.counts()[DONE] == 10


def test_duplicates_are_idempotent_and_do_not_reprocess(listener_factory, study_factory):
    listener = listener_factory()
    paths = study_factory(5100, **SMALL)
    assert send_files(paths, "127.0.0.1", listener.config.port) == [0] * 6
    listener.wait_for(series_uid(paths), timeout_s=120)
    # Success again, stored once
    assert send_files(paths, "127.0.0.1", listener.config.port) == [0] * 6
    time.sleep(listener.config.idle_s + 1.0)
    record = listener.index.get(series_uid(paths))
    assert (record.state, record.instances, record.attempts) == (DONE, 6, 1)
    assert listener.telemetry.registry.get_sample_value("thighseg_instances_duplicate_total") == 6


def test_aborted_transfer_is_logged_expires_and_is_freed(listener_factory, study_factory, caplog):
    listener = listener_factory(expiry_s=1.5)
    paths = study_factory(5200, **SMALL)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(pydicom.uid.CTImageStorage)
    association = ae.associate("127.0.0.1", listener.config.port, ae_title="THIGHSEG")
    for path in paths[:3]:
        assert association.send_c_store(pydicom.dcmread(path)).Status == 0
    association.abort()
    assert wait_until(
        lambda: any("sending to 1 series was aborted" in r.getMessage() for r in caplog.records), 10
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and listener.index.get(series_uid(paths)).state != FAILED:
        time.sleep(0.2)
    record = listener.index.get(series_uid(paths))
    assert record.state == FAILED and record.reason.startswith("expired")
    assert list(listener.config.spool_dir.rglob("*.dcm")) == []
    assert series_uid(paths) not in listener.results  # never segmented from a partial transfer


def test_unwritable_spool_answers_out_of_resources_and_keeps_running(
    listener_factory, study_factory
):
    listener = listener_factory()
    blocked, fine = study_factory(5300, **SMALL), study_factory(5301, **SMALL)
    study_uid = str(pydicom.dcmread(blocked[0], stop_before_pixels=True).StudyInstanceUID)
    (listener.config.spool_dir / study_uid).write_text("a file where the study folder should be")
    assert send_files(blocked[:2], "127.0.0.1", listener.config.port) == [0xA700, 0xA700]
    assert send_files(fine, "127.0.0.1", listener.config.port) == [0] * 6
    assert listener.wait_for(series_uid(fine), timeout_s=120).report.status == "done"


def test_compressed_transfer_syntaxes_are_stored_as_sent_and_decoded(
    listener_factory, study_factory, tmp_path
):
    listener = listener_factory()
    paths = study_factory(5400, **SMALL)
    syntaxes = [
        RLELossless,
        JPEG2000Lossless,
        JPEGLSLossless,
        DeflatedExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        "1.2.840.10008.1.2.4.70",
    ]
    variants = []
    for k, (path, syntax) in enumerate(zip(paths, syntaxes, strict=False)):
        target = tmp_path / f"{k}.dcm"
        if syntax == "1.2.840.10008.1.2.4.70":
            if shutil.which("dcmcjpeg") is None:
                pytest.skip("DCMTK dcmcjpeg not installed")
            subprocess.run(["dcmcjpeg", "+e1", str(path), str(target)], check=True)
        else:
            ds = pydicom.dcmread(path)
            if syntax in (RLELossless, JPEG2000Lossless, JPEGLSLossless):
                ds.compress(syntax)
            else:
                ds.file_meta.TransferSyntaxUID = syntax
            ds.save_as(target, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
        variants.append(target)
    ae = AE(ae_title="MODALITY")
    for syntax in syntaxes:
        ae.add_requested_context(pydicom.uid.CTImageStorage, syntax)
    association = ae.associate("127.0.0.1", listener.config.port, ae_title="THIGHSEG")
    assert association.is_established
    assert [association.send_c_store(pydicom.dcmread(p)).Status for p in variants] == [0] * 6
    association.release()
    result = listener.wait_for(series_uid(paths), timeout_s=120)
    assert result.report.status == "done", result.report
    spooled = sorted(listener.config.spool_dir.rglob("*.dcm"))
    assert {
        str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        for p in spooled
    } >= {str(RLELossless), str(JPEG2000Lossless), str(JPEGLSLossless)}
    assert np.array_equal(assemble(spooled).hu, assemble(list(paths)).hu)


def test_triton_outage_keeps_the_series_queued_until_it_is_back(
    model_repository, listener_factory, study_factory, tmp_path
):
    ports = Ports(free_port(), free_port(), free_port())
    server = EmbeddedTriton(model_repository, ports, log_file=tmp_path / "triton.log").start()
    listener = listener_factory(triton_url=server.http_url, retry_backoff_s=(0.5, 2.0))
    readyz = f"http://127.0.0.1:{listener.config.metrics_port}/readyz"
    try:
        assert http_status(readyz) == 200
        server.stop()
        assert http_status(readyz) == 503
        paths = study_factory(5500, **SMALL)
        assert send_files(paths, "127.0.0.1", listener.config.port) == [0] * 6
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not listener.telemetry.registry.get_sample_value(
            "thighseg_series_deferred_total", {"cause": "triton"}
        ):
            time.sleep(0.2)
        record = listener.index.get(series_uid(paths))
        assert (
            record.state in ("complete", "processing") and series_uid(paths) not in listener.results
        )
        deadline = time.monotonic() + 10  # waiting for Triton counts as queued
        while (
            time.monotonic() < deadline
            and listener.index.get(series_uid(paths)).state != "complete"
        ):
            time.sleep(0.1)
        assert listener.telemetry.registry.get_sample_value("thighseg_queue_depth") == 1
        server = EmbeddedTriton(model_repository, ports, log_file=tmp_path / "triton2.log").start()
        result = listener.wait_for(series_uid(paths), timeout_s=180)
        assert result.report.status == "done" and result.report.instances == 6
        assert http_status(readyz) == 200
    finally:
        server.stop()


def test_kill_9_mid_study_then_restart_and_resend_the_rest(triton, study_factory, tmp_path):
    paths = study_factory(5600, size=128, slices=12)
    spool, out, port = tmp_path / "spool", tmp_path / "out", free_port()
    with listener_process(triton.http_url, spool, out, 1.0, port=port, model=MODEL) as (_, first):
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(pydicom.uid.CTImageStorage)
        association = ae.associate("127.0.0.1", port, ae_title="THIGHSEG")
        assert [association.send_c_store(pydicom.dcmread(p)).Status for p in paths[:6]] == [0] * 6
        os.kill(first.pid, signal.SIGKILL)  # mid-study: the association is still open
        first.wait(10)
    with listener_process(triton.http_url, spool, out, 1.0, port=port, model=MODEL):
        assert send_files(paths[6:], "127.0.0.1", port) == [0] * 6
        study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        report_path = out / study_uid / series_uid(paths) / "report.json"
        deadline = time.monotonic() + 180
        report: dict = {}
        while time.monotonic() < deadline:
            if report_path.exists():
                import json

                report = json.loads(report_path.read_text())
                if report.get("instances") == 12:
                    break
            time.sleep(0.5)
        assert report.get("status") == "done" and report.get("instances") == 12, report


class _RefusingPacs:
    """A destination that answers every C-STORE with 0xA900 and counts the attempts."""

    def __init__(self) -> None:
        self.requests = 0
        self.port = free_port()
        ae = AE(ae_title="REFUSER")
        ae.supported_contexts = StoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._refuse)]
        )

    def _refuse(self, event) -> int:
        self.requests += 1
        return 0xA900


@pytest.mark.skipif(shutil.which("storescp") is None, reason="DCMTK storescp not installed")
def test_results_are_forwarded_and_refusals_are_not_retried(
    listener_factory, study_factory, tmp_path
):
    received = tmp_path / "pacs"
    received.mkdir()
    pacs_port = free_port()
    pacs = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(received), str(pacs_port)])
    refuser = _RefusingPacs()
    try:
        time.sleep(0.5)
        good = listener_factory(destinations=(Destination("PACS", "127.0.0.1", pacs_port),))
        paths = study_factory(5700, **SMALL)
        send_files(paths, "127.0.0.1", good.config.port)
        (forwarded,) = good.wait_for(series_uid(paths), timeout_s=120).report.forwarded
        assert forwarded.delivered is True and forwarded.attempts == 1
        modalities = sorted(
            pydicom.dcmread(p, stop_before_pixels=True).Modality for p in received.iterdir()
        )
        assert modalities == ["OT", "SEG", "SR"]  # the summary page too

        # two destinations, each with its own outputs: the refusal of one stops no other
        refused = listener_factory(
            destinations=(
                Destination.parse(f"REFUSER@127.0.0.1:{refuser.port}/sr"),
                Destination.parse(f"PACS@127.0.0.1:{pacs_port}/seg"),
            )
        )
        send_files(paths, "127.0.0.1", refused.config.port)
        report = refused.wait_for(series_uid(paths), timeout_s=120).report
        to_refuser, to_pacs = report.forwarded
        assert to_refuser.delivered is False and to_refuser.detail.startswith("refused")
        assert to_refuser.attempts == 1 and refuser.requests == 1  # the SR, once
        assert to_pacs.delivered is True
        assert wait_until(lambda: len(list(received.iterdir())) == 4, 10)  # one more SEG
        failures = refused.telemetry.registry.get_sample_value(
            "thighseg_forward_failures_total", {"destination": "REFUSER"}
        )
        assert failures == 1

        down = listener_factory(
            destinations=(Destination("NOBODY", "127.0.0.1", free_port()),), forward_attempts=2
        )
        send_files(paths, "127.0.0.1", down.config.port)
        report = down.wait_for(series_uid(paths), timeout_s=120).report
        assert report.forwarded[0].delivered is False and report.forwarded[0].attempts == 2
        assert report.status == "done"  # the result itself is kept
    finally:
        pacs.terminate()
        pacs.wait(10)
        refuser.server.shutdown()


def test_logs_carry_no_patient_identifiers(listener_factory, study_factory, caplog):
    caplog.set_level(logging.DEBUG)
    listener = listener_factory()
    paths = study_factory(5800, **SMALL)
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    send_files(paths, "127.0.0.1", listener.config.port)
    listener.wait_for(series_uid(paths), timeout_s=120)
    send_files([paths[0]], "127.0.0.1", listener.config.port, calling_ae="OTHER")
    text = caplog.text
    assert caplog.records, "nothing was logged at all"
    for identifier in (
        str(ds.PatientName),
        str(ds.PatientID),
        str(ds.AccessionNumber),
        str(ds.SeriesInstanceUID),
        str(ds.StudyInstanceUID),
    ):
        assert identifier not in text


def open_descriptors() -> int:
    """File descriptors this process holds now (the listener runs in it)."""
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs Linux /proc")
def test_descriptors_stay_flat_over_series_and_health_probes(listener_factory, study_factory):
    """Every series and every probe used to leave a Triton client (and its event-loop
    descriptors) behind on a thread that had ended; past 1024 descriptors select() fails and
    every association aborts. A long-running listener must hold a bounded number."""
    listener = listener_factory()
    readyz = f"http://127.0.0.1:{listener.config.metrics_port}/readyz"

    def process(seed: int) -> None:
        paths = study_factory(seed, size=128, slices=4)
        assert set(send_files(paths, "127.0.0.1", listener.config.port)) == {0}
        assert listener.wait_for(series_uid(paths), timeout_s=120).report.status == "done"
        for _ in range(10):
            urllib.request.urlopen(readyz, timeout=10).close()

    process(700)  # warm-up: the first series opens what the listener keeps
    before = open_descriptors()
    for seed in range(701, 705):
        process(seed)
    grown = open_descriptors() - before
    assert grown <= 4, f"{grown} descriptors more after 4 series and 40 /readyz probes"


def _open_association_with(paths, port: int):
    """An association that has stored `paths` (each answered Success) and stays open."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(pydicom.uid.CTImageStorage)
    association = ae.associate("127.0.0.1", port, ae_title="THIGHSEG")
    assert [association.send_c_store(pydicom.dcmread(p)).Status for p in paths] == [0] * len(paths)
    return association


def test_a_release_during_the_stop_is_kept_and_the_series_published_after_restart(
    listener_factory, study_factory, tmp_path
):
    # SIGTERM while a sender is still connected: its release must not be lost to a closed index
    # (the series then stayed receiving until expiry freed it: data the sender thought delivered)
    paths = study_factory(5610, size=128, slices=6)
    spool, out = tmp_path / "spool-drain", tmp_path / "out-drain"
    first = listener_factory(spool_dir=spool, output_dir=out, idle_s=30.0, drain_s=20.0)
    association = _open_association_with(paths, first.config.port)
    stopping = threading.Thread(target=first.stop)
    stopping.start()
    time.sleep(0.5)
    assert stopping.is_alive(), "the stop waits for the open association (drain)"
    association.release()
    stopping.join(30)
    assert not stopping.is_alive()
    again = listener_factory(spool_dir=spool, output_dir=out, idle_s=0.5)
    result = again.wait_for(series_uid(paths), timeout_s=120)
    assert result.report.status == "done" and result.report.instances == 6


def test_an_association_still_open_after_the_drain_is_aborted_and_a_spool_has_one_listener(
    listener_factory, study_factory, tmp_path
):
    paths = study_factory(5611, size=128, slices=3)
    spool = tmp_path / "spool-busy"
    first = listener_factory(spool_dir=spool, drain_s=0.5)
    with pytest.raises(OSError, match="in use by another listener"):
        listener_factory(spool_dir=spool)  # a second listener would recover the same series
    association = _open_association_with(paths, first.config.port)
    started = time.monotonic()
    first.stop()
    assert time.monotonic() - started < 10  # bounded by the drain, not by the sender
    assert wait_until(lambda: association.is_aborted, 5)
    # what was acknowledged is kept: a new listener on the spool holds the three instances
    again = listener_factory(spool_dir=spool)
    assert again.index.get(series_uid(paths)).instances == 3
