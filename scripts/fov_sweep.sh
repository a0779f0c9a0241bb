#!/usr/bin/env bash
# Does accuracy depend on the field of view? The same subjects at FOV 300, 400 and 500 mm (512²
# acquisitions: 0.59 -> 0.98 mm pixels), default model, internal and stress cohorts; the model sees
# a 1.55 mm tile centred on the body whatever the FOV. At 300 mm the fixed phantom's thighs can
# reach the edge of the field of view.
#
#   bash scripts/fov_sweep.sh [OUT] [STUDIES]     -> OUT/fov_sweep.json and a table
set -euo pipefail
out="${1:-docs/evaluation/fov}"
studies="${2:-5}"
model="${MODEL:-$(.venv/bin/python -c "from thighseg.core.constants import DEFAULT_MODEL; print(DEFAULT_MODEL)")}"
for fov in 300 400 500; do
    .venv/bin/thighseg evaluate --models "$model" --cohorts internal_test stress --fov "$fov" \
        --studies "$studies" --out "$out/$fov" > /dev/null
done
.venv/bin/python - "$out" "$model" <<'PY'
import json, sys
from pathlib import Path
out, model = Path(sys.argv[1]), sys.argv[2]
table = {}
for fov in (300, 400, 500):
    report = json.loads((out / str(fov) / "evaluation.json").read_text())["models"][model]
    table[fov] = {c: {g: round(v["summary"]["overlap"][g]["dsc"]["mean"], 4)
                      for g in ("extensor", "flexor", "adductor", "mean")} for c, v in report.items()}
(out / "fov_sweep.json").write_text(json.dumps({"model": model, "dsc": table}, indent=2))
print("| FOV (acquired pixel) | internal mean DSC | stress mean DSC |")
print("|---|---|---|")
for fov, row in table.items():
    print(f"| {fov} mm ({fov / 512:.2f} mm) | {row['internal_test']['mean']:.3f} | {row['stress']['mean']:.3f} |")
PY
