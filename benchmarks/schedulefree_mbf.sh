#!/usr/bin/env bash
# Lever check for issue 19 item 3: MBF's direction inside Schedule-Free averaging
# (`schedulefree-mbf`) against plain MBF, AdamW and Schedule-Free AdamW on text-gpt, 60 CPU
# seconds of training per run, one thread, tuning seed 100 (not a final seed), validation loss
# on the held-out 10 % (never the test tail). One seed: a screen of the lever, not a result of the
# protocol. Writes benchmarks/schedulefree_mbf/runs.json from the runs' metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/schedulefree_mbf}"
DATA="${MBF_BENCH_DATA:-../shared/data}"
export OMP_NUM_THREADS=1
run() {  # name optimizer schedule [--set k=v]
  local name=$1 opt=$2 schedule=$3; shift 3
  mbf-bench run --task text-gpt --optimizers "$opt" --seeds 100 --budget-seconds 60 --clock cpu \
    --holdout 0.1 --schedule "$schedule" --threads 1 --no-progress --data-dir "$DATA" \
    --out "$OUT/$name" --overwrite "$@"
}
run adamw-warmup-cosine adamw warmup-cosine
run mbf-warmup-cosine mbf warmup-cosine
run mbf-constant mbf constant
run schedulefree-adamw-constant schedulefree-adamw constant
run sfmbf-lr3e-3 schedulefree-mbf constant
run sfmbf-lr1e-2 schedulefree-mbf constant --set lr=1e-2
run sfmbf-lr1e-3 schedulefree-mbf constant --set lr=1e-3
run sfmbf-lr3e-3-momentum0.9 schedulefree-mbf constant --set momentum=0.9
python - "$OUT" benchmarks/schedulefree_mbf/runs.json <<'PY'
import json, sys
from pathlib import Path
rows = []
for config in sorted(Path(sys.argv[1]).glob("*/text-gpt/*/100/config.json")):
    lines = [json.loads(t) for t in (config.parent / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in lines if "val_loss" in m][-1]
    rows.append({"run": config.parts[-5], "optimizer": config.parts[-3],
                 "hparams": json.loads(config.read_text()).get("hparams"),
                 "steps": last.get("step"), "seconds": last.get("seconds"),
                 "val_loss": last["val_loss"]})
Path(sys.argv[2]).write_text(json.dumps(rows, indent=1) + "\n")
for r in sorted(rows, key=lambda r: r["val_loss"]):
    print(f"{r['run']:32s} {r['val_loss']:.3f}  ({r['steps']} steps)")
PY
