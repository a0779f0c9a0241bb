"""Calling-AE allow-list and DICOM over TLS, with a self-signed certificate made in the test."""

import shutil
import socket
import ssl
import subprocess
import time
import urllib.request

import pytest
from conftest import free_port
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from thighseg.dicom_listener.config import ListenerConfig
from thighseg.dicom_listener.service import Listener
from thighseg.pipeline.stages import InferenceSettings


def _unused_inference() -> InferenceSettings:
    def refuse(_batch):
        raise AssertionError("no series is processed in these tests")

    return InferenceSettings(refuse, "segformer", 256)


def _echo(port: int, calling: str, tls: tuple | None = None, host: str = "127.0.0.1") -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    association = ae.associate(host, port, ae_title="THIGHSEG", tls_args=tls)
    if not association.is_established:
        return False
    ok = association.send_c_echo().Status == 0
    association.release()
    return ok


def _rejected(listener: Listener, reason: str) -> float | None:
    """The rejection counter, once what ingest processes reported has arrived."""
    for _ in range(50):
        value = listener.telemetry.registry.get_sample_value(
            "thighseg_associations_rejected_total", {"reason": reason}
        )
        if value is not None:
            return value
        time.sleep(0.1)
    return None


@pytest.mark.parametrize("ingest_processes", [1, 2])
def test_only_allowed_calling_ae_titles_associate(tmp_path, ingest_processes):
    config = ListenerConfig(
        tmp_path / "spool",
        tmp_path / "out",
        host="127.0.0.1",
        port=free_port(),
        allowed_calling_aets=("CT_SCANNER",),
        ingest_processes=ingest_processes,
    )
    with Listener(config, _unused_inference()) as listener:
        assert _echo(config.port, "CT_SCANNER")
        assert not _echo(config.port, "INTRUDER")
        assert _rejected(listener, "calling_ae") == 1


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
@pytest.mark.parametrize("ingest_processes", [1, 2])
def test_a_listener_on_the_ipv6_loopback_serves_dicom_and_its_endpoints_there(
    tmp_path, ingest_processes
):
    config = ListenerConfig(
        tmp_path / "spool",
        tmp_path / "out",
        host="::1",
        port=free_port(),
        metrics_port=free_port(),
        ingest_processes=ingest_processes,
    )
    with Listener(config, _unused_inference()):  # the endpoints' server was IPv4 only
        assert _echo(config.port, "CT_SCANNER", host="::1")
        health = urllib.request.urlopen(f"http://[::1]:{config.metrics_port}/healthz", timeout=10)
        assert health.status == 200


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
@pytest.mark.parametrize("ingest_processes", [1, 2])
def test_tls_association_with_a_self_signed_certificate(tmp_path, ingest_processes):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    config = ListenerConfig(
        tmp_path / "spool",
        tmp_path / "out",
        host="127.0.0.1",
        port=free_port(),
        tls_cert=cert,
        tls_key=key,
        ingest_processes=ingest_processes,
    )
    with Listener(config, _unused_inference()) as listener:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        assert _echo(config.port, "SECURE_SCU", (client, "localhost"))
        assert not _echo(config.port, "PLAIN_SCU"), (
            "a plain-TCP association must not be accepted on the TLS port"
        )
        assert _rejected(listener, "tls") == 1
