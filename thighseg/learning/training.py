"""Training on synthetic thighs (torch; only needed for training and export).

The data mixes the fixed phantom (the "internal" site) with many more subjects from the
randomised generator (`thighseg.synthetic.randomised`, SynthSeg-style), so the network has to
find the fat planes between the groups instead of remembering where the phantom puts them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from thighseg.core.constants import DEFAULT_MODEL
from thighseg.core.labels import NUM_CLASSES, normalise_hu
from thighseg.core.resample import (
    MODEL_INPUT_SIZE,
    labels_on_tiles,
    stack_channels,
    stacked_tiles,
)
from thighseg.learning import dataset, models
from thighseg.measure.metrics import dice_per_group
from thighseg.synthetic import phantom, randomised

RANDOMISED_FIRST_SEED = 100_000  # randomised training subjects; validation starts at +90,000
HELD_OUT_LEVELS = 8  # random thigh levels scored per held-out randomised subject
_EMPTY_TARGETS = np.zeros((0, MODEL_INPUT_SIZE, MODEL_INPUT_SIZE), np.uint8)
NEIGHBOUR_GAP_MM = (1.0, 20.0)  # 2.5D training: slice gaps drawn log-uniformly from thin to thick
PHANTOM_STACK_SLICES = (24, 48, 72)  # 2.5D phantoms: slices over the thigh, ~17 to ~6 mm apart


def _empty_images(context: int) -> np.ndarray:
    return np.zeros((0, stack_channels(context), MODEL_INPUT_SIZE, MODEL_INPUT_SIZE), np.float16)


@dataclass
class TrainConfig:
    model: str = DEFAULT_MODEL
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
    data: str | None = None  # a dataset folder (`thighseg dataset import`) instead of phantoms
    fold: str = "0"  # with data: a fold number of splits.json, or "all"
    validate_every: int = 0  # steps between held-out checks (0: only at the end)
    patience: int = 0  # checks without improvement before stopping (0: never stop early)
    # neighbour slices on either side as extra input channels (2.5D; 0: 2D); None: as the init
    # weights take (2D from scratch)
    context: int | None = None


def cohort_slices(
    seeds: list[int],
    slices_per_subject: int,
    rng: np.random.Generator,
    progress: bool = True,
    context: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised model tiles (n, 2·context+1, s, s) and labels from phantoms of mixed matrix
    sizes; with context, the centres are spread over a series of 24 to 72 slices."""
    images, targets = [_empty_images(context)], [_EMPTY_TARGETS]
    for seed in tqdm(seeds, desc="phantoms", disable=not progress):
        size = int(rng.choice([256, 384, 512]))
        series = int(rng.choice(PHANTOM_STACK_SLICES)) if context else slices_per_subject
        ph = phantom.generate(seed, size=size, slices=series)
        centres = np.linspace(0, series - 1, slices_per_subject).round().astype(int)
        tiles, windows = stacked_tiles(
            ph.hu, (ph.geometry.pixel_spacing,) * 2, context, centres=centres
        )
        images.append(normalise_hu(tiles).astype(np.float16))
        targets.append(labels_on_tiles(ph.labels[centres], windows))
    return np.concatenate(images), np.concatenate(targets)


