"""C-STORE of results (SEG, SR, the summary page as Secondary Capture) to a destination AE, with
bounded retries.

Transient problems (no association, aborted association, out of resources) are retried with
exponential backoff; a refusal that will not change (SOP class not supported, data set does not
match, cannot understand) stops at once, so a refusing PACS never causes an endless loop.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
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


@dataclass(frozen=True)
class Destination:
    """An AE that results are C-STOREd to, and which of them it takes."""

    ae_title: str
    host: str
    port: int
    outputs: tuple[str, ...] = tuple(OUTPUTS)

    @staticmethod
    def parse(text: str) -> Destination:
        """AET@host:port, optionally /seg,sr,sc (default: all three)."""
        match = re.fullmatch(r"([^@]{1,16})@([^:/]+):(\d+)(?:/([a-z,]+))?", text)
        if not match:
            raise ValueError(f"destination must look like AET@host:port[/seg,sr,sc], got {text!r}")
        outputs = tuple(match.group(4).split(",")) if match.group(4) else tuple(OUTPUTS)
        unknown = sorted(set(outputs) - set(OUTPUTS))
        if unknown or not outputs:
            raise ValueError(
                f"unknown output(s) {', '.join(unknown)} in {text!r}; choose from seg, sr, sc"
            )
        return Destination(match.group(1), match.group(2), int(match.group(3)), outputs)

    def files(self, folder: Path) -> list[Path]:
        """The chosen result files of one series that exist (a NIfTI input has no DICOM)."""
        paths = [folder / OUTPUTS[name] for name in self.outputs]
        return [path for path in paths if path.exists()]


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


def forward(
    paths: list[Path],
    destination: Destination,
    calling_ae: str = AE_TITLE,
    attempts: int = 4,
    backoff_s: float = 1.0,
) -> ForwardResult:
    """Send every file; True only if the destination stored all of them."""
    datasets = [pydicom.dcmread(p) for p in paths]
    delay = backoff_s
    detail = ""
    for attempt in range(1, attempts + 1):
        ae = AE(ae_title=calling_ae)
        for ds in datasets:
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        association = ae.associate(
            destination.host, destination.port, ae_title=destination.ae_title
        )
        if association.is_established:
            statuses = []
            for ds in datasets:
                response = association.send_c_store(ds)
                statuses.append(int(response.Status) if "Status" in response else -1)
            association.release()
            if all(_stored(s) for s in statuses):
                return ForwardResult(True, attempt, "stored")
            failed = [s for s in statuses if not _stored(s)]
            detail = f"C-STORE status {', '.join(f'0x{s:04X}' for s in failed)}"
            if all(s >= 0 and _permanent(s) for s in failed):
                log.error(
                    "destination %s refused the results (%s); not retrying",
                    destination.ae_title,
                    detail,
                )
                return ForwardResult(False, attempt, f"refused: {detail}")
        else:
            detail = "association rejected or destination unreachable"
        if attempt < attempts:
            log.warning(
                "forwarding to %s failed (%s); retry %d in %.1f s",
                destination.ae_title,
                detail,
                attempt,
                delay,
            )
            time.sleep(delay)
            delay *= 2
    return ForwardResult(False, attempts, f"gave up after {attempts} attempts: {detail}")
