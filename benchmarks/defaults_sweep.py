"""Evidence for MBF's default hyperparameters and estimator: a grid on scikit-learn's digits.

For each optimizer and setting, trains the same small networks from the same seeds for a fixed
number of steps and prints the final full-training-set loss (mean over seeds) and seconds per step.
Run: ``.venv/bin/python benchmarks/defaults_sweep.py [--steps 300] [--seeds 0,1,2]``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections.abc import Callable

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

from mbf import MBF


def data() -> tuple[torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    return x, torch.tensor(digits.target)


def classifier() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def autoencoder() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, 32),
        nn.ReLU(),
        nn.Linear(32, 8),
        nn.Linear(8, 32),
        nn.ReLU(),
        nn.Linear(32, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
    )


def run(
    problem: str,
    make_opt: Callable[[nn.Module], torch.optim.Optimizer],
    steps: int,
    seed: int,
    batch: int = 128,
) -> tuple[float, float]:
    x, y = data()
    torch.manual_seed(seed)
    model = classifier() if problem == "clf" else autoencoder()

    def loss_fn(out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if problem == "clf":
            return nn.functional.cross_entropy(out, y[idx])
        target = x[idx]
        return nn.functional.binary_cross_entropy_with_logits(out, target, reduction="sum") / len(
            idx
        )

    opt = make_opt(model)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        opt.zero_grad()
        loss = loss_fn(model(x[idx]), idx)
        loss.backward()
        opt.step()
    elapsed = (time.perf_counter() - start) / steps
    with torch.no_grad():
        final = float(loss_fn(model(x), torch.arange(len(x))))
    return (final if math.isfinite(final) else float("inf")), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--problems", default="clf,ae")
    parser.add_argument("--estimators", default="batch,per_example")
    parser.add_argument("--lrs", default="0.001,0.003,0.01,0.03,0.1")
    parser.add_argument("--dampings", default="1e-4,1e-3,1e-2,1e-1")
    parser.add_argument("--inv-every", type=int, default=20)
    parser.add_argument("--max-block-sizes", default="32")
    parser.add_argument("--no-baselines", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny networks: one thread is fastest and immune to oversubscription
    seeds = [int(s) for s in args.seeds.split(",")]
    grid: dict[str, Callable[..., torch.optim.Optimizer]] = {}
    if not args.no_baselines:
        for lr in (0.01, 0.03, 0.1, 0.3):
            grid[f"sgdm lr={lr}"] = lambda m, lr=lr: torch.optim.SGD(
                m.parameters(), lr=lr, momentum=0.9
            )
        for lr in (1e-3, 3e-3, 1e-2):
            grid[f"adam lr={lr}"] = lambda m, lr=lr: torch.optim.Adam(m.parameters(), lr=lr)
    floats = lambda text: [float(v) for v in text.split(",")]  # noqa: E731
    for est, lr, damping, mbs in itertools.product(
        args.estimators.split(","),
        floats(args.lrs),
        floats(args.dampings),
        [int(v) for v in args.max_block_sizes.split(",")],
    ):
        grid[f"mbf-{est} lr={lr} damping={damping} max_block_size={mbs}"] = (
            lambda m, est=est, lr=lr, damping=damping, mbs=mbs: MBF(
                m,
                lr=lr,
                damping=damping,
                estimator=est,
                inv_every=args.inv_every,
                max_block_size=mbs,
            )
        )
    for problem in args.problems.split(","):
        rows = []
        for name, make in grid.items():
            results = [run(problem, make, args.steps, s) for s in seeds]
            losses = [r[0] for r in results]
            rows.append((float(np.mean(losses)), name, float(np.mean([r[1] for r in results]))))
        rows.sort()
        print(
            f"\n## {problem}: final training loss after {args.steps} steps (mean of seeds {seeds})"
        )
        print("| setting | loss | ms/step |\n|---|---|---|")
        for loss, name, sec in rows:
            print(f"| {name} | {loss:.4f} | {1000 * sec:.2f} |")


if __name__ == "__main__":
    main()
