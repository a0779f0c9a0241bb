"""A minimal C-STORE SCU for pushing a series (demo, tests, benchmarks)."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.presentation import StoragePresentationContexts

from thighseg.core.constants import AE_TITLE


def send_files(
    paths: list[Path],
    host: str,
    port: int,
    called_ae: str = AE_TITLE,
    calling_ae: str = "THIGHSEG_SCU",
) -> list[int]:
    """Send every file in one association; returns the C-STORE status of each (in order)."""
    ae = AE(ae_title=calling_ae)
    ae.requested_contexts = StoragePresentationContexts[:127]
    ae.maximum_pdu_size = 0
    association = ae.associate(host, port, ae_title=called_ae)
    if not association.is_established:
        raise ConnectionError(f"association with {called_ae}@{host}:{port} was not established")
    statuses = []
    try:
        for path in paths:
            status = association.send_c_store(pydicom.dcmread(path))
            statuses.append(int(status.Status) if "Status" in status else -1)
    finally:
        association.release()
    return statuses
