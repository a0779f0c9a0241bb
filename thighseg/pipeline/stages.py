"""One series through the stages: assemble (DICOM) or load (NIfTI) -> infer -> measure -> emit.

Each stage is a plain function with declared inputs and outputs; `run_stages` wires them once for
both kinds of input and records how long each took, so a failure names its stage and the report
says where time went. `process_series` (DICOM: SEG, SR, summary, SC, overlay) and `process_nifti`
(labels as NIfTI, summary) differ only in how the volume is read and what is written.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

import thighseg
from thighseg.client.triton import TritonUnavailable
from thighseg.client.volume import InferFn, segment_slices
from thighseg.core.memory import release_free_heap, release_highdicom_tables
from thighseg.core.resample import stack_context
from thighseg.measure import qc
from thighseg.measure.anatomy import body_midline
from thighseg.measure.indices import indices_of
from thighseg.measure.metrics import volumes_ml
from thighseg.measure.sums import SliceSums, StudySums
from thighseg.pipeline.assemble import HUStack, SeriesError, Volume, assemble
from thighseg.pipeline.loaders import load_nifti_image, save_nifti_labels
from thighseg.pipeline.report import DONE, SeriesReport
from thighseg.pipeline.seg_process import PendingOutput, PendingSeg, ScJob, SrJob, prepare_seg
from thighseg.pipeline.streaming import StreamedSlice
from thighseg.pipeline.summary import Preview, render, write_overlay_png

log = logging.getLogger(__name__)


def _never_blocked() -> str | None:
    return None


@dataclass(frozen=True)
class InferenceSettings:
    """How the infer stage reaches the model: a batch function, the model's name and input size."""

    infer: InferFn
    model: str
    input_size: int
    context: int = 0  # neighbour slices on either side the model takes (2.5D); 0: 2D
    batch_size: int = 8
    concurrency: int = 4
    model_version: str | None = None  # the served version, recorded in reports and SEG
    weights_sha256: str | None = None
    tta: str = "none"  # what `infer` does around the model ("flip": mean with the mirror image)
    # why inference cannot run now (for /readyz), or None
    blocked: Callable[[], str | None] = _never_blocked


def settings_for(segmenter, model: str, **options) -> InferenceSettings:
    """Inference through a TritonSegmenter, at the input size the served model declares, pinned
    to the version it serves now (so every report names the version that made it)."""
    segmenter.version = segmenter.served_version()
    channels, size, _ = segmenter.input_shape()
    return InferenceSettings(
        segmenter.infer,
        model,
        size,
        context=stack_context(channels),
        blocked=segmenter.why_not_ready,
        model_version=segmenter.version,
        weights_sha256=segmenter.weights_sha256(segmenter.version),
        **options,
    )


# Failures of the machine, not of the series: the series is kept and tried again once they clear.
ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO, errno.ENOTDIR}
)


class Superseded(Exception):
    """The input changed while it was processed (checked between stages): the work is abandoned,
    nothing of it is kept."""


def _wanted() -> bool:
    return True


def is_environment_error(error: BaseException) -> bool:
    """A full or unwritable disk, as opposed to a series that cannot be processed."""
    return isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS


@dataclass(frozen=True)
class SeriesResult:
    """Where one input's results were written, and its report."""

    report_path: Path
    seg_path: Path | None  # None for a failed series or a NIfTI input
    report: SeriesReport


def short_uid(uid: str) -> str:
    """Last 8 characters: enough to tell series apart in logs without printing full identifiers."""
    return "…" + uid[-8:]


@dataclass
class LoadedVolume:
    """What the read stage hands on: the HU volume, its geometry and, for emit, where it came
    from."""

    hu: np.ndarray | HUStack  # (z, y, x)
    spacing_zyx: tuple[float, float, float]
    height_m: float | None  # PatientSize, for the height-normalised index
    origin: Any  # the assembled DICOM Volume, or the NIfTI affine


