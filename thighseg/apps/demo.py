"""`thighseg demo`: the whole product on one machine, with a synthetic study and its truth."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom

from thighseg.core.constants import DICOM_PORT
from thighseg.learning import models
from thighseg.measure.metrics import dice_per_group, group_volumes_ml
from thighseg.pipeline.loaders import labels_from_seg
from thighseg.serving.embedded_triton import EmbeddedTriton, Ports
from thighseg.synthetic import phantom
from thighseg.synthetic.ct_series import read_truth, write_series

log = logging.getLogger(__name__)


@dataclass
class DemoOptions:
    model: str = "segformer"
    seed: int = 42
    size: int = 512
    slices: int = 60
    slice_spacing: float = 5.0
    work_dir: Path | None = None
    ports: Ports = Ports()
    scp_port: int = DICOM_PORT
    repository: Path = models.REPOSITORY


def ensure_exported(model: str, repository: Path) -> Path:
    """Export the shipped weights to ONNX once; later runs reuse the file until the shipped
    weights change (a pull with new weights must not keep serving the old export)."""
    onnx_path = repository / models.triton_name(model) / "1" / "model.onnx"
    record = onnx_path.with_name("weights.json")
    shipped = hashlib.sha256(models.weights_path(model).read_bytes()).hexdigest()
    exported = json.loads(record.read_text()).get("sha256") if record.exists() else None
    if not onnx_path.exists() or exported != shipped:
        from thighseg.export.onnx_export import export_to_repository

        log.info("exporting %s to %s", model, onnx_path)
        export_to_repository(model, repository)
    return onnx_path


def run_demo(options: DemoOptions) -> dict:
    from thighseg.client.triton import TritonSegmenter
    from thighseg.dicom_listener.config import ListenerConfig
    from thighseg.dicom_listener.scu import send_files
    from thighseg.dicom_listener.service import Listener
    from thighseg.pipeline.stages import settings_for

    ensure_exported(options.model, options.repository)
    with tempfile.TemporaryDirectory(prefix="thighseg-demo-") as scratch:
        work = options.work_dir or Path(scratch)
        started = time.perf_counter()
        study = phantom.generate(
            options.seed,
            size=options.size,
            slices=options.slices,
            slice_spacing=options.slice_spacing,
        )
        series_dir = work / "study"
        paths = write_series(study, series_dir)
        print(
            f"phantom: seed {options.seed}, {options.slices} slices of {options.size}², "
            f"{time.perf_counter() - started:.1f} s"
        )
        with EmbeddedTriton(
            options.repository, options.ports, log_file=work / "triton.log"
        ) as server:
            print(
                f"triton: ready on http {options.ports.http}, grpc {options.ports.grpc}, "
                f"metrics {options.ports.metrics}"
            )
            segmenter = TritonSegmenter(server.http_url, models.triton_name(options.model))
            settings = settings_for(segmenter, options.model)
            config = ListenerConfig(
                spool_dir=work / "spool",
                output_dir=work / "results",
                host="127.0.0.1",
                port=options.scp_port,
                idle_s=1.0,
            )
            with Listener(config, settings) as listener:
                pushed = time.perf_counter()
                statuses = send_files(paths, "127.0.0.1", options.scp_port)
                if any(statuses):
                    raise RuntimeError(f"C-STORE failures: {sorted(set(statuses))}")
                series_uid = str(
                    pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID
                )
                result = listener.wait_for(series_uid, timeout_s=600)
                elapsed = time.perf_counter() - pushed
            segmenter.close()
        if result.report.status != "done":
            raise RuntimeError(f"series failed: {result.report.reason}")
        summary = summarise(result, series_dir, elapsed)
        if options.work_dir is None:
            summary["note"] = "outputs were in a temporary folder; pass --work DIR to keep them"
        return summary


def summarise(result, series_dir: Path, elapsed_s: float) -> dict:
    """Read the SEG back (as a viewer would) and compare it with the phantom's truth."""
    truth, uids = read_truth(series_dir)
    predicted = labels_from_seg(result.seg_path, uids)
    spacing = tuple(result.report.spacing_zyx_mm)
    return {
        "seconds_push_to_seg": round(elapsed_s, 2),
        "seg": str(result.seg_path),
        "report": str(result.report_path),
        "dice": dice_per_group(predicted, truth),
        "volumes_ml": result.report.volumes_ml,
        "truth_volumes_ml": group_volumes_ml(truth, spacing),
    }


def print_summary(summary: dict) -> None:
    print(f"\nSEG: {summary['seg']}\nreport: {summary['report']}")
    print(f"push to SEG: {summary['seconds_push_to_seg']} s\n")
    print(f"{'group':<14}{'predicted mL':>14}{'truth mL':>12}{'DSC':>8}")
    for group, volume in summary["volumes_ml"].items():
        dsc = summary["dice"].get(group)
        print(
            f"{group:<14}{volume:>14.1f}{summary['truth_volumes_ml'][group]:>12.1f}"
            f"{'' if dsc is None else f'{dsc:>8.3f}'}"
        )
