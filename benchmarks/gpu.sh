#!/usr/bin/env bash
# The speed table on a CUDA GPU (`mbf` is tied rows, the default since 2026-12-08; `mbf-untied`
# the block per row of before), then 16-bit curvature and MBF(compile=True) against eager, within
# ten minutes. Usage (repository root):
#   bash benchmarks/gpu.sh [OUT_JSON]
# Installs the project into the current Python if mbf_bench is not importable (CUDA torch assumed
# present), prints the card's name, then the table of `mbf-bench speed --device cuda`.
set -euo pipefail
out=${1:-speed-gpu.json}
python -c "import mbf_bench" 2>/dev/null || python -m pip install -q --no-deps -e .
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)"
timeout 290 python -m mbf_bench.cli speed --device cuda \
  --tasks mnist-ae,cifar10-resnet32,cifar100-vgg16,planetoid-gcn \
  --optimizers sgdm,adam,mbf,mbf-untied,mbf-per_example,mbf-packed,kfac,shampoo-ours --repeats 5 \
  --warmup 3 --json "$out"
# 16-bit curvature (issue 17) and the transformer task (issue 19) on the same card: MBF's
# float32, bfloat16 and packed bfloat16 curvature against Adam/AdamW (text-gpt on stand-in data
# of the task's shapes, as `speed` does everywhere).
timeout 150 python -m mbf_bench.cli speed --device cuda --tasks mnist-ae,text-gpt \
  --optimizers adam,adamw,mbf,mbf-bf16,mbf-packed-bf16 --repeats 5 --warmup 3 \
  --json "${out%.json}-curvature-dtype.json" || echo "the 16-bit speed run did not finish in 150 s"
# MBF(compile=True) against the eager step on the same card (issue 17; compilation included in
# the first steps, reported apart).
timeout 150 python benchmarks/compile_speed.py --task mnist-ae --device cuda --clock wall \
  --rounds 8 || echo "compile_speed.py did not finish in 150 s"
