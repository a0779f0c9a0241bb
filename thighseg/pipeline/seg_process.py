"""The DICOM outputs are built in a process of their own (the SEG process) while this one infers,
measures the study and renders the summary.

Building and encoding the SEG of a 300-slice study (1,800 frames with their per-frame items,
highdicom and pydicom) is ~1.5 s of pure Python. A thread could not overlap it with the measurement
(one GIL: 0.3-0.5 s saved, measured); a process does. It builds the SEG's header as soon as the
series is assembled (`seg_header`: everything but the frames follows from the sources), and once
the labels are known this process fills the frames in (~0.1 s), and the SEG process then writes
the SR and the summary's Secondary Capture. highdicom's module tables (~65 MB, ~0.25 s to parse)
are loaded in that process alone, and let go after the header and after the SC: while the study
is inferred and measured (the pod's peak) it holds ~110 MB, not ~175. Every output's UIDs are chosen
before it exists, so the SR can reference the SEG and the report name them all meanwhile. If the
SEG process dies (killed for memory, say), an output is written in this process instead: the
optimisation never costs a result.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from thighseg.core.memory import release_free_heap, release_highdicom_tables
from thighseg.measure.indices import VolumeIndices
from thighseg.measure.qc import Flag
from thighseg.pipeline.seg_header import SegHeader
from thighseg.pipeline.seg_inputs import seg_reference, sided_labels, slim_sources
from thighseg.pipeline.summary import secondary_capture

log = logging.getLogger(__name__)

SEG_PROCESSES = 1  # each costs ~90 MB idle and the SEG-sized peak of its own; SEGs queue in it
HEADER_FILE = ".seg-header.npz"  # the SEG's header built ahead of its labels, beside the SEG

_pool: ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ProcessPoolExecutor(
                SEG_PROCESSES,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_exit_with_parent,
                initargs=(os.getpid(),),
            )
        return _pool


def _exit_with_parent(parent: int) -> None:
    """In each SEG process: end when the process that started it is gone (even killed with -9,
    which leaves no chance to shut the pool down)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _forget_broken_pool() -> None:
    global _pool
    with _pool_lock:
        _pool = None


@dataclass(frozen=True)
class SegHeaderJob:
    """The SEG's sources (`slim_sources` headers) and identity; `run` builds its header
    (`seg_header`) while the study is still inferred and measured."""

    sources: list[Dataset]
    path: Path  # the header file, beside the SEG
    model: str
    algorithm_version: str | None
    series_instance_uid: str
    sop_instance_uid: str
    keeps_tables: ClassVar[bool] = False  # the SR comes only once the study is measured

    def build(self) -> SegHeader:
        """The header, built in this process."""
        return SegHeader.of(
            self.sources,
            self.model,
            self.algorithm_version,
            self.series_instance_uid,
            self.sop_instance_uid,
        )

    def run(self) -> None:
        """Build the header and save it beside the SEG-to-be, for the listener to fill in."""
        self.build().save(self.path)

    def built(self) -> SegHeader | None:
        """The header, if it was built for this very SEG."""
        try:
            header = SegHeader.load(self.path)
        except FileNotFoundError:
            return None
        return header if header.sop_instance_uid == self.sop_instance_uid else None


@dataclass(frozen=True)
class SrJob:
    """The SR of a measured study, referencing a SEG by the identity chosen for it."""

    seg: Dataset
    sources: list[Dataset]
    indices: VolumeIndices
    path: Path
    model: str
    flags: list[Flag]
    algorithm_version: str | None
    series_instance_uid: str = field(default_factory=generate_uid)
    sop_instance_uid: str = field(default_factory=generate_uid)
    keeps_tables: ClassVar[bool] = True  # the SC follows at once

    def run(self) -> None:
        """Build the SR and write it to `path`."""
        from thighseg.pipeline.outputs import write_sr  # highdicom: in the SEG process alone

        write_sr(
            self.seg,
            self.sources,
            self.indices,
            self.path,
            self.model,
            self.flags,
            self.algorithm_version,
            self.series_instance_uid,
            self.sop_instance_uid,
        )


@dataclass(frozen=True)
class ScJob:
    """The summary page (a PNG already rendered) as a Secondary Capture in the source's study."""

    png: Path
    source: Dataset
    path: Path
    series_instance_uid: str = field(default_factory=generate_uid)
    sop_instance_uid: str = field(default_factory=generate_uid)
    keeps_tables: ClassVar[bool] = False  # the study's last output

    def run(self) -> None:
        """Encode the PNG and write the SC to `path`."""
        secondary_capture(
            self.png, self.source, self.path, self.series_instance_uid, self.sop_instance_uid
        )


class OutputJob(Protocol):
    """An output written to `path` by `run`, in whichever process runs it; `keeps_tables`: the
    SEG process keeps highdicom's tables after it, for another output about to follow."""

    path: Path
    keeps_tables: ClassVar[bool]

    def run(self) -> None:
        """Write the output."""


def _run(job: OutputJob) -> None:  # module level: what the SEG process is given to call
    job.run()
    if not job.keeps_tables:
        release_highdicom_tables()
    release_free_heap()


