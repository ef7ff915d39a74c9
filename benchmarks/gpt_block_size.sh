#!/usr/bin/env bash
# Lever screen for issue 19 item 3: MBF's mini-block size on the transformer task. text-gpt,
# 180 CPU seconds of training per run (the defaults track's budget), warmup-cosine (the
# protocol's schedule), one thread, tuning seeds 100 and 101 (not the protocol's final seeds
# 0-4), validation loss on the held-out 10 % (never the test tail). Rows of text-gpt's Linear
# layers hold 129 entries (128 inputs and the bias): max_block_size 16 cuts them into 9 blocks
# of 15, 32 (the default) into 5 of 26, 64 into 3 of 43. A screen, not a protocol result.
# Writes benchmarks/gpt_block_size/runs.json from the runs' metrics.
# Usage: [BUDGET=180] bash benchmarks/gpt_block_size.sh [SIZES] [SEEDS]   (about 40 CPU minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpt_block_size}"
DATA="${MBF_BENCH_DATA:-../shared/data}"
export OMP_NUM_THREADS=1
for seed in ${2:-100 101}; do
  for size in ${1:-16 32 64}; do
    .venv/bin/mbf-bench run --task text-gpt --optimizers mbf --seeds "$seed" --budget-seconds "${BUDGET:-180}" \
      --clock cpu --holdout 0.1 --schedule warmup-cosine --threads 1 --no-progress \
      --data-dir "$DATA" --out "$OUT/mbs$size" --overwrite --set "max_block_size=$size"
  done
done
.venv/bin/python - "$OUT" benchmarks/gpt_block_size/runs.json <<'PY'
import json, sys
from pathlib import Path
rows = []
for config in sorted(Path(sys.argv[1]).glob("mbs*/text-gpt/*/*/config.json")):
    lines = [json.loads(t) for t in (config.parent / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in lines if "val_loss" in m][-1]
    rows.append({"max_block_size": int(config.parts[-5][3:]), "seed": int(config.parts[-2]),
                 "steps": last.get("step"), "seconds": last.get("seconds"),
                 "val_loss": last["val_loss"]})
Path(sys.argv[2]).parent.mkdir(parents=True, exist_ok=True)
Path(sys.argv[2]).write_text(json.dumps(rows, indent=1) + "\n")
for r in sorted(rows, key=lambda r: (r["max_block_size"], r["seed"])):
    print(f"max_block_size {r['max_block_size']:3d} seed {r['seed']}: {r['val_loss']:.4f} "
          f"({r['steps']} steps)")
PY
