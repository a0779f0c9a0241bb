"""Never publish a partial or wrong result (issue 17): each of the black-box campaign's ten
findings, reproduced on loopback against the real listener, real associations and the real Triton
server."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
from conftest import MODEL, free_port, wait_until
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import MaximumLengthNotification
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import Verification

from thighseg.apps.ingest import listener_process
from thighseg.dicom_listener.index import DONE, RECEIVING
from thighseg.dicom_listener.scu import send_files

SMALL = dict(size=128, slices=6)


def uids(paths) -> tuple[str, str]:
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def http_get(url: str) -> tuple[int, str]:
    try:
        response = urllib.request.urlopen(url, timeout=5)
        return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def store(
    port: int, datasets: list[pydicom.Dataset], called: str = "THIGHSEG"
) -> list[pydicom.Dataset]:
    """C-STORE each data set in one association; the full responses (status, error comment)."""
    ae = AE(ae_title="MODALITY")
    ae.requested_contexts = StoragePresentationContexts[:127]
    association = ae.associate("127.0.0.1", port, ae_title=called)
    assert association.is_established
    try:
        return [association.send_c_store(ds) for ds in datasets]
    finally:
        association.release()


def spool_content_sha256(spool: Path, study_uid: str, series_uid: str) -> str:
    """The content hash a result must carry, computed independently from the spooled files."""
    files = sorted((spool / study_uid / series_uid).glob("*.dcm"))
    text = "".join(f"{p.stem}:{hashlib.sha256(p.read_bytes()).hexdigest()}\n" for p in files)
    return hashlib.sha256(text.encode()).hexdigest()


def seg_sources(seg_path: Path) -> set[str]:
    seg = pydicom.dcmread(seg_path)
    return {
        str(item.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }


# 1 ------------------------------------------------------------------------------------------------
def test_instances_arriving_while_the_series_is_processed_are_in_the_published_result(
    listener_factory, study_factory
):
    # holds the first processing attempt in inference until the rest arrived
    gate = threading.Event()

    def gated(infer):
        def wait_then_infer(batch):
            gate.wait(60)
            return infer(batch)

        return wait_then_infer

    # the race of a completed series being processed (a head start would hold the worker instead)
    listener = listener_factory(idle_s=0.3, wrap_infer=gated, head_start=False)
    paths = study_factory(6100, slices=12)
    study_uid, series_uid = uids(paths)
    assert send_files(paths[:6], "127.0.0.1", listener.config.port) == [0] * 6
    assert wait_until(lambda: listener.index.get(series_uid).state == "processing", 30, poll_s=0.02)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(pydicom.uid.CTImageStorage)
    association = ae.associate("127.0.0.1", listener.config.port, ae_title="THIGHSEG")
    assert [association.send_c_store(pydicom.dcmread(p)).Status for p in paths[6:]] == [0] * 6
    gate.set()  # the first attempt ends while the sender is still connected
    assert wait_until(lambda: listener.index.get(series_uid).state != "processing", 120)
    association.release()
    result = listener.wait_for(series_uid, timeout_s=180)  # the first result ever published
    assert result.report.instances == 12, "a result of the first six slices was published"
    assert wait_until(lambda: listener.index.get(series_uid).state == DONE, 60)
    report = json.loads(result.report_path.read_text())
    assert report["status"] == "done" and report["instances"] == 12
    assert report["content_sha256"] == spool_content_sha256(
        listener.config.spool_dir, study_uid, series_uid
    )
    sop_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    assert seg_sources(result.seg_path) == sop_uids
    # no staging folder left behind
    assert not list(result.report_path.parent.parent.glob(".*partial"))


def head_starts(listener, outcome: str) -> float | None:
    return listener.telemetry.registry.get_sample_value(
        "thighseg_head_starts_total", {"outcome": outcome}
    )


def counting(calls: list[int], entered: threading.Event | None = None, gate=None):
    """An infer wrapper that counts the slices it sends to the model (and may hold them)."""

    def wrap(infer):
        def counted(batch):
            calls.append(len(batch))
            if entered is not None:
                entered.set()
                gate.wait(60)
            return infer(batch)

        return counted

    return wrap


def test_a_head_start_is_published_only_once_its_series_completes_and_is_not_redone(
    listener_factory, study_factory
):
    calls: list[int] = []
    idle_s = 2.0
    listener = listener_factory(idle_s=idle_s, wrap_infer=counting(calls))
    assert (head_starts(listener, "used"), head_starts(listener, "discarded")) == (0, 0)  # exported
    paths = study_factory(6110, slices=8)
    study_uid, series_uid = uids(paths)
    final = listener.config.output_dir / study_uid / series_uid
    assert send_files(paths, "127.0.0.1", listener.config.port) == [0] * 8
    released = time.monotonic()

    def working_early() -> bool:  # the head start's staging folder, the series not yet complete
        staging = list(final.parent.glob(f".{series_uid}.*.partial"))
        return bool(staging) and listener.index.get(series_uid).state == RECEIVING

    assert wait_until(working_early, idle_s - 0.5, poll_s=0.01), "no work during the idle wait"
    assert not final.exists()
    assert wait_until(final.exists, 120, poll_s=0.01)
    # the association closed (before send_files returned) at least idle_s before completion
    assert time.monotonic() - released >= idle_s - 0.2, "published before the series completed"
    result = listener.wait_for(series_uid, timeout_s=60)
    assert result.report.status == "done" and result.report.instances == 8
    assert (head_starts(listener, "used"), head_starts(listener, "discarded")) == (1, 0)
    assert sum(calls) == 8, f"slices inferred {sum(calls)} times: the head start was redone"
    assert not list(final.parent.glob(".*partial"))


def test_instances_arriving_during_a_head_start_are_in_the_published_result(
    listener_factory, study_factory
):
    entered, gate, calls = threading.Event(), threading.Event(), []
    # no streaming: the head start infers the first six slices itself, and is held there
    listener = listener_factory(
        idle_s=1.0, stream_slices=0, wrap_infer=counting(calls, entered, gate)
    )
    paths = study_factory(6120, slices=12)
    study_uid, series_uid = uids(paths)
    assert send_files(paths[:6], "127.0.0.1", listener.config.port) == [0] * 6
    assert entered.wait(30), "no head start after the release"
    assert send_files(paths[6:], "127.0.0.1", listener.config.port) == [0] * 6
    gate.set()
    result = listener.wait_for(series_uid, timeout_s=180)  # the first result ever published
    assert result.report.instances == 12, "the head start of the first six slices was published"
    assert json.loads(result.report_path.read_text())["content_sha256"] == spool_content_sha256(
        listener.config.spool_dir, study_uid, series_uid
    )
    assert (head_starts(listener, "used"), head_starts(listener, "discarded")) == (1, 1)
    assert listener.telemetry.registry.get_sample_value("thighseg_results_superseded_total") == 0
    assert wait_until(lambda: not list(result.report_path.parent.parent.glob(".*partial")), 30)


# 2 ------------------------------------------------------------------------------------------------
def test_after_a_restart_a_series_still_receiving_waits_for_its_own_completion(
    triton, study_factory, tmp_path
):
    paths = study_factory(6200, size=128, slices=12)
    study_uid, series_uid = uids(paths)
    spool, out, port = tmp_path / "spool", tmp_path / "out", free_port()
    with listener_process(triton.http_url, spool, out, 0.5, port=port, model=MODEL) as (_, first):
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(pydicom.uid.CTImageStorage)
        association = ae.associate("127.0.0.1", port, ae_title="THIGHSEG")
        assert [association.send_c_store(pydicom.dcmread(p)).Status for p in paths[:5]] == [0] * 5
        # the sender is still connected: the series is not complete
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    report_path = out / study_uid / series_uid / "report.json"
    with listener_process(triton.http_url, spool, out, 0.5, port=port, model=MODEL):
        time.sleep(3.0)  # six idle periods: the old listener published the 5-slice result by now
        assert not report_path.exists()
        with sqlite3.connect(spool / "index.sqlite3") as db:
            assert db.execute("SELECT state FROM series").fetchone()[0] == RECEIVING
        assert send_files(paths[5:], "127.0.0.1", port) == [0] * 7
        assert wait_until(report_path.exists, 180, poll_s=0.2)
        report = json.loads(report_path.read_text())
        assert report["status"] == "done" and report["instances"] == 12, report


# 3 ------------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A real 24 MiB file system (tmpfs), so that the disk really fills up."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if (
        shutil.which("mount") is None
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount_point)],
            capture_output=True,
        ).returncode
    ):
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(folder: Path) -> Path:
    """Write until the file system refuses (ENOSPC)."""
    filler = folder / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * (64 << 10))
                handle.flush()
        except OSError:
            pass
    return filler


def test_a_full_spool_disk_refuses_instances_then_recovers_without_a_partial_result(
    listener_factory, study_factory, small_disk
):
    listener = listener_factory(
        spool_dir=small_disk / "spool", limits=_limits(min_free_spool_bytes=0)
    )
    readyz = f"http://127.0.0.1:{listener.config.metrics_port}/readyz"
    paths = study_factory(6300, **SMALL)
    study_uid, series_uid = uids(paths)
    filler = _fill(small_disk)
    responses = store(listener.config.port, [pydicom.dcmread(p) for p in paths])
    assert all(r.Status == 0xA700 for r in responses), [hex(r.Status) for r in responses]
    assert "spool" in responses[0].ErrorComment
    assert list((small_disk / "spool").rglob("*.dcm")) == []  # nothing refused is left in the spool
    assert list((small_disk / "spool").rglob("*.part")) == []
    filler.unlink()
    assert send_files(paths, "127.0.0.1", listener.config.port) == [0] * 6
    result = listener.wait_for(series_uid, timeout_s=120)
    assert result.report.status == "done" and result.report.instances == 6
    assert http_get(readyz)[0] == 200

    guarded = listener_factory(
        spool_dir=small_disk / "spool2", limits=_limits(min_free_spool_bytes=1 << 30)
    )
    response = store(guarded.config.port, [pydicom.dcmread(paths[0])])[0]
    assert (response.Status, response.ErrorComment) == (
        0xA700,
        "spool disk is full; try again later",
    )
    status, body = http_get(f"http://127.0.0.1:{guarded.config.metrics_port}/readyz")
    assert status == 503 and "spool disk full" in body


def _limits(**changes):
    from dataclasses import replace

    from thighseg.dicom_listener.config import Limits

    return replace(Limits(), **changes)


def test_a_failing_index_stalls_completion_visibly_and_completion_resumes(
    listener_factory, study_factory
):
    """The tracker thread meets `database or disk is full` (as on a full disk): it must survive,
    say so on /readyz, and complete the series once the index works again."""
    listener = listener_factory(idle_s=0.3)
    readyz = f"http://127.0.0.1:{listener.config.metrics_port}/readyz"
    healthy = listener.index.complete_if_receiving
    failing = {"on": True}

    def complete_if_receiving(series_uid: str) -> bool:
        if failing["on"]:
            raise sqlite3.OperationalError("database or disk is full")
        return healthy(series_uid)

    listener.index.complete_if_receiving = complete_if_receiving
    paths = study_factory(6350, **SMALL)
    assert send_files(paths, "127.0.0.1", listener.config.port) == [0] * 6
    assert wait_until(lambda: http_get(readyz)[0] == 503, 10)
    assert "disk is full" in http_get(readyz)[1]
    failing["on"] = False
    result = listener.wait_for(uids(paths)[1], timeout_s=120)
    assert result.report.status == "done" and result.report.instances == 6
    assert wait_until(lambda: http_get(readyz)[0] == 200, 10)


# 4 ------------------------------------------------------------------------------------------------
def test_the_advertised_pdu_limit_holds_on_the_wire(listener_factory, study_factory):
    limit = 64 << 10
    listener = listener_factory(max_pdu_bytes=limit)
    paths = study_factory(6400, size=256, slices=6)  # 128 KiB of pixel data an instance
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(pydicom.uid.CTImageStorage)
    association = ae.associate("127.0.0.1", listener.config.port, ae_title="THIGHSEG")
    assert association.acceptor.maximum_length == limit  # what the listener advertises
    # a sender that ignores it: one oversized P-DATA PDU
    for item in association.acceptor.user_information:
        if isinstance(item, MaximumLengthNotification):
            item.maximum_length_received = 8 << 20
    response = association.send_c_store(pydicom.dcmread(paths[0]))
    assert "Status" not in response
    assert wait_until(lambda: not association.is_established, 10)
    assert list(listener.config.spool_dir.rglob("*.dcm")) == []
    assert (
        listener.telemetry.registry.get_sample_value(
            "thighseg_associations_rejected_total", {"reason": "pdu_too_large"}
        )
        == 1
    )
    assert send_files(paths[:1], "127.0.0.1", listener.config.port) == [
        0
    ]  # an honest sender still works


def _associate_request(called: str = "THIGHSEG") -> bytes:
    """An A-ASSOCIATE-RQ PDU for Verification, encoded by pynetdicom."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title, primitive.called_ae_title = "RAW", called
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    primitive.user_information = [maximum]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def test_a_huge_pdu_header_is_refused_before_its_body_is_read(listener_factory, caplog):
    caplog.set_level(logging.INFO)
    listener = listener_factory()
    with socket.create_connection(("127.0.0.1", listener.config.port), timeout=10) as raw:
        raw.sendall(_associate_request())
        assert raw.recv(1)[0] == 0x02  # A-ASSOCIATE-AC
        raw.recv(1 << 16)
        raw.sendall(struct.pack(">BBL", 0x04, 0, 100 << 20) + b"\0" * 1024)  # "100 MiB follow"
        started = time.monotonic()
        # the listener closes the connection instead of waiting for 100 MiB
        while raw.recv(1 << 16):
            pass
        assert time.monotonic() - started < 5
    assert (
        listener.telemetry.registry.get_sample_value(
            "thighseg_associations_rejected_total", {"reason": "pdu_too_large"}
        )
        == 1
    )
    assert dropped_quietly(caplog.records)


