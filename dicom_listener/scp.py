"""The C-STORE SCP: small event handlers that answer with a DICOM status.

Storage (the spool) and series bookkeeping (the tracker) are separate objects; handlers only
validate, store and report. Every storage SOP class is accepted at association negotiation so
that a non-CT instance gets an explicit C-STORE failure status instead of a silent context
rejection.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from pydicom.uid import CTImageStorage
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from thighseg.dicom_listener.series import SeriesKey, SeriesTracker
from thighseg.dicom_listener.spool import Spool, is_valid_uid
from thighseg.dicom_listener.telemetry import Telemetry

log = logging.getLogger(__name__)

SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000


@dataclass
class StoreHandler:
    spool: Spool
    tracker: SeriesTracker
    telemetry: Telemetry

    def __call__(self, event: evt.Event) -> int:
        status, reason = self._store(event)
        if status == SUCCESS:
            self.telemetry.received.inc()
        else:
            self.telemetry.rejected.labels(reason).inc()
        return status

    def _store(self, event: evt.Event) -> tuple[int, str]:
        sop_class = str(event.request.AffectedSOPClassUID)
        if sop_class != CTImageStorage:
            log.warning("refused instance of SOP class %s: only CT Image Storage is segmented", sop_class)
            return SOP_CLASS_NOT_SUPPORTED, "sop_class"
        try:
            dataset = event.dataset
            modality = dataset.get("Modality")
            uids = (dataset.get("StudyInstanceUID"), dataset.get("SeriesInstanceUID"), dataset.get("SOPInstanceUID"))
            has_pixels = "PixelData" in dataset
        except Exception as error:  # undecodable data set
            log.warning("refused undecodable instance: %s", type(error).__name__)
            return CANNOT_UNDERSTAND, "undecodable"
        if modality != "CT":
            log.warning("refused CT Image Storage instance with modality %s", modality)
            return DATASET_DOES_NOT_MATCH_SOP_CLASS, "modality"
        if not all(u is not None and is_valid_uid(str(u)) for u in uids):
            log.warning("refused instance with missing or invalid study/series/instance UID")
            return DATASET_DOES_NOT_MATCH_SOP_CLASS, "uid"
        if not has_pixels:
            log.warning("refused instance without pixel data")
            return DATASET_DOES_NOT_MATCH_SOP_CLASS, "no_pixel_data"
        study_uid, series_uid, sop_uid = (str(u) for u in uids)
        try:
            self.spool.store(event.encoded_dataset(include_meta=True), study_uid, series_uid, sop_uid)
        except OSError as error:
            log.error("could not spool instance: %s", error.strerror or error)
            return OUT_OF_RESOURCES, "spool_write"
        self.tracker.received(id(event.assoc), SeriesKey(study_uid, series_uid), sop_uid)
        return SUCCESS, ""


def make_ae(ae_title: str) -> AE:
    ae = AE(ae_title=ae_title)
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax)
    ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs for big CT instances
    return ae


def event_handlers(store: StoreHandler, tracker: SeriesTracker) -> list[tuple]:
    closed = lambda event: tracker.association_closed(id(event.assoc))  # noqa: E731
    return [
        (evt.EVT_C_ECHO, lambda event: SUCCESS),
        (evt.EVT_C_STORE, store),
        (evt.EVT_RELEASED, closed),
        (evt.EVT_ABORTED, closed),
    ]
