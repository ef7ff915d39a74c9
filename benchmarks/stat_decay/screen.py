"""Should MBF's default ``stat_decay`` be 0.99 instead of 0.9? A validation screen on every task
of protocol v2, with the rule for the answer written down before the runs (README.md).

Each run is a protocol v2 tuning run (``mbf_bench.protocol.run_job`` with phase ``tune``: the
task's CPU-second budget, warmup-cosine, the validation split held out of the training set; the
test split is never read) of MBF at the library defaults as the defaults track builds them, with
only ``stat_decay`` changed, on the screen's own seeds 100 and 101 (disjoint from the protocol's
tuning seed 1000 and final seeds 0-4). Records (without their curves) go to ``runs.jsonl``; a
run already there is not run again, so the screen resumes.

    OMP_NUM_THREADS=1 python benchmarks/stat_decay/screen.py run --data-dir ../shared/data \
        [--tasks digits-ae,...] [--values 0.9,0.99] [--seeds 100,101]
    python benchmarks/stat_decay/screen.py report
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from mbf_bench.protocol import TrialJob, library_defaults, load_rules, screen_main, screen_run

HERE = Path(__file__).resolve().parent
RUNS = HERE / "runs.jsonl"
TASKS = ("digits-ae", "text-gpt-tiny", "planetoid-gcn", "cifar10-resnet8", "curves-ae",
         "mnist-ae", "text-gpt")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    rules = load_rules()
    for task in args.tasks.split(","):
        for seed in map(int, args.seeds.split(",")):
            for value in map(float, args.values.split(",")):
                hparams = {**library_defaults("mbf", task), "stat_decay": value}
                job = TrialJob("tune", task, "mbf", "mbf", hparams, seed)
                row = screen_run(rules, job, args.data_dir, RUNS,
                                 {"task": task, "stat_decay": value, "seed": seed})
                if row is not None:
                    print(json.dumps(row), flush=True)
    return 0


def report(args: argparse.Namespace) -> int:
    rows = [json.loads(t) for t in RUNS.read_text().splitlines()]
    print("| task | metric | stat_decay | seed 100 | seed 101 | mean | steps |")
    print("|---|---|---|---|---|---|---|")
    for task in TASKS:
        for value in sorted({r["stat_decay"] for r in rows if r["task"] == task}):
            mine = {r["seed"]: r for r in rows if r["task"] == task and r["stat_decay"] == value}
            vals = [mine[s]["value"] for s in sorted(mine)]
            cells = [f"{mine[s]['value']:.4g}" if mine[s]["value"] is not None else "diverged"
                     for s in (100, 101) if s in mine]
            mean = statistics.fmean(vals) if vals and None not in vals else float("nan")
            metric = next(iter(mine.values()))["metric"]
            steps = "/".join(str(mine[s]["steps"]) for s in sorted(mine))
            cells += [""] * (2 - len(cells))
            print(f"| {task} | {metric} | {value:g} | " + " | ".join(cells)
                  + f" | {mean:.4g} | {steps} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    def arguments(run: argparse.ArgumentParser) -> None:
        run.add_argument("--values", default="0.9,0.99")

    return screen_main(__doc__ or "", TASKS, run, report, arguments, argv)

if __name__ == "__main__":
    sys.exit(main())
