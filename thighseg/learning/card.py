"""Model cards written from what training recorded, so a card never drifts from its weights.

`thighseg train` calls `write_card` with its summary; `thighseg evaluate` figures are added when an
evaluation JSON is given (`thighseg card --evaluation docs/evaluation/evaluation.json`). Why a
run's weights were adopted is decided after training, against a rule declared before it: that note
is kept in the summary JSON under `adoption`, so a card written again keeps it.
"""

from __future__ import annotations

import json
from pathlib import Path

from thighseg.core.resample import MODEL_PIXEL_MM, stack_channels
from thighseg.learning import models

ARCHITECTURES = {
    "denseunet": "dense-block U-Net (`thighseg/learning/dense_unet.py`, FC-DenseNet style, "
    "0.72 M parameters)",
    "manet": "MANet with an EfficientNet-B0 encoder and a slim decoder "
    "(segmentation-models-pytorch, 7.6 M parameters)",
    "segformer": "SegFormer with a MiT-b0 encoder (segmentation-models-pytorch, 3.7 M parameters)",
}
GROUPS = ("extensor", "flexor", "adductor")
ADOPTION = "adoption"  # the summary's note on why these weights were adopted (Markdown)
COHORT_NOTES = {
    "internal_test": "fixed phantom, training site (training generator family)",
    "external": "fixed phantom, second site (training generator family)",
    "stress": "independent generator, never used in training or tuning",
}


def command(config: dict) -> str:
    """The `thighseg train` command line that reproduces a run."""
    if config.get("data"):
        return (
            f"thighseg train --model {config['model']} --data {config['data']} "
            f"--fold {config['fold']} --steps {config['steps']} --batch-size "
            f"{config['batch_size']} --learning-rate {config['learning_rate']:g} "
            f"--validate-every {config['validate_every']} --patience {config['patience']} "
            f"--seed {config['seed']}"
            + (f" --init {config['init']}" if config.get("init") else "")
            + (f" --context {config['context']}" if config.get("context") else "")
        )
    parts = [
        f"thighseg train --model {config['model']}",
        f"--subjects {config['subjects']} --slices {config['slices_per_subject']}",
        f"--randomised-subjects {config.get('randomised_subjects', 0)}",
        f"--randomised-slices {config.get('randomised_slices', 0)}",
        f"--steps {config['steps']} --batch-size {config['batch_size']}",
        f"--learning-rate {config['learning_rate']:g} --seed {config['seed']}",
    ]
    if config.get("validate_every"):
        parts.append(
            f"--validate-every {config['validate_every']} --patience {config.get('patience', 0)}"
        )
    if config.get("init"):
        parts.append(f"--init {Path(config['init']).name}")
    if config.get("context"):
        parts.append(f"--context {config['context']}")
    return " ".join(parts)


def _dataset_lines(summary: dict) -> list[str]:
    fold = summary["fold"]
    kept = (
        f"Best validation at step {summary.get('best_step')}"
        if summary["validation_subjects"]
        else f"No validation subject: the weights of the last step ({summary.get('best_step')})"
    )
    return [
        f"Fine-tuned on the dataset `{summary['dataset']}` (content digest "
        f"`{summary['dataset_digest'][:16]}…`), fold {fold}: "
        f"{len(summary['train_subjects'])} training subject(s), "
        f"{len(summary['validation_subjects'])} validation subject(s), "
        f"{len(summary['test_subjects'])} test subject(s) never used. {kept}. Started from "
        + (
            f"`{Path(summary['config']['init']).name}`"
            if summary["config"].get("init")
            else "scratch"
        )
        + " (the shipped weights' cards describe their synthetic training).",
    ]


def _synthetic_lines(config: dict) -> list[str]:
    last_seed = config["first_seed"] + config["subjects"] - 1
    neighbours = (
        [
            f"2.5D: each slice comes with its {config['context']} neighbour(s) on either side, "
            "phantom slices from series of 24 to 72 slices, randomised levels with neighbours "
            "1–20 mm apart (log-uniform); stacks reversed at random."
        ]
        if config.get("context")
        else []
    )
    return [
        f"Synthetic only. {config['subjects']} fixed-phantom subjects "
        f"(`thighseg.synthetic.phantom`, seeds {config['first_seed']}–{last_seed}, "
        f"{config['slices_per_subject']} slices each) and {config.get('randomised_subjects', 0)} "
        "subjects of the randomised generator (`thighseg.synthetic.randomised`: septa direction, "
        "curvature and waviness, group proportions, femur position, outline, atrophy, fatty "
        "infiltration, oedema, metal, tissue HU, kernels, noise, slice thickness, field of view; "
        f"{config.get('randomised_slices', 0)} random levels each). Augmentation: mirror, "
        "rotation, scale, shift, intensity offset, noise. The stress generator "
        "(`thighseg.synthetic.stress`) was never used."
    ] + neighbours


