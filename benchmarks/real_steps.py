"""Cross-check of `mbf-bench speed`'s amortized step: time whole cycles of real training steps.

`mbf-bench speed` times each phase (statistics, factorization, plain step) and amortizes them. This
script instead runs each optimizer for whole cycles of consecutive steps at its own frequencies
(for MBF on autoencoders: a factorization every 20 steps, a statistics fold every 4), interleaved
over rounds, and prints the mean step and its ratio to the first optimizer named. Example:

    OMP_NUM_THREADS=1 python benchmarks/real_steps.py --task mnist-ae --steps 20 --rounds 2 \
        --optimizers adam,mbf,mbf-packed,kfac,shampoo-ours
"""

from __future__ import annotations

import argparse
import time

import torch

from mbf_bench.speed import _Runner, workload
from mbf_bench.tasks import TASKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist-ae", choices=sorted(TASKS))
    parser.add_argument("--optimizers", default="adam,mbf,kfac,shampoo-ours")
    parser.add_argument("--steps", type=int, default=20, help="steps per round (a whole cycle)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cpu = torch.device("cpu")
    work = workload(args.task, cpu)  # the task registry's model, batch and loss; random data
    torch.manual_seed(0)
    state = work.make_model().state_dict()
    batch = work.batch
    names = args.optimizers.split(",")
    runners = [_Runner(name, work, state, cpu) for name in names]
    for runner in runners:
        for _ in range(args.warmup):
            runner.step(batch)
    total = dict.fromkeys(names, 0.0)
    for _ in range(args.rounds):
        for runner in runners:  # interleaved rounds: machine drift hits every optimizer alike
            start = time.perf_counter()
            for _ in range(args.steps):
                runner.step(batch)
            total[runner.name] += time.perf_counter() - start
    n = args.rounds * args.steps
    for name in names:
        ratio = total[name] / total[names[0]]
        print(f"{args.task} {name}: {total[name] / n:.4f} s/step, x{ratio:.2f}")


if __name__ == "__main__":
    main()