def _submit(job: OutputJob) -> Future | None:
    """The job running in the SEG process; None when no SEG process can be started."""
    try:
        return _executor().submit(_run, job)
    except (BrokenProcessPool, RuntimeError) as error:  # RuntimeError: shut down at exit
        log.warning("SEG process unavailable (%s): a fresh one serves the next study", error)
        _forget_broken_pool()
        return None


def _result(job: OutputJob, future: Future | None) -> Path:
    """The job's output once its future is done; written here if the SEG process failed to."""
    try:
        if future is None:
            raise BrokenProcessPool("it was not handed to one")
        future.result()
    except BrokenProcessPool as error:
        log.warning(
            "SEG process unavailable (%s): writing %s in this process", error, job.path.name
        )
        _forget_broken_pool()
        job.run()
    return job.path


@dataclass
class PendingOutput:
    """An output being written in the SEG process, or (without a future) to be written here."""

    job: OutputJob
    future: Future | None

    def wait(self) -> Path:
        """The output file, written."""
        if self.future is None:
            self.job.run()
            return self.job.path
        return _result(self.job, self.future)

    def discard(self) -> None:
        """The series failed after the output was started: no file of it is left."""
        if self.future is not None:
            with contextlib.suppress(Exception):
                self.future.result()
        self.job.path.unlink(missing_ok=True)


def _ready() -> bool:
    """Run in a SEG process at its start: it imports what its outputs need (highdicom) then,
    not while the first study's header is built."""
    from thighseg.pipeline import outputs  # noqa: F401 - imported for its import's sake

    return True


def warm() -> None:
    """Start the SEG processes now, so the first study does not wait for their imports."""
    with contextlib.suppress(BrokenProcessPool, RuntimeError):
        for _ in range(SEG_PROCESSES):
            _executor().submit(_ready)


@dataclass
class PendingSeg:
    """A SEG whose identity is known now and whose header is being built in the SEG process;
    `label` gives it its labels and `wait` writes it in this process (and lets go of them): the
    header's frames filled in (~0.1 s of a 300-slice study, before the SR is started);
    where no header was built (no SEG process, or it failed to), the header is built here first:
    one way to write a SEG either way."""

    header: SegHeaderJob
    reference: Dataset  # for the SR: the SEG's study, series, SOP class and instance
    path: Path
    separate_process: bool  # the SEG's header, SR and SC are written in the SEG process
    header_future: Future | None = None
    labels: np.ndarray | None = None
    midline: float | None = None
    written: bool = False

    @property
    def sources(self) -> list[Dataset]:
        """The slim source headers (what the SR reads of them)."""
        return self.header.sources

    def label(self, labels: np.ndarray, midline: float) -> None:
        """The group labels (1-3), and the body `midline` that splits them into legs; `wait`
        makes them segment numbers in place: wait once they are no longer read."""
        if labels.shape[0] != len(self.sources):
            raise ValueError(f"{labels.shape[0]} mask slices for {len(self.sources)} sources")
        self.labels, self.midline = labels, midline

    def then(self, job: OutputJob) -> PendingOutput:
        """Start another output of the study where the SEG's header is built (after it, in the
        SEG process)."""
        return PendingOutput(job, _submit(job) if self.separate_process else None)

    def wait(self) -> Path:
        """The SEG file, written (once: the labels are segment numbers afterwards, and no longer
        kept here)."""
        if self.written:
            return self.path
        if self.labels is None or self.midline is None:
            raise RuntimeError("the SEG was never given its labels")
        try:
            self._write(sided_labels(self.labels, self.midline, in_place=True))
        finally:
            self.header.path.unlink(missing_ok=True)
        self.written, self.labels = True, None
        return self.path

    def discard(self) -> None:
        """The series failed after the SEG was started: no SEG is left beside its report."""
        if self.header_future is not None:
            with contextlib.suppress(Exception):
                self.header_future.result()
        self.path.unlink(missing_ok=True)
        self.header.path.unlink(missing_ok=True)

    def _write(self, sided: np.ndarray) -> None:
        (self._built_header() or self.header.build()).write(sided, self.path)

    def _built_header(self) -> SegHeader | None:
        """The header built in the SEG process (here, if the SEG process died), once it is; None
        without a SEG process or where building it failed (a failure costs time, never the SEG:
        it is said, and the header built here)."""
        if self.header_future is None:
            return None
        try:
            _result(self.header, self.header_future)
        except Exception as error:  # noqa: BLE001 - built here, where it fails for real
            log.warning(
                "SEG header not built ahead (%s: %s): it is built here",
                type(error).__name__,
                error,
            )
            return None
        return self.header.built()


def prepare_seg(
    sources: list[Dataset],
    path: Path,
    model: str,
    algorithm_version: str | None = None,
    separate_process: bool = True,
) -> PendingSeg:
    """A SEG of these sources to be written to `path`: its identity chosen now, its header
    built in the SEG process (`separate_process`) while the study is inferred and measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = SegHeaderJob(
        slim_sources(sources),
        path.parent / HEADER_FILE,
        model,
        algorithm_version,
        generate_uid(),
        generate_uid(),
    )
    reference = seg_reference(sources[0], header.series_instance_uid, header.sop_instance_uid)
    future = _submit(header) if separate_process else None
    return PendingSeg(header, reference, path, separate_process, future)
