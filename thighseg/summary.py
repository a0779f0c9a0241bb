"""One-page study summary (PNG and PDF, and a DICOM Secondary Capture of the same page): three
axial levels with the coloured groups, a coronal reformat of the mask, the table of indices and the
QC flags — what a radiologist opens from the PACS and a researcher opens as a file."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from thighseg.labels import MUSCLE_GROUPS
from thighseg.qc import Flag

COLOURS = {1: (0.90, 0.24, 0.24), 2: (0.24, 0.78, 0.31), 3: (0.27, 0.43, 0.94)}
WINDOW = (-160.0, 240.0)


def blend(hu: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """RGB in [0, 1]: the slice in a soft-tissue window with the muscle groups blended in colour."""
    rgb = np.repeat(np.clip((hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1)[..., None], 3, axis=2)
    for group, colour in COLOURS.items():
        mask = labels == group
        rgb[mask] = 0.55 * rgb[mask] + 0.45 * np.array(colour)
    return rgb


def _table_rows(indices: dict) -> list[list[str]]:
    rows = []
    for name in [g.name.lower() for g in MUSCLE_GROUPS] + ["muscle"]:
        right, left = indices["right"][name], indices["left"][name]
        rows.append([name, f"{right['total_ml']:.0f} / {left['total_ml']:.0f}",
                     f"{right['lean_ml']:.0f} / {left['lean_ml']:.0f}", f"{right['imat_ml']:.0f} / {left['imat_ml']:.0f}",
                     f"{(right['mean_hu'] or 0):.0f} / {(left['mean_hu'] or 0):.0f}",
                     f"{indices['asymmetry_percent'][name]:.1f}"])
    rows.append(["intermuscular fat", f"{indices['right']['intermuscular_fat_ml']:.0f} / "
                 f"{indices['left']['intermuscular_fat_ml']:.0f}", "", "", "", ""])
    return rows


def render(hu: np.ndarray, labels: np.ndarray, spacing_zyx: tuple[float, float, float], indices: dict,
           flags: list[Flag], title: str, png: Path, pdf: Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(11.69, 8.27), dpi=110)  # A4 landscape
    grid = figure.add_gridspec(3, 4, height_ratios=[1.1, 1.0, 0.9])
    figure.suptitle(title, fontsize=13, x=0.01, ha="left")
    rows, columns = np.nonzero(labels.any(axis=0))
    margin = max(10, (columns.max() - columns.min()) // 8) if rows.size else 0
    crop = (slice(max(0, rows.min() - margin), rows.max() + margin + 1),
            slice(max(0, columns.min() - margin), columns.max() + margin + 1)) if rows.size else (slice(None),) * 2
    z_levels = sorted({int(round(f * (len(hu) - 1))) for f in (0.8, 0.5, 0.2)}, reverse=True)
    for column, z in enumerate(z_levels):
        axis = figure.add_subplot(grid[0, column])
        axis.imshow(blend(hu[z][crop], labels[z][crop]))
        axis.set_title(("proximal", "middle", "distal")[column] if len(z_levels) == 3 else f"slice {z}", fontsize=9)
        axis.axis("off")
    coronal_row = int(np.argmax((labels > 0).sum(axis=(0, 2))))
    axis = figure.add_subplot(grid[0, 3])
    axis.imshow(blend(hu[::-1, coronal_row, crop[1]], labels[::-1, coronal_row, crop[1]]),
                aspect=spacing_zyx[0] / spacing_zyx[2])
    axis.set_title("coronal (mask)", fontsize=9)
    axis.axis("off")
    table_axis = figure.add_subplot(grid[1, :])
    table_axis.axis("off")
    table = table_axis.table(cellText=_table_rows(indices), colLabels=[
        "group (R / L)", "total mL", "lean mL", "IMAT mL", "mean HU", "asymmetry %"], loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.3)
    total = indices["total"]
    facts = [f"Total muscle {total['muscle']['total_ml']:.0f} mL, lean {total['muscle']['lean_ml']:.0f} mL, "
             f"IMAT fraction {100 * total['imat_fraction']:.1f} %, intermuscular fat fraction "
             f"{100 * total['intermuscular_fat_fraction']:.1f} %, low-density muscle "
             f"{total['muscle']['low_density_ml']:.0f} mL"]
    if "muscle_volume_index_ml_per_m2" in total:
        facts.append(f"Muscle volume index {total['muscle_volume_index_ml_per_m2']:.0f} mL/m²")
    facts.append("QC: " + ("no flags" if not flags else ""))
    facts += [f"  ⚠ {f.code}: {f.reason}" for f in flags]
    text_axis = figure.add_subplot(grid[2, :])
    text_axis.axis("off")
    text_axis.text(0, 1, "\n".join(facts), va="top", fontsize=9, family="DejaVu Sans",
                   color="black" if not flags else "#8a1c1c")
    text_axis.text(0, 0, "Automatic segmentation (thighseg). Research use; verify before clinical decisions.",
                   fontsize=7, color="grey")
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png)
    if pdf is not None:
        figure.savefig(pdf)
    plt.close(figure)
    return png


def secondary_capture(png: Path, reference, path: Path):
    """The summary page as a DICOM Secondary Capture in the study of `reference` (a source header)."""
    import highdicom as hd
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB"))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        # the axial panels keep the CT's display orientation: rows run to the patient's left, columns posterior
        coordinate_system="PATIENT", patient_orientation=("L", "P"), series_instance_uid=hd.UID(),
        series_number=int(reference.get("SeriesNumber", 1) or 1) + 3000, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="thighseg", series_description="Thigh muscle summary (thighseg)")
    sc.ImageLaterality = "B"  # both thighs (the thigh is a paired body part)
    path.parent.mkdir(parents=True, exist_ok=True)
    sc.save_as(path)
    return sc
