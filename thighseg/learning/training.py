"""Training on synthetic thighs (torch; only needed for training and export).

The data mixes the fixed phantom (the "internal" site) with many more subjects from the
randomised generator (`thighseg.synthetic.randomised`, SynthSeg-style), so the network has to
find the fat planes between the groups instead of remembering where the phantom puts them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from thighseg.core.labels import NUM_CLASSES, normalise_hu
from thighseg.core.resample import MODEL_INPUT_SIZE, labels_to_model_grid, to_model_grid
from thighseg.learning import models
from thighseg.measure.metrics import dice_per_group
from thighseg.synthetic import phantom, randomised

RANDOMISED_FIRST_SEED = 100_000  # randomised training subjects; validation starts at +90,000


@dataclass
class TrainConfig:
    model: str = "segformer"
    subjects: int = 36  # fixed-phantom subjects
    slices_per_subject: int = 24
    randomised_subjects: int = 300
    randomised_slices: int = 6  # random levels per randomised subject
    validation_subjects: int = 4  # of each generator
    steps: int = 1500  # the model cards record each model's own
    batch_size: int = 8
    learning_rate: float = 6e-4
    seed: int = 0
    first_seed: int = 1000  # training subjects are seeds first_seed.. (tests/demo use others)
    init: str | None = None  # weights to fine-tune from; None trains from scratch


def cohort_slices(
    seeds: list[int], slices_per_subject: int, rng: np.random.Generator, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised model-grid slices and labels from phantoms of mixed matrix sizes."""
    images, targets = [], []
    for seed in tqdm(seeds, desc="phantoms", disable=not progress):
        size = int(rng.choice([256, 384, 512]))
        ph = phantom.generate(seed, size=size, slices=slices_per_subject)
        images.append(normalise_hu(to_model_grid(ph.hu)).astype(np.float16))
        targets.append(labels_to_model_grid(ph.labels))
    return np.concatenate(images), np.concatenate(targets)


