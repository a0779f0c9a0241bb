"""`thighseg evaluate`: the paper's evaluation on phantom cohorts, for each model.

Per study (3D): DSC, sensitivity, specificity, accuracy per group; volumes (total muscle, lean
muscle, intramuscular and intermuscular fat) from the predicted and the true masks on the same HU.
Per cohort: mean ± SD, ICC(2,1) with 95 % CI for each volume, Bland–Altman. Output: JSON,
Markdown, DSC box plot, Bland–Altman plots, overlays of the worst and the median study.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from thighseg.client.volume import Backend, segment_volume
from thighseg.core.constants import EVALUATION_COHORTS
from thighseg.core.labels import MUSCLE_GROUPS
from thighseg.core.resample import MODEL_INPUT_SIZE
from thighseg.learning.dataset import IGNORE, Case, cases_of, read_manifest
from thighseg.measure.agreement import bland_altman, icc_2_1, mean_sd
from thighseg.measure.indices import volume_indices
from thighseg.measure.metrics import overlap_metrics
from thighseg.synthetic import cohorts
from thighseg.synthetic.phantom import Phantom

METRICS = ("dsc", "sensitivity", "specificity", "accuracy")


@dataclass(frozen=True)
class EvaluationConfig:
    cohorts: tuple[str, ...] = EVALUATION_COHORTS
    studies: int = 10
    slices: int = 24
    size: int = 512
    field_of_view: float | None = None  # mm; None: each generator draws its own
    tta: str = "none"  # test-time augmentation the backends apply ("flip"), recorded in the report


@dataclass(frozen=True)
class Study:
    """One labelled volume to score: a phantom or a case of a user's dataset."""

    case: str
    hu: np.ndarray
    labels: np.ndarray
    spacing_zyx: tuple[float, float, float]

    @staticmethod
    def of_phantom(study: Phantom) -> Study:
        g = study.geometry
        spacing = (g.slice_spacing, g.pixel_spacing, g.pixel_spacing)
        return Study(str(study.subject.seed), study.hu, study.labels, spacing)

    @staticmethod
    def of_case(case: Case) -> Study:
        # voxels labelled "ignore" are scored as background, whatever the model says there
        labels = np.where(case.labels == IGNORE, 0, case.labels).astype(np.uint8)
        return Study(case.case_id, case.hu, labels, case.spacing_zyx)


def evaluate_study(study: Study, backend: Backend) -> dict:
    predicted = segment_volume(
        study.hu, backend.infer, MODEL_INPUT_SIZE, study.spacing_zyx[1:], context=backend.context
    )
    return {
        "case": study.case,
        "overlap": overlap_metrics(predicted, study.labels),
        "volumes_predicted": volume_indices(study.hu, predicted, study.spacing_zyx).headline(),
        "volumes_truth": volume_indices(study.hu, study.labels, study.spacing_zyx).headline(),
        "_labels": predicted,
    }


def summarise(per_study: list[dict]) -> dict:
    summary: dict = {"overlap": {}, "volumes": {}}
    for group in [g.name.lower() for g in MUSCLE_GROUPS]:
        summary["overlap"][group] = {
            m: mean_sd(s["overlap"][group][m] for s in per_study) for m in METRICS
        }
    summary["overlap"]["mean"] = {
        m: mean_sd(
            np.mean([s["overlap"][g][m] for g in summary["overlap"] if g != "mean"])
            for s in per_study
        )
        for m in METRICS
    }
    groups = [g.name.lower() for g in MUSCLE_GROUPS]
    worst = min(per_study, key=lambda r: np.mean([r["overlap"][g]["dsc"] for g in groups]))
    summary["worst_study"] = {
        "case": worst["case"],
        "mean_dsc": float(np.mean([worst["overlap"][g]["dsc"] for g in groups])),
        "lowest_group_dsc": float(min(worst["overlap"][g]["dsc"] for g in groups)),
    }
    for volume in per_study[0]["volumes_truth"]:
        truth = np.array([s["volumes_truth"][volume] for s in per_study])
        predicted = np.array([s["volumes_predicted"][volume] for s in per_study])
        entry = {
            "truth_ml": mean_sd(truth),
            "predicted_ml": mean_sd(predicted),
            "bland_altman_ml": bland_altman(truth, predicted).as_dict(),
        }
        if len(per_study) >= 3:
            entry["icc_2_1"] = icc_2_1(np.stack([truth, predicted], axis=1)).as_dict()
        summary["volumes"][volume] = entry
    return summary


def phantom_cohorts(config: EvaluationConfig) -> dict[str, list[Study]]:
    return {
        cohort: [
            Study.of_phantom(s)
            for s in tqdm(
                cohorts.studies(
                    cohort, config.slices, config.size, config.studies, config.field_of_view
                ),
                total=config.studies,
                desc=f"phantoms {cohort}",
            )
        ]
        for cohort in config.cohorts
    }


