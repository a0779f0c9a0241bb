"""`thighseg dataset import`: users' labelled CT into a thighseg dataset, every case checked.

Sources: an nnU-Net v2 raw dataset (dataset.json, imagesTr/*_0000.nii.gz, labelsTr/), a folder of
NIfTI pairs (images/<case>.nii.gz + labels/<case>.nii.gz), DICOM CT series with DICOM SEG objects
that reference them (any folder tree), or 3D Slicer segmentations (<case>.seg.nrrd beside the CT
<case>.nrrd, read with pynrrd; segment names from the Slicer header). A label map (YAML or JSON)
says which source labels (values, or names from dataset.json, SEG or Slicer segments) make up each
group:

    extensor: [1, 2, vastus_lateralis]
    flexor: [3]
    adductor: [4, 5]
    ignore: [9]          # excluded from the loss and the metrics
    background: [6]      # value 0 is always background
    unmapped: error      # or "background" / "ignore": what happens to labels listed nowhere

A case that fails a check gets one line in the import report and the import goes on; a case is
written completely (temporary file, then rename) or not at all, and the manifest lists only
written cases.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from thighseg.core.labels import Group
from thighseg.learning.dataset import (
    IGNORE,
    CaseRecord,
    Manifest,
    read_manifest,
    write_case,
    write_manifest,
)

TARGETS = {
    "extensor": int(Group.EXTENSOR),
    "flexor": int(Group.FLEXOR),
    "adductor": int(Group.ADDUCTOR),
    "background": 0,
    "ignore": IGNORE,
}
SPACING_RANGE_MM = (0.2, 10.0)  # in-plane; z may be up to 20 mm
SLICE_SPACING_MAX_MM = 20.0


class CaseError(ValueError):
    """A case that cannot be imported, with the reason a user can act on."""


@dataclass(frozen=True)
class LabelMap:
    by_value: dict[int, int]
    by_name: dict[str, int]
    unmapped: str = "error"

    @staticmethod
    def load(path: Path) -> LabelMap:
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            try:
                spec = yaml.safe_load(text)
            except yaml.YAMLError as error:
                mark = getattr(error, "problem_mark", None)
                where = f" (line {mark.line + 1})" if mark is not None else ""
                raise ValueError(f"{path}: not valid YAML{where}") from None
        else:
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: not valid JSON (line {error.lineno})") from None
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: expected a mapping of group -> source labels")
        unmapped = str(spec.pop("unmapped", "error"))
        if unmapped not in ("error", "background", "ignore"):
            raise ValueError(f"{path}: unmapped must be error, background or ignore")
        unknown = set(spec) - set(TARGETS)
        if unknown:
            raise ValueError(
                f"{path}: unknown target(s) {', '.join(sorted(unknown))}; use {', '.join(TARGETS)}"
            )
        by_value: dict[int, int] = {0: 0}
        by_name: dict[str, int] = {}
        owner: dict[int | str, str] = {}
        for target, sources in spec.items():
            for source in sources if isinstance(sources, list) else [sources]:
                numeric = isinstance(source, int) or (isinstance(source, str) and source.isdigit())
                key: int | str = int(source) if numeric else str(source).lower()
                if key in owner and owner[key] != target:
                    raise ValueError(
                        f"{path}: {source!r} is mapped to both {owner[key]} and {target}"
                    )
                owner[key] = target
                (by_value if numeric else by_name)[key] = TARGETS[target]  # type: ignore[index]
        return LabelMap(by_value, by_name, unmapped)

    def as_dict(self) -> dict:
        return {"by_value": self.by_value, "by_name": self.by_name, "unmapped": self.unmapped}

    def resolve(self, names: dict[str, int]) -> dict[int, int]:
        """Value -> target, with source names (e.g. dataset.json labels) turned into values."""
        table = dict(self.by_value)
        for name, value in names.items():
            if name.lower() in self.by_name:
                table[int(value)] = self.by_name[name.lower()]
        return table

    def apply(self, raw: np.ndarray, table: dict[int, int]) -> np.ndarray:
        present = [int(v) for v in np.unique(raw)]
        missing = [v for v in present if v not in table]
        if missing and self.unmapped == "error":
            raise CaseError(
                f"label value(s) {', '.join(map(str, missing))} not in the label map "
                "(map them to a group, background or ignore, or set unmapped)"
            )
        fallback = 0 if self.unmapped != "ignore" else IGNORE
        lookup = np.full(max(present) + 1, fallback, dtype=np.uint8) if present else None
        if lookup is None:
            return np.zeros(raw.shape, np.uint8)
        for value, target in table.items():
            if 0 <= value < len(lookup):
                lookup[value] = target
        if raw.min() < 0:
            raise CaseError(f"negative label value {int(raw.min())}")
        return lookup[raw]


@dataclass
class SourceCase:
    """One case found in a source, loaded lazily (so a bad file fails only its own case)."""

    case_id: str
    source: str
    load: object  # () -> (hu, raw labels, spacing, names)


@dataclass
class ImportReport:
    written: list[CaseRecord] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (case id, reason)

    def table(self) -> str:
        lines = [
            f"{'case':<28} {'status':<8} detail",
            *(
                f"{r.case_id:<28} {'ok':<8} {r.shape[0]} slices, "
                f"{r.spacing_zyx[1]:.2f}×{r.spacing_zyx[2]:.2f}×{r.spacing_zyx[0]:.2f} mm, "
                + ", ".join(f"{k} {v}" for k, v in r.voxels_per_label.items() if v)
                for r in self.written
            ),
            *(f"{case:<28} {'failed':<8} {reason}" for case, reason in self.failed),
            f"{len(self.written)} case(s) imported, {len(self.failed)} failed",
        ]
        return "\n".join(lines)


# --- sources -----------------------------------------------------------------------------------


def nnunet_cases(root: Path) -> Iterator[SourceCase]:
    """nnU-Net v2 raw: dataset.json names the labels, imagesTr/<case>_0000<ending>."""
    from thighseg.pipeline.loaders import load_nifti_raw_pair

    spec = json.loads((root / "dataset.json").read_text())
    ending = spec.get("file_ending", ".nii.gz")
    names = {str(k): int(v) for k, v in spec.get("labels", {}).items() if not isinstance(v, list)}
    channels = spec.get("channel_names") or spec.get("modality") or {"0": "CT"}
    if len(channels) != 1:
        raise ValueError(f"{root}: {len(channels)} input channels; thighseg takes one CT channel")
    images = sorted((root / "imagesTr").glob(f"*_0000{ending}"))
    for image in images:
        case_id = image.name[: -len(f"_0000{ending}")]
        label = root / "labelsTr" / f"{case_id}{ending}"

        def load(image=image, label=label):
            if not label.is_file():
                raise CaseError(f"label file missing: labelsTr/{label.name}")
            hu, raw, spacing = _read_pair(load_nifti_raw_pair, image, label)
            return hu, raw, spacing, names

        yield SourceCase(case_id, str(image), load)
    labels = {label.name[: -len(ending)]: label for label in (root / "labelsTr").glob(f"*{ending}")}
    yield from _orphans(labels, {i.name[: -len(f"_0000{ending}")] for i in images}, "imagesTr")


def nifti_pair_cases(root: Path) -> Iterator[SourceCase]:
    """images/<case>.nii(.gz) with labels/<case>.nii(.gz)."""
    from thighseg.pipeline.loaders import load_nifti_raw_pair

    images = sorted((root / "images").glob("*.nii*"))
    for image in images:
        case_id = image.name.split(".nii")[0]
        candidates = list((root / "labels").glob(f"{case_id}.nii*"))

        def load(image=image, candidates=candidates):
            if not candidates:
                raise CaseError(f"label file missing: labels/{image.name}")
            hu, raw, spacing = _read_pair(load_nifti_raw_pair, image, candidates[0])
            return hu, raw, spacing, {}

        yield SourceCase(case_id, str(image), load)
    labels = {label.name.split(".nii")[0]: label for label in (root / "labels").glob("*.nii*")}
    yield from _orphans(labels, {image.name.split(".nii")[0] for image in images}, "images")


def _orphans(labels: dict[str, Path], images: set[str], folder: str) -> Iterator[SourceCase]:
    """Label files (by case id) without an image: failed cases in the report, never skipped
    silently."""
    for case_id, label in sorted(labels.items()):
        if case_id not in images:

            def load(label=label):
                raise CaseError(f"image file missing for {label.name} (nothing in {folder}/)")

            yield SourceCase(case_id, str(label), load)


def _read_pair(reader, image: Path, label: Path):
    try:
        return reader(image, label)
    except ValueError as error:
        raise CaseError(str(error)) from error


def dicom_seg_cases(root: Path) -> Iterator[SourceCase]:
    """DICOM SEG objects and the CT series they reference, anywhere under `root`."""
    import pydicom

    series: dict[str, list[Path]] = {}
    segs: list[tuple[Path, pydicom.Dataset]] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not DICOM: not ours to import
            continue
        if header.get("Modality") == "SEG":
            segs.append((path, header))
        elif header.get("Modality") == "CT":
            series.setdefault(str(header.SeriesInstanceUID), []).append(path)
    for seg_path, header in segs:
        referenced = _referenced_series(header)

        def load(seg_path=seg_path, referenced=referenced):
            if referenced not in series:
                raise CaseError(
                    f"{seg_path.name} references series …{referenced[-12:]}, "
                    "which is not among the CT series found"
                )
            return _load_dicom_seg(series[referenced], seg_path)

        yield SourceCase(f"{header.get('PatientID', 'case')}_{seg_path.stem}", str(seg_path), load)


def _referenced_series(header) -> str:
    for item in header.get("ReferencedSeriesSequence", []):
        return str(item.SeriesInstanceUID)
    return ""


def _load_dicom_seg(files: list[Path], seg_path: Path):
    import highdicom as hd

    from thighseg.pipeline.assemble import assemble

    volume = assemble(files)
    seg = hd.seg.segread(seg_path)
    uids = [s.SOPInstanceUID for s in volume.sources]
    raw = np.zeros(volume.hu.shape, np.int32)
    names: dict[str, int] = {}
    for number in seg.segment_numbers:
        names[str(seg.get_segment_description(number).SegmentLabel)] = int(number)
        mask = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, segment_numbers=[number], combine_segments=True
        )
        raw[np.asarray(mask) > 0] = number
    return volume.hu, raw, volume.spacing_zyx, names


def slicer_cases(root: Path) -> Iterator[SourceCase]:
    """3D Slicer segmentations: <case>.seg.nrrd beside its CT volume <case>.nrrd or .nii(.gz)."""
    for seg_path in sorted(root.glob("*.seg.nrrd")):
        case_id = seg_path.name[: -len(".seg.nrrd")]
        images = [
            p
            for p in (root / f"{case_id}.nrrd", root / f"{case_id}.nii.gz", root / f"{case_id}.nii")
            if p.is_file()
        ]

        def load(seg_path=seg_path, images=images, case_id=case_id):
            if not images:
                raise CaseError(
                    f"no CT volume {case_id}.nrrd or {case_id}.nii.gz beside the .seg.nrrd"
                )
            return _load_slicer(images[0], seg_path)

        yield SourceCase(case_id, str(seg_path), load)


def _nrrd_image(path: Path):
    """A NRRD volume as a nibabel image in RAS (NRRD geometry: space directions and origin)."""
    import nrrd

    data, header = nrrd.read(str(path))
    directions = np.asarray(header["space directions"], dtype=float)
    spatial = ~np.isnan(directions).any(axis=1)
    if data.ndim == 4:  # Slicer's layered segmentation: the list axis first
        data = np.moveaxis(data, int(np.flatnonzero(~spatial)[0]), 0)
    affine = np.eye(4)
    affine[:3, :3] = directions[spatial].T
    affine[:3, 3] = np.asarray(header["space origin"], dtype=float)
    if header.get("space", "left-posterior-superior") in ("left-posterior-superior", "LPS"):
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    return data, affine, header


def _load_slicer(image_path: Path, seg_path: Path):
    """CT and segmentation on the CT's grid; raw labels numbered by segment, named by Slicer."""
    import nibabel as nib

    from thighseg.pipeline.loaders import canonical_to_zyx, hu_and_spacing, load_nifti_image

    if image_path.suffix == ".nrrd":
        data, affine, _ = _nrrd_image(image_path)
        image = nib.as_closest_canonical(nib.Nifti1Image(data.astype(np.float32), affine))
        hu, spacing = hu_and_spacing(image)
        image_affine, shape = image.affine, image.shape
    else:
        hu, spacing, image_affine = load_nifti_image(image_path)
        shape = hu.shape[::-1]
    data, seg_affine, header = _nrrd_image(seg_path)
    raw_native, names = _slicer_labels(data, header)
    seg = nib.as_closest_canonical(nib.Nifti1Image(raw_native.astype(np.int32), seg_affine))
    placed = _on_image_grid(np.asarray(seg.dataobj), seg.affine, image_affine, shape, seg_path)
    return hu, canonical_to_zyx(placed), spacing, names


