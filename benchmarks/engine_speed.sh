#!/usr/bin/env bash
# Issue 10: step cost of MBF relative to Adam before (9d53ba2, the two-copy engine) and after
# the one-engine refactor, measured in alternating rounds in one session, one thread each.
# Usage: bash benchmarks/engine_speed.sh BEFORE_SRC_DIR  (e.g. a worktree of 9d53ba2's src/)
set -euo pipefail
before=${1:?usage: engine_speed.sh BEFORE_SRC_DIR}
out=benchmarks/engine_speed
mkdir -p "$out"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for round in 1 2; do
  for version in before after; do
    if [ "$version" = before ]; then path=$before; else path=src; fi
    PYTHONPATH=$path .venv/bin/python -m mbf_bench.cli speed --tasks mnist-ae,cifar10-resnet32 \
      --optimizers adam,mbf,mbf-packed --repeats 5 --warmup 1 \
      --json "$out/${version}_round${round}.json" > "$out/${version}_round${round}.md"
  done
done
