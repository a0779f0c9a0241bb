"""No full UID in any log line, at any level, whichever library writes it.

UIDs identify a patient's study as surely as a name does. The listener's own messages already
shorten them (`short_uid`); pynetdicom, highdicom and tracebacks (paths under spool/ and results/)
do not. A log record factory rewrites every record as it is created, before any handler or
formatter sees it, so no configuration of handlers can leak one.
"""

from __future__ import annotations

import logging
import re
import traceback

from thighseg.pipeline.stages import short_uid

# A UID has at least five numeric components (IP addresses and versions have fewer); it may be
# followed by a full stop or by the rest of a malformed value ("….498.99.abc").
_UID = re.compile(r"(?<![\d.])\d+(?:\.\d+){4,}(?!\d)")
_installed = False


def redact(text: str) -> str:
    """Each UID in `text` shortened to its last 8 characters, as in the listener's own messages."""
    return _UID.sub(lambda match: short_uid(match.group(0)), text)


def redact_identifiers() -> None:
    """Install the redacting record factory once per process (idempotent); Python warnings
    (pydicom warns with the offending value) are routed through logging so they are redacted too."""
    global _installed
    if _installed:
        return
    logging.captureWarnings(True)
    make_record = logging.getLogRecordFactory()

    def redacted_record(*args: object, **kwargs: object) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed call: keep the template only
            message = str(record.msg)
        record.msg, record.args = redact(message), None
        if record.exc_info:
            record.exc_text = redact(
                "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            )
            record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return record

    logging.setLogRecordFactory(redacted_record)
    _installed = True
