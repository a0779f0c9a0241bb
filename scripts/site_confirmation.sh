#!/usr/bin/env bash
# Confirms a site fine-tuning on 10 fresh subjects of the same site (stress generator, seeds
# 4120-4129): neither trained on nor used to choose anything (steps, TTA), so the figure is not
# flattered by choices made on site_adaptation.sh's test subjects. Scores the shipped weights and
# WEIGHTS, without and with flip TTA, once.
#
#   [SITE_SLICES=72] bash scripts/site_confirmation.sh WEIGHTS [WORK_DIR]
set -euo pipefail
weights="$1"
work="${2:-/tmp/thighseg-site-confirmation}"
model="${MODEL:-$(.venv/bin/python -c "from thighseg.core.constants import DEFAULT_MODEL; print(DEFAULT_MODEL)")}"
thighseg=.venv/bin/thighseg
rm -rf "$work" && mkdir -p "$work"

.venv/bin/python scripts/site_dataset.py "$work/Dataset601_SiteConfirmation" 4120 4129 \
    --size "${SITE_SIZE:-512}" --slices "${SITE_SLICES:-72}" --label-map "$work/labels.yaml"
$thighseg dataset import "$work/Dataset601_SiteConfirmation" --labels "$work/labels.yaml" \
    --out "$work/dataset"
# every subject is a test subject: no fold, nothing to train or choose on
.venv/bin/python -c "import json, sys; json.dump({'seed': 0, 'test': [f'site_{s}' for s in range(4120, 4130)], 'folds': []}, open(sys.argv[1], 'w'))" "$work/split.json"
$thighseg dataset split "$work/dataset" --split-file "$work/split.json"

$thighseg evaluate --data "$work/dataset" --models "$model" --out "$work/before"
$thighseg evaluate --data "$work/dataset" --models "$model" --weights "$weights" --fold all \
    --out "$work/after"
$thighseg evaluate --data "$work/dataset" --models "$model" --weights "$weights" --fold all \
    --tta flip --out "$work/after_tta_flip"

.venv/bin/python - "$work" "$model" <<'PY'
import json, sys
from pathlib import Path
work, model = Path(sys.argv[1]), sys.argv[2]
result = {"model": model, "subjects": [f"site_{s}" for s in range(4120, 4130)]}
print(f"| {model} on 10 fresh site studies | extensor | flexor | adductor | mean | worst study |")
print("|---|---|---|---|---|---|")
for tag in ("before", "after", "after_tta_flip"):
    summary = json.loads((work / tag / "evaluation.json").read_text())["models"][model]["test"]["summary"]
    overlap = summary["overlap"]
    r = {g: round(overlap[g]["dsc"]["mean"], 4) for g in ("extensor", "flexor", "adductor", "mean")}
    worst = summary["worst_study"]
    r["worst_study"] = {"case": worst["case"], "mean_dsc": round(worst["mean_dsc"], 4)}
    result[tag] = r
    print(
        f"| {tag} | {r['extensor']:.3f} | {r['flexor']:.3f} | {r['adductor']:.3f} | {r['mean']:.3f} "
        f"| {worst['mean_dsc']:.3f} ({worst['case']}) |"
    )
(work / "site_confirmation.json").write_text(json.dumps(result, indent=2))
PY