def infer_stage(
    hu: np.ndarray | HUStack,
    pixel_mm: tuple[float, float],
    settings: InferenceSettings,
    streamed: dict[int, StreamedSlice] | None = None,
) -> np.ndarray:
    """Labels (z, y, x) for the volume, in batches of slices through the inference server; slices
    already inferred as they arrived (`streamed`, by slice index) are not inferred again."""
    known = {k: done for k, done in (streamed or {}).items() if done.shape == hu.shape[1:]}
    labels = np.empty(hu.shape, dtype=np.uint8)
    for index, done in known.items():
        labels[index] = done.labels
    segment_slices(
        hu,
        [k for k in range(hu.shape[0]) if k not in known],
        labels,
        settings.infer,
        settings.input_size,
        pixel_mm,
        settings.batch_size,
        settings.concurrency,
        settings.context,
    )
    return labels


def measure_stage(
    report: SeriesReport,
    loaded: LoadedVolume,
    labels: np.ndarray,
    measured: dict[int, SliceSums],
    midline: float,
) -> None:
    """Group volumes, the full per-leg indices and the QC flags, into the report; slices measured
    as they arrived (`measured`, by slice index) are measured again only where the study's
    `midline` changes them."""
    study = StudySums.of(loaded.hu, labels, loaded.spacing_zyx[1], measured, midline)
    report.volumes_ml = volumes_ml(study.group_voxels(), loaded.spacing_zyx)
    report.indices = indices_of(study, loaded.spacing_zyx, loaded.height_m)
    report.qc_flags = qc.check_sums(study, loaded.spacing_zyx)


@dataclass
class StudyLabels:
    """The study's labels (z, y, x), held in one place from inference to the emitter, which
    `take`s them: once it has written them nothing keeps them, and the summary is drawn without
    them (~75 MB of a 300-slice 512² study; the listener's peak was there)."""

    array: np.ndarray | None

    def take(self) -> np.ndarray:
        """The labels, which this holder no longer keeps."""
        if self.array is None:
            raise RuntimeError("the study's labels were taken already")
        array, self.array = self.array, None
        return array


def _summary(
    report: SeriesReport, loaded: LoadedVolume, preview: Preview, out_dir: Path, title: str
) -> None:
    render(
        preview,
        loaded.spacing_zyx,
        report.indices,
        report.qc_flags,
        title,
        out_dir / "summary.png",
        out_dir / "summary.pdf",
    )


def algorithm_version(report: SeriesReport) -> str:
    """What the SEG names as the algorithm's version: package, served model version, weights."""
    parts = [thighseg.__version__]
    if report.model_version:
        parts.append(f"model v{report.model_version}")
    if report.weights_sha256:
        parts.append(f"weights sha256:{report.weights_sha256[:12]}")
    if report.tta != "none":
        parts.append(f"{report.tta} TTA")
    return " ".join(parts)[:64]  # LO


def seg_starter(separate_process: bool) -> EarlyStart:
    """The SEG's header needs only the sources: it is built, in the SEG process
    (`separate_process`), while the series is inferred and measured; the labels follow (to be
    written at emit in this process, without one)."""

    def start(report: SeriesReport, sources: list[Dataset], out_dir: Path) -> PendingSeg:
        return prepare_seg(
            sources,
            out_dir / "seg.dcm",
            report.model,
            algorithm_version(report),
            separate_process,
        )

    return start


def emit_dicom(
    report: SeriesReport,
    loaded: LoadedVolume,
    study_labels: StudyLabels,
    out_dir: Path,
    seg: PendingSeg,
) -> None:
    """SEG, SR, the one-page summary (PNG, PDF, DICOM SC) and the overlay. This process fills in
    the SEG's frames and lets go of the labels; then the SR and SC are encoded where the SEG's
    header was built (the SEG process, by default) while this process renders the pictures from
    the few planes they show (the two processes' larger needs never coincide). A failure here
    leaves none of the outputs."""
    volume: Volume = loaded.origin
    title = (
        f"Thigh muscle summary — {report.model}, {len(volume.sources)} slices, "
        f"study {short_uid(report.study_instance_uid or '')}"
    )
    sr_job = SrJob(
        seg.reference,
        seg.sources,  # slim: what the SR reads of them
        report.indices,
        out_dir / "sr.dcm",
        report.model,
        report.qc_flags,
        algorithm_version(report),
    )
    sc_job = ScJob(out_dir / "summary.png", volume.sources[0], out_dir / "summary_sc.dcm")
    labels = study_labels.take()
    started: list[PendingOutput] = []
    try:
        preview = Preview.of(loaded.hu, labels)  # the few planes the pictures show
        del labels  # the SEG holds them until it is written
        seg.wait()
        release_free_heap()  # the labels' pages, before the SR and the pictures take more
        started.append(seg.then(sr_job))
        _summary(report, loaded, preview, out_dir, title)
        write_overlay_png(preview, out_dir / "overlay.png")
        del preview
        started.append(seg.then(sc_job))
        for output in started:
            output.wait()
    except BaseException:
        for output in started:
            output.discard()
        raise
    release_highdicom_tables()  # loaded here only when the outputs were written here
    report.seg_sop_instance_uid = str(seg.reference.SOPInstanceUID)
    report.sr_sop_instance_uid = sr_job.sop_instance_uid
    report.sc_sop_instance_uid = sc_job.sop_instance_uid
    report.outputs = [
        "seg.dcm",
        "sr.dcm",
        "summary.png",
        "summary.pdf",
        "summary_sc.dcm",
        "overlay.png",
        "report.json",
    ]


