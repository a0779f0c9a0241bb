"""Durable storage of received instances: nothing is acknowledged before it is on disk.

Each instance is written to a temporary file, fsynced, renamed into place and the directory
fsynced, so a crash leaves either the whole instance or none of it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
WRITE_BUFFER_BYTES = 1 << 20


def is_valid_uid(value: object) -> bool:
    """A DICOM UID: digits and dots, at most 64 characters (also keeps paths safe)."""
    return isinstance(value, str) and len(value) <= 64 and bool(_UID.match(value))


class Spool:
    """spool/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm"""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        for uid in (study_uid, series_uid):
            if not is_valid_uid(uid):
                raise ValueError(f"invalid UID {uid!r}")
        return self.root / study_uid / series_uid

    def store(self, encoded: bytes, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Write one encoded instance (DICOM file bytes) durably; returns its path."""
        if not is_valid_uid(sop_uid):
            raise ValueError(f"invalid SOP Instance UID {sop_uid!r}")
        folder = self.series_dir(study_uid, series_uid)
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{sop_uid}.dcm"
        temporary = folder / f".{sop_uid}.part"
        with open(temporary, "wb", buffering=WRITE_BUFFER_BYTES) as handle:
            handle.write(encoded)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)
        _fsync_directory(folder)
        return final

    def instances(self, study_uid: str, series_uid: str) -> list[Path]:
        return sorted(self.series_dir(study_uid, series_uid).glob("*.dcm"))


def _fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
