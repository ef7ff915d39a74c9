#!/usr/bin/env bash
# The comparison protocol as it was run for docs/results.md (2026-11-30, one thread per run, CPU
# seconds of the training steps as the clock). Every command appends records under
# benchmarks/protocol/ and skips runs already there: rerunning resumes. Two streams ran side by
# side on the 2-core machine. Then: python benchmarks/protocol_report.py
set -euo pipefail
cd "$(dirname "$0")/.."
P="${PYTHON:-python} benchmarks/protocol.py"
export OMP_NUM_THREADS=1
SMALL=sgdm,adam,mbf,mbf-paper,kfac,shampoo-ours

stream_mnist() {
  $P tune --task mnist-ae --optimizers adam,sgdm,kfac,tnt,mbf-paper,shampoo-ours,mbf --trials 8 \
    --cpu-seconds 40
  $P final --task mnist-ae --optimizers adam,sgdm,mbf,mbf-paper,shampoo-ours,tnt,kfac \
    --seeds 0,1,2 --cpu-seconds 90
  $P defaults --task mnist-ae --optimizers adam,sgdm,mbf,kfac,shampoo-ours,tnt --seeds 0,1 \
    --cpu-seconds 90
  $P ablate --task mnist-ae --optimizers mbf --seeds 0,1 --cpu-seconds 60
}

stream_small() {
  # task:tune-seconds:final-seconds
  for spec in digits-ae:2:4 planetoid-gcn:13:13 cifar10-resnet8:20:20 curves-ae:15:30; do
    IFS=: read -r task tune final <<<"$spec"
    opts=$SMALL
    case $task in planetoid-gcn|cifar10-resnet8) opts=$SMALL,mbf-sgd ;; esac
    $P tune --task "$task" --optimizers "$opts" --trials 6 --cpu-seconds "$tune"
    $P final --task "$task" --optimizers "$opts" --seeds 0,1,2 --cpu-seconds "$final"
    $P defaults --task "$task" --optimizers sgdm,adam,mbf,kfac,shampoo-ours --seeds 0,1 \
      --cpu-seconds "$final"
  done
}

case "${1:-all}" in
  mnist) stream_mnist ;;
  small) stream_small ;;
  all) stream_mnist & stream_small & wait ;;
esac
