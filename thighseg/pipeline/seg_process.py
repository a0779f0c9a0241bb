"""The DICOM outputs are built and written in a process of their own (the SEG process) while this
one measures the study and renders the summary.

Building and encoding the SEG of a 300-slice study (1,800 frames with their per-frame items,
highdicom and pydicom) is ~1.3 s of pure Python. A thread could not overlap it with the measurement
(one GIL: 0.3-0.5 s saved, measured); a process does. The SR and the summary's Secondary Capture
follow it there once measured and rendered: highdicom's module tables (~65 MB, ~0.5 s to parse)
then stay loaded in that process alone, and this one never loads them. Every output's UIDs are
chosen before it exists, so the SR can reference the SEG and the report name them all meanwhile.
If the SEG process dies (killed for memory, say), an output is written in this process instead:
the optimisation never costs a result.
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
from typing import Protocol

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from thighseg.measure.indices import VolumeIndices
from thighseg.measure.qc import Flag
from thighseg.pipeline.outputs import (
    build_seg,
    save_seg,
    seg_reference,
    sided_labels,
    slim_sources,
    write_sr,
)
from thighseg.pipeline.summary import secondary_capture

log = logging.getLogger(__name__)

SEG_PROCESSES = 1  # each costs ~90 MB idle and the SEG-sized peak of its own; SEGs queue in it
LABELS_FILE = ".seg-labels.npy"  # group labels handed to the SEG process, beside the SEG

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
class SegJob:
    """Everything the SEG process needs (the sources: `slim_sources` headers)."""

    sources: list[Dataset]
    labels_file: Path
    midline: float  # where the legs are split into segments
    path: Path
    model: str
    algorithm_version: str | None
    series_instance_uid: str
    sop_instance_uid: str

    def run(self, labels: np.ndarray | None = None) -> None:
        """Build the SEG of group `labels` (by default the labels file) and write it to `path`;
        given labels become segment numbers in place (a study-sized copy less at the peak)."""
        labels = np.load(self.labels_file) if labels is None else labels
        seg = build_seg(
            self.sources,
            sided_labels(labels, self.midline, in_place=True),
            self.model,
            self.algorithm_version,
            self.series_instance_uid,
            self.sop_instance_uid,
        )
        save_seg(seg, self.path)


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
    series_instance_uid: str = field(default_factory=lambda: str(hd.UID()))
    sop_instance_uid: str = field(default_factory=lambda: str(hd.UID()))

    def run(self) -> None:
        """Build the SR and write it to `path`."""
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
    series_instance_uid: str = field(default_factory=lambda: str(hd.UID()))
    sop_instance_uid: str = field(default_factory=lambda: str(hd.UID()))

    def run(self) -> None:
        """Encode the PNG and write the SC to `path`."""
        secondary_capture(
            self.png, self.source, self.path, self.series_instance_uid, self.sop_instance_uid
        )


class OutputJob(Protocol):
    """An output written to `path` by `run`, in whichever process runs it."""

    path: Path

    def run(self) -> None:
        """Write the output."""


def _run(job: OutputJob) -> None:  # module level: what the SEG process is given to call
    job.run()


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
    return True


def warm() -> None:
    """Start the SEG processes now, so the first study does not wait for their imports."""
    with contextlib.suppress(BrokenProcessPool, RuntimeError):
        for _ in range(SEG_PROCESSES):
            _executor().submit(_ready)


@dataclass
class PendingSeg:
    """A SEG being written in the SEG process (or, with `labels`, to be written here): its
    identity now, its file once `wait` returns."""

    job: SegJob
    reference: Dataset  # for the SR: the SEG's study, series, SOP class and instance
    future: Future | None
    # group labels, when the SEG is written in this process: `wait` makes them segment numbers
    labels: np.ndarray | None = None
    written_here: bool = False

    def then(self, job: OutputJob) -> PendingOutput:
        """Start another output of the study where this SEG is written (after it, in the SEG
        process)."""
        return PendingOutput(job, None if self.labels is not None else _submit(job))

    def wait(self) -> Path:
        """The SEG file, written; by this process if the SEG process failed to."""
        if self.labels is not None:
            if not self.written_here:  # once: the labels are segment numbers afterwards
                self.job.run(self.labels)
                self.written_here = True
            return self.job.path
        try:
            return _result(self.job, self.future)
        finally:
            self.job.labels_file.unlink(missing_ok=True)

    def discard(self) -> None:
        """The series failed after the SEG was started: no SEG is left beside its report."""
        PendingOutput(self.job, self.future).discard()
        self.job.labels_file.unlink(missing_ok=True)


def start_seg(
    sources: list[Dataset],
    labels: np.ndarray,
    midline: float,
    path: Path,
    model: str,
    algorithm_version: str | None = None,
    separate_process: bool = True,
) -> PendingSeg:
    """Start writing the SEG of group labels (1-3), split into legs at the body `midline`, to
    `path` in the SEG process; without `separate_process`, `wait` writes it in this one (less
    memory, more time), turning `labels` into segment numbers in place: wait for it once they
    are no longer read."""
    if labels.shape[0] != len(sources):
        raise ValueError(f"{labels.shape[0]} mask slices for {len(sources)} source instances")
    path.parent.mkdir(parents=True, exist_ok=True)
    labels_file = path.parent / LABELS_FILE
    job = SegJob(
        slim_sources(sources),
        labels_file,
        midline,
        path,
        model,
        algorithm_version,
        str(hd.UID()),
        str(hd.UID()),
    )
    reference = seg_reference(sources[0], job.series_instance_uid, job.sop_instance_uid)
    if not separate_process:
        return PendingSeg(job, reference, None, labels)
    np.save(labels_file, labels)
    return PendingSeg(job, reference, _submit(job))
