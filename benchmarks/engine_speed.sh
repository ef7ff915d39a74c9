#!/usr/bin/env bash
# Step cost of MBF relative to Adam for two versions of the code, measured in alternating rounds
# in one session, one thread each (`mbf-bench speed` with the same optimizers and tasks).
# Usage: [THREADS=1] [OPTIMIZERS=...] bash benchmarks/engine_speed.sh BEFORE_SRC_DIR [OUT_DIR] [TASKS]
#   issue 10 (the one-engine refactor), BEFORE = a worktree of 9d53ba2's src/:
#     bash benchmarks/engine_speed.sh ../before/src
#   the cheaper Adam graft, BEFORE = a worktree of c598893's src/:
#     bash benchmarks/engine_speed.sh ../before-graft/src benchmarks/graft_speed mnist-ae
#   the factorization cut into one part per thread, BEFORE = a worktree of 4b26e4e's src/:
#     THREADS=2 OPTIMIZERS=adam,adamw,mbf bash benchmarks/engine_speed.sh ../before/src \
#       benchmarks/threads_speed mnist-ae,text-gpt,cifar10-resnet32
set -euo pipefail
before=${1:?usage: engine_speed.sh BEFORE_SRC_DIR [OUT_DIR] [TASKS]}
out=${2:-benchmarks/engine_speed}
tasks=${3:-mnist-ae,cifar10-resnet32}
mkdir -p "$out"
threads=${THREADS:-1}
optimizers=${OPTIMIZERS:-adam,mbf,mbf-paper,mbf-packed}
export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
for round in 1 2; do
  for version in before after; do
    if [ "$version" = before ]; then path=$before; else path=src; fi
    PYTHONPATH=$path .venv/bin/python -m mbf_bench.cli speed --tasks "$tasks" \
      --optimizers "$optimizers" --repeats 5 --warmup 1 \
      --json "$out/${version}_round${round}.json" > "$out/${version}_round${round}.md"
  done
done