def dataset_cohorts(root: Path, splits: dict) -> dict[str, list[Study]]:
    """A user's dataset as cohorts: each fold's validation subjects ("fold<k>") and the test
    subjects ("test") of its `splits` (its splits.json, `read_splits`)."""
    found = {
        f"fold{k}": [Study.of_case(c) for c in cases_of(root, fold["validation"])]
        for k, fold in enumerate(splits["folds"])
    }
    if splits.get("test"):
        found["test"] = [Study.of_case(c) for c in cases_of(root, splits["test"])]
    return found


def ensemble(backends: list[Backend]) -> Backend:
    """Mean logits of several models (the fold models on the test set, as nnU-Net does); they
    must take the same input."""
    contexts = {backend.context for backend in backends}
    if len(contexts) != 1:
        raise ValueError("the models take different neighbour slices (2D and 2.5D mixed)")

    def run(images: np.ndarray) -> np.ndarray:
        return np.mean([backend.infer(images) for backend in backends], axis=0)

    return replace(backends[0], infer=run)


def run_evaluation(
    backends: dict[str, Backend],
    out: Path,
    config: EvaluationConfig,
    studies_by_cohort: dict[str, list[Study]] | None = None,
    cohort_backends: dict[str, dict[str, Backend]] | None = None,
    pooled: tuple[str, ...] = (),
    source: dict | None = None,
) -> dict:
    """Score every model on every cohort (phantom cohorts of `config` unless studies are given;
    `cohort_backends` overrides the models for a cohort, e.g. each fold's own) and write JSON,
    Markdown and figures. `pooled` cohorts are also summarised together as "pooled". `source`
    says what was scored on what (a user's dataset: `dataset_source`)."""
    out.mkdir(parents=True, exist_ok=True)
    studies_by_cohort = studies_by_cohort or phantom_cohorts(config)
    report: dict = {
        "config": {**config.__dict__, "cohorts": list(studies_by_cohort)},
        "models": {},
    }
    if source is not None:
        report["source"] = source
    cases: dict = {}
    for cohort, studies in studies_by_cohort.items():
        for model, backend in (cohort_backends or {}).get(cohort, backends).items():
            results = [evaluate_study(s, backend) for s in tqdm(studies, desc=f"{model} {cohort}")]
            cases[(model, cohort)] = (studies, results)
    for model in {m for m, _ in cases}:
        if pooled:
            parts = [cases[(model, c)] for c in pooled if (model, c) in cases]
            cases[(model, "pooled")] = (
                [s for studies, _ in parts for s in studies],
                [r for _, results in parts for r in results],
            )
    for (model, cohort), (_, results) in cases.items():
        report["models"].setdefault(model, {})[cohort] = {
            "summary": summarise(results),
            "studies": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
        }
    report["config"]["cohorts"] = list(dict.fromkeys(c for _, c in cases))
    (out / "evaluation.json").write_text(json.dumps(report, indent=2))
    (out / "evaluation.md").write_text(markdown(report))
    write_figures(report, cases, out)
    return report


