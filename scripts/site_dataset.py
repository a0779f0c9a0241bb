"""A "site" of labelled thigh CT as an nnU-Net v2 raw dataset: stress-generator studies (a
construction the shipped weights never saw) saved as NIfTI in RAS with the site's own label values.

    python scripts/site_dataset.py ROOT FIRST_SEED LAST_SEED [--size 512] [--slices 24]
        [--label-map MAP.yaml]

Used by site_adaptation.sh (seeds 4100-4119) and site_confirmation.sh (4120-4129).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from thighseg.synthetic import stress

SITE_LABELS = {"background": 0, "quadriceps": 10, "hamstrings": 20, "adductors": 30}
# the label map `thighseg dataset import --labels` takes: the site's names → thighseg's groups
GROUP_OF = {"quadriceps": "extensor", "hamstrings": "flexor", "adductors": "adductor"}


def _ras(volume: np.ndarray) -> np.ndarray:
    """(z, y, x) from the top-left, feet first → NIfTI's (x, y, z) in RAS."""
    return np.ascontiguousarray(volume.transpose(2, 1, 0)[::-1, ::-1, :])


def write_site(root: Path, seeds: range, size: int, slices: int) -> None:
    """imagesTr/site_<seed>_0000.nii.gz, labelsTr/site_<seed>.nii.gz and dataset.json."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for seed in tqdm(seeds, desc="site studies"):
        study = stress.generate(seed, size=size, slices=slices)
        g = study.geometry
        affine = np.diag([g.pixel_spacing, g.pixel_spacing, g.slice_spacing, 1.0])
        image = nib.Nifti1Image(_ras(study.hu.astype(np.float32)), affine)
        nib.save(image, root / "imagesTr" / f"site_{seed}_0000.nii.gz")
        labels = nib.Nifti1Image(_ras(study.labels * 10), affine)
        nib.save(labels, root / "labelsTr" / f"site_{seed}.nii.gz")
    description = {
        "channel_names": {"0": "CT"},
        "file_ending": ".nii.gz",
        "numTraining": len(seeds),
        "labels": SITE_LABELS,
    }
    (root / "dataset.json").write_text(json.dumps(description))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("first_seed", type=int)
    parser.add_argument("last_seed", type=int)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--label-map", type=Path, help="also write the import's label map here")
    args = parser.parse_args()
    write_site(args.root, range(args.first_seed, args.last_seed + 1), args.size, args.slices)
    if args.label_map:
        args.label_map.write_text("".join(f"{g}: [{n}]\n" for n, g in GROUP_OF.items()))
