"""One complete series through the stages: assemble -> infer -> measure -> emit.

Each stage is a plain function with declared inputs and outputs; `process_series` wires them and
records how long each took, so a failure names its stage and the report says where time went.
"""
from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from thighseg.client.triton import TritonUnavailable
from thighseg.client.volume import segment_volume
from thighseg.dicom_listener.assemble import SeriesError, Volume, assemble
from thighseg.dicom_listener.outputs import write_overlay_png, write_report, write_seg, write_sr
from thighseg import qc
from thighseg.indices import volume_indices
from thighseg.memory import release_free_heap, release_highdicom_tables
from thighseg.metrics import group_volumes_ml
from thighseg.summary import Preview, render, secondary_capture

log = logging.getLogger(__name__)

InferFn = Callable[[np.ndarray], np.ndarray]


def _always_ready() -> bool:
    return True


@dataclass(frozen=True)
class InferenceSettings:
    infer: InferFn
    model: str
    input_size: int
    batch_size: int = 8
    concurrency: int = 4
    ready: Callable[[], bool] = _always_ready  # is the inference server reachable (for /readyz)


def settings_for(segmenter, model: str, **options) -> InferenceSettings:
    """Inference through a TritonSegmenter, at the input size the served model declares."""
    return InferenceSettings(segmenter.infer, model, segmenter.input_shape()[1], ready=segmenter.is_ready, **options)


# Failures of the machine, not of the series: the series is kept and tried again once they clear.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO,
                                errno.ENOTDIR})


def is_environment_error(error: BaseException) -> bool:
    """A full or unwritable disk, as opposed to a series that cannot be processed."""
    return isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS


@dataclass(frozen=True)
class SeriesResult:
    report_path: Path
    seg_path: Path | None
    report: dict


def short_uid(uid: str) -> str:
    """Last 8 characters: enough to tell series apart in logs without printing full identifiers."""
    return "…" + uid[-8:]


def infer_stage(hu: np.ndarray, settings: InferenceSettings) -> np.ndarray:
    return segment_volume(hu, settings.infer, settings.input_size, settings.batch_size, settings.concurrency)


def measure_stage(hu: np.ndarray, labels: np.ndarray, spacing_zyx: tuple[float, float, float],
                  height_m: float | None = None) -> dict:
    """Group volumes, the full per-leg indices and the QC flags."""
    return {"volumes_ml": group_volumes_ml(labels, spacing_zyx),
            "indices": volume_indices(hu, labels, spacing_zyx, height_m),
            "qc_flags": [f.as_dict() for f in qc.check(hu, labels, spacing_zyx)]}


def emit_stage(volume: Volume, labels: np.ndarray, report: dict, out_dir: Path, model: str) -> dict:
    """SEG, SR, the one-page summary (PNG, PDF, DICOM SC) and the overlay; returns report additions."""
    flags = [qc.Flag(**f) for f in report["qc_flags"]]
    title = f"Thigh muscle summary — {model}, {len(volume.sources)} slices, study {short_uid(report['study_instance_uid'])}"
    preview = Preview.of(volume.hu, labels)  # the pictures need only a few planes of the HU volume
    summary = render(preview, volume.spacing_zyx, report["indices"], flags, title, out_dir / "summary.png",
                     out_dir / "summary.pdf")
    write_overlay_png(preview, out_dir / "overlay.png")
    del preview
    release_free_heap()  # the SEG is the largest allocation of the study: make room for it
    seg = write_seg(volume.sources, labels, out_dir / "seg.dcm", model)
    sr = write_sr(seg, volume.sources, report["volumes_ml"], out_dir / "sr.dcm", model, flags)
    sc = secondary_capture(summary, volume.sources[0], out_dir / "summary_sc.dcm")
    release_highdicom_tables()
    return {"seg_sop_instance_uid": str(seg.SOPInstanceUID), "sr_sop_instance_uid": str(sr.SOPInstanceUID),
            "sc_sop_instance_uid": str(sc.SOPInstanceUID),
            "outputs": ["seg.dcm", "sr.dcm", "summary.png", "summary.pdf", "summary_sc.dcm", "overlay.png",
                        "report.json"]}


def process_series(instance_paths: list[Path], out_dir: Path, settings: InferenceSettings,
                   provenance: dict | None = None) -> SeriesResult:
    """Run every stage; a series that cannot be processed still gets a report with the reason.

    TritonUnavailable and environment errors (disk full, folder not writable) are not properties
    of the series: they propagate so the caller can keep the series queued and try again later.
    `provenance` (e.g. the content hash of the inputs) is recorded in the report as given.
    """
    timings: dict[str, float] = {}
    report: dict = {"model": settings.model, "instances": len(instance_paths), "status": "failed",
                    **(provenance or {})}
    stage = "assemble"

    def timed(name: str, work: Callable, *args, **options):
        nonlocal stage
        stage, started = name, time.perf_counter()
        result = work(*args, **options)
        release_free_heap()  # what the stage freed leaves the process before the next one allocates
        timings[name] = time.perf_counter() - started
        return result

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        volume = timed("assemble", assemble, instance_paths, scratch=out_dir)  # HU on disk beside the results
        first = volume.sources[0]
        report.update(study_instance_uid=str(first.StudyInstanceUID),
                      series_instance_uid=str(first.SeriesInstanceUID),
                      shape_zyx=list(volume.hu.shape), spacing_zyx_mm=list(volume.spacing_zyx))
        labels = timed("infer", infer_stage, volume.hu, settings)
        height = first.get("PatientSize")
        report.update(timed("measure", measure_stage, volume.hu, labels, volume.spacing_zyx,
                            float(height) if height else None))
        report.update(timed("emit", emit_stage, volume, labels, report, out_dir, settings.model))
        report["status"] = "done"
    except SeriesError as error:
        report["reason"] = str(error)
    except TritonUnavailable:
        raise
    except Exception as error:  # any stage failure is reported, never lost
        if is_environment_error(error):
            raise
        log.exception("series failed in stage %s", stage)
        report["reason"] = f"{stage} failed: {type(error).__name__}: {error}"
    report["stage_seconds"] = {k: round(v, 4) for k, v in timings.items()}
    report_path = out_dir / "report.json"
    write_report(report, report_path)
    return SeriesResult(report_path=report_path,
                        seg_path=out_dir / "seg.dcm" if report["status"] == "done" else None, report=report)