def randomised_slices(
    seeds: list[int], slices_per_subject: int, progress: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Model-grid slices and labels from the randomised generator (rendered on the grid)."""
    images, targets = [], []
    for seed in tqdm(seeds, desc="randomised thighs", disable=not progress):
        ph = randomised.generate(seed, size=MODEL_INPUT_SIZE, slices=slices_per_subject)
        images.append(normalise_hu(ph.hu).astype(np.float16))
        targets.append(ph.labels)
    if not images:
        return (
            np.zeros((0, MODEL_INPUT_SIZE, MODEL_INPUT_SIZE), np.float16),
            np.zeros((0, MODEL_INPUT_SIZE, MODEL_INPUT_SIZE), np.uint8),
        )
    return np.concatenate(images), np.concatenate(targets)


def _augment(torch, images, targets, generator):
    """CT-plausible augmentation: mirror, small affine, intensity offset and noise."""
    import torch.nn.functional as F

    n = images.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    targets = torch.where(flip[:, None, None], targets.flip(-1), targets)
    angle = (torch.rand(n, generator=generator) - 0.5) * 0.35
    scale = 1 + (torch.rand(n, generator=generator) - 0.5) * 0.3
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * 0.2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, images.shape, align_corners=False)
    images = F.grid_sample(
        images, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    onehot = F.one_hot(targets.long(), NUM_CLASSES).permute(0, 3, 1, 2).float()
    targets = F.grid_sample(
        onehot, grid, mode="nearest", padding_mode="border", align_corners=False
    ).argmax(1)
    images = images + (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.08
    images = (
        images
        + torch.randn(images.shape, generator=generator)
        * torch.rand(n, 1, 1, 1, generator=generator)
        * 0.06
    )
    return images, targets


def _loss(torch, logits, targets):
    import torch.nn.functional as F

    ce = F.cross_entropy(logits, targets)
    probs = logits.softmax(1)
    onehot = F.one_hot(targets, NUM_CLASSES).permute(0, 3, 1, 2).float()
    intersection = (probs * onehot).sum((0, 2, 3))
    dice = (2 * intersection + 1) / (probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1)
    return ce + (1 - dice[1:].mean())


def train(config: TrainConfig, out: Path | None = None, checkpoint: Path | None = None) -> dict:
    """Train, validate on held-out subjects, save weights; resumes from `checkpoint` if present."""
    import torch

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Mixed precision on GPU only: CPUs here have no native bf16 and autocast slows them down.
    amp = device.type == "cuda"
    out = out or models.weights_path(config.model)
    checkpoint = checkpoint or out.with_suffix(".ckpt")
    out.parent.mkdir(parents=True, exist_ok=True)
    train_seeds = list(range(config.first_seed, config.first_seed + config.subjects))
    val_seeds = list(
        range(
            config.first_seed + config.subjects,
            config.first_seed + config.subjects + config.validation_subjects,
        )
    )
    images, targets = cohort_slices(train_seeds, config.slices_per_subject, rng)
    first_random = RANDOMISED_FIRST_SEED
    extra_images, extra_targets = randomised_slices(
        list(range(first_random, first_random + config.randomised_subjects)),
        config.randomised_slices,
    )
    images = np.concatenate([images, extra_images])
    targets = np.concatenate([targets, extra_targets])
    network = (
        models.load_trained(config.model, Path(config.init)).train()
        if config.init
        else models.build(config.model)
    ).to(device)
    optimiser = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, config.learning_rate, total_steps=config.steps, pct_start=0.05
    )
    start_step = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        network.load_state_dict(state["state_dict"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        start_step = state["step"]
    generator = torch.Generator().manual_seed(config.seed + start_step)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    network.train()
    started = time.time()
    bar = tqdm(
        range(start_step, config.steps),
        desc=f"train {config.model}",
        initial=start_step,
        total=config.steps,
    )
    for step in bar:
        index = torch.randint(0, len(images), (config.batch_size,), generator=generator)
        x = torch.from_numpy(images[index.numpy()].astype(np.float32))[:, None]
        y = torch.from_numpy(targets[index.numpy()].astype(np.int64))
        x, y = _augment(torch, x, y, generator)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = _loss(torch, network(x).float(), y)
        optimiser.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % 100 == 0 or step + 1 == config.steps:
            torch.save(
                {
                    "state_dict": network.state_dict(),
                    "optimiser": optimiser.state_dict(),
                    "schedule": schedule.state_dict(),
                    "step": step + 1,
                },
                checkpoint,
            )
    network = network.cpu().eval()
    validation = validate(network, val_seeds, config.slices_per_subject)
    random_seeds = range(first_random + 90_000, first_random + 90_000 + config.validation_subjects)
    validation_randomised = validate_randomised(network, list(random_seeds))
    torch.save(
        {
            "state_dict": _compact(network.state_dict()),
            "config": asdict(config),
            "validation": validation,
            "input_size": MODEL_INPUT_SIZE,
        },
        out,
    )
    summary = {
        "config": asdict(config),
        "validation": validation,
        "validation_randomised": validation_randomised,
        "seconds": round(time.time() - started, 1),
        "weights": out.name,
        "device": _describe(device),
    }
    return record(summary, out)


def record(summary: dict, out: Path) -> dict:
    """Add the weights' hash and the package versions, write `<out>.json` and the model card."""
    from importlib.metadata import version

    from thighseg.learning.card import write_card

    summary["sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()
    summary["versions"] = {
        name: version(name)
        for name in ("thighseg", "torch", "segmentation-models-pytorch", "numpy")
    }
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    write_card(summary, out.with_suffix(".md"))
    return summary


def _describe(device) -> str:
    import os

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


SHIPPED_WEIGHTS_LIMIT_BYTES = 20 << 20


def _compact(state_dict: dict) -> dict:
    """FP16 storage when FP32 would exceed what we ship in git (weights load back as FP32)."""
    size = sum(t.numel() * t.element_size() for t in state_dict.values())
    if size <= SHIPPED_WEIGHTS_LIMIT_BYTES:
        return state_dict
    return {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}


def validate(network, seeds: list[int], slices: int) -> dict[str, float]:
    """Mean DSC per group over held-out phantoms, on the model grid."""

    rng = np.random.default_rng(12345)
    images, targets = cohort_slices(seeds, slices, rng, progress=False)
    return _dice_on(network, images, targets)


def validate_randomised(network, seeds: list[int]) -> dict[str, float]:
    """Mean DSC per group over held-out randomised subjects (8 slices each)."""
    images, targets = randomised_slices(seeds, 8, progress=False)
    return _dice_on(network, images, targets)


def _dice_on(network, images: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    import torch

    with torch.no_grad():
        logits = torch.cat(
            [
                network(torch.from_numpy(images[i : i + 16].astype(np.float32))[:, None])
                for i in range(0, len(images), 16)
            ]
        )
    return dice_per_group(logits.argmax(1).numpy().astype(np.uint8), targets)
