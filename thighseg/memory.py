"""Giving memory back between the stages of a study, so that a long-running listener's peak stays at
what one study needs (the bench measures it against the study's voxel bytes).

- glibc keeps memory that numpy arrays freed in its heaps, per thread, instead of returning it to the
  operating system; `malloc_trim` returns it (the remedy Dask documents for "memory not released
  back to the OS"). Elsewhere than glibc this is a no-op.
- highdicom caches its DICOM module tables (about 65 MB of Python objects) the first time it builds an
  instance, for the life of the process; re-reading them costs about 0.2 s a study.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)


def _glibc_malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_MALLOC_TRIM = _glibc_malloc_trim()


def release_free_heap() -> None:
    """Return freed heap memory of every thread's arena to the operating system."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def release_highdicom_tables() -> None:
    """Drop highdicom's cached module tables (a private function of the pinned highdicom version;
    if it moves, memory is merely kept)."""
    try:
        from highdicom import _standard_utils
    except ImportError:
        return
    for name in ("get_module_attribute_map", "get_iod_module_map", "get_sop_class_iod_map"):
        cached = getattr(_standard_utils, name, None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
        else:
            log.debug("highdicom has no cached %s: nothing to release", name)
