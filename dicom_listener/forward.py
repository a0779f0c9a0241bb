"""Results (SEG, SR, the summary page as Secondary Capture) sent to destinations with bounded
retries: a DICOM AE by C-STORE, or a DICOMweb service by STOW-RS.

Transient problems (no association, aborted association, out of resources; no connection, HTTP
408/429/5xx) are retried with exponential backoff; a refusal that will not change (SOP class not
supported, data set does not match, cannot understand; any other HTTP 4xx) stops at once, so a
refusing PACS never causes an endless loop.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.status import (
    STATUS_FAILURE,
    STATUS_SUCCESS,
    STATUS_WARNING,
    STORAGE_SERVICE_CLASS_STATUS,
    code_to_category,
)

from thighseg.core.constants import AE_TITLE

log = logging.getLogger(__name__)


# what `--forward AET@host:port/seg,sr,sc` may choose, and the result file of each
OUTPUTS = {"seg": "seg.dcm", "sr": "sr.dcm", "sc": "summary_sc.dcm"}


def _outputs(chosen: str | None, text: str) -> tuple[str, ...]:
    """The outputs a destination named (default: all three), or a ValueError naming the bad."""
    outputs = tuple(chosen.split(",")) if chosen else tuple(OUTPUTS)
    unknown = sorted(set(outputs) - set(OUTPUTS))
    if unknown or not all(outputs):
        raise ValueError(
            f"unknown output(s) {', '.join(unknown) or '(empty)'} in {text!r}; "
            "choose from seg, sr, sc"
        )
    return outputs


def chosen_files(folder: Path, outputs: tuple[str, ...]) -> list[Path]:
    """The chosen result files of one series that exist (a NIfTI input has no DICOM)."""
    paths = [folder / OUTPUTS[name] for name in outputs]
    return [path for path in paths if path.exists()]


@dataclass(frozen=True)
class Destination:
    """An AE that results are C-STOREd to, and which of them it takes."""

    ae_title: str
    host: str
    port: int
    outputs: tuple[str, ...] = tuple(OUTPUTS)

    @staticmethod
    def parse(text: str) -> Destination | StowDestination:
        """AET@host:port, optionally /seg,sr,sc; or a DICOMweb base URL
        (http[s]://host/dicom-web), optionally #seg,sr,sc. Default: all three outputs."""
        if re.match(r"https?://", text):
            return StowDestination.parse(text)
        match = re.fullmatch(r"([^@]{1,16})@([^:/]+):(\d+)(?:/([a-z,]+))?", text)
        if not match:
            raise ValueError(
                "destination must look like AET@host:port[/seg,sr,sc] or "
                f"http[s]://host/dicom-web[#seg,sr,sc], got {text!r}"
            )
        outputs = _outputs(match.group(4), text)
        return Destination(match.group(1), match.group(2), int(match.group(3)), outputs)

    @property
    def name(self) -> str:
        """How reports and metrics name the destination."""
        return self.ae_title

    def files(self, folder: Path) -> list[Path]:
        """The chosen result files of one series that exist."""
        return chosen_files(folder, self.outputs)


@dataclass(frozen=True)
class StowDestination:
    """A DICOMweb service that results are stored to by STOW-RS, and which of them it takes."""

    url: str
    outputs: tuple[str, ...] = tuple(OUTPUTS)

    @staticmethod
    def parse(text: str) -> StowDestination:
        """http[s]://host[:port]/path-to-dicom-web, optionally #seg,sr,sc (the fragment, which
        no server ever sees)."""
        url, _, chosen = text.partition("#")
        if not re.fullmatch(r"https?://[^/\s#]+(/[^\s#]*)?", url):
            raise ValueError(f"DICOMweb destination must be an http(s) URL, got {text!r}")
        return StowDestination(url.rstrip("/"), _outputs(chosen or None, text))

    @property
    def name(self) -> str:
        """How reports and metrics name the destination."""
        return self.url

    def files(self, folder: Path) -> list[Path]:
        """The chosen result files of one series that exist."""
        return chosen_files(folder, self.outputs)


@dataclass(frozen=True)
class ForwardResult:
    """Whether the destination stored every file, after how many attempts, and why not."""

    delivered: bool
    attempts: int
    detail: str


def _stored(status: int) -> bool:
    """Success, or a warning (coercion, elements discarded): the destination kept the object."""
    return status >= 0 and code_to_category(status) in (STATUS_SUCCESS, STATUS_WARNING)


def _permanent(status: int) -> bool:
    """A refusal that a retry will not change: any failure but out of resources or a processing
    failure at the destination."""
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(status, ("", ""))[1]
    transient = meaning.startswith(("Refused: Out of Resources", "Processing Failure"))
    return code_to_category(status) == STATUS_FAILURE and not transient


def _c_store(
    datasets: list[Dataset], destination: Destination, calling_ae: str
) -> tuple[bool, bool, str]:
    """One association: (stored all, refusal is permanent, detail)."""
    ae = AE(ae_title=calling_ae)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    association = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not association.is_established:
        return False, False, "association rejected or destination unreachable"
    statuses = []
    for ds in datasets:
        response = association.send_c_store(ds)
        statuses.append(int(response.Status) if "Status" in response else -1)
    association.release()
    failed = [s for s in statuses if not _stored(s)]
    if not failed:
        return True, False, "stored"
    detail = f"C-STORE status {', '.join(f'0x{s:04X}' for s in failed)}"
    return False, all(s >= 0 and _permanent(s) for s in failed), detail


TRANSIENT_HTTP = frozenset({408, 429})


def _stow(datasets: list[Dataset], destination: StowDestination) -> tuple[bool, bool, str]:
    """One STOW-RS request: (stored all, refusal is permanent, detail)."""
    client = DICOMwebClient(destination.url, timeout=60)
    client.set_http_retry_params(retry=False)  # forward() retries, the same way for both routes
    try:
        response = client.store_instances(datasets)
    except requests.HTTPError as error:
        code = error.response.status_code if error.response is not None else 0
        permanent = 400 <= code < 500 and code not in TRANSIENT_HTTP
        return False, permanent, f"HTTP {code}"
    except requests.RequestException as error:
        return False, False, f"no answer ({type(error).__name__})"
    failed = response.get("FailedSOPSequence", [])
    if failed:
        reasons = sorted({f"0x{int(item.get('FailureReason', 0)):04X}" for item in failed})
        return False, True, f"STOW-RS failed {len(failed)} instance(s): {', '.join(reasons)}"
    return True, False, "stored"


def forward(
    paths: list[Path],
    destination: Destination | StowDestination,
    calling_ae: str = AE_TITLE,
    attempts: int = 4,
    backoff_s: float = 1.0,
) -> ForwardResult:
    """Send every file; True only if the destination stored all of them."""
    datasets = [pydicom.dcmread(p) for p in paths]
    delay = backoff_s
    detail = ""
    for attempt in range(1, attempts + 1):
        if isinstance(destination, StowDestination):
            delivered, permanent, detail = _stow(datasets, destination)
        else:
            delivered, permanent, detail = _c_store(datasets, destination, calling_ae)
        if delivered:
            return ForwardResult(True, attempt, detail)
        if permanent:
            log.error(
                "destination %s refused the results (%s); not retrying", destination.name, detail
            )
            return ForwardResult(False, attempt, f"refused: {detail}")
        if attempt < attempts:
            log.warning(
                "forwarding to %s failed (%s); retry %d in %.1f s",
                destination.name,
                detail,
                attempt,
                delay,
            )
            time.sleep(delay)
            delay *= 2
    return ForwardResult(False, attempts, f"gave up after {attempts} attempts: {detail}")
