#!/usr/bin/env bash
# How MBF's step ratios move from one thread to two (issue 17): `mbf-bench speed` for Adam/AdamW
# and MBF's defaults on the paper's shapes and the transformer tasks, once with OMP_NUM_THREADS=1
# and once with 2, on a quiet machine. Records and tables land in benchmarks/speed/threads-N.*.
# Usage: bash benchmarks/speed_threads.sh   (about 15 minutes on the project's 2-core machine)
set -euo pipefail
out=benchmarks/speed
mkdir -p "$out"
for threads in 1 2; do
  export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
  .venv/bin/mbf-bench speed --tasks mnist-ae,text-gpt,text-gpt-tiny,cifar10-resnet32 \
    --optimizers adam,adamw,mbf --repeats 5 --warmup 1 \
    --json "$out/threads-$threads.json" > "$out/threads-$threads.md"
  .venv/bin/mbf-bench speed --tasks cifar100-vgg16 --optimizers adam,mbf --repeats 3 --warmup 1 \
    --json "$out/threads-$threads-vgg16.json" > "$out/threads-$threads-vgg16.md"
done
