"""The C-STORE SCP: small event handlers that answer with a DICOM status.

Storage (the spool), bookkeeping (the series tracker) and checks (validation) are separate; the
handler validates, stores durably, records, and only then answers Success. Every storage SOP class
is accepted at negotiation so that a non-CT instance gets an explicit C-STORE failure status
instead of a silent context rejection.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from thighseg.dicom_listener.series import SeriesKey, SeriesTracker
from thighseg.dicom_listener.spool import Spool
from thighseg.dicom_listener.telemetry import Telemetry
from thighseg.dicom_listener.validation import (CANNOT_UNDERSTAND, OUT_OF_RESOURCES, Limits, Refusal,
                                                check_instance)

log = logging.getLogger(__name__)

SUCCESS = 0x0000
JPEG_LOSSLESS_PROCESS_14 = "1.2.840.10008.1.2.4.57"
# Uncompressed, deflated and the lossless compressed family (decoded at assembly by pylibjpeg).
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                     JPEGLosslessSV1, JPEG_LOSSLESS_PROCESS_14, JPEGLSLossless, JPEG2000Lossless, RLELossless]


@dataclass
class StoreHandler:
    spool: Spool
    tracker: SeriesTracker
    telemetry: Telemetry
    limits: Limits = Limits()

    def __call__(self, event: evt.Event) -> int:
        status, reason = self._store(event)
        if status != SUCCESS:
            self.telemetry.rejected.labels(reason).inc()
        return status

    def _store(self, event: evt.Event) -> tuple[int, str]:
        request = event.request
        try:
            dataset = event.dataset
            transfer_syntax = str(event.context.transfer_syntax)
        except Exception as error:  # undecodable data set
            log.warning("refused undecodable instance: %s", type(error).__name__)
            return CANNOT_UNDERSTAND, "undecodable"
        refusal: Refusal | None = check_instance(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                                                 dataset, transfer_syntax, self.limits)
        if refusal is not None:
            log.warning("refused instance: %s", refusal.detail)
            return refusal.status, refusal.reason
        encoded = event.encoded_dataset(include_meta=True)
        if len(encoded) > self.limits.max_instance_bytes:
            log.warning("refused instance of %d bytes (limit %d)", len(encoded), self.limits.max_instance_bytes)
            return OUT_OF_RESOURCES, "too_large"
        study_uid, series_uid, sop_uid = (str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID),
                                          str(dataset.SOPInstanceUID))
        try:
            self.spool.store(encoded, study_uid, series_uid, sop_uid)
            new = self.tracker.received(id(event.assoc), SeriesKey(study_uid, series_uid), sop_uid)
        except Exception as error:  # disk full, unwritable spool, index failure: never answer Success
            log.error("could not spool instance: %s", getattr(error, "strerror", None) or type(error).__name__)
            return OUT_OF_RESOURCES, "spool_write"
        (self.telemetry.received if new else self.telemetry.duplicates).inc()
        return SUCCESS, ""


def make_ae(ae_title: str, max_pdu_bytes: int) -> AE:
    ae = AE(ae_title=ae_title)
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
    ae.maximum_pdu_size = max_pdu_bytes
    ae.maximum_associations = 32
    return ae


def event_handlers(store: StoreHandler, tracker: SeriesTracker) -> list[tuple]:
    return [
        (evt.EVT_C_ECHO, lambda event: SUCCESS),
        (evt.EVT_C_STORE, store),
        (evt.EVT_RELEASED, lambda event: tracker.association_closed(id(event.assoc), released=True)),
        (evt.EVT_ABORTED, lambda event: tracker.association_closed(id(event.assoc), released=False)),
    ]
