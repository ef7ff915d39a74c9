#!/usr/bin/env bash
# The runs behind docs/results.md (CPU, this project's 2-core machine). Usage:
#   bash benchmarks/results.sh [OUT] [DATA]     (defaults: runs/results ../shared/data)
set -euo pipefail
out=${1:-runs/results}
data=${2:-../shared/data}
bench=".venv/bin/mbf-bench"
$bench run --task planetoid-gcn --optimizers sgdm,adam,mbf,mbf-per_example,kfac,shampoo-ours \
  --seeds 0 --data-dir "$data" --out "$out"
$bench run --task cifar10-resnet8 --optimizers sgdm,adam,mbf,kfac,shampoo-ours --seeds 0 --epochs 20 \
  --data-dir "$data/cifar10/aamirmalik-dr/cifar10_sample.npz" --out "$out"
$bench run --task mnist-ae --optimizers sgdm,adam,mbf,kfac,shampoo-ours --seeds 0 \
  --budget-seconds 120 --data-dir "$data" --out "$out"
$bench report "$out"
