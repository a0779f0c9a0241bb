"""The C-STORE SCP: small event handlers that answer with a DICOM status.

Storage (the spool), bookkeeping (the series tracker) and checks (validation) are separate; the
handler validates, stages durably, records, commits, and only then answers Success; a refusal
carries an Error Comment that says why. Every storage SOP class is accepted at negotiation so that
a non-CT instance gets an explicit C-STORE failure status instead of a silent context rejection.
The connection handlers enforce what the association advertises: the called AE title, the
maximum PDU length (checked before a PDU is read, so an oversized PDU costs no memory) and a
network timeout (a half-sent PDU does not hold a connection forever).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import (
    AddressInformation,
    AssociationSocket,
    ThreadedAssociationServer,
)
from pynetdicom.utils import make_target

from thighseg.dicom_listener.config import Limits, ListenerConfig
from thighseg.dicom_listener.index import Arrival
from thighseg.dicom_listener.polling import poll_promptly
from thighseg.dicom_listener.series import Arrivals, SeriesKey
from thighseg.dicom_listener.spool import Spool, Staged, sha256_of
from thighseg.dicom_listener.telemetry import Telemetry
from thighseg.dicom_listener.validation import (
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    Refusal,
    check_instance,
    undecodable,
)

log = logging.getLogger(__name__)
# its INFO/DEBUG output can carry identifiers
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

SUCCESS = 0x0000
ABORT_WAIT_S = 5.0  # an aborted association's thread ends within this (its handler returns)
LISTEN_BACKLOG = 64  # connections waiting to be accepted (socketserver's default is 5)
JPEG_LOSSLESS_PROCESS_14 = "1.2.840.10008.1.2.4.57"
# Uncompressed, deflated and the lossless compressed family (decoded at assembly by pylibjpeg).
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEG_LOSSLESS_PROCESS_14,
    JPEGLSLossless,
    JPEG2000Lossless,
    RLELossless,
]
# A-ABORT PDU: source 2 (service provider), reason 6 (invalid PDU parameter value), PS3.8 9.3.8.
A_ABORT_INVALID_PDU_PARAMETER = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6])


def _response(refusal: Refusal) -> Dataset:
    response = Dataset()
    response.Status = refusal.status
    response.ErrorComment = refusal.error_comment
    return response


@dataclass
class StoreHandler:
    """The EVT_C_STORE handler: check, stage, record, commit, answer."""

    spool: Spool
    tracker: Arrivals
    telemetry: Telemetry
    limits: Limits = Limits()
    # told of each new or changed instance once it is committed (streaming inference)
    on_stored: Callable[[SeriesKey, str, str, Path], None] | None = None

    def __call__(self, event: evt.Event) -> int | Dataset:
        refusal = self._store(event)
        if refusal is None:
            return SUCCESS
        self.telemetry.rejected.labels(refusal.reason).inc()
        log.warning("refused instance: %s", refusal.detail)
        return _response(refusal)

    def _store(self, event: evt.Event) -> Refusal | None:
        request = event.request
        try:
            dataset = event.dataset
            transfer_syntax = str(event.context.transfer_syntax)
        except Exception as error:  # noqa: BLE001 - undecodable data set
            return undecodable(error)
        refusal = check_instance(
            str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID),
            dataset,
            transfer_syntax,
            self.limits,
        )
        if refusal is not None:
            return refusal
        encoded = event.encoded_dataset(include_meta=True)
        if len(encoded) > self.limits.max_instance_bytes:
            return Refusal(
                OUT_OF_RESOURCES,
                "too_large",
                f"instance of {len(encoded)} bytes exceeds {self.limits.max_instance_bytes}",
            )
        key = SeriesKey(str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID))
        return self._spool(event, encoded, key, str(dataset.SOPInstanceUID))

    def _spool(
        self, event: evt.Event, encoded: bytes, key: SeriesKey, sop_uid: str
    ) -> Refusal | None:
        """Stage, record, commit: an instance is in place only once the index knows it."""
        try:
            if self.spool.free_bytes() < self.limits.min_free_spool_bytes + len(encoded):
                return Refusal(
                    OUT_OF_RESOURCES, "spool_full", "spool disk is full; try again later"
                )
            digest = sha256_of(encoded)
            staged = self.spool.stage(encoded, key.study_uid, key.series_uid, sop_uid)
        except Exception as error:  # noqa: BLE001 - disk full, unwritable spool: never Success
            return Refusal(
                OUT_OF_RESOURCES, "spool_write", f"cannot write the spool ({_describe(error)})"
            )
        try:
            with self.spool.locked(sop_uid):  # the file matches the index's digest
                arrival = self._record_and_commit(event, key, sop_uid, digest, staged)
        except Exception as error:  # noqa: BLE001 - index or rename failed: the sender must resend
            self.spool.discard(staged)
            return Refusal(
                OUT_OF_RESOURCES, "spool_write", f"cannot record the instance ({_describe(error)})"
            )
        if arrival is Arrival.CONFLICT:
            return Refusal(
                DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "uid_conflict",
                "SOPInstanceUID already stored in another series",
            )
        counter = {Arrival.NEW: self.telemetry.received, Arrival.REPLACED: self.telemetry.replaced}
        counter.get(arrival, self.telemetry.duplicates).inc()
        if arrival in counter and self.on_stored is not None:
            try:
                self.on_stored(key, sop_uid, digest, staged.final)
            except Exception as error:  # noqa: BLE001 - stored and recorded: never a failure now
                log.warning(
                    "instance stored, not streamed (%s): its series is inferred whole", error
                )
        if arrival is Arrival.REPLACED:
            log.warning(
                "an instance was received again with different content: its series is re-processed"
            )
        return None

    def _record_and_commit(
        self, event: evt.Event, key: SeriesKey, sop_uid: str, digest: str, staged: Staged
    ) -> Arrival:
        arrival = self.tracker.received(id(event.assoc), key, sop_uid, digest)
        if arrival is Arrival.CONFLICT or (
            arrival is Arrival.DUPLICATE
            and self.spool.holds(key.study_uid, key.series_uid, sop_uid, digest)
        ):
            self.spool.discard(staged)
        else:
            self.spool.commit(staged)
        return arrival


def _describe(error: BaseException) -> str:
    return getattr(error, "strerror", None) or type(error).__name__


def make_ae(ae_title: str, max_pdu_bytes: int) -> AE:
    """The listener's AE: every storage SOP class, our transfer syntaxes, limits and timeouts."""
    ae = AE(ae_title=ae_title)
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
    ae.maximum_pdu_size = max_pdu_bytes
    ae.maximum_associations = 32
    ae.require_called_aet = True  # an association addressed to another AE title is rejected
    return ae


