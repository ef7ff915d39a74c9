#!/usr/bin/env bash
# Lever screens for issue 19 item 3 on the transformer task, beside the protocol: text-gpt, 180
# CPU seconds of training per run (the defaults track's budget), warmup-cosine (the protocol's
# schedule; none for schedulefree-adamw), one thread, tuning seeds 100 and 101 (never the
# protocol's final seeds 0-4), validation loss on the held-out 10 % (the test tail never read).
# Each variant is "label optimizer [KEY=VALUE ...]" (overrides of the registry's defaults).
# A screen, not a protocol result. Writes benchmarks/gpt_levers/runs.json from every run under
# $OUT (runs of earlier invocations included).
# RUNNER (default mbf-bench) may name a script that registers a prototype optimizer and then
# takes mbf-bench's arguments (benchmarks/tied_rows/prototype.py).
# Usage: [BUDGET=180] [SEEDS="100 101"] [RUNNER=...] bash benchmarks/gpt_levers.sh "label opt k=v ..." ...
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpt_levers}"
DATA="${MBF_BENCH_DATA:-../shared/data}"
export OMP_NUM_THREADS=1
for seed in ${SEEDS:-100 101}; do
  for variant in "$@"; do
    read -r label optimizer overrides <<<"$variant"
    sets=()
    for kv in $overrides; do sets+=(--set "$kv"); done
    schedule=warmup-cosine
    [ "$optimizer" = schedulefree-adamw ] && schedule=constant
    if [ -f "$OUT/$label/text-gpt/$optimizer/$seed/metrics.jsonl" ] && \
       grep -q val_loss "$OUT/$label/text-gpt/$optimizer/$seed/metrics.jsonl"; then
      echo "$label seed $seed: done already"; continue
    fi
    ${RUNNER:-.venv/bin/mbf-bench} run --task text-gpt --optimizers "$optimizer" --seeds "$seed" \
      --budget-seconds "${BUDGET:-180}" --clock cpu --holdout 0.1 --schedule "$schedule" \
      --threads 1 --no-progress --data-dir "$DATA" --out "$OUT/$label" --overwrite "${sets[@]}"
  done
done
.venv/bin/python - "$OUT" benchmarks/gpt_levers/runs.json <<'PY'
import json, sys
from pathlib import Path
out, rows = Path(sys.argv[1]), []
for config in sorted(out.glob("*/text-gpt/*/*/config.json")):
    lines = [json.loads(t) for t in (config.parent / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in lines if "val_loss" in m]
    if not evals:
        continue
    spec = json.loads(config.read_text())
    rows.append({"label": config.parts[-5], "optimizer": config.parts[-3],
                 "seed": int(config.parts[-2]), "overrides": spec.get("hparam_overrides"),
                 "steps": evals[-1].get("step"), "val_loss": evals[-1]["val_loss"]})
target = Path(sys.argv[2])
target.parent.mkdir(parents=True, exist_ok=True)
old = json.loads(target.read_text()) if target.exists() else []
keep = {(r["label"], r["seed"]): r for r in old}
keep.update({(r["label"], r["seed"]): r for r in rows})
merged = sorted(keep.values(), key=lambda r: (r["label"], r["seed"]))
target.write_text(json.dumps(merged, indent=1) + "\n")
for r in merged:
    print(f"{r['label']:28s} seed {r['seed']}: {r['val_loss']:.4f} ({r['steps']} steps)")
PY
