"""Count the MBF updates that were not applied (``counters['overflowed_updates']``) and the
blocks that took their right-hand side's direction (``counters['overflowed_blocks']``) over a
text-gpt run at the registry defaults: the check behind the overflow fix of 2026-12-07
(``docs/reliability.md``). Prints one JSON line every 100 steps.

    OMP_NUM_THREADS=1 python benchmarks/overflow_check.py --steps 1600 --seed 1 \
        --schedule warmup-cosine --data-dir ../shared/data

Before the fix (commit 65858ab), that run dropped every update from step 780 on; at a constant
learning rate, seed 0, 1,000 steps, it dropped none.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mbf_bench.optimizers import build_optimizer
from mbf_bench.schedule import SCHEDULES, lr_factor
from mbf_bench.tasks import get_task, load_data, make_problem
from mbf_bench.train import resolve_hparams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="text-gpt")
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--schedule", choices=SCHEDULES, default="warmup-cosine")
    parser.add_argument("--data-dir", default="../shared/data")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = get_task(args.task)
    data = load_data(task, Path(args.data_dir))
    problem = make_problem(task, data, seed=args.seed, device=torch.device("cpu"))
    torch.manual_seed(args.seed)
    model = task.model(data)
    opt = build_optimizer("mbf", model, resolve_hparams("mbf", task, {}))
    base = [group["lr"] for group in opt.param_groups]
    per_epoch = problem.steps_per_epoch
    first = None
    for step in range(args.steps):
        factor = lr_factor(args.schedule, step / args.steps, 0.05)
        for group, lr in zip(opt.param_groups, base, strict=True):
            group["lr"] = lr * factor
        opt.zero_grad()
        loss = problem.loss(model, problem.batch(step // per_epoch, step % per_epoch))
        loss.backward()
        opt.step()
        counters = opt.counters
        if first is None and counters["overflowed_updates"]:
            first = step
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            print(json.dumps({"step": step + 1, "loss": float(loss.detach()),
                              "first_dropped_update": first,
                              **{k: v for k, v in counters.items() if k.startswith("overflow")}}),
                  flush=True)


if __name__ == "__main__":
    main()