def _nothing_early(*_: object) -> None:
    return None


def emit_nifti(
    report: SeriesReport, loaded: LoadedVolume, study_labels: StudyLabels, out_dir: Path, _: None
) -> None:
    """Labels as NIfTI in the image's own space, and the one-page summary."""
    labels = study_labels.take()
    save_nifti_labels(labels, loaded.origin, out_dir / "labels.nii.gz")
    preview = Preview.of(loaded.hu, labels)
    del labels
    _summary(
        report,
        loaded,
        preview,
        out_dir,
        f"Thigh muscle summary — {report.model}, {Path(report.source).name}",
    )
    report.outputs = ["labels.nii.gz", "summary.png", "summary.pdf", "report.json"]


def read_dicom(
    report: SeriesReport, paths: list[Path], out_dir: Path, sources_known: SourcesKnown
) -> LoadedVolume:
    """Assemble the series; the HU volume lives in a scratch file beside the results."""
    volume = assemble(paths, scratch=out_dir, sorted_headers=sources_known)
    first = volume.sources[0]
    report.study_instance_uid, report.series_instance_uid = (
        str(first.StudyInstanceUID),
        str(first.SeriesInstanceUID),
    )
    height = first.get("PatientSize")
    return LoadedVolume(volume.hu, volume.spacing_zyx, float(height) if height else None, volume)


def read_nifti(path: Path) -> LoadedVolume:
    """Load a NIfTI volume as HU in thighseg's array convention."""
    hu, spacing, affine = load_nifti_image(path)
    return LoadedVolume(hu, spacing, None, affine)


# told the source headers, in slice order, as soon as they are known (DICOM)
SourcesKnown = Callable[[list[Dataset]], None]
Reader = Callable[[SeriesReport, SourcesKnown], LoadedVolume]
# the SEG, started once the source headers are known (while the pixels are read) and given the
# labels and the body midline before measurement; it goes to the emitter
EarlyStart = Callable[[SeriesReport, list[Dataset], Path], PendingSeg | None]
Emitter = Callable[[SeriesReport, LoadedVolume, StudyLabels, Path, Any], None]


# slices inferred and measured as they arrived, by SOP Instance UID, asked for once assembled
Streamed = Callable[[], dict[str, StreamedSlice]]


def _none_streamed() -> dict[str, StreamedSlice]:
    return {}


