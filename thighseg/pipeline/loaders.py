"""Users' own labelled data: NIfTI image + label pairs, and DICOM CT series + DICOM SEG.

Both return the same (HU volume, label volume, spacing) triple as the phantoms, in thighseg's
array convention: (z, row, column) with z ascending towards the head, rows towards posterior and
columns towards the patient's left (DICOM LPS display), so legs and indices mean the same thing
whatever the source.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from thighseg.core.labels import MUSCLE_GROUPS
from thighseg.pipeline.assemble import assemble


@dataclass
class LabelledVolume:
    """An image with its label map (a user's case or a phantom), in thighseg's array convention."""

    hu: np.ndarray  # float32 (z, y, x)
    labels: np.ndarray  # uint8 (z, y, x)
    spacing_zyx: tuple[float, float, float]
    source: str


def canonical_to_zyx(array: np.ndarray) -> np.ndarray:
    """Canonical RAS (+x to the patient's right, +y anterior) -> (z, posterior rows, leftward
    columns)."""
    return np.ascontiguousarray(array[::-1, ::-1, :].transpose(2, 1, 0))


def _zyx_to_canonical(array: np.ndarray) -> np.ndarray:
    """The inverse of canonical_to_zyx."""
    return np.ascontiguousarray(array.transpose(2, 1, 0)[::-1, ::-1, :])


def _load_canonical(path: Path):
    import nibabel as nib

    image = nib.as_closest_canonical(nib.load(str(path)))
    if len(image.shape) != 3:
        raise ValueError(f"{path.name} is not a 3D volume (shape {image.shape})")
    return image


def hu_and_spacing(image) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A canonical (RAS) nibabel image as HU in thighseg's (z, y, x) and its (dz, dy, dx) in mm."""
    dx, dy, dz = (float(v) for v in image.header.get_zooms()[:3])
    return canonical_to_zyx(image.get_fdata(dtype=np.float32)), (dz, dy, dx)


def load_nifti_image(image_path: Path) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray]:
    """A CT volume in HU (z, y, x), its spacing (dz, dy, dx) in mm and its canonical affine."""
    image = _load_canonical(image_path)
    hu, spacing = hu_and_spacing(image)
    return hu, spacing, image.affine


def save_nifti_labels(labels: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """A (z, y, x) label map written back in the canonical orientation of the image it came from."""
    import nibabel as nib

    nib.save(nib.Nifti1Image(_zyx_to_canonical(labels), affine), path)
    return path


def load_nifti_raw_pair(
    image_path: Path, label_path: Path
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A CT volume in HU, its label map with the source's own values (int32), and the spacing;
    the two must share shape and geometry."""
    image, label = _load_canonical(image_path), _load_canonical(label_path)
    if image.shape != label.shape:
        raise ValueError(
            f"{image_path.name} and {label_path.name} differ in shape "
            f"({image.shape} vs {label.shape})"
        )
    if not np.allclose(image.affine, label.affine, atol=1e-3):
        spacing = [np.round(img.header.get_zooms()[:3], 3).tolist() for img in (image, label)]
        origin = [np.round(img.affine[:3, 3], 2).tolist() for img in (image, label)]
        raise ValueError(
            f"{image_path.name} and {label_path.name} differ in geometry (spacing mm "
            f"{spacing[0]} vs {spacing[1]}, origin {origin[0]} vs {origin[1]})"
        )
    labels = canonical_to_zyx(np.asanyarray(label.dataobj)).astype(np.int32)
    hu, spacing = hu_and_spacing(image)
    return hu, labels, spacing


def load_nifti_pair(image_path: Path, label_path: Path) -> LabelledVolume:
    """A CT volume in HU and its label map (0 background, 1 extensor, 2 flexor, 3 adductor)."""
    hu, labels, spacing = load_nifti_raw_pair(image_path, label_path)
    if labels.min() < 0 or labels.max() > max(MUSCLE_GROUPS):
        raise ValueError(f"{label_path.name} has labels outside 0..{int(max(MUSCLE_GROUPS))}")
    return LabelledVolume(hu, labels.astype(np.uint8), spacing, str(image_path))


def load_dicom_with_seg(series_files: list[Path], seg_path: Path) -> LabelledVolume:
    """A CT series and a SEG referencing it; segments are matched to groups by their label."""
    volume = assemble(series_files)
    uids = [s.SOPInstanceUID for s in volume.sources]
    return LabelledVolume(
        volume.hu, labels_from_seg(seg_path, uids), volume.spacing_zyx, str(seg_path)
    )


def labels_from_seg(seg_path: Path, source_uids: list[str]) -> np.ndarray:
    """Group label map (z, y, x) from a SEG, one slice per source SOP Instance UID in the given
    order. Segments are matched to groups by their label ("Right extensor", "Flexor", ...), so
    per-leg segments, thighseg's own among them, merge into their group."""
    import highdicom as hd  # ~20 MB of imports, for SEG readers only (the listener is not one)

    seg = hd.seg.segread(seg_path)
    by_name = {g.name.lower(): int(g) for g in MUSCLE_GROUPS}
    labels = np.zeros((len(source_uids), seg.Rows, seg.Columns), np.uint8)
    for number in seg.segment_numbers:
        name = seg.get_segment_description(number).SegmentLabel.lower()
        group = next((value for key, value in by_name.items() if key in name), None)
        if group is None:
            raise ValueError(f"SEG segment {number} ({name!r}) is not extensor, flexor or adductor")
        mask = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=source_uids, segment_numbers=[number], combine_segments=True
        )
        labels[np.asarray(mask) > 0] = group
    return labels
