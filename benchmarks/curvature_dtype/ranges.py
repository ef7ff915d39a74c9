"""The range MBF's float32 statistics and inverses span on mnist-ae, against float16's.

Trains the task's model with the bench's MBF (float32 curvature) for ``--steps`` steps on random
batches of the task's shape and prints, over all blocks, the smallest and largest nonzero
magnitude of the statistics and of the inverses, and the share of nonzero entries that
float16 would flush below its smallest normal (6.1e-5) or its smallest subnormal (6.0e-8), or
overflow (above 65504).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/curvature_dtype/ranges.py
"""

from __future__ import annotations

import argparse

import torch

from mbf_bench.optimizers import build_optimizer
from mbf_bench.speed import workload
from mbf_bench.train import resolve_hparams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    work = workload("mnist-ae", torch.device("cpu"))
    torch.manual_seed(0)
    model = work.make_model()
    opt = build_optimizer("mbf", model, resolve_hparams("mbf", work.task, {}))
    for _ in range(args.steps):
        opt.zero_grad()
        work.loss(model, work.batch).backward()
        opt.step()
    half = torch.finfo(torch.float16)
    for kind in ("fisher", "inverse"):
        values = torch.cat([getattr(u, kind).abs().reshape(-1) for u in opt.blocks()])
        values = values[values > 0]
        below_normal = float((values < half.tiny).double().mean())
        below_sub = float((values < 2.0**-24).double().mean())
        above = float((values > half.max).double().mean())
        print(f"{kind}: nonzero |x| in [{float(values.min()):.2e}, {float(values.max()):.2e}]; "
              f"float16 subnormal {below_normal:.1%}, zero {below_sub:.1%}, inf {above:.2%}")


if __name__ == "__main__":
    main()
