"""Durable storage of received instances: nothing is acknowledged before it is on disk.

Each instance is first staged in a temporary file and fsynced; only once the index has recorded it
is it renamed into place and the directory fsynced. A crash, a full disk or an index failure
leaves either the whole instance or none of it, and never a file the index does not know.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

# Components are 0 or have no leading zero (PS3.5 9.1).
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
WRITE_BUFFER_BYTES = 1 << 20
LOCK_BUCKETS = 64  # SOP Instance UIDs share this many lock files


def is_valid_uid(value: object) -> bool:
    """A DICOM UID: digits and dots, at most 64 characters (also keeps paths safe)."""
    return isinstance(value, str) and len(value) <= 64 and bool(_UID.match(value))


def sha256_of(data: bytes) -> str:
    """The hex SHA-256 of an instance's bytes (its identity in the index)."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Staged:
    """An instance written and fsynced beside its final place, not yet renamed into it."""

    temporary: Path
    final: Path


class Spool:
    """spool/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm"""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._locks = self.root / ".locks"
        self._locks.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def locked(self, sop_uid: str) -> Iterator[None]:
        """While held, no other thread or ingest process records or commits this SOP Instance
        UID (so the file in place always matches the index's digest). An flock on a file opened
        afresh each time: it excludes threads of one process as well as other processes."""
        bucket = zlib.crc32(sop_uid.encode()) % LOCK_BUCKETS  # hash() differs between processes
        with open(self._locks / f"{bucket:02d}", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield  # closing the file releases the lock

    def claim(self) -> IO[str]:
        """This listener's hold on the spool until the returned file is closed: a second listener
        on the same spool (and index) fails to start instead of recovering and completing the
        same series beside the first."""
        handle = open(self._locks / "listener", "a+")  # noqa: SIM115 - held open: that is the claim
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise OSError(
                errno.EBUSY, f"spool {self.root} is in use by another listener ({holder})"
            ) from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        return handle

    def series_dir(self, study_uid: str, series_uid: str) -> Path:
        """The folder of one series (UIDs are checked: they become path parts)."""
        for uid in (study_uid, series_uid):
            if not is_valid_uid(uid):
                raise ValueError(f"invalid UID {uid!r}")
        return self.root / study_uid / series_uid

    def path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where one instance is kept."""
        if not is_valid_uid(sop_uid):
            raise ValueError(f"invalid SOP Instance UID {sop_uid!r}")
        return self.series_dir(study_uid, series_uid) / f"{sop_uid}.dcm"

    def free_bytes(self) -> int:
        """Free space on the spool's file system."""
        return shutil.disk_usage(self.root).free

    def stage(self, encoded: bytes, study_uid: str, series_uid: str, sop_uid: str) -> Staged:
        """Write one encoded instance (DICOM file bytes) to a temporary file of its own, fsynced
        (the same instance may arrive on several associations at once)."""
        final = self.path(study_uid, series_uid, sop_uid)
        final.parent.mkdir(parents=True, exist_ok=True)
        temporary = final.with_name(f".{final.name}.{uuid.uuid4().hex}.part")
        try:
            with open(temporary, "wb", buffering=WRITE_BUFFER_BYTES) as handle:
                handle.write(encoded)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return Staged(temporary, final)

    @staticmethod
    def commit(staged: Staged) -> Path:
        """Rename a staged instance into place, durably."""
        os.replace(staged.temporary, staged.final)
        _fsync_directory(staged.final.parent)
        return staged.final

    @staticmethod
    def discard(staged: Staged) -> None:
        """Remove a staged instance that will not be committed."""
        staged.temporary.unlink(missing_ok=True)

    def holds(self, study_uid: str, series_uid: str, sop_uid: str, digest: str) -> bool:
        """Is this exact content already in place (a duplicate needs no new write)?"""
        try:
            return sha256_of(self.path(study_uid, series_uid, sop_uid).read_bytes()) == digest
        except FileNotFoundError:
            return False


def _fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
