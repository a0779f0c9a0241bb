"""The DUL reactor polls promptly while an association is busy and as pynetdicom does once idle."""

from __future__ import annotations

import time

from conftest import free_port
from pynetdicom import AE, evt
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import Verification

from thighseg.dicom_listener.polling import (
    BUSY_DELAY_S,
    BUSY_WINDOW_S,
    IDLE_DELAY_S,
    PromptDUL,
    poll_promptly,
)


def test_an_association_polls_fast_while_busy_and_slowly_once_idle():
    port = free_port()
    duls: list[DULServiceProvider] = []

    def opened(event: evt.Event) -> None:
        duls.append(event.assoc.dul)
        assert poll_promptly(event.assoc.dul)

    scp = AE("POLLTEST")
    scp.add_supported_context(Verification)
    server = scp.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_CONN_OPEN, opened)]
    )
    try:
        scu = AE()
        scu.add_requested_context(Verification)
        association = scu.associate("127.0.0.1", port, ae_title="POLLTEST")
        assert association.is_established
        assert association.send_c_echo().Status == 0x0000
        (dul,) = duls
        assert type(dul) is PromptDUL
        assert dul._run_loop_delay == BUSY_DELAY_S  # noqa: SLF001 - the attribute pynetdicom reads
        time.sleep(BUSY_WINDOW_S + 0.2)
        assert dul._run_loop_delay == IDLE_DELAY_S  # noqa: SLF001
        assert association.send_c_echo().Status == 0x0000  # a PDU: busy again
        assert dul._run_loop_delay == BUSY_DELAY_S  # noqa: SLF001
        association.release()
    finally:
        server.shutdown()


def test_a_dul_of_another_class_is_left_alone():
    class OtherDUL(DULServiceProvider):
        pass

    other = OtherDUL.__new__(OtherDUL)
    assert not poll_promptly(other)
    assert type(other) is OtherDUL