def streamed_by_index(loaded: LoadedVolume, streamed: dict[str, StreamedSlice] | None) -> dict:
    """Streamed slices (by SOP Instance UID) by slice index of the assembled volume, those
    inferred with the very neighbours the volume puts around them (2.5D; a 2D slice's stack is
    itself)."""
    if not streamed or not isinstance(loaded.origin, Volume):
        return {}
    uids = [str(source.SOPInstanceUID) for source in loaded.origin.sources]

    def around(index: int, context: int) -> tuple[str, ...]:
        return tuple(
            uids[k] for k in range(index - context, index + context + 1) if 0 <= k < len(uids)
        )

    return {
        index: streamed[uid]
        for index, uid in enumerate(uids)
        if uid in streamed
        and streamed[uid].neighbours == around(index, len(streamed[uid].neighbours) // 2)
    }


def run_stages(
    report: SeriesReport,
    read: Reader,
    emit: Emitter,
    out_dir: Path,
    settings: InferenceSettings,
    streamed_slices: Streamed = _none_streamed,
    start_early: EarlyStart = _nothing_early,
    still_wanted: Callable[[], bool] = _wanted,
) -> SeriesResult:
    """Run every stage; an input that cannot be processed still gets a report with the reason.

    TritonUnavailable and environment errors (disk full, folder not writable) are not properties
    of the input: they propagate so the caller can keep it queued and try again later. So does
    Superseded, raised before a stage once `still_wanted()` says the result would not be used.
    """
    stage, early = "assemble", None

    def sources_known(sources: list[Dataset]) -> None:
        nonlocal early
        early = start_early(report, sources, out_dir)

    def timed(name: str, work: Callable, *args):
        nonlocal stage
        if not still_wanted():
            raise Superseded(f"input changed before {name}")
        stage, started = name, time.perf_counter()
        result = work(*args)
        release_free_heap()  # what the stage freed leaves the process before the next one allocates
        report.stage_seconds[name] = round(time.perf_counter() - started, 4)
        return result

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        loaded = timed("assemble", read, report, sources_known)
        report.shape_zyx, report.spacing_zyx_mm = list(loaded.hu.shape), list(loaded.spacing_zyx)
        streamed = streamed_by_index(loaded, streamed_slices())  # the last ones finished meanwhile
        # no local of their own, which would keep the labels alive through the emitter
        labels = StudyLabels(
            timed("infer", infer_stage, loaded.hu, loaded.spacing_zyx[1:], settings, streamed)
        )
        measured = {i: done.sums for i, done in streamed.items() if done.sums is not None}
        midline = body_midline(loaded.hu, {z: sums.body for z, sums in measured.items()})
        if early is not None:
            early.label(labels.array, midline)
        timed("measure", measure_stage, report, loaded, labels.array, measured, midline)
        timed("emit", emit, report, loaded, labels, out_dir, early)
        early = None  # the emitter has used it
        report.status = DONE
    except SeriesError as error:
        report.reason = str(error)
    except (TritonUnavailable, Superseded):
        raise
    except Exception as error:  # any stage failure is reported, never lost
        if is_environment_error(error):
            raise
        log.exception("input failed in stage %s", stage)
        report.reason = f"{stage} failed: {type(error).__name__}: {error}"
    finally:
        if early is not None:  # started, never emitted: nothing of it stays beside a failure
            early.discard()
    report_path = out_dir / "report.json"
    report.write(report_path)
    seg_path = out_dir / "seg.dcm" if report.done and "seg.dcm" in report.outputs else None
    return SeriesResult(report_path=report_path, seg_path=seg_path, report=report)


def process_series(
    instance_paths: list[Path],
    out_dir: Path,
    settings: InferenceSettings,
    provenance: dict | None = None,
    streamed_slices: Streamed = _none_streamed,
    seg_process: bool = True,
    still_wanted: Callable[[], bool] = _wanted,
) -> SeriesResult:
    """A DICOM CT series -> SEG, SR, summary, SC, overlay, report. `provenance` (the listener's
    content hash and generation of the inputs) is recorded in the report as given;
    `streamed_slices()` gives the slices inferred and measured as they arrived (by SOP Instance
    UID), once assembled: the last of them finish meanwhile;
    `seg_process`: the SEG is written in the SEG process during measurement; `still_wanted`:
    checked before each stage (see run_stages)."""
    report = SeriesReport(
        model=settings.model,
        model_version=settings.model_version,
        weights_sha256=settings.weights_sha256,
        tta=settings.tta,
        instances=len(instance_paths),
        **(provenance or {}),
    )
    return run_stages(
        report,
        lambda r, known: read_dicom(r, instance_paths, out_dir, known),
        emit_dicom,
        out_dir,
        settings,
        streamed_slices,
        seg_starter(seg_process),
        still_wanted,
    )


def process_nifti(path: Path, out_dir: Path, settings: InferenceSettings) -> SeriesResult:
    """A NIfTI volume -> labels (NIfTI), summary, report."""
    report = SeriesReport(
        model=settings.model,
        model_version=settings.model_version,
        weights_sha256=settings.weights_sha256,
        tta=settings.tta,
        source=str(path),
    )
    return run_stages(report, lambda *_: read_nifti(path), emit_nifti, out_dir, settings)
