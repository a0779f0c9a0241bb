"""`thighseg segment`: many retrospective studies through the same Triton server.

Inputs are DICOM folders (one or more series each) and NIfTI volumes. Every study gets its own
output folder; a study whose report says done is skipped, so a killed run resumes where it stopped.
One study's failure never stops the cohort: it is reported and listed at the end. The cohort table
(results.csv, and results.parquet when pyarrow is installed) is rebuilt from every report.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import pydicom
from tqdm import tqdm

from thighseg.dicom_listener.validation import check_instance
from thighseg.pipeline.report import SeriesReport
from thighseg.pipeline.stages import InferenceSettings, process_nifti, process_series

NIFTI = re.compile(r"\.nii(\.gz)?$")


@dataclass(frozen=True)
class Study:
    key: str  # output folder name
    kind: str  # "dicom" | "nifti"
    paths: tuple[Path, ...]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80]


def discover(inputs: list[Path]) -> list[Study]:
    """DICOM series (grouped by SeriesInstanceUID within each folder) and NIfTI files."""
    studies: list[Study] = []
    for item in inputs:
        if item.is_file() and NIFTI.search(item.name):
            studies.append(Study(_safe(NIFTI.sub("", item.name)), "nifti", (item,)))
        elif item.is_dir():
            nifti = sorted(p for p in item.rglob("*") if p.is_file() and NIFTI.search(p.name))
            studies += [Study(_safe(NIFTI.sub("", p.name)), "nifti", (p,)) for p in nifti]
            series: dict[str, list[Path]] = {}
            for path in sorted(
                p for p in item.rglob("*") if p.is_file() and not NIFTI.search(p.name)
            ):
                try:
                    header = pydicom.dcmread(
                        path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]
                    )
                except Exception:  # not DICOM (truth files, notes): not a study
                    continue
                if "SeriesInstanceUID" in header:
                    series.setdefault(str(header.SeriesInstanceUID), []).append(path)
            for uid, paths in series.items():
                studies.append(Study(_safe(f"{item.name}_{uid[-12:]}"), "dicom", tuple(paths)))
        else:
            raise FileNotFoundError(f"{item} is neither a folder nor a NIfTI file")
    return studies


def _done(out_dir: Path, model: str) -> bool:
    """Done earlier with the same model (a folder made with another model is processed again)."""
    report = out_dir / "report.json"
    if not report.exists():
        return False
    earlier = SeriesReport.read(report)
    return earlier.done and earlier.model == model


def refusals(paths: tuple[Path, ...]) -> list[str]:
    """What the listener would refuse at C-STORE time in these files (the same checks, so batch
    mode accepts exactly what the listener accepts)."""
    found = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path)
            meta = ds.file_meta
            refusal = check_instance(
                str(meta.get("MediaStorageSOPClassUID", ds.get("SOPClassUID", ""))),
                str(ds.get("SOPInstanceUID", "")),
                ds,
                str(meta.get("TransferSyntaxUID", "")),
            )
        except Exception as error:  # noqa: BLE001 - unreadable file: refused like undecodable data
            found.append(f"{path.name}: cannot read ({type(error).__name__})")
            continue
        if refusal is not None:
            found.append(f"{path.name}: {refusal.detail}")
    return found


def process(study: Study, out_dir: Path, settings: InferenceSettings) -> SeriesReport:
    """One study through the pipeline's single path (DICOM series or NIfTI volume)."""
    if study.kind == "nifti":
        return process_nifti(study.paths[0], out_dir, settings).report
    refused = refusals(study.paths)
    if refused:
        reason = f"{len(refused)} of {len(study.paths)} instance(s) refused; first: {refused[0]}"
        report = SeriesReport(model=settings.model, reason=reason, instances=len(study.paths))
        report.write(out_dir / "report.json")
        return report
    return process_series(list(study.paths), out_dir, settings).report


def row(key: str, report: SeriesReport) -> dict:
    """One flat CSV row: identity, status, headline volumes, indices, QC codes."""
    out = {
        "study": key,
        "status": report.status,
        "reason": report.reason or "",
        "model": report.model,
        "thighseg_version": report.thighseg_version,
        "qc_flags": ";".join(f.code for f in report.qc_flags),
    }
    indices = report.indices
    if indices is not None:
        out.update(indices.headline())
        total = indices.total
        out.update(
            imat_fraction=total.imat_fraction,
            intermuscular_fat_fraction=total.intermuscular_fat_fraction,
            muscle_mean_hu=total.muscle.mean_hu,
            low_density_muscle_ml=total.muscle.low_density_ml,
            asymmetry_percent=indices.asymmetry_percent.muscle,
            muscle_volume_index_ml_per_m2=total.muscle_volume_index_ml_per_m2,
        )
        for leg in ("right", "left"):
            for group in ("extensor", "flexor", "adductor"):
                out[f"{leg}_{group}_ml"] = indices.leg(leg).tissue(group).total_ml
    return out


def write_table(out: Path) -> Path:
    rows = [
        row(path.parent.name, SeriesReport.read(path)) for path in sorted(out.glob("*/report.json"))
    ]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = out / "results.csv"
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    try:
        import pandas as pd

        pd.DataFrame(rows, columns=columns).to_parquet(out / "results.parquet")
    except ImportError:  # pandas/pyarrow are optional: the CSV is the cohort table
        pass
    return table


def run(
    inputs: list[Path], out: Path, settings: InferenceSettings
) -> tuple[list[str], list[tuple[str, str]]]:
    """Process every study not done yet; returns (processed keys, [(key, reason) of failures])."""
    studies = discover(inputs)
    out.mkdir(parents=True, exist_ok=True)
    processed, failures = [], []
    for study in tqdm(studies, desc="studies", unit="study"):
        target = out / study.key
        if _done(target, settings.model):
            continue
        report = process(study, target, settings)
        processed.append(study.key)
        if not report.done:
            failures.append((study.key, report.reason or "unknown"))
    write_table(out)
    return processed, failures