def _history_lines(summary: dict) -> list[str]:
    """The runs these weights were fine-tuned from, oldest first, and the time of all runs."""
    history = summary.get("history", [])
    if not history:
        return []
    total = sum(step.get("seconds") or 0 for step in history) + summary["seconds"]
    lines = ["", "Fine-tuned from the result of (oldest first):"]
    for step in history:
        sha = step.get("sha256")
        lines.append(
            f"1. `{command(step['config'])}` — {step.get('seconds') or 0:,.0f} s on "
            f"{step.get('device') or 'cpu'}" + (f", sha256 `{sha[:16]}…`" if sha else "")
        )
    lines += ["", f"All runs together: {total:,.0f} s."]
    return lines


def _dice_rows(figures: dict[str, float]) -> list[str]:
    rows = [f"| {g} | {figures[g]:.3f} |" for g in GROUPS]
    rows.append(f"| mean | {sum(figures[g] for g in GROUPS) / 3:.3f} |")
    return rows


def render(summary: dict, evaluation: dict | None = None) -> str:
    """The card as Markdown."""
    config = summary["config"]
    model = config["model"]
    context = config.get("context", 0)
    stack = (
        f"the slice and its {context} neighbour(s) on either side in position order (2.5D), "
        if context
        else ""
    )
    lines = [
        f"# Model card: thighseg {model}",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {ARCHITECTURES[model]} |",
        f"| input / output | {stack_channels(context)} × 256 × 256: {stack}HU clipped to "
        "[-250, 250] and scaled to [-1, 1] (`thighseg.core.labels.normalise_hu`), any matrix "
        "resampled to a "
        f"256² tile of {MODEL_PIXEL_MM} mm pixels centred on the body "
        "(`thighseg.core.resample`; shrunk to fit a wider body) → 4-class logits "
        "(background, extensor, flexor, adductor) |",
        f"| file | `{summary['weights']}` (sha256 `{summary.get('sha256', 'n/a')[:16]}…`) |",
        f"| served as | `{models.triton_name(model)}` |",
        "",
        "## Data",
        *(_dataset_lines(summary) if "dataset_digest" in summary else _synthetic_lines(config)),
        *(["", summary[ADOPTION]] if summary.get(ADOPTION) else []),
        "",
        "## Command",
        "```bash",
        command(config),
        "```",
        f"AdamW, one-cycle schedule, cross-entropy + Dice; {summary['seconds']:,.0f} s on "
        f"{summary.get('device', 'cpu')}"
        + (f", fine-tuned from `{Path(config['init']).name}`" if config.get("init") else "")
        + ". Versions: "
        + ", ".join(f"{k} {v}" for k, v in summary.get("versions", {}).items())
        + ".",
        *_history_lines(summary),
        "",
        "## Validation (model grid, held-out subjects)",
    ]
    if summary.get("validation"):
        label = "validation subjects DSC" if "dataset_digest" in summary else "fixed phantom DSC"
        lines += [f"| group | {label} |", "|---|---|", *_dice_rows(summary["validation"])]
    elif "dataset_digest" in summary:
        lines += ["None: every subject outside the test set was trained on (`--fold all`)."]
    if "validation_randomised" in summary:
        lines += [
            "",
            "| group | randomised generator DSC |",
            "|---|---|",
            *_dice_rows(summary["validation_randomised"]),
        ]
    if evaluation and model in evaluation.get("models", {}):
        lines += ["", *_evaluation_rows(evaluation, model)]
    lines += [
        "",
        "## Limits",
        "Validated on the data named above only; check it on your own cases before clinical "
        "use. Not a medical device.",
        "",
        "## Licence",
        "Apache License 2.0, like the code (`LICENSE`). No patient data went into these weights.",
        "",
    ]
    return "\n".join(lines)


def _evaluation_rows(evaluation: dict, model: str) -> list[str]:
    config = evaluation["config"]
    lines = [
        f"## Evaluation (`thighseg evaluate`, {config['studies']} studies of {config['slices']} "
        f"slices {config['size']}² per cohort, 3D DSC mean ± SD)",
        "| cohort | what it is | extensor | flexor | adductor | mean |",
        "|---|---|---|---|---|---|",
    ]
    for cohort, figures in evaluation["models"][model].items():
        overlap = figures["summary"]["overlap"]
        cells = " | ".join(
            f"{overlap[g]['dsc']['mean']:.3f} ± {overlap[g]['dsc']['sd']:.3f}"
            for g in (*GROUPS, "mean")
        )
        lines.append(f"| {cohort} | {COHORT_NOTES.get(cohort, '')} | {cells} |")
    return lines


def write_card(summary: dict, path: Path, evaluation: dict | None = None) -> Path:
    path.write_text(render(summary, evaluation))
    return path


def refresh_cards(evaluation_json: Path, weights_dir: Path = models.WEIGHTS_DIR) -> list[Path]:
    """Rewrite every card beside its weights with the figures of an evaluation run."""
    evaluation = json.loads(evaluation_json.read_text())
    written = []
    for model in evaluation["models"]:
        summary_path = weights_dir / f"{model}.json"
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            written.append(write_card(summary, weights_dir / f"{model}.md", evaluation))
    return written