def _slicer_labels(data: np.ndarray, header: dict) -> tuple[np.ndarray, dict[str, int]]:
    """One integer per segment (its index + 1) and the segment names."""
    segments = sorted(
        {int(k.split("_")[0][len("Segment") :]) for k in header if re.match(r"Segment\d+_", k)}
    )
    if not segments:
        raise CaseError("the .seg.nrrd describes no segments (SegmentN_Name fields)")
    raw = np.zeros(data.shape[-3:], np.int32)
    names = {}
    for n in segments:
        value = int(header.get(f"Segment{n}_LabelValue", 1))
        layer = data[int(header.get(f"Segment{n}_Layer", 0))] if data.ndim == 4 else data
        raw[layer == value] = n + 1
        names[str(header.get(f"Segment{n}_Name", f"Segment_{n + 1}"))] = n + 1
    return raw, names


def _on_image_grid(
    labels: np.ndarray, seg_affine: np.ndarray, image_affine: np.ndarray, shape, seg_path: Path
) -> np.ndarray:
    """A (possibly cropped) segmentation pasted into the image's voxel grid, which it must share
    (same axes and spacing, an integer voxel offset)."""
    to_image = np.linalg.inv(image_affine) @ seg_affine
    offset = to_image[:3, 3]
    if not np.allclose(to_image[:3, :3], np.eye(3), atol=1e-3) or not np.allclose(
        offset, np.round(offset), atol=1e-2
    ):
        raise CaseError(f"{seg_path.name} is not on the CT's voxel grid (resampled or rotated)")
    start = np.round(offset).astype(int)
    stop = start + np.array(labels.shape)
    if (start < 0).any() or (stop > np.array(shape)).any():
        raise CaseError(f"{seg_path.name} extends beyond the CT volume")
    placed = np.zeros(tuple(shape), np.int32)
    placed[start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]] = labels
    return placed


