"""A minimal C-STORE SCU for pushing a series (demo, tests, benchmarks)."""

from __future__ import annotations

import time
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
    rate: float | None = None,
) -> list[int]:
    """Send every file in one association, at most `rate` instances a second (a modality's pace;
    None: as fast as the peer answers); returns the C-STORE status of each (in order)."""
    ae = AE(ae_title=calling_ae)
    ae.requested_contexts = StoragePresentationContexts[:127]
    ae.maximum_pdu_size = 0
    association = ae.associate(host, port, ae_title=called_ae)
    if not association.is_established:
        raise ConnectionError(f"association with {called_ae}@{host}:{port} was not established")
    statuses = []
    started = time.monotonic()
    try:
        for number, path in enumerate(paths):
            dataset = pydicom.dcmread(path)
            if rate:
                time.sleep(max(0.0, started + number / rate - time.monotonic()))
            status = association.send_c_store(dataset)
            statuses.append(int(status.Status) if "Status" in status else -1)
    finally:
        association.release()
    return statuses
