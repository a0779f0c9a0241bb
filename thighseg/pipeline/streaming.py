"""Streaming inference: slices go to the model as they arrive, and are measured
(`thighseg.measure.sums`), so that when a series completes only its last slices remain to be
inferred and measured.

A 2D model's labels of a slice depend on that slice alone, so they are computed the moment it is
stored, in any order. A 2.5D model (`context` neighbours on either side) needs the slice's
neighbours: a slice is inferred once `context` slices have arrived on each side of it (by position
along the slice normal, as the volume is assembled), and again if a slice arrives between them
later. Either way a result is exactly what the whole-volume path computes
(`client.volume.segment_slices`) for the same slices. Each result is kept under the content
digests of every instance it was made from, and names those instances: at processing time it is
used only if the index snapshot names the very same bytes and the assembled volume puts the very
same neighbours around it; any other slice (an end of the series, replaced, dropped because the
cache was full, failed) is inferred then with the rest. Streaming is an optimisation and never a
source of truth.

A slice waiting for a free worker is only its spool path: the file is read when inferred, so a
backlog (inference slower than the sender) costs no memory for pixels; a 2.5D slice's neighbours
come from the last few slices decoded, or are read again from the spool.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset

from thighseg.client.volume import InferFn, segment_slices
from thighseg.core.resample import stack_channels
from thighseg.measure.sums import SliceSums, measure_slice
from thighseg.pipeline.assemble import slice_hu, slice_position

log = logging.getLogger(__name__)

# 2.5D: decoded slices kept for the stacks of their neighbours, in stacks' worth (a sender's
# order is seldom further off than this; a slice not kept is read from the spool again)
RECENT_STACKS = 4
# slices pending per inference worker up to which a slice is still measured as it streams
MEASURE_BACKLOG_PER_WORKER = 16
_Decoded = tuple[np.ndarray, tuple[float, float]]  # HU and (row, column) pixel size in mm


@dataclass(frozen=True)
class StreamedSlice:
    """One slice done as it arrived: its labels, its measurement sums, and the instances it was
    inferred from ((SOP Instance UID, content digest), in position order; itself for 2D).

    The labels are kept deflated: a 512² label image is ~4 KB instead of 256 KB (0.3 ms to
    deflate, 0.1 ms to inflate), so a streamed study holds ~1 MB of labels, not ~80 MB, until
    its series is processed."""

    deflated: bytes
    shape: tuple[int, int]
    sums: SliceSums | None  # None: not measured while a backlog waited (measured with the series)
    stack: tuple[tuple[str, str], ...]

    @classmethod
    def of(
        cls, labels: np.ndarray, sums: SliceSums | None, stack: tuple[tuple[str, str], ...]
    ) -> StreamedSlice:
        """The slice's uint8 `labels`, deflated."""
        image = np.ascontiguousarray(labels, dtype=np.uint8)
        return cls(zlib.compress(image.data, 1), image.shape, sums, stack)

    @property
    def labels(self) -> np.ndarray:
        """The labels (a new uint8 array each time)."""
        return np.frombuffer(bytearray(zlib.decompress(self.deflated)), np.uint8).reshape(
            self.shape
        )

    @property
    def neighbours(self) -> tuple[str, ...]:
        """The SOP Instance UIDs of the stack."""
        return tuple(uid for uid, _ in self.stack)


@dataclass(frozen=True)
class _Arrival:
    position: float  # along the slice normal (2.5D only; 0 for 2D)
    digest: str
    path: Path


