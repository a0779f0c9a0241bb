#!/usr/bin/env bash
# A new site's labelled CT, end to end with the CLI a research group would use: import, split by
# subject, evaluate the shipped default model, fine-tune it, evaluate again on the same held-out
# subjects. The "site" is the stress generator (thighseg.synthetic.stress) at seeds 4100-4119, which
# the shipped weights never saw (the stress cohort of `thighseg evaluate` uses 4000-4019).
#
#   [SITE_SLICES=24] [SITE_SIZE=512] [SITE_FOLD=0|all] bash scripts/site_adaptation.sh [WORK_DIR] [STEPS]
#
# SITE_FOLD=all fine-tunes on all 10 non-test subjects (no validation: the last step's weights).
#
# Writes WORK_DIR/site_adaptation.json and prints the before/after table.
set -euo pipefail
work="${1:-/tmp/thighseg-site}"
steps="${2:-300}"
fold="${SITE_FOLD:-0}"
model="${MODEL:-$(.venv/bin/python -c "from thighseg.core.constants import DEFAULT_MODEL; print(DEFAULT_MODEL)")}"
thighseg=.venv/bin/thighseg
rm -rf "$work" && mkdir -p "$work"

# 1. the site's studies as an nnU-Net v2 raw dataset (NIfTI, RAS, its own label values)
.venv/bin/python scripts/site_dataset.py "$work/Dataset600_Site" 4100 4119 \
    --size "${SITE_SIZE:-512}" --slices "${SITE_SLICES:-24}" --label-map "$work/labels.yaml"

# 2. import, split: 10 subjects held out for testing, 10 for fine-tuning (8 train / 2 validation)
$thighseg dataset import "$work/Dataset600_Site" --labels "$work/labels.yaml" --out "$work/dataset"
$thighseg dataset split "$work/dataset" --folds 1 --test 10 --seed 0

# 3. before, 4. fine-tune, 5. after (the same 10 test subjects)
$thighseg evaluate --data "$work/dataset" --models "$model" --out "$work/before"
start=$(date +%s)
$thighseg train --model "$model" --data "$work/dataset" --fold "$fold" --steps "$steps" \
    --learning-rate 2e-4 --validate-every 50 --patience 3 --out "$work/site.pt"
seconds=$(( $(date +%s) - start ))
$thighseg evaluate --data "$work/dataset" --models "$model" --weights "$work/site.pt" --fold "$fold" \
    --out "$work/after"

.venv/bin/python - "$work" "$seconds" "$model" <<'EOF'
import json, os, sys
from pathlib import Path
work, seconds, model = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
result = {"model": model, "fine_tune_cpu_minutes": round(seconds / 60, 1)}
for tag in ("before", "after"):
    overlap = json.loads((work / tag / "evaluation.json").read_text())["models"][model]["test"]["summary"]["overlap"]
    result[tag] = {g: round(overlap[g]["dsc"]["mean"], 4) for g in ("extensor", "flexor", "adductor", "mean")}
(work / "site_adaptation.json").write_text(json.dumps(result, indent=2))
print(f"| {model} on 10 held-out site studies | extensor | flexor | adductor | mean |")
print("|---|---|---|---|---|")
for tag in ("before", "after"):
    r = result[tag]
    print(f"| {tag} | {r['extensor']:.3f} | {r['flexor']:.3f} | {r['adductor']:.3f} | {r['mean']:.3f} |")
print(f"fine-tuning: {result['fine_tune_cpu_minutes']} min")
EOF
