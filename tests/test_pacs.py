"""A real PACS round trip: Orthanc (the Debian package) sends a study to the listener over DICOM and
receives the SEG, the SR and the summary page back under the same study."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from conftest import free_port

from thighseg.dicom_listener.forward import Destination, StowDestination
from thighseg.dicom_listener.scu import send_files

ORTHANC = shutil.which("Orthanc") or (
    "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None
)
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
pytestmark = pytest.mark.skipif(
    ORTHANC is None, reason="Orthanc not installed (scripts/setup.sh installs the Debian package)"
)


class Orthanc:
    """An Orthanc process on free loopback ports with its own storage, stopped by PID."""

    def __init__(self, folder: Path, listener_port: int, dicomweb: bool = False) -> None:
        self.http_port, self.dicom_port = free_port(), free_port()
        config = {
            "Name": "thighseg-test",
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "DicomModalities": {"thighseg": ["THIGHSEG", "127.0.0.1", listener_port]},
            "DicomAlwaysAllowStore": True,
            "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.log = (folder / "orthanc.log").open("wb")
        self.process = subprocess.Popen(
            [ORTHANC, str(folder / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("Orthanc did not answer within 30 s")

    def request(self, path: str, body: bytes | None = None) -> object:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        method = "POST" if body is not None else "GET"
        with urllib.request.urlopen(
            urllib.request.Request(url, body, method=method), timeout=60
        ) as r:
            return json.loads(r.read() or b"null")

    def get(self, path: str) -> object:
        return self.request(path)

    def log_tail(self, lines: int = 40) -> str:
        """The end of Orthanc's own log, for a failure message."""
        self.log.flush()
        text = Path(self.log.name).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def test_orthanc_sends_a_study_and_gets_seg_sr_and_summary_back(
    listener_factory, study_factory, tmp_path
):
    listener_port = free_port()
    pacs = Orthanc(tmp_path, listener_port)
    try:
        listener_factory(
            port=listener_port,
            destinations=(Destination("ORTHANC", "127.0.0.1", pacs.dicom_port),),
        )
        for path in study_factory(51, size=128, slices=6):
            pacs.request("/instances", path.read_bytes())
        (study,) = pacs.get("/studies")
        pacs.request("/modalities/thighseg/store", json.dumps({"Resources": [study]}).encode())
        deadline = time.monotonic() + 180
        modalities: list[str] = []
        while time.monotonic() < deadline:
            series = pacs.get(f"/studies/{study}/series")
            modalities = sorted(s["MainDicomTags"].get("Modality", "") for s in series)
            if len(modalities) >= 4:
                break
            time.sleep(1)
        assert modalities == ["CT", "OT", "SEG", "SR"], (modalities, pacs.log_tail())
        for series in pacs.get(f"/studies/{study}/series"):
            if series["MainDicomTags"]["Modality"] in ("SEG", "SR", "OT"):
                assert len(series["Instances"]) == 1
    finally:
        pacs.stop()
    assert pacs.process.poll() is not None, "Orthanc still running after stop()"


def test_destinations_parse_ae_and_dicomweb_forms_and_name_mistakes():
    assert Destination.parse("PACS@pacs.example:104/seg,sr") == Destination(
        "PACS", "pacs.example", 104, ("seg", "sr")
    )
    assert Destination.parse("https://pacs.example/dicom-web/#sr") == StowDestination(
        "https://pacs.example/dicom-web", ("sr",)
    )
    assert Destination.parse("http://127.0.0.1:8042/dicom-web").outputs == ("seg", "sr", "sc")
    for bad, says in (
        ("PACS@pacs:104/seg,pdf", "unknown output(s) pdf"),
        ("pacs:104", "AET@host:port"),
        ("http://pacs/dicom-web#seg,,sr", "choose from seg, sr, sc"),
        ("https:///dicom-web", "http(s) URL"),
    ):
        with pytest.raises(ValueError, match=re.escape(says)):
            Destination.parse(bad)


@pytest.mark.skipif(
    not DICOMWEB_PLUGIN.exists(), reason="orthanc-dicomweb not installed (scripts/setup.sh)"
)
def test_stow_rs_stores_the_chosen_results_and_a_refusal_is_not_retried(
    listener_factory, study_factory, tmp_path
):
    pacs = Orthanc(tmp_path, free_port(), dicomweb=True)
    try:
        base = f"http://127.0.0.1:{pacs.http_port}"
        listener = listener_factory(
            destinations=(
                Destination.parse(f"{base}/dicom-web#seg,sr"),
                Destination.parse(f"{base}/no-dicom-web-here"),
            ),
        )
        paths = study_factory(52, size=128, slices=6)
        assert set(send_files(paths, "127.0.0.1", listener.config.port)) == {0}
        uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
        report = listener.wait_for(uid, timeout_s=180).report
        stored, refused = report.forwarded
        assert (stored.delivered, stored.attempts) == (True, 1), stored
        assert (refused.delivered, refused.attempts) == (False, 1), refused
        assert refused.detail == "refused: HTTP 404"
        (study,) = pacs.get("/studies")
        series = pacs.get(f"/studies/{study}/series")
        assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["SEG", "SR"]
    finally:
        pacs.stop()