class SliceCache:
    """Slices inferred and measured as they arrived, by series and SOP Instance UID.

    At most `max_slices` instances are held (their labels deflated, ~4 KB a 512² slice, and a few
    decoded slices for 2.5D neighbours); beyond that, slices are not streamed and the series is
    inferred whole when it completes.
    """

    def __init__(
        self,
        infer: InferFn,
        input_size: int,
        max_slices: int = 2048,
        workers: int = 2,
        context: int = 0,
    ) -> None:
        self._infer, self._input_size, self._max_slices = infer, input_size, max_slices
        self._context = context
        # measured as they stream only while inference keeps up: behind a sender that outruns
        # it, measuring the series at the end costs the same CPU without holding the backlog up.
        # A modality's pace keeps a few slices pending, ten or so in a busy moment (20/s with
        # ~0.5 s to read, infer and measure one); a bound of 2 per worker, measured, left 62 to
        # 296 of a 300-slice study at 20/s unmeasured, and 1-1.8 s of measuring after it completed
        self._measure_backlog = MEASURE_BACKLOG_PER_WORKER * workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stream")
        self._lock = threading.Lock()
        self._arrived: dict[str, dict[str, _Arrival]] = {}
        self._recent: OrderedDict[str, _Decoded] = OrderedDict()  # by content digest (2.5D)
        self._done: dict[str, dict[str, StreamedSlice]] = {}
        self._pending: dict[str, set[Future]] = {}
        self._count = 0

    def submit(self, series_uid: str, sop_uid: str, digest: str, path: Path) -> bool:
        """Infer the instance stored at `path` with content `digest` in the background (a 2.5D
        model: once its neighbours are there); False when the cache is full (not streamed)."""
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
            dataset = _read(path, digest)
            position = slice_position(dataset) if self._context else 0.0
            decoded = _decode(dataset)
        except Exception as error:  # noqa: BLE001 - inferred again with the series
            log.info("streamed slice not read (%s); the series infers it", type(error).__name__)
            with self._lock:
                self._count -= 1
            return
        with self._lock:
            arrived = self._arrived.setdefault(series_uid, {})
            if sop_uid in arrived:
                self._count -= 1  # a replaced instance: one slot, newest content
            arrived[sop_uid] = _Arrival(position, digest, path)
            self._remember(digest, decoded)
            stacks = self._stacks_ready(series_uid, sop_uid)
        for stack in stacks:
            try:
                self._infer_stack(series_uid, stack, {digest: decoded})
            except Exception as error:  # noqa: BLE001 - inferred again with the series
                log.info(
                    "streamed slice not inferred (%s); the series infers it", type(error).__name__
                )

    def _stacks_ready(
        self, series_uid: str, sop_uid: str
    ) -> list[tuple[tuple[str, _Arrival], ...]]:
        """The stacks (instances in position order, the centre in the middle) that the arrival of
        `sop_uid` completes or changes, and that were not inferred with exactly these slices."""
        arrived = self._arrived[series_uid]
        if not self._context:
            return [((sop_uid, arrived[sop_uid]),)]
        order = self._in_position_order(series_uid)
        at = next(k for k, (uid, _) in enumerate(order) if uid == sop_uid)
        done = self._done.get(series_uid, {})
        stacks = []
        for centre in range(at - self._context, at + self._context + 1):
            stack = self._stack_around(order, centre)
            if stack is None:
                continue  # not yet (or never: an end of the series, inferred with it)
            made = done.get(order[centre][0])
            if made is None or made.stack != _content(stack):
                stacks.append(stack)
        return stacks

    def _in_position_order(self, series_uid: str) -> list[tuple[str, _Arrival]]:
        """The series' arrivals along the slice normal (the caller holds the lock)."""
        return sorted(self._arrived[series_uid].items(), key=lambda item: item[1].position)

    def _stack_around(
        self, order: list[tuple[str, _Arrival]], centre: int
    ) -> tuple[tuple[str, _Arrival], ...] | None:
        """The stack centred on `order[centre]`, None while a side lacks `context` slices."""
        first, last = centre - self._context, centre + self._context
        if first < 0 or last >= len(order):
            return None
        return tuple(order[first : last + 1])

    def _still_current(self, series_uid: str, made: tuple[tuple[str, str], ...]) -> bool:
        """Whether the stack `made` ((UID, digest) in position order) is still the one the
        arrivals put around its centre (the caller holds the lock). Two workers may infer a
        centre's stack before and after a slice arrived between its neighbours; the one that
        finishes last must not replace the newer stack's labels with the older's."""
        arrived = self._arrived.get(series_uid)
        centre_uid, centre_digest = made[len(made) // 2]
        if arrived is None or centre_uid not in arrived:
            return False  # forgotten meanwhile
        if not self._context:
            return arrived[centre_uid].digest == centre_digest
        order = self._in_position_order(series_uid)
        at = next(k for k, (uid, _) in enumerate(order) if uid == centre_uid)
        stack = self._stack_around(order, at)
        return stack is not None and _content(stack) == made

    def _remember(self, digest: str, decoded: _Decoded) -> None:
        """Keep a decoded 2.5D slice for its neighbours' stacks (the caller holds the lock)."""
        if not self._context:
            return
        self._recent[digest] = decoded
        self._recent.move_to_end(digest)
        while len(self._recent) > RECENT_STACKS * stack_channels(self._context):
            self._recent.popitem(last=False)

    def _decoded(self, arrival: _Arrival, given: dict[str, _Decoded]) -> _Decoded:
        """The slice's HU and pixel size: just decoded, recently decoded, or read again."""
        with self._lock:
            known = given.get(arrival.digest) or self._recent.get(arrival.digest)
        if known is not None:
            return known
        decoded = _decode(_read(arrival.path, arrival.digest))
        with self._lock:
            self._remember(arrival.digest, decoded)
        return decoded

    def _infer_stack(
        self, series_uid: str, stack: tuple[tuple[str, _Arrival], ...], given: dict[str, _Decoded]
    ) -> None:
        decoded = [self._decoded(arrival, given) for _, arrival in stack]
        centre = len(stack) // 2
        pixel_mm = decoded[centre][1]
        hu = np.stack([image for image, _ in decoded])
        labels = np.empty(hu.shape, dtype=np.uint8)
        segment_slices(
            hu, [centre], labels, self._infer, self._input_size, pixel_mm, 1, 1, self._context
        )
        with self._lock:
            keeping_up = len(self._pending.get(series_uid, ())) <= self._measure_backlog
        sums = measure_slice(hu[centre], labels[centre], pixel_mm[0]) if keeping_up else None
        done = StreamedSlice.of(labels[centre], sums, _content(stack))
        with self._lock:
            if self._still_current(series_uid, done.stack):
                self._done.setdefault(series_uid, {})[stack[centre][0]] = done

    def _settled(self, series_uid: str, future: Future) -> None:
        with self._lock:
            self._pending.get(series_uid, set()).discard(future)

    def peek(self, series_uid: str, digests: dict[str, str]) -> dict[str, StreamedSlice]:
        """The series' slices made only of instances whose content is exactly `digests`
        (SOP UID -> digest), after the slices still in flight finish; the series stays cached
        (a head start may be discarded, and its series processed again)."""
        with self._lock:
            pending = list(self._pending.get(series_uid, ()))
        wait(pending)
        with self._lock:
            cached = dict(self._done.get(series_uid, {}))
        return {
            sop: done
            for sop, done in cached.items()
            if all(digests.get(uid) == digest for uid, digest in done.stack)
        }

    def take(self, series_uid: str, digests: dict[str, str]) -> dict[str, StreamedSlice]:
        """`peek`, then the series is forgotten."""
        done = self.peek(series_uid, digests)
        with self._lock:
            self._count -= len(self._arrived.pop(series_uid, {}))
            self._done.pop(series_uid, None)
            self._pending.pop(series_uid, None)
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


def _content(stack: tuple[tuple[str, _Arrival], ...]) -> tuple[tuple[str, str], ...]:
    """A stack's instances as (SOP Instance UID, content digest)."""
    return tuple((uid, arrival.digest) for uid, arrival in stack)


def _decode(dataset: Dataset) -> _Decoded:
    return slice_hu(dataset), (float(dataset.PixelSpacing[0]), float(dataset.PixelSpacing[1]))


def _read(path: Path, digest: str) -> Dataset:
    """The instance stored at `path`, if it still holds the content `digest`."""
    encoded = path.read_bytes()
    if hashlib.sha256(encoded).hexdigest() != digest:
        raise LookupError("replaced or removed since it was stored")
    return pydicom.dcmread(BytesIO(encoded))
