"""Does 2.5D input (a slice and its two neighbours as channels) beat 2D for thigh groups?

Both variants start from the same trained 2D SegFormer. The 2.5D network's first convolution is
inflated (the neighbour channels start at zero), so at step 0 it is exactly the 2D model; then
both are fine-tuned with the same seed, steps and slices and scored on held-out subjects of the
training generators. The stress cohort is not used: choosing an input design is tuning.

    .venv/bin/python scripts/compare_2p5d.py --weights thighseg/weights/segformer.pt --steps 300

writes docs/evaluation/2p5d.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from thighseg.core.labels import NUM_CLASSES, normalise_hu
from thighseg.core.resample import MODEL_INPUT_SIZE, labels_on_tiles, tiles_of
from thighseg.learning import models
from thighseg.learning.training import _augment, _loss
from thighseg.measure.metrics import dice_per_group
from thighseg.synthetic import phantom, randomised


def randomised_triplets(seeds: range, per_subject: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3, s, s) neighbour stacks and (n, s, s) centre labels, slice gap 3-7 mm."""
    stacks, labels = [], []
    for seed in tqdm(seeds, desc="randomised triplets"):
        rng = np.random.default_rng([seed, 5])
        subject = randomised.sample_subject(seed)
        centres = rng.uniform(0.05, 0.95, per_subject)
        gap = rng.uniform(3, 7) / subject.thigh_length
        levels = np.concatenate([[c - gap, c, c + gap] for c in centres])
        study = randomised.generate(seed, size=MODEL_INPUT_SIZE, levels=levels)
        hu = normalise_hu(study.hu).reshape(per_subject, 3, MODEL_INPUT_SIZE, MODEL_INPUT_SIZE)
        stacks.append(hu.astype(np.float16))
        labels.append(study.labels[1::3])
    return np.concatenate(stacks), np.concatenate(labels)


def phantom_triplets(seeds: range, slices: int) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous 5 mm phantom slices; the end slices repeat themselves as neighbours."""
    stacks, labels = [], []
    for seed in tqdm(seeds, desc="phantom triplets"):
        study = phantom.generate(seed, size=384, slices=slices, slice_spacing=5.0)
        tiles, windows = tiles_of(study.hu, (study.geometry.pixel_spacing,) * 2)
        hu = normalise_hu(tiles)
        padded = np.concatenate([hu[:1], hu, hu[-1:]])
        stacks.append(np.stack([padded[:-2], padded[1:-1], padded[2:]], 1).astype(np.float16))
        labels.append(labels_on_tiles(study.labels, windows))
    return np.concatenate(stacks), np.concatenate(labels)


def network(weights: Path, channels: int) -> torch.nn.Module:
    import segmentation_models_pytorch as smp

    trained = models.load_trained("segformer", weights)
    if channels == 1:
        return trained.train()
    net = smp.Segformer(
        encoder_name="mit_b0", encoder_weights=None, in_channels=3, classes=NUM_CLASSES
    )
    state = trained.state_dict()
    for name, tensor in net.state_dict().items():
        if tensor.shape != state[name].shape:  # the stem: centre channel = the 2D weights
            inflated = torch.zeros_like(tensor)
            inflated[:, 1:2] = state[name]
            state[name] = inflated
    net.load_state_dict(state)
    return net.train()


def fine_tune(net: torch.nn.Module, images: np.ndarray, labels: np.ndarray, steps: int) -> float:
    optimiser = torch.optim.AdamW(net.parameters(), lr=2e-4, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    started = time.time()
    for _ in tqdm(range(steps), desc=f"fine-tune {images.shape[1]}ch"):
        index = torch.randint(0, len(images), (8,), generator=generator).numpy()
        x = torch.from_numpy(images[index].astype(np.float32))
        y = torch.from_numpy(labels[index].astype(np.int64))
        x, y = _augment(torch, x, y, generator)
        loss = _loss(torch, net(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return time.time() - started


def score(net: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    net.eval()
    with torch.inference_mode():
        logits = torch.cat(
            [
                net(torch.from_numpy(images[i : i + 16].astype(np.float32)))
                for i in range(0, len(images), 16)
            ]
        )
    dice = dice_per_group(logits.argmax(1).numpy().astype(np.uint8), labels)
    return {**dice, "mean": float(np.mean(list(dice.values())))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=models.weights_path("segformer"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("docs/evaluation/2p5d.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    train_r = randomised_triplets(range(150_000, 150_120), 4)
    train_p = phantom_triplets(range(1000, 1012), 16)
    images = np.concatenate([train_r[0], train_p[0]])
    labels = np.concatenate([train_r[1], train_p[1]])
    held_out = {
        "randomised (held out)": randomised_triplets(range(195_000, 195_010), 4),
        "phantom validation": phantom_triplets(range(1036, 1040), 12),
    }
    results: dict = {"steps": args.steps, "weights": str(args.weights), "variants": {}}
    for channels in (1, 3):
        net = network(args.weights, channels)
        pick = slice(1, 2) if channels == 1 else slice(0, 3)
        seconds = fine_tune(net, images[:, pick], labels, args.steps)
        results["variants"][f"{channels}ch"] = {
            "train_seconds": round(seconds, 1),
            **{name: score(net, x[:, pick], y) for name, (x, y) in held_out.items()},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    for variant, figures in results["variants"].items():
        print(variant, {k: v["mean"] if isinstance(v, dict) else v for k, v in figures.items()})


if __name__ == "__main__":
    main()
