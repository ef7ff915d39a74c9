#!/usr/bin/env bash
# The speed table of docs/results.md: `mbf-bench speed` for the library's current defaults on
# the paper's shapes (random data of each task's shape), one thread, optimizers interleaved in
# one process per command. Records and tables land in benchmarks/speed/.
# Usage: bash benchmarks/speed.sh   (about 25 minutes on the project's 2-core machine)
set -euo pipefail
out=benchmarks/speed
mkdir -p "$out"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
bench=".venv/bin/mbf-bench"
$bench speed --tasks mnist-ae,cifar10-resnet32,planetoid-gcn \
  --optimizers sgdm,adam,mbf,mbf-paper,mbf-per_example,mbf-packed,kfac,shampoo-ours \
  --repeats 5 --warmup 1 --json "$out/small.json" > "$out/small.md"
# VGG-16 without the per-example and packed variants: seven copies of its state do not fit 24 GiB.
$bench speed --tasks cifar100-vgg16 --optimizers sgdm,adam,mbf,mbf-paper,kfac,shampoo-ours \
  --repeats 3 --warmup 1 --json "$out/vgg16.json" > "$out/vgg16.md"