def _receive_timeout(connection: socket.socket, seconds: float) -> None:
    """A kernel receive timeout (SO_RCVTIMEO) on a blocking socket: a silent peer ends the read
    with an error after `seconds`. Python's own socket timeout would do the same, but it turns the
    socket non-blocking and polls before each of the ~128 reads of a 512 KiB instance."""
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)


class PeerDropped(OSError):
    """Raised by a guarded read to end an association on purpose (a PDU over the limit, a peer
    silent mid-PDU): counted and logged as a warning with the reason already."""


class _QuietDroppedPeers(logging.Filter):
    """pynetdicom logs every failed read as an ERROR with a traceback ("Connection closed before
    the entire PDU was received"); for a peer dropped on purpose that is noise beside the
    warning that says why."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return not isinstance(error, PeerDropped)


_QUIET_DROPPED_PEERS = _QuietDroppedPeers()


@dataclass
class ConnectionGuard:
    """EVT_CONN_OPEN runs before the association's reader starts: bound its socket's reads, and
    poll promptly while it is busy (`polling`)."""

    max_pdu_bytes: int
    network_timeout_s: float
    telemetry: Telemetry

    def __post_init__(self) -> None:
        logging.getLogger("pynetdicom.dul").addFilter(_QUIET_DROPPED_PEERS)  # once: the same one

    def __call__(self, event: evt.Event) -> None:
        poll_promptly(event.assoc.dul)
        sock: AssociationSocket = event.assoc.dul.socket
        if sock.socket is not None:
            _receive_timeout(sock.socket, self.network_timeout_s)
        read = sock.recv
        limit, telemetry, timeout_s = self.max_pdu_bytes, self.telemetry, self.network_timeout_s

        def guarded_read(nr_bytes: int) -> bytearray:
            if limit and nr_bytes > limit:
                telemetry.associations_rejected.labels("pdu_too_large").inc()
                log.warning(
                    "aborting association: PDU of %d bytes exceeds the %d-byte limit",
                    nr_bytes,
                    limit,
                )
                with contextlib.suppress(OSError):
                    sock.socket.sendall(A_ABORT_INVALID_PDU_PARAMETER)
                raise PeerDropped(f"PDU of {nr_bytes} bytes exceeds the {limit}-byte maximum")
            try:
                return read(nr_bytes)
            except (BlockingIOError, TimeoutError) as error:  # SO_RCVTIMEO: stopped mid-PDU
                telemetry.associations_rejected.labels("network_timeout").inc()
                log.warning(
                    "closing association: peer silent for %.0f s in the middle of a PDU", timeout_s
                )
                raise PeerDropped(f"peer silent for {timeout_s:.0f} s") from error

        sock.recv = guarded_read


@dataclass
class RejectionLogger:
    """Counts and logs rejected associations with the reason (AE titles are not patient data)."""

    ae: AE
    telemetry: Telemetry

    def __call__(self, event: evt.Event) -> None:
        request = event.assoc.requestor.primitive
        calling, called = (
            (str(request.calling_ae_title).strip(), str(request.called_ae_title).strip())
            if request is not None
            else ("?", "?")
        )
        allowed = [a.strip() for a in self.ae.require_calling_aet]
        if allowed and calling not in allowed:
            reason = "calling_ae"
        elif called != self.ae.ae_title.strip():
            reason = "called_ae"
        else:
            reason = "busy"
        self.telemetry.associations_rejected.labels(reason).inc()
        log.warning(
            "rejected association from %r to %r at %s: %s",
            calling,
            called,
            event.assoc.requestor.address,
            reason,
        )


class CountingTLSContext:
    """The server's SSLContext, with each failed handshake logged and counted, and a timeout on the
    handshake (pynetdicom runs it in the accepting thread, so a silent client would block it)."""

    def __init__(self, context: ssl.SSLContext, timeout_s: float, telemetry: Telemetry) -> None:
        self._context, self._timeout_s, self._telemetry = context, timeout_s, telemetry

    def wrap_socket(self, sock, server_side: bool = True, **options):  # noqa: ANN001 - ssl's signature
        """Wrap an accepted socket; a failed handshake is logged, counted and re-raised."""
        sock.settimeout(self._timeout_s)
        try:
            return self._context.wrap_socket(sock, server_side=server_side, **options)
        except (ssl.SSLError, OSError) as error:
            self._telemetry.associations_rejected.labels("tls").inc()
            log.warning(
                "TLS handshake failed: %s", getattr(error, "reason", None) or type(error).__name__
            )
            sock.close()
            raise


def event_handlers(
    ae: AE, store: StoreHandler, tracker: Arrivals, guard: ConnectionGuard
) -> list[tuple]:
    """The handlers the association server binds: connection guard, rejections, echo, store,
    completion."""
    return [
        (evt.EVT_CONN_OPEN, guard),
        (evt.EVT_REJECTED, RejectionLogger(ae, store.telemetry)),
        (evt.EVT_C_ECHO, lambda event: SUCCESS),
        (evt.EVT_C_STORE, store),
        (
            evt.EVT_RELEASED,
            lambda event: tracker.association_closed(id(event.assoc), released=True),
        ),
        (
            evt.EVT_ABORTED,
            lambda event: tracker.association_closed(id(event.assoc), released=False),
        ),
    ]


def server_ssl_context(config: ListenerConfig) -> ssl.SSLContext | None:
    """The TLS context for the SCP, or None for plain TCP."""
    if config.tls_cert is None:
        return None
    if config.tls_key is None:
        raise ValueError("TLS needs both a certificate and its private key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(config.tls_cert), keyfile=str(config.tls_key))
    if config.tls_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(config.tls_ca))
    return context


def listening_socket(host: str, port: int) -> socket.socket:
    """The listener's bound, listening TCP socket (shared by its ingest processes); an address
    already in use names itself in the error."""
    listening = None
    try:
        address = AddressInformation(host, port)  # as pynetdicom resolves it: IPv4 first
        listening = socket.socket(address.address_family, socket.SOCK_STREAM)
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind(address.as_tuple)
        listening.listen(LISTEN_BACKLOG)
    except OSError as error:  # the port in the message: "Errno 98" alone names nothing
        if listening is not None:
            listening.close()
        message = f"cannot listen for DICOM on {host}:{port}: {error.strerror}"
        raise OSError(error.errno, message) from error
    return listening


class ListeningSocketServer(ThreadedAssociationServer):
    """Accepts on a listening socket opened beforehand by the listener process, which hands the
    same socket to each ingest process: whichever process is free takes the next connection.
    (With SO_REUSEPORT each process had a socket of its own, the kernel hashed connections among
    them whatever their load, and a process that died took the connections queued for it.)"""

    def __init__(self, *args, listening: socket.socket, **kwargs) -> None:  # noqa: ANN002, ANN003
        self._listening = listening
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        """Take the listening socket instead of binding a new one."""
        self.socket.close()
        self.socket = self._listening
        # Non-blocking: of the processes woken by a connection, those that lose the race for it
        # go back to waiting instead of blocking in accept().
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Already listening."""

    def server_close(self) -> None:
        """Close this process's descriptor only (shutdown() would close the socket for every
        process), then, as socketserver's threaded server does, wait for the threads that start
        an association for each connection accepted: stop_scp then sees every association."""
        self.socket.close()
        self._threads.join()


