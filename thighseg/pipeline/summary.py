"""One-page study summary (PNG and PDF, and a DICOM Secondary Capture of the same page): three
axial levels with the coloured groups, a coronal reformat of the mask, the table of indices and the
QC flags — what a radiologist opens from the PACS and a researcher opens as a file."""

from __future__ import annotations

import io
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from thighseg.measure.indices import TISSUES, VolumeIndices
from thighseg.measure.qc import Flag

COLOURS = {1: (0.90, 0.24, 0.24), 2: (0.24, 0.78, 0.31), 3: (0.27, 0.43, 0.94)}
GROUP_NAMES = {1: "extensor", 2: "flexor", 3: "adductor"}
WINDOW = (-160.0, 240.0)


def blend(hu: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """RGB in [0, 1]: the slice in a soft-tissue window with the muscle groups blended in colour."""
    rgb = np.repeat(np.clip((hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1)[..., None], 3, axis=2)
    for group, colour in COLOURS.items():
        mask = labels == group
        rgb[mask] = 0.55 * rgb[mask] + 0.45 * np.array(colour)
    return rgb


def _table_rows(indices: VolumeIndices) -> list[list[str]]:
    rows = []
    for name in TISSUES:
        right, left = indices.right.tissue(name), indices.left.tissue(name)
        rows.append(
            [
                name,
                f"{right.total_ml:.0f} / {left.total_ml:.0f}",
                f"{right.lean_ml:.0f} / {left.lean_ml:.0f}",
                f"{right.imat_ml:.0f} / {left.imat_ml:.0f}",
                f"{(right.mean_hu or 0):.0f} / {(left.mean_hu or 0):.0f}",
                f"{getattr(indices.asymmetry_percent, name):.1f}",
            ]
        )
    rows.append(
        [
            "intermuscular fat",
            f"{indices.right.intermuscular_fat_ml:.0f} / {indices.left.intermuscular_fat_ml:.0f}",
            "",
            "",
            "",
            "",
        ]
    )
    return rows


@dataclass(frozen=True)
class Preview:
    """The few planes the pictures show, copied out of the study so that the HU volume can be freed
    before anything is drawn."""

    levels: tuple[
        int, ...
    ]  # axial slice indices at 20, 50 and 80 % of the study, ascending (distal first)
    axial_hu: np.ndarray  # (levels, y, x)
    axial_labels: np.ndarray
    coronal_hu: np.ndarray  # (z, x) through the image row with the most muscle
    coronal_labels: np.ndarray
    crop: tuple[slice, slice]  # (y, x) around all the muscle in the study, with a margin

    @classmethod
    def of(cls, hu, labels: np.ndarray) -> Preview:
        """`hu`: (z, y, x), a numpy array or an HUStack."""
        levels = tuple(sorted({int(round(f * (len(hu) - 1))) for f in (0.2, 0.5, 0.8)}))
        # the row with the most muscle, counted slice by slice: no volume-sized temporary
        coronal_row = int(np.argmax(sum(np.count_nonzero(s, axis=1) for s in labels)))
        rows, columns = np.nonzero(labels.any(axis=0))
        margin = max(10, (columns.max() - columns.min()) // 8) if rows.size else 0
        crop = (
            (
                slice(max(0, rows.min() - margin), rows.max() + margin + 1),
                slice(max(0, columns.min() - margin), columns.max() + margin + 1),
            )
            if rows.size
            else (slice(None),) * 2
        )
        coronal = np.empty((len(hu), hu.shape[2]), hu.dtype)
        for z in range(len(hu)):  # slice by slice, so that `hu` may be an HUStack read from disk
            coronal[z] = hu[z][coronal_row]
        return cls(
            levels,
            np.stack([hu[z] for z in levels]),
            labels[list(levels)],
            coronal,
            labels[:, coronal_row].copy(),
            crop,
        )


def warm() -> threading.Thread:
    """Import matplotlib and draw a page of text to PNG and PDF, in the background (the thread is
    returned): a fresh listener's first study then renders its summary in ~0.8 s, not ~1.4 s (the
    imports, font loading and PDF backend, measured on a 2-core machine)."""

    def draw() -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401 - imported for `render`, which uses it
        from matplotlib.figure import Figure

        figure = Figure(figsize=(2, 1), dpi=50)  # not pyplot's: no shared state with a render
        figure.suptitle("warm-up")
        figure.add_subplot().table(cellText=[["0"]], colLabels=["mL"])
        for format in ("png", "pdf"):
            figure.savefig(io.BytesIO(), format=format)

    thread = threading.Thread(target=draw, name="summary-warm-up", daemon=True)
    thread.start()
    return thread


def render(
    preview: Preview,
    spacing_zyx: tuple[float, float, float],
    indices: VolumeIndices,
    flags: list[Flag],
    title: str,
    png: Path,
    pdf: Path | None = None,
) -> Path:
    """The one-page summary (PNG and PDF): axial levels, coronal reformat, indices table, QC
    flags."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    figure = plt.figure(figsize=(11.69, 8.27), dpi=110)  # A4 landscape
    # left: the three axial levels, as large as the page allows; right: coronal, table, facts
    grid = figure.add_gridspec(
        3,
        2,
        width_ratios=[1.25, 1.0],
        left=0.01,
        right=0.99,
        top=0.91,
        bottom=0.02,
        wspace=0.03,
        hspace=0.12,
    )
    figure.suptitle(title, fontsize=13, x=0.02, y=0.975, ha="left")
    figure.legend(  # the colour key, above the pictures
        handles=[Patch(color=COLOURS[g], label=name) for g, name in GROUP_NAMES.items()],
        loc="upper right",
        bbox_to_anchor=(0.98, 0.975),
        ncol=3,
        fontsize=10,
        frameon=False,
    )
    crop = preview.crop
    named = len(preview.levels) == 3
    for row, k in enumerate(reversed(range(len(preview.levels)))):  # proximal (highest z) first
        axis = figure.add_subplot(grid[row, 0])
        axis.imshow(blend(preview.axial_hu[k][crop], preview.axial_labels[k][crop]))
        axis.set_title(
            ("proximal", "middle", "distal")[row] if named else f"slice {preview.levels[k]}",
            fontsize=10,
        )
        for x, side in ((0.02, "R"), (0.98, "L")):  # radiological view: patient's right on the left
            axis.text(
                x,
                0.03,
                side,
                transform=axis.transAxes,
                color="white",
                fontsize=9,
                ha="left" if side == "R" else "right",
            )
        axis.axis("off")
    axis = figure.add_subplot(grid[0, 1])
    axis.imshow(
        blend(preview.coronal_hu[::-1, crop[1]], preview.coronal_labels[::-1, crop[1]]),
        aspect=spacing_zyx[0] / spacing_zyx[2],
    )
    axis.set_title("coronal", fontsize=10)
    axis.axis("off")
    table_axis = figure.add_subplot(grid[1, 1])
    table_axis.axis("off")
    table = table_axis.table(
        cellText=_table_rows(indices),
        colLabels=["group (R / L)", "total mL", "lean mL", "IMAT mL", "mean HU", "asym. %"],
        colWidths=[0.27, 0.15, 0.15, 0.13, 0.16, 0.12],
        loc="upper center",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.45)
    total = indices.total
    facts = [
        f"Total muscle {total.muscle.total_ml:.0f} mL",
        f"lean {total.muscle.lean_ml:.0f} mL",
        f"IMAT fraction {100 * total.imat_fraction:.1f} %",
        f"intermuscular fat fraction {100 * total.intermuscular_fat_fraction:.1f} %",
        f"low-density muscle {total.muscle.low_density_ml:.0f} mL",
    ]
    if total.muscle_volume_index_ml_per_m2 is not None:
        facts.append(f"muscle volume index {total.muscle_volume_index_ml_per_m2:.0f} mL/m²")
    text_axis = figure.add_subplot(grid[2, 1])
    text_axis.axis("off")
    text_axis.text(0.02, 1, "\n".join(facts), va="top", fontsize=10, family="DejaVu Sans")
    qc = ["QC: no flags"] if not flags else ["QC:", *(f"⚠ {f.code}: {f.reason}" for f in flags)]
    text_axis.text(
        0.5,
        1,
        "\n".join(textwrap.fill(line, 34, subsequent_indent="   ") for line in qc),
        va="top",
        fontsize=9,
        color="black" if not flags else "#8a1c1c",
    )
    text_axis.text(
        0.02,
        0,
        "Automatic segmentation (thighseg). Research use; verify before clinical decisions.",
        fontsize=7,
        color="grey",
    )
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png)
    if pdf is not None:
        figure.savefig(pdf)
    plt.close(figure)
    return png


def secondary_capture(
    png: Path,
    reference,
    path: Path,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
):
    """The summary page as a DICOM Secondary Capture in the study of `reference` (a source
    header); UIDs given in advance let the report name an SC still being built elsewhere."""
    import highdicom as hd
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB"))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        # the axial panels keep the CT's display orientation: rows run to the patient's left,
        # columns posterior
        coordinate_system="PATIENT",
        patient_orientation=("L", "P"),
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=int(reference.get("SeriesNumber", 1) or 1) + 3000,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=1,
        manufacturer="thighseg",
        series_description="Thigh muscle summary (thighseg)",
    )
    sc.ImageLaterality = "B"  # both thighs (the thigh is a paired body part)
    path.parent.mkdir(parents=True, exist_ok=True)
    sc.save_as(path)
    return sc


def write_overlay_png(preview: Preview, path: Path) -> Path:
    """Three axial levels (distal, middle, proximal) side by side, coloured as in the summary page,
    so a reader can judge the result at a glance."""
    from PIL import Image

    tiles = [
        (blend(hu, labels) * 255).astype(np.uint8)
        for hu, labels in zip(preview.axial_hu, preview.axial_labels, strict=False)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(tiles, axis=1)).save(path)
    return path
