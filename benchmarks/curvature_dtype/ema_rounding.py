"""How much a bfloat16 running average loses, against the float64 one, per ``stat_decay``.

The statistics ``F <- decay F + (1 - decay) g g^T`` of a stationary stream of gradients (blocks
of 8, ``g ~ N(0, D)`` with diagonal scales spread over two decades) kept three ways by MBF's own
storage operations: in float32, in bfloat16 rounded after every update (packed storage, which
has no queue), and in bfloat16 folded ``stat_buffer=4`` estimates at a time in float32 and
rounded once (full storage's queue). Printed: the error of each against the float64 average
after ``--steps`` updates, relative to the block's largest entry (the median over blocks and
the largest), and the mean relative error of the diagonal (a bias: updates lost to rounding
would show here, as a shrinking diagonal).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/curvature_dtype/ema_rounding.py
"""

from __future__ import annotations

import argparse

import torch

from mbf.storage import STORAGES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--blocks", type=int, default=512)
    args = parser.parse_args()
    full = STORAGES["full"]
    s, n = 8, args.blocks
    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(-2, 0, s, dtype=torch.float64)
    print("| stat_decay | kept as | median error / max | largest error / max | diagonal bias |")
    print("|---|---|---|---|---|")
    for decay in (0.9, 0.95, 0.99, 0.999):
        a = 1.0 - decay
        exact = torch.zeros(n, s, s, dtype=torch.float64)
        kept = {
            "float32": torch.zeros(n, s, s),
            "bfloat16, rounded every update": torch.zeros(n, s, s, dtype=torch.bfloat16),
            "bfloat16, 4 folded in float32": torch.zeros(n, s, s, dtype=torch.bfloat16),
        }
        queue: list[torch.Tensor] = []
        for _ in range(args.steps):
            g = torch.randn(n, s, dtype=torch.float64, generator=gen) * scales
            exact.mul_(decay).add_(a * g[:, :, None] * g[:, None, :])
            full.add_outer_(kept["float32"], g.float(), a)
            full.add_outer_(kept["bfloat16, rounded every update"], g.float(), a)
            queue.append(g.float())
            if len(queue) == 4:
                full.fold_(kept["bfloat16, 4 folded in float32"], torch.stack(queue, 1), [a] * 4)
                queue = []
        peak = exact.abs().amax(dim=(1, 2))
        for label, stats in kept.items():
            error = (stats.double() - exact).abs().amax(dim=(1, 2)) / peak
            diag = exact.diagonal(0, 1, 2)
            bias = float(((stats.double().diagonal(0, 1, 2) - diag) / diag).mean())
            print(f"| {decay} | {label} | {float(error.median()):.2e} | "
                  f"{float(error.max()):.2e} | {bias:+.2e} |")


if __name__ == "__main__":
    main()