def stop_scp(server: ThreadedAssociationServer, drain_s: float) -> None:
    """Stop accepting; established associations may finish (release) for up to `drain_s`, the
    rest are aborted, so their sender learns that what it got no Success for was not stored.
    Returns once their threads have ended: nothing is recorded after it (the index may close)."""
    server.shutdown()
    associations = server.active_associations
    started = time.monotonic()
    deadline = started + drain_s
    for association in associations:
        if association.is_established:  # a sender that may still release; not a bare connection
            association.join(max(0.0, deadline - time.monotonic()))
    aborted = [a for a in associations if a.is_alive()]
    for association in aborted:
        association.abort()
    for association in aborted:
        association.join(ABORT_WAIT_S)
    if aborted:  # established ones the drain outlasted, and connections not (or no longer) in use
        log.warning(
            "stopping: %d association(s) still open after %.1f s aborted",
            len(aborted),
            time.monotonic() - started,
        )


def start_scp(
    config: ListenerConfig, store: StoreHandler, arrivals: Arrivals, listening: socket.socket
) -> ThreadedAssociationServer:
    """The listener's SCP accepting on `listening` (`listening_socket`) in a thread of its own,
    as AE.start_server does. The socket is the server's from then on: closed when it stops, or at
    once if it cannot start."""
    try:
        ae = make_ae(config.ae_title, config.max_pdu_bytes)
        if config.allowed_calling_aets:
            ae.require_calling_aet = list(config.allowed_calling_aets)
        guard = ConnectionGuard(config.max_pdu_bytes, config.network_timeout_s, store.telemetry)
        tls = server_ssl_context(config)
        server = ae.make_server(
            (config.host, config.port),
            evt_handlers=event_handlers(ae, store, arrivals, guard),
            ssl_context=CountingTLSContext(tls, config.network_timeout_s, store.telemetry)
            if tls
            else None,
            server_class=ListeningSocketServer,
            listening=listening,
        )
    except BaseException:
        listening.close()
        raise
    acceptor = threading.Thread(target=make_target(server.serve_forever), name="dicom-acceptor")
    acceptor.daemon = True
    acceptor.start()
    ae._servers.append(server)  # noqa: SLF001 - as AE.start_server does; shutdown() removes it
    return server