def dropped_quietly(records: list[logging.LogRecord]) -> bool:
    """The listener's warning says why; pynetdicom's ERROR and traceback for the read it ended
    on purpose are not logged."""
    warned = any(r.name.startswith("thighseg") and r.levelno == logging.WARNING for r in records)
    errors = [r for r in records if r.name.startswith("pynetdicom") and r.levelno >= logging.ERROR]
    return warned and not errors


def test_a_half_sent_pdu_does_not_hold_the_connection(listener_factory, caplog):
    caplog.set_level(logging.INFO)
    listener = listener_factory(network_timeout_s=1.0)
    with socket.create_connection(("127.0.0.1", listener.config.port), timeout=15) as raw:
        request = _associate_request()
        raw.sendall(request[: len(request) // 2])
        started = time.monotonic()
        while raw.recv(1 << 16):
            pass
        assert time.monotonic() - started < 10
    assert wait_until(
        lambda: listener.telemetry.registry.get_sample_value(
            "thighseg_associations_rejected_total", {"reason": "network_timeout"}
        )
        == 1,
        5,
    )
    assert dropped_quietly(caplog.records)


# 5 ------------------------------------------------------------------------------------------------
def test_unwritable_results_keep_the_series_queued_and_it_finishes_once_writable(
    listener_factory, study_factory, caplog
):
    caplog.set_level(logging.DEBUG)
    listener = listener_factory(retry_backoff_s=(0.3, 1.0))
    readyz = f"http://127.0.0.1:{listener.config.metrics_port}/readyz"
    paths = study_factory(6500, **SMALL)
    study_uid, series_uid = uids(paths)
    listener.config.output_dir.mkdir(parents=True, exist_ok=True)
    blocker = listener.config.output_dir / study_uid
    blocker.write_text("a file where the study's results folder should be")
    assert send_files(paths, "127.0.0.1", listener.config.port) == [0] * 6
    assert wait_until(
        lambda: (listener.index.get(series_uid).reason or "").startswith("results folder"), 60
    )
    status, body = http_get(readyz)
    assert status == 503 and "results not writable" in body
    assert listener.index.get(series_uid).state in ("complete", "processing")
    blocker.unlink()
    result = listener.wait_for(series_uid, timeout_s=120)
    assert result.report.status == "done" and result.report_path.exists()
    assert wait_until(lambda: http_get(readyz)[0] == 200, 10)
    assert series_uid not in caplog.text and study_uid not in caplog.text


# 6 and 9 ------------------------------------------------------------------------------------------
def _without(keyword):
    def change(ds):
        delattr(ds, keyword)

    return change


def _raw(keyword: str, vr: str, value: bytes):
    def change(ds):
        tag = Tag(keyword)
        ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)

    return change


BAD_HEADERS = {
    "no_rescale_slope": (_without("RescaleSlope"), 0xA900, "Rescale"),
    "no_rescale_intercept": (_without("RescaleIntercept"), 0xA900, "Rescale"),
    "unknown_charset": (
        _raw("SpecificCharacterSet", "CS", b"ISO_IR 999"),
        0xA900,
        "SpecificCharacterSet",
    ),
    "non_numeric_position": (
        _raw("ImagePositionPatient", "DS", b"a\\b\\c "),
        0xA900,
        "ImagePositionPatient",
    ),
    "no_frame_of_reference": (_without("FrameOfReferenceUID"), 0xA900, "FrameOfReferenceUID"),
    "undecodable_rows": (_raw("Rows", "US", b"\x01\x02\x03"), 0xC000, "decode"),
}


def test_bad_headers_are_refused_at_c_store_time_with_an_error_comment(
    listener_factory, study_factory
):
    listener = listener_factory()
    paths = study_factory(6600, **SMALL)
    datasets = []
    for change, _, _ in BAD_HEADERS.values():
        ds = pydicom.dcmread(paths[0])
        change(ds)
        datasets.append(ds)
    responses = store(listener.config.port, datasets)
    for name, response in zip(BAD_HEADERS, responses, strict=False):
        _, status, comment = BAD_HEADERS[name]
        assert response.Status == status, (name, hex(response.Status))
        assert comment in response.ErrorComment and len(response.ErrorComment) <= 64, (
            name,
            response.ErrorComment,
        )
    assert list(listener.config.spool_dir.rglob("*.dcm")) == []


# 7 ------------------------------------------------------------------------------------------------
class _Pacs:
    """A storage SCP that keeps what it receives (SOP class and instance UIDs)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, str]] = []
        self.port = free_port()
        ae = AE(ae_title="PACS")
        ae.supported_contexts = StoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event) -> int:
        self.received.append((event.dataset.Modality, str(event.dataset.SOPInstanceUID)))
        return 0


def test_new_content_under_a_known_sop_instance_uid_replaces_and_reforwards_the_result(
    listener_factory, study_factory
):
    from thighseg.dicom_listener.forward import Destination

    pacs = _Pacs()
    try:
        listener = listener_factory(destinations=(Destination("PACS", "127.0.0.1", pacs.port),))
        paths = study_factory(6700, **SMALL)
        study_uid, series_uid = uids(paths)
        assert send_files(paths, "127.0.0.1", listener.config.port) == [0] * 6
        first = listener.wait_for(series_uid, timeout_s=120).report.to_json()
        changed = pydicom.dcmread(paths[2])
        changed.PixelData = bytes(len(changed.PixelData))  # same SOP Instance UID, different image
        assert store(listener.config.port, [changed])[0].Status == 0
        assert wait_until(
            lambda: listener.results[series_uid].report.content_sha256 != first["content_sha256"],
            120,
        )
        second = json.loads(listener.results[series_uid].report_path.read_text())
        assert second["status"] == "done" and second["instances"] == 6
        assert second["content_sha256"] == spool_content_sha256(
            listener.config.spool_dir, study_uid, series_uid
        )
        assert second["seg_sop_instance_uid"] != first["seg_sop_instance_uid"]
        assert wait_until(lambda: len(pacs.received) == 6, 30)  # SEG, SR, summary twice
        segs = [uid for modality, uid in pacs.received if modality == "SEG"]
        assert segs == [first["seg_sop_instance_uid"], second["seg_sop_instance_uid"]]
        assert (
            listener.telemetry.registry.get_sample_value("thighseg_instances_replaced_total") == 1
        )
    finally:
        pacs.server.shutdown()


# 8 ------------------------------------------------------------------------------------------------
def test_an_association_for_another_called_ae_title_is_rejected_and_counted(
    listener_factory, caplog
):
    caplog.set_level(logging.WARNING)
    listener = listener_factory()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    wrong = ae.associate("127.0.0.1", listener.config.port, ae_title="WRONGAE")
    assert not wrong.is_established and wrong.is_rejected
    right = ae.associate("127.0.0.1", listener.config.port, ae_title="THIGHSEG")
    assert right.is_established
    right.release()
    assert wait_until(
        lambda: listener.telemetry.registry.get_sample_value(
            "thighseg_associations_rejected_total", {"reason": "called_ae"}
        )
        == 1,
        5,
    )
    assert "WRONGAE" in caplog.text


# 10 -----------------------------------------------------------------------------------------------
UID_IN_TEXT = re.compile(r"\d+(?:\.\d+){4,}")


def test_no_full_uid_in_any_log_line_at_any_level(listener_factory, study_factory, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, highdicom's and pynetdicom's included
    for name in ("highdicom", "pynetdicom"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        listener = listener_factory()
        paths = study_factory(6800, **SMALL)
        assert send_files(paths, "127.0.0.1", listener.config.port) == [0] * 6
        assert listener.wait_for(uids(paths)[1], timeout_s=120).report.status == "done"
        logging.getLogger("thighseg.test").exception(
            "failure while reading %s",
            paths[0],
            exc_info=FileNotFoundError(2, "missing", str(paths[0])),
        )
    finally:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("highdicom").setLevel(logging.NOTSET)
    assert len(caplog.records) > 20, "nothing much was logged: the check would prove nothing"
    leaked = UID_IN_TEXT.findall(caplog.text)
    assert not leaked, leaked[:5]


def test_expired_series_get_a_report_and_no_stale_instance_count(listener_factory, study_factory):
    listener = listener_factory(expiry_s=1.0)
    paths = study_factory(6900, **SMALL)
    study_uid, series_uid = uids(paths)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(pydicom.uid.CTImageStorage)
    association = ae.associate("127.0.0.1", listener.config.port, ae_title="THIGHSEG")
    assert [association.send_c_store(pydicom.dcmread(p)).Status for p in paths[:3]] == [0] * 3
    association.abort()
    report_path = listener.config.output_dir / study_uid / series_uid / "report.json"
    assert wait_until(report_path.exists, 20)
    report = json.loads(report_path.read_text())
    assert report["status"] == "failed" and report["reason"].startswith("expired")
    assert report["instances_received"] == 3
    assert listener.index.get(series_uid).instances == 0


def test_an_unexpected_worker_failure_ends_as_a_failed_series_with_a_report(
    listener_factory, study_factory
):
    listener = listener_factory()
    paths = study_factory(6950, **SMALL)
    study_uid, series_uid = uids(paths)

    def broken_finish(*args, **kwargs):
        raise RuntimeError("index bug")

    listener.index.finish = broken_finish
    assert send_files(paths, "127.0.0.1", listener.config.port) == [0] * 6
    assert wait_until(lambda: listener.index.get(series_uid).state == "failed", 120)
    assert listener.index.get(series_uid).reason.startswith("internal error: RuntimeError")
    result_dir = listener.config.output_dir / study_uid / series_uid
    report = json.loads((result_dir / "report.json").read_text())
    assert report["status"] == "failed" and "index bug" in report["reason"]
    assert not list(result_dir.parent.glob(".*partial"))


# found by the independent black-box check -------------------------------------------------------
def test_a_sender_pausing_longer_than_expiry_on_an_open_association_loses_nothing(
    listener_factory, study_factory
):
    listener = listener_factory(expiry_s=1.0)
    paths = study_factory(7000, **SMALL)
    series_uid = uids(paths)[1]
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(pydicom.uid.CTImageStorage)
    association = ae.associate("127.0.0.1", listener.config.port, ae_title="THIGHSEG")
    assert [association.send_c_store(pydicom.dcmread(p)).Status for p in paths[:3]] == [0] * 3
    time.sleep(3.0)  # three expiry periods, association still open
    assert listener.index.get(series_uid).state == RECEIVING
    assert [association.send_c_store(pydicom.dcmread(p)).Status for p in paths[3:]] == [0] * 3
    association.release()
    result = listener.wait_for(series_uid, timeout_s=120)
    assert result.report.status == "done" and result.report.instances == 6


@pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK storescu not installed")
def test_the_same_instances_on_parallel_associations_are_all_acknowledged(
    listener_factory, study_factory
):
    listener = listener_factory()
    paths = study_factory(7100, **SMALL)
    command = ["storescu", "-aec", "THIGHSEG", "127.0.0.1", str(listener.config.port)]
    senders = [
        subprocess.Popen([*command, *map(str, paths)], stderr=subprocess.PIPE) for _ in range(6)
    ]
    outcomes = [(sender.wait(120), sender.stderr.read().decode()[-300:]) for sender in senders]
    assert all(code == 0 for code, _ in outcomes), outcomes
    result = listener.wait_for(uids(paths)[1], timeout_s=120)
    assert result.report.instances == 6
    assert not list(listener.config.spool_dir.rglob("*.part"))


def test_series_state_gauge_is_what_the_index_says(listener_factory, study_factory):
    listener = listener_factory()
    paths = study_factory(7200, **SMALL)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(pydicom.uid.CTImageStorage)
    association = ae.associate("127.0.0.1", listener.config.port, ae_title="THIGHSEG")
    assert association.send_c_store(pydicom.dcmread(paths[0])).Status == 0
    registry = listener.telemetry.registry
    assert registry.get_sample_value("thighseg_series_state", {"state": "receiving"}) == 1
    association.abort()


def test_uids_with_leading_zeros_are_refused_and_warnings_are_redacted(
    listener_factory, study_factory, caplog
):
    import warnings

    caplog.set_level(logging.DEBUG)
    listener = listener_factory()
    ds = pydicom.dcmread(study_factory(7300, **SMALL)[0])
    bad = "1.2.826.0.1.3680043.8.498.0777123456789"
    ds.SOPInstanceUID = bad
    ds.file_meta.MediaStorageSOPInstanceUID = bad
    response = store(listener.config.port, [ds])[0]
    assert response.Status == 0xA900 and "SOPInstanceUID" in response.ErrorComment
    warnings.warn(f"Invalid value for VR UI: {bad!r}", UserWarning, stacklevel=1)
    assert bad not in caplog.text and "…23456789" in caplog.text


def test_a_series_failing_before_inference_frees_its_streamed_slices_and_logs_why(
    listener_factory, study_factory, caplog
):
    caplog.set_level(logging.INFO)
    for head_start in (True, False):  # the failure published by a head start, or found later
        listener = listener_factory(idle_s=0.3, head_start=head_start)
        caplog.clear()
        a_series_failing_before_inference_frees_its_streamed_slices(listener, study_factory, caplog)


def a_series_failing_before_inference_frees_its_streamed_slices(
    listener, study_factory, caplog
) -> None:
    paths = study_factory(6130, slices=6)
    _, series_uid = uids(paths)
    twin = pydicom.dcmread(paths[2])  # a second instance at the same position: cannot assemble
    twin.SOPInstanceUID = pydicom.uid.generate_uid()
    datasets = [pydicom.dcmread(p) for p in paths] + [twin]
    assert [r.Status for r in store(listener.config.port, datasets)] == [0] * 7
    result = listener.wait_for(series_uid, timeout_s=120)
    assert result.report.status == "failed" and "same slice position" in result.report.reason
    assert listener.telemetry.registry.get_sample_value("thighseg_slices_streamed_total") == 7
    assert wait_until(lambda: listener.streaming.slices == 0, 30), "streamed slices held forever"
    assert any(
        "failed: two or more instances share the same slice position" in r.getMessage()
        for r in caplog.records
    ), "the log says a series failed, not why"