def randomised_slices(
    seeds: list[int], slices_per_subject: int, progress: bool = True, context: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Model-grid slices (n, 2·context+1, s, s) and labels from the randomised generator
    (rendered on the grid); with context, each random level comes with neighbours a random
    gap (`NEIGHBOUR_GAP_MM`) apart."""
    images, targets = [_empty_images(context)], [_EMPTY_TARGETS]
    for seed in tqdm(seeds, desc="randomised thighs", disable=not progress):
        if not context:
            ph = randomised.generate(seed, size=MODEL_INPUT_SIZE, slices=slices_per_subject)
            images.append(normalise_hu(ph.hu)[:, None].astype(np.float16))
            targets.append(ph.labels)
            continue
        rng = np.random.default_rng([seed, 25])
        length = randomised.sample_subject(seed).thigh_length
        gap = np.exp(rng.uniform(*np.log(NEIGHBOUR_GAP_MM))) / length
        offsets = gap * np.arange(-context, context + 1)
        levels = np.concatenate([c + offsets for c in rng.uniform(0.05, 0.95, slices_per_subject)])
        ph = randomised.generate(seed, size=MODEL_INPUT_SIZE, levels=levels)
        width = stack_channels(context)
        stacks = ph.hu.reshape(slices_per_subject, width, MODEL_INPUT_SIZE, MODEL_INPUT_SIZE)
        images.append(normalise_hu(stacks).astype(np.float16))
        targets.append(ph.labels[context::width])
    return np.concatenate(images), np.concatenate(targets)


def dataset_slices(
    root: Path, subjects: list[str], context: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Model tiles of a user's dataset (`thighseg dataset import`); "ignore" voxels get
    the loss's ignore index."""
    images, targets = [], []
    for case in dataset.cases_of(root, subjects):
        tiles, windows = stacked_tiles(case.hu, case.spacing_zyx[1:], context)
        images.append(normalise_hu(tiles).astype(np.float16))
        labels = labels_on_tiles(case.labels, windows)
        targets.append(np.where(labels == dataset.IGNORE, NUM_CLASSES, labels).astype(np.uint8))
    if not images:
        raise ValueError(f"no cases of subjects {', '.join(subjects) or '(none)'} in {root}")
    return np.concatenate(images), np.concatenate(targets)


@dataclass
class TrainingData:
    """Slices to learn from, and the held-out sets scored at the end (and during training when
    early stopping is on)."""

    images: np.ndarray
    targets: np.ndarray
    validation: dict[str, tuple[np.ndarray, np.ndarray]]
    description: dict


def synthetic_data(config: TrainConfig) -> TrainingData:
    rng = np.random.default_rng(config.seed)
    first, count = config.first_seed, config.subjects
    context = config.context
    images, targets = cohort_slices(
        list(range(first, first + count)), config.slices_per_subject, rng, context=context
    )
    extra = randomised_slices(
        list(range(RANDOMISED_FIRST_SEED, RANDOMISED_FIRST_SEED + config.randomised_subjects)),
        config.randomised_slices,
        context=context,
    )
    return TrainingData(
        images=np.concatenate([images, extra[0]]),
        targets=np.concatenate([targets, extra[1]]),
        validation=synthetic_held_out(config),
        description={},
    )


def held_out_seeds(config: TrainConfig) -> dict[str, list[int]]:
    """The subjects after the training phantoms and the randomised validation subjects."""
    first = config.first_seed + config.subjects
    first_random = RANDOMISED_FIRST_SEED + 90_000
    return {
        "validation": list(range(first, first + config.validation_subjects)),
        "validation_randomised": list(
            range(first_random, first_random + config.validation_subjects)
        ),
    }


def synthetic_held_out(config: TrainConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The held-out subjects (`held_out_seeds`): never trained on, scored at the end of every run
    (and by scripts comparing runs)."""
    seeds = held_out_seeds(config)
    return {
        "validation": cohort_slices(
            seeds["validation"],
            config.slices_per_subject,
            np.random.default_rng(12345),
            progress=False,
            context=config.context,
        ),
        "validation_randomised": randomised_slices(
            seeds["validation_randomised"],
            HELD_OUT_LEVELS,
            progress=False,
            context=config.context,
        ),
    }


def user_data(config: TrainConfig) -> TrainingData:
    """A fold of a user's dataset: its training subjects, its validation subjects held out
    ("all": every subject but the test set, nothing held out)."""
    root = Path(config.data or "")
    manifest = dataset.read_manifest(root)
    splits = dataset.read_splits(root)
    index = dataset.fold_index(splits, config.fold)
    if index is None:
        train_subjects = sorted(set(manifest.subjects()) - set(splits.get("test", [])))
        validation_subjects: list[str] = []
    else:
        fold = splits["folds"][index]
        train_subjects, validation_subjects = fold["train"], fold["validation"]
    images, targets = dataset_slices(root, train_subjects, config.context)
    validation = (
        {"validation": dataset_slices(root, validation_subjects, config.context)}
        if validation_subjects
        else {}
    )
    return TrainingData(
        images=images,
        targets=targets,
        validation=validation,
        description={
            "dataset": manifest.name,
            "dataset_digest": manifest.digest(),
            "fold": config.fold,
            "train_subjects": train_subjects,
            "validation_subjects": validation_subjects,
            "test_subjects": splits.get("test", []),
        },
    )


def _augment(torch, images, targets, generator):
    """CT-plausible augmentation: mirror, small affine, intensity offset and noise; 2.5D stacks
    are also reversed at random, so the model does not depend on which way a series is sorted.
    Targets may hold the ignore index NUM_CLASSES."""
    import torch.nn.functional as F

    n = images.shape[0]
    if images.shape[1] > 1:
        reverse = torch.rand(n, generator=generator) < 0.5
        images = torch.where(reverse[:, None, None, None], images.flip(1), images)
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
    onehot = F.one_hot(targets.long(), NUM_CLASSES + 1).permute(0, 3, 1, 2).float()
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
    """Cross-entropy + Dice over the groups; pixels with the ignore index count in neither."""
    import torch.nn.functional as F

    ce = F.cross_entropy(logits, targets, ignore_index=NUM_CLASSES)
    valid = (targets != NUM_CLASSES)[:, None].float()
    probs = logits.softmax(1) * valid
    onehot = F.one_hot(targets, NUM_CLASSES + 1)[..., :NUM_CLASSES].permute(0, 3, 1, 2).float()
    intersection = (probs * onehot).sum((0, 2, 3))
    dice = (2 * intersection + 1) / (probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1)
    return ce + (1 - dice[1:].mean())


def _checkpoint(torch, path: Path, network, optimiser, schedule, step: int, best: dict) -> None:
    torch.save(
        {
            "state_dict": network.state_dict(),
            "optimiser": optimiser.state_dict(),
            "schedule": schedule.state_dict(),
            "step": step,
            "best": best,
        },
        path,
    )


def train(config: TrainConfig, out: Path | None = None, checkpoint: Path | None = None) -> dict:
    """Train, validate on held-out subjects, save weights; resumes from `checkpoint` if present.

    With `validate_every`, the held-out DSC is written to `<out>.csv` as training goes, the best
    weights so far are kept, and training stops after `patience` checks without improvement.
    """
    import torch

    torch.manual_seed(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Mixed precision on GPU only: CPUs here have no native bf16 and autocast slows them down.
    amp = device.type == "cuda"
    out = out or models.weights_path(config.model)
    checkpoint = checkpoint or out.with_suffix(".ckpt")
    network = (
        models.load_trained(config.model, Path(config.init), context=config.context).train()
        if config.init
        else models.build(config.model, config.context or 0)
    ).to(device)
    config = replace(config, context=models.context_of(network))
    data = user_data(config) if config.data else synthetic_data(config)
    history = training_history(Path(config.init)) if config.init else []  # before `out` is replaced
    out.parent.mkdir(parents=True, exist_ok=True)  # once the data and the start are known good
    optimiser = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, config.learning_rate, total_steps=config.steps, pct_start=0.05
    )
    start_step, best = 0, {"dsc": -1.0, "step": 0, "checks_without_gain": 0}
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        network.load_state_dict(state["state_dict"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        start_step, best = state["step"], state.get("best", best)
    best_path = out.with_suffix(".best.pt")
    log = out.with_suffix(".csv")
    monitor = config.validate_every and "validation" in data.validation
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
        index = torch.randint(0, len(data.images), (config.batch_size,), generator=generator)
        x = torch.from_numpy(data.images[index.numpy()].astype(np.float32))
        y = torch.from_numpy(data.targets[index.numpy()].astype(np.int64))
        x, y = _augment(torch, x, y, generator)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss = _loss(torch, network(x).float(), y)
        optimiser.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
        schedule.step()
        done = step + 1
        if monitor and (done % config.validate_every == 0 or done == config.steps):
            stop = _check(torch, network, data, done, loss.item(), best, best_path, log, config)
            network.train()
        else:
            stop = False
        bar.set_postfix(  # after this step's check: the best so far, including it
            loss=f"{loss.item():.3f}", **({"best": f"{best['dsc']:.3f}"} if monitor else {})
        )
        if done % 100 == 0 or done == config.steps or stop:
            _checkpoint(torch, checkpoint, network, optimiser, schedule, done, best)
        if stop:
            bar.write(
                f"early stop at step {done}: best mean DSC {best['dsc']:.4f} at {best['step']}"
            )
            break
    if monitor and best_path.exists():
        network.load_state_dict(torch.load(best_path, map_location=device, weights_only=True))
    network = network.cpu().eval()
    validation = {name: _dice_on(network, *arrays) for name, arrays in data.validation.items()}
    torch.save(
        {
            "state_dict": _compact(network.state_dict()),
            "config": asdict(config),
            "validation": validation.get("validation", {}),
            "input_size": MODEL_INPUT_SIZE,
            "context": config.context,
        },
        out,
    )
    summary = {
        "config": asdict(config),
        **validation,
        **data.description,
        "best_step": best["step"] if monitor else config.steps,
        "seconds": round(time.time() - started, 1),
        "weights": out.name,
        "device": _describe(device),
        **({"history": history} if history else {}),
    }
    return record(summary, out)


def _check(torch, network, data, step, loss, best, best_path, log, config) -> bool:
    """Score the held-out slices, log a CSV row, keep the best weights; True: stop early."""
    network.eval()
    figures = _dice_on(network, *data.validation["validation"])
    mean = float(np.mean(list(figures.values())))
    if not log.exists():
        log.write_text("step,loss," + ",".join(figures) + ",mean\n")
    with log.open("a") as handle:
        handle.write(f"{step},{loss:.5f}," + ",".join(f"{v:.5f}" for v in figures.values()))
        handle.write(f",{mean:.5f}\n")
    if mean > best["dsc"]:
        best.update(dsc=mean, step=step, checks_without_gain=0)
        torch.save(network.state_dict(), best_path)
        return False
    best["checks_without_gain"] += 1
    return bool(config.patience) and best["checks_without_gain"] >= config.patience


SHIPPED_WEIGHTS_LIMIT_BYTES = 20 << 20


def _compact(state_dict: dict) -> dict:
    """FP16 storage when FP32 would exceed what we ship in git (weights load back as FP32)."""
    size = sum(t.numel() * t.element_size() for t in state_dict.values())
    if size <= SHIPPED_WEIGHTS_LIMIT_BYTES:
        return state_dict
    return {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}


def _dice_on(network, images: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    import torch

    with torch.no_grad():
        logits = torch.cat(
            [
                network(torch.from_numpy(images[i : i + 16].astype(np.float32)))
                for i in range(0, len(images), 16)
            ]
        )
    predicted = logits.argmax(1).numpy().astype(np.uint8)
    predicted[targets == NUM_CLASSES] = NUM_CLASSES  # ignored pixels score for no group
    return dice_per_group(predicted, targets)


def training_history(init: Path) -> list[dict]:
    """The runs that made the starting weights, oldest first (from their JSON, when there is one),
    so a card names every step that led to its weights."""
    recorded = init.with_suffix(".json")
    if not recorded.exists():
        return []
    earlier = json.loads(recorded.read_text())
    step = {key: earlier.get(key) for key in ("config", "seconds", "sha256", "device")}
    return [*earlier.get("history", []), step]


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
