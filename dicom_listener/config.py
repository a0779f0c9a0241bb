"""The listener's settings in one dataclass: the CLI's options, the Helm chart's values and the
README take their defaults from here (tests check that they agree). Imports nothing heavy: the CLI
reads these defaults at every start."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from thighseg.core.constants import AE_TITLE, DICOM_PORT

if TYPE_CHECKING:
    from thighseg.dicom_listener.forward import Destination, StowDestination


@dataclass(frozen=True)
class Limits:
    """What the listener accepts: matrix, sizes, spacing, rescale and free spool space."""

    max_matrix: int = 2048  # rows/columns
    min_matrix: int = 32
    max_instance_bytes: int = 64 << 20
    pixel_spacing_mm: tuple[float, float] = (0.05, 5.0)
    rescale_slope: tuple[float, float] = (1e-3, 1e3)  # a CT slope outside this is not HU
    min_free_spool_bytes: int = 256 << 20  # below this, refuse with 0xA700 before the disk fills


@dataclass
class ListenerConfig:
    """Everything the listener can be told; the defaults are the product's defaults."""

    spool_dir: Path
    output_dir: Path
    ae_title: str = AE_TITLE
    host: str = "0.0.0.0"
    port: int = DICOM_PORT
    idle_s: float = 2.0
    expiry_s: float = 86400.0  # no instance this long and no association open: given up, freed
    workers: int = 1
    # a released series is processed during the idle wait, its result published once it completes
    # unchanged (otherwise discarded): results come idle_s sooner
    head_start: bool = True
    # processes receiving C-STOREs on the listener's socket; 1: in the listener process
    ingest_processes: int = 1
    # the SEG's header, the SR and the SC are written in a process of its own during measurement
    # (measure + emit 2.2 s instead of 3.6 s for a 300-slice study, ~45 MB more at the peak:
    # docs/benchmark); False: in the listener process
    seg_process: bool = True
    # /metrics, /healthz, /readyz (LISTENER_METRICS_PORT in the CLI)
    metrics_port: int | None = None
    allowed_calling_aets: tuple[str, ...] = ()  # empty: any calling AE title may associate
    tls_cert: Path | None = None  # PEM certificate + key: DICOM over TLS
    tls_key: Path | None = None
    tls_ca: Path | None = None  # when set, clients must present a certificate signed by it
    max_pdu_bytes: int = 4 << 20  # advertised and enforced: a larger PDU aborts the association
    network_timeout_s: float = 30.0  # a peer silent this long mid-PDU or mid-handshake is dropped
    # on stop, open associations may finish this long; the rest are aborted (within Kubernetes'
    # default 30 s grace period, with time left to finish the series in progress)
    drain_s: float = 10.0
    limits: Limits = Limits()
    retry_backoff_s: tuple[float, float] = (2.0, 60.0)  # Triton down: first and longest wait
    # results to each (C-STORE or STOW-RS), the outputs it chose
    destinations: tuple[Destination | StowDestination, ...] = ()
    forward_attempts: int = 6  # backoff 1, 2, 4, 8, 16 s: a busy PACS gets half a minute
    # slices inferred as they arrive and held until their series completes (256 KiB a 512² slice);
    # 0: each series is inferred whole once complete
    stream_slices: int = 2048


def default(name: str) -> object:
    """The default of one ListenerConfig field (for CLI options and documentation)."""
    field = next(f for f in fields(ListenerConfig) if f.name == name)
    if field.default is MISSING:
        raise KeyError(f"ListenerConfig.{name} has no default")
    return field.default
