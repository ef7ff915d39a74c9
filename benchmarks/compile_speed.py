"""``MBF(compile=True)`` against the eager step: optimizer-step time, alternating in one process.

Two copies of the task's model and of MBF (the benchmark's hyperparameters for the task), one
eager and one compiled, take statistics every step and no factorization; after warm-up (which
includes the compilation, reported apart) their ``optimizer.step()`` is timed in alternating
order for ``--rounds`` rounds, and the medians and their ratio are printed. CPU time by default
(``time.process_time``: less disturbed by a loaded machine); ``--clock wall`` for wall time (on a
GPU, the device is synchronized around each step).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/compile_speed.py --task mnist-ae
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mbf import MBF
from mbf.direction import Moments
from mbf_bench.speed import _Runner, _sync, workload
from mbf_bench.tasks import TASKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist-ae", choices=sorted(TASKS))
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = parser.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    device = torch.device(args.device)
    work = workload(args.task, device)
    torch.manual_seed(0)
    state = work.make_model().state_dict()
    runners = {"eager": _Runner("mbf", work, state, device),
               "compiled": _Runner("mbf", work, state, device)}
    compiled = runners["compiled"].optimizer
    assert isinstance(compiled, MBF)
    compiled.compile, compiled._moments = True, Moments(compile=True)

    def step(runner: _Runner) -> float:
        runner.optimizer.zero_grad()
        work.loss(runner.model, work.batch).backward()
        _sync(device)
        start = clock()
        runner.optimizer.step()
        _sync(device)
        return clock() - start

    for name, runner in runners.items():
        runner.set_mode(True, False)  # statistics every step, no factorization
        start = time.perf_counter()
        step(runner)
        step(runner)  # the first step with momentum: where the compiled loop is built
        print(f"{args.task} {name}: first two steps {time.perf_counter() - start:.1f} s (wall)")
        for _ in range(args.warmup):
            step(runner)
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for index in range(args.rounds):  # alternating order: drift hits both alike
        names = list(runners) if index % 2 else list(runners)[::-1]
        for name in names:
            seconds[name].append(step(runners[name]))
    median = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"{args.task} ({args.clock} clock, {torch.get_num_threads()} threads, {args.rounds} "
          f"rounds): eager {1e3 * median['eager']:.1f} ms, compiled "
          f"{1e3 * median['compiled']:.1f} ms, compiled / eager "
          f"{median['compiled'] / median['eager']:.3f}")


if __name__ == "__main__":
    main()
