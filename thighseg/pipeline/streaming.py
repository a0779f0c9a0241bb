"""Streaming inference: slices go to the model as they arrive, and are measured
(`thighseg.measure.sums`), so that when a series completes only its last slices remain to be
inferred and measured.

The served models are 2D: a slice's labels depend on that slice alone, so they can be computed the
moment it is stored, in any order, and are exactly those the whole-volume path computes
(`client.volume.segment_volume` resamples each slice on its own). Each result is kept under the
instance's content digest: at processing time only labels of the very bytes the index snapshot names
are used, and any slice without one (replaced, dropped because the cache was full, failed) is
inferred then with the rest. Streaming is an optimisation and never a source of truth.

A slice waiting for a free worker is only its spool path: the file is read when inferred, so a
backlog (inference slower than the sender) costs no memory for pixels.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom

from thighseg.client.volume import InferFn, segment_volume
from thighseg.measure.sums import SliceSums, measure_slice
from thighseg.pipeline.assemble import slice_hu

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamedSlice:
    """One slice done as it arrived: its labels and its measurement sums."""

    labels: np.ndarray
    sums: SliceSums | None  # None: not measured while a backlog waited (measured with the series)


class SliceCache:
    """Slices inferred and measured as they arrived, by series, SOP Instance UID and content
    digest.

    At most `max_slices` are kept (a study-sized budget of memory: 256 KiB a 512² slice); beyond
    that, slices are not streamed and the series is inferred whole when it completes.
    """

    def __init__(
        self, infer: InferFn, input_size: int, max_slices: int = 2048, workers: int = 2
    ) -> None:
        self._infer, self._input_size, self._max_slices = infer, input_size, max_slices
        # measured as they stream only while inference keeps up: behind a sender that outruns
        # it, measuring the series at the end costs the same CPU without holding the backlog up
        self._measure_backlog = 2 * workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stream")
        self._lock = threading.Lock()
        self._done: dict[str, dict[str, tuple[str, StreamedSlice]]] = {}
        self._pending: dict[str, set[Future]] = {}
        self._count = 0

    def submit(self, series_uid: str, sop_uid: str, digest: str, path: Path) -> bool:
        """Infer the instance stored at `path` with content `digest` in the background; False
        when the cache is full (not streamed)."""
        with self._lock:
            if self._count >= self._max_slices:
                return False
            self._count += 1  # reserved now, so concurrent submits respect the budget
            future = self._pool.submit(self._run, series_uid, sop_uid, digest, path)
            self._pending.setdefault(series_uid, set()).add(future)
        future.add_done_callback(lambda done: self._settled(series_uid, done))
        return True

    def _run(self, series_uid: str, sop_uid: str, digest: str, path: Path) -> None:
        try:
            encoded = path.read_bytes()
            if hashlib.sha256(encoded).hexdigest() != digest:
                raise LookupError("replaced or removed since it was stored")
            dataset = pydicom.dcmread(BytesIO(encoded))
            pixel_mm = tuple(float(v) for v in dataset.PixelSpacing)
            hu = slice_hu(dataset)
            labels = segment_volume(hu[None], self._infer, self._input_size, pixel_mm, 1, 1)[0]
            with self._lock:
                keeping_up = len(self._pending.get(series_uid, ())) <= self._measure_backlog
            sums = measure_slice(hu, labels, pixel_mm[0]) if keeping_up else None
            done = StreamedSlice(labels, sums)
        except Exception as error:  # noqa: BLE001 - inferred again with the series
            log.info("streamed slice not inferred (%s); the series infers it", type(error).__name__)
            with self._lock:
                self._count -= 1
            return
        with self._lock:
            previous = self._done.setdefault(series_uid, {}).get(sop_uid)
            self._done[series_uid][sop_uid] = (digest, done)
            if previous is not None:
                self._count -= 1  # a replaced instance: one slot, newest content

    def _settled(self, series_uid: str, future: Future) -> None:
        with self._lock:
            self._pending.get(series_uid, set()).discard(future)

    def peek(self, series_uid: str, digests: dict[str, str]) -> dict[str, StreamedSlice]:
        """The series' instances whose content is exactly `digests` (SOP UID -> digest),
        after the slices still in flight finish; the series stays cached (a head start may be
        discarded, and its series processed again)."""
        with self._lock:
            pending = list(self._pending.get(series_uid, ()))
        wait(pending)
        with self._lock:
            cached = dict(self._done.get(series_uid, {}))
        return {sop: done for sop, (digest, done) in cached.items() if digests.get(sop) == digest}

    def take(self, series_uid: str, digests: dict[str, str]) -> dict[str, StreamedSlice]:
        """`peek`, then the series is forgotten."""
        done = self.peek(series_uid, digests)
        with self._lock:
            cached = self._done.pop(series_uid, {})
            self._pending.pop(series_uid, None)
            self._count -= len(cached)
        return done

    def forget(self, series_uid: str) -> None:
        """Drop what the series streamed (expired or abandoned)."""
        self.take(series_uid, {})

    @property
    def slices(self) -> int:
        """Slices held or being inferred."""
        with self._lock:
            return self._count

    def close(self) -> None:
        """Stop the inference threads; slices not yet inferred are dropped."""
        self._pool.shutdown(wait=True, cancel_futures=True)