def _fmt(stat: dict, digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def dataset_source(root: Path, scored_with: list[str]) -> dict:
    """What a dataset evaluation scored: the dataset (name, manifest digest) and the models
    (weights files with their SHA-256, or a Triton URL), so a report is never read as another's."""
    manifest = read_manifest(root)
    return {
        "dataset": manifest.name,
        "dataset_path": str(root),
        "dataset_digest": manifest.digest(),
        "scored_with": scored_with,
    }


def weights_label(path: Path) -> str:
    """A weights file as a report names it: path and the start of its SHA-256."""
    return f"{path} (sha256 {hashlib.sha256(path.read_bytes()).hexdigest()[:12]})"


def _introduction(report: dict) -> list[str]:
    source = report.get("source")
    tta = report["config"].get("tta", "none")
    if source is None:
        return [
            "# thighseg evaluation (synthetic phantom cohorts)",
            "",
            "internal_test and external come from the generator family the models were trained "
            "on; stress comes from `thighseg.synthetic.stress`, built differently and never used "
            "in training or tuning.",
            "",
            f"Test-time augmentation: {tta}.",
        ]
    return [
        f"# thighseg evaluation on dataset `{source['dataset']}`",
        "",
        f"Dataset `{source['dataset_path']}` (manifest sha256 {source['dataset_digest'][:16]}…), "
        f"scored with {'; '.join(source['scored_with'])}; test-time augmentation: {tta}.",
        "",
        "fold*k*: the validation subjects of fold *k*, scored with that fold's weights; pooled: "
        "every fold's validation subjects together; test: the held-out subjects no fold trained "
        "on (with one model per fold, their ensemble).",
    ]


def markdown(report: dict) -> str:
    lines = [
        *_introduction(report),
        "",
        "DSC, sensitivity, specificity and accuracy are 3D per study, then mean ± SD over studies. "
        "ICC is ICC(2,1) (two-way random, absolute agreement, single measure) of predicted vs "
        "true volumes with its 95 % CI.",
        "",
    ]
    for cohort in report["config"]["cohorts"]:
        lines += [
            f"## {cohort}",
            "",
            "| model | extensor DSC | flexor DSC | adductor DSC | mean DSC | "
            "worst study (mean DSC) | mean sensitivity | mean specificity | mean accuracy |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for model, by_cohort in report["models"].items():
            if cohort not in by_cohort:
                continue
            o = by_cohort[cohort]["summary"]["overlap"]
            worst = by_cohort[cohort]["summary"]["worst_study"]
            lines.append(
                f"| {model} | {_fmt(o['extensor']['dsc'])} | {_fmt(o['flexor']['dsc'])} | "
                f"{_fmt(o['adductor']['dsc'])} | {_fmt(o['mean']['dsc'])} | "
                f"{worst['mean_dsc']:.3f} ({worst['case']}) | "
                f"{_fmt(o['mean']['sensitivity'])} | "
                f"{_fmt(o['mean']['specificity'], 4)} | {_fmt(o['mean']['accuracy'], 4)} |"
            )
        lines += [
            "",
            "| model | volume | truth mL | predicted mL | ICC(2,1) [95 % CI] | bias mL [LoA] |",
            "|---|---|---|---|---|---|",
        ]
        for model, by_cohort in report["models"].items():
            for volume, v in by_cohort.get(cohort, {"summary": {"volumes": {}}})["summary"][
                "volumes"
            ].items():
                icc = v.get("icc_2_1")
                icc_text = (
                    f"{icc['value']:.4f} [{icc['ci_low']:.4f}, {icc['ci_high']:.4f}]"
                    if icc
                    else "n/a"
                )
                ba = v["bland_altman_ml"]
                lines.append(
                    f"| {model} | {volume} | {_fmt(v['truth_ml'], 1)} | "
                    f"{_fmt(v['predicted_ml'], 1)} | "
                    f"{icc_text} | {ba['mean_difference']:.1f} [{ba['lower_limit']:.1f}, "
                    f"{ba['upper_limit']:.1f}] |"
                )
        lines.append("")
    return "\n".join(lines)


def write_figures(report: dict, cases: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from thighseg.pipeline.summary import Preview, write_overlay_png

    groups = [g.name.lower() for g in MUSCLE_GROUPS]
    models = list(report["models"])
    for cohort in report["config"]["cohorts"]:
        figure, axis = plt.subplots(figsize=(8, 4))
        data, labels = [], []
        present = [m for m in models if cohort in report["models"][m]]
        for model in present:
            for group in groups:
                data.append(
                    [s["overlap"][group]["dsc"] for s in report["models"][model][cohort]["studies"]]
                )
                labels.append(f"{model}\n{group}")
        axis.boxplot(data)
        axis.set_xticks(range(1, len(labels) + 1), labels, fontsize=7)
        axis.set_ylabel("DSC")
        axis.set_title(f"Per-group DSC, {cohort}")
        figure.tight_layout()
        figure.savefig(out / f"dsc_boxplot_{cohort}.png", dpi=110)
        plt.close(figure)
        for model in present:
            studies = report["models"][model][cohort]["studies"]
            volumes = list(studies[0]["volumes_truth"])
            figure, axes = plt.subplots(1, len(volumes), figsize=(4 * len(volumes), 3.5))
            for axis, volume in zip(axes, volumes, strict=False):
                truth = np.array([s["volumes_truth"][volume] for s in studies])
                predicted = np.array([s["volumes_predicted"][volume] for s in studies])
                ba = bland_altman(truth, predicted)
                axis.scatter((truth + predicted) / 2, predicted - truth, s=14)
                for y, style in (
                    (ba.mean_difference, "-"),
                    (ba.lower_limit, "--"),
                    (ba.upper_limit, "--"),
                ):
                    axis.axhline(y, linestyle=style, color="grey")
                axis.set_title(volume.replace("_", " "), fontsize=9)
                axis.set_xlabel("mean of truth and prediction (mL)", fontsize=8)
                axis.set_ylabel("prediction − truth (mL)", fontsize=8)
            figure.suptitle(f"Bland–Altman, {model}, {cohort}")
            figure.tight_layout()
            figure.savefig(out / f"bland_altman_{model}_{cohort}.png", dpi=110)
            plt.close(figure)
            studies_ph, results = cases[(model, cohort)]
            order = np.argsort([np.mean([r["overlap"][g]["dsc"] for g in groups]) for r in results])
            for tag, index in (("worst", order[0]), ("median", order[len(order) // 2])):
                write_overlay_png(
                    Preview.of(studies_ph[index].hu, results[index]["_labels"]),
                    out / f"overlay_{model}_{cohort}_{tag}.png",
                )
