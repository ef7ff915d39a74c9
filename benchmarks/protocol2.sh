#!/usr/bin/env bash
# Protocol v2, all of it (rules: docs/protocol.md). Every command appends records under
# benchmarks/protocol2/ and skips runs already recorded: rerun this script to resume, over days
# if need be; `bash benchmarks/protocol2.sh TASK` runs one task. One thread per run, CPU seconds
# as the clock, so streams may share a machine. Estimate: python benchmarks/protocol2.py estimate
# (36.5 CPU hours of training steps for every task and optimizer; evaluation comes on top).
# Then: python benchmarks/protocol2.py report
set -uo pipefail
cd "$(dirname "$0")/.."
P="${PYTHON:-python} benchmarks/protocol2.py"
export OMP_NUM_THREADS=1
DATA="${MBF_BENCH_DATA:-../shared/data}"
TUNED=adamw,schedulefree-adamw,soap,psgd-kron,muon,shampoo,sgdm,mbf,kfac,tnt,shampoo-ours
DEFAULTS=$TUNED,adamw@lr=3e-3
TASKS="digits-ae text-gpt-tiny planetoid-gcn cifar10-resnet8 curves-ae mnist-ae text-gpt"

for task in ${1:-$TASKS}; do
  # An optimizer that is not in the registry (its extra not installed) is skipped with a message.
  $P tune --task "$task" --optimizers "$TUNED" --data-dir "$DATA"
  $P final --task "$task" --optimizers "$TUNED" --data-dir "$DATA"
  $P defaults --task "$task" --optimizers "$DEFAULTS" --data-dir "$DATA"
done