SOURCES = {
    "nnunet": nnunet_cases,
    "nifti": nifti_pair_cases,
    "dicom": dicom_seg_cases,
    "slicer": slicer_cases,
}


def detect_format(root: Path) -> str:
    if (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        return "nnunet"
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return "nifti"
    if any(root.glob("*.seg.nrrd")):
        return "slicer"
    if root.is_dir():
        return "dicom"
    raise ValueError(f"{root} is not a folder")


# --- checks and import -------------------------------------------------------------------------


def check_case(hu: np.ndarray, labels: np.ndarray, spacing: tuple[float, float, float]) -> None:
    """Refuse what would poison training: odd spacing, non-HU intensities, no groups."""
    dz, dy, dx = spacing
    low, high = SPACING_RANGE_MM
    if not (low <= dy <= high and low <= dx <= high and 0 < dz <= SLICE_SPACING_MAX_MM):
        raise CaseError(f"implausible spacing {dx:.3g}×{dy:.3g}×{dz:.3g} mm")
    if hu.ndim != 3 or min(hu.shape[1:]) < 32:
        raise CaseError(f"image of shape {hu.shape} is too small")
    if float(np.percentile(hu, 1)) > -500:
        raise CaseError(
            f"no air in the image (1st percentile {np.percentile(hu, 1):.0f}): "
            "not a CT in Hounsfield units?"
        )
    muscle = labels[(labels > 0) & (labels != IGNORE)]
    if muscle.size == 0:
        raise CaseError("no extensor, flexor or adductor voxels after the label map")
    median = float(np.median(hu[(labels > 0) & (labels != IGNORE)]))
    if not -200 <= median <= 200:
        raise CaseError(f"labelled muscle has median {median:.0f} HU, expected -200..200")


def import_sources(
    sources: list[Path],
    label_map: LabelMap,
    out: Path,
    name: str | None = None,
    fmt: str = "auto",
    subject_regex: str | None = None,
    progress: bool = True,
) -> ImportReport:
    """Import every case of every source into `out` (a new or an existing dataset folder)."""
    cases = []
    for root in sources:
        kind = detect_format(root) if fmt == "auto" else fmt
        cases += list(SOURCES[kind](root))
    report = ImportReport()
    manifest = Manifest(name=name or out.name, label_map=label_map.as_dict())
    if (out / "manifest.json").is_file():  # adding to a dataset: keep what is there
        manifest.cases = read_manifest(out).cases
    seen: set[str] = set()
    for case in tqdm(cases, desc="import", disable=not progress):
        if case.case_id in seen:
            report.failed.append((case.case_id, "duplicate case id (already imported)"))
            continue
        seen.add(case.case_id)
        try:
            hu, raw, spacing, names = case.load()  # type: ignore[operator]
            labels = label_map.apply(raw, label_map.resolve(names))
            check_case(hu, labels, spacing)
        except CaseError as error:
            report.failed.append((case.case_id, str(error)))
            continue
        subject = _subject(case.case_id, subject_regex)
        record = write_case(out, case.case_id, subject, case.source, hu, labels, spacing)
        report.written.append(record)
        manifest.cases = [c for c in manifest.cases if c.case_id != record.case_id] + [record]
        write_manifest(out, manifest)  # after every case: an interrupted import stays usable
    write_manifest(out, manifest)
    imports = [
        *_earlier_imports(out / "import_report.json"),
        {
            "sources": [str(s) for s in sources],
            "label_map": label_map.as_dict(),
            "written": [r.case_id for r in report.written],
            "failed": [{"case": c, "reason": r} for c, r in report.failed],
        },
    ]
    (out / "import_report.json").write_text(json.dumps({"imports": imports}, indent=2))
    (out / "card.md").write_text(_card(manifest, imports))
    return report


def _subject(case_id: str, pattern: str | None) -> str:
    if not pattern:
        return case_id
    match = re.search(pattern, case_id)
    if not match:
        return case_id
    return match.group(1) if match.groups() else match.group(0)


def _earlier_imports(path: Path) -> list[dict]:
    """The imports a dataset already records (adding to it keeps their provenance)."""
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    return earlier.get("imports", [earlier])  # a single import, as files before 2026-12-07 were


def _card(manifest: Manifest, imports: list[dict]) -> str:
    totals = {
        key: sum(c.voxels_per_label[key] for c in manifest.cases)
        for key in ("extensor", "flexor", "adductor", "ignore")
    }
    return "\n".join(
        [
            f"# Dataset card: {manifest.name}",
            "",
            f"- cases: {len(manifest.cases)} from {len(manifest.subjects())} subject(s); "
            f"{sum(len(i['failed']) for i in imports)} refused (see import_report.json)",
            *(
                f"- import {k}: {', '.join(i.get('sources', ['?']))}: {len(i['written'])} "
                f"written, {len(i['failed'])} refused; label map "
                + json.dumps(i.get("label_map", manifest.label_map))
                for k, i in enumerate(imports, 1)
            ),
            f"- content digest: `{manifest.digest()}`",
            "- voxels per label: " + ", ".join(f"{k} {v:,}" for k, v in totals.items()),
            "- orientation: (z, row, column) = (towards the head, posterior, patient's left)",
            "- checks: geometry of image and labels, spacing, HU (air present, muscle HU), "
            "labels present after the map",
            "",
        ]
    )
