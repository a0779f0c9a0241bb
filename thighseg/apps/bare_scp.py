"""pynetdicom's own ceiling for the ingest benchmark: an SCP that answers Success to every C-STORE
and keeps nothing (no validation, no disk). What the listener adds on top of it is its own cost;
what separates this from DCMTK storescp is the library's.

    python -m thighseg.apps.bare_scp PORT
"""

from __future__ import annotations

import signal
import sys

from pynetdicom import AE, AllStoragePresentationContexts, evt

from thighseg.core.constants import AE_TITLE
from thighseg.dicom_listener.polling import poll_promptly


def serve(port: int) -> None:
    """Accept C-STOREs on 127.0.0.1:port until SIGTERM or SIGINT."""
    ae = AE(AE_TITLE)
    ae.maximum_pdu_size = 4 << 20  # as the listener's default
    ae.maximum_associations = 64  # pynetdicom's default of 10 refuses the benchmark's 10 senders
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax)
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[
            (evt.EVT_C_STORE, lambda _: 0x0000),
            (evt.EVT_CONN_OPEN, lambda event: poll_promptly(event.assoc.dul)),  # as the listener
        ],
    )
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.shutdown()


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    serve(int(sys.argv[1]))
