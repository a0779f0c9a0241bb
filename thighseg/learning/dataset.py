"""A labelled dataset on disk, the one format training and evaluation read.

`thighseg dataset import` converts what users have (nnU-Net raw datasets, NIfTI pairs, DICOM CT +
SEG, 3D Slicer .seg.nrrd) into this layout, so nothing above it cares where a case came from:

    DATASET/manifest.json   cases, subject ids, spacing, shape, voxels per label, content hashes
    DATASET/splits.json     folds by subject (never by slice) and an optional held-out test set
    DATASET/cases/<case>.npz  hu (int16, HU), labels (uint8: 0..3, IGNORE), spacing_zyx (mm)
    DATASET/card.md         what it is, where it came from, how it was checked

Arrays use thighseg's convention: (z, row, column), z towards the head, rows towards posterior,
columns towards the patient's left (DICOM LPS display), whatever the source's orientation.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from thighseg.core.labels import MUSCLE_GROUPS

FORMAT = "thighseg-dataset/1"
IGNORE = 255  # voxels excluded from the loss and from the metrics ("ignore" in a label map)


@dataclass(frozen=True)
class CaseRecord:
    case_id: str
    subject_id: str
    source: str
    spacing_zyx: tuple[float, float, float]
    shape: tuple[int, int, int]
    voxels_per_label: dict[str, int]
    sha256: str  # of the stored case file


@dataclass
class Manifest:
    name: str
    cases: list[CaseRecord] = field(default_factory=list)
    label_map: dict = field(default_factory=dict)
    format: str = FORMAT

    def subjects(self) -> list[str]:
        return sorted({c.subject_id for c in self.cases})

    def digest(self) -> str:
        """One hash for the whole dataset content (recorded by the models trained on it)."""
        text = json.dumps(sorted((c.case_id, c.sha256) for c in self.cases))
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Case:
    case_id: str
    hu: np.ndarray  # float32 (z, y, x)
    labels: np.ndarray  # uint8 (z, y, x)
    spacing_zyx: tuple[float, float, float]


def label_counts(labels: np.ndarray) -> dict[str, int]:
    counts = {g.name.lower(): int((labels == g).sum()) for g in MUSCLE_GROUPS}
    counts["ignore"] = int((labels == IGNORE).sum())
    return counts


def write_case(
    root: Path,
    case_id: str,
    subject_id: str,
    source: str,
    hu: np.ndarray,
    labels: np.ndarray,
    spacing_zyx: tuple[float, float, float],
) -> CaseRecord:
    """Store one case atomically (temporary file, then rename) and describe it."""
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        hu=np.clip(np.rint(hu), -32768, 32767).astype(np.int16),
        labels=labels.astype(np.uint8),
        spacing_zyx=np.asarray(spacing_zyx, dtype=np.float64),
    )
    data = buffer.getvalue()
    folder = root / "cases"
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{case_id}.npz.part"
    temporary.write_bytes(data)
    temporary.replace(folder / f"{case_id}.npz")
    return CaseRecord(
        case_id=case_id,
        subject_id=subject_id,
        source=source,
        spacing_zyx=tuple(float(s) for s in spacing_zyx),  # type: ignore[arg-type]
        shape=tuple(int(n) for n in hu.shape),  # type: ignore[arg-type]
        voxels_per_label=label_counts(labels),
        sha256=hashlib.sha256(data).hexdigest(),
    )


def _write_json(path: Path, payload: dict) -> Path:
    """Whole or not at all: a temporary file renamed over the old one."""
    temporary = path.with_name(f".{path.name}.part")
    temporary.write_text(json.dumps(payload, indent=2))
    temporary.replace(path)
    return path


def write_manifest(root: Path, manifest: Manifest) -> Path:
    return _write_json(root / "manifest.json", {**asdict(manifest), "digest": manifest.digest()})


def read_manifest(root: Path) -> Manifest:
    path = root / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{root} is not a thighseg dataset (no manifest.json); "
            "create one with `thighseg dataset import`"
        )
    payload = json.loads(path.read_text())
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path}: format {payload.get('format')!r}, expected {FORMAT!r}")
    cases = [
        CaseRecord(**{**c, "spacing_zyx": tuple(c["spacing_zyx"]), "shape": tuple(c["shape"])})
        for c in payload["cases"]
    ]
    return Manifest(name=payload["name"], cases=cases, label_map=payload.get("label_map", {}))


def load_case(root: Path, record: CaseRecord) -> Case:
    """A stored case, checked against the hash in the manifest."""
    data = (root / "cases" / f"{record.case_id}.npz").read_bytes()
    if hashlib.sha256(data).hexdigest() != record.sha256:
        raise ValueError(f"case {record.case_id} changed since import (hash mismatch)")
    with np.load(io.BytesIO(data)) as arrays:
        return Case(
            case_id=record.case_id,
            hu=arrays["hu"].astype(np.float32),
            labels=arrays["labels"],
            spacing_zyx=tuple(float(s) for s in arrays["spacing_zyx"]),  # type: ignore[arg-type]
        )


# --- splits by subject -------------------------------------------------------------------------


def make_splits(subjects: list[str], folds: int = 5, seed: int = 0, test: int = 0) -> dict:
    """k folds over subjects (seeded shuffle), after setting `test` subjects aside for good."""
    if folds < 1:
        raise ValueError("folds must be >= 1")
    if test < 0:
        raise ValueError("test must be >= 0 subjects")
    order = list(subjects)
    np.random.default_rng(seed).shuffle(order)
    held_out, pool = sorted(order[:test]), order[test:]
    if len(pool) < max(2, folds):
        raise ValueError(
            f"{len(pool)} subject(s) left for training; need at least {max(2, folds)} for "
            f"{folds} fold(s)"
        )
    if folds == 1:  # one split: 80 % train, 20 % validation
        cut = max(1, round(len(pool) * 0.2))
        chunks = [pool[:cut]]
    else:
        chunks = [pool[k::folds] for k in range(folds)]
    return {
        "seed": seed,
        "test": held_out,
        "folds": [
            {"validation": sorted(chunk), "train": sorted(s for s in pool if s not in chunk)}
            for chunk in chunks
        ],
    }


def check_splits(splits: dict, subjects: list[str]) -> None:
    """A split file must name known subjects and never put one subject on two sides."""
    known = set(subjects)
    test = set(splits.get("test", []))
    for k, fold in enumerate(splits["folds"]):
        train, validation = set(fold["train"]), set(fold["validation"])
        unknown = (train | validation | test) - known
        if unknown:
            raise ValueError(f"fold {k}: unknown subject(s) {', '.join(sorted(unknown))}")
        overlap = (train & validation) | ((train | validation) & test)
        if overlap:
            raise ValueError(f"fold {k}: subject(s) on two sides: {', '.join(sorted(overlap))}")
        if not train or not validation:
            raise ValueError(f"fold {k}: empty training or validation side")


def write_splits(root: Path, splits: dict) -> Path:
    check_splits(splits, read_manifest(root).subjects())
    return _write_json(root / "splits.json", splits)


def read_splits(root: Path) -> dict:
    path = root / "splits.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{root} has no splits.json; create it with `thighseg dataset split {root}`"
        )
    splits = json.loads(path.read_text())
    check_splits(splits, read_manifest(root).subjects())
    return splits


def fold_index(splits: dict, fold: str) -> int | None:
    """The fold a user named ("0", "1", …) as an index of splits.json's folds; None for "all"."""
    if fold == "all":
        return None
    count = len(splits["folds"])
    if not fold.isdigit() or int(fold) >= count:
        have = f"0–{count - 1} or 'all'" if count else "none: only 'all'"
        raise ValueError(f"no fold {fold!r} in splits.json (folds: {have})")
    return int(fold)


def cases_of(root: Path, subjects: list[str]) -> Iterator[Case]:
    manifest = read_manifest(root)
    wanted = set(subjects)
    for record in manifest.cases:
        if record.subject_id in wanted:
            yield load_case(root, record)
