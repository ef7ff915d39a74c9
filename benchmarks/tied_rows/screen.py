"""Should ``tie_rows`` be MBF's default? A validation screen of the library option on every task
of protocol v2, against MBF's current defaults, with the rule written down before the runs
(README.md, "The library option").

Each run is a protocol v2 tuning run (``mbf_bench.protocol.run_job``, phase ``tune``: the task's
CPU-second budget, warmup-cosine, the validation split; the test split is never read) of the
registry's ``mbf-tied`` (``mbf.MBF`` at the library defaults with ``tie_rows=True`` and
``stat_decay`` 0.9) on seeds 100 and 101. MBF's current defaults (``stat_decay`` 0.99, untied)
ran in the same conditions on the same seeds for ``benchmarks/stat_decay/``; the report reads
those rows from there. Records go to ``library.jsonl``; a run already there is not run again.

    OMP_NUM_THREADS=1 python benchmarks/tied_rows/screen.py run --data-dir ../shared/data \
        [--tasks digits-ae,...] [--seeds 100,101]
    python benchmarks/tied_rows/screen.py report
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from mbf_bench.protocol import TrialJob, library_defaults, load_rules, screen_run

HERE = Path(__file__).resolve().parent
RUNS = HERE / "library.jsonl"
UNTIED = HERE.parent / "stat_decay" / "runs.jsonl"  # MBF's defaults: stat_decay 0.99, untied
TASKS = ("digits-ae", "text-gpt-tiny", "planetoid-gcn", "cifar10-resnet8", "curves-ae",
         "mnist-ae", "text-gpt")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    rules = load_rules()
    for task in args.tasks.split(","):
        for seed in map(int, args.seeds.split(",")):
            job = TrialJob("tune", task, "mbf-tied", "mbf-tied",
                           library_defaults("mbf-tied", task), seed)
            row = screen_run(rules, job, args.data_dir, RUNS,
                             {"task": task, "optimizer": "mbf-tied", "seed": seed})
            if row is not None:
                print(json.dumps(row), flush=True)
    return 0


def _by_seed(rows: list[dict], task: str) -> dict[int, float | None]:
    return {r["seed"]: r["value"] for r in rows if r["task"] == task}


def report(args: argparse.Namespace) -> int:
    tied = [json.loads(t) for t in RUNS.read_text().splitlines()]
    untied = [r for r in map(json.loads, UNTIED.read_text().splitlines())
              if r["stat_decay"] == 0.99]
    print("| task | metric | MBF defaults (100 / 101: mean) | tie_rows (100 / 101: mean) | "
          "difference | larger spread |")
    print("|---|---|---|---|---|---|")
    for task in TASKS:
        a, b = _by_seed(untied, task), _by_seed(tied, task)
        if not b:
            continue
        cells, means, spreads = [], [], []
        for values in (a, b):
            vals = [values.get(s) for s in (100, 101)]
            shown = " / ".join("diverged" if v is None else f"{v:.4g}" for v in vals)
            ok = [v for v in vals if v is not None]
            mean = statistics.fmean(ok) if len(ok) == 2 else float("nan")
            means.append(mean)
            spreads.append(abs(ok[0] - ok[1]) if len(ok) == 2 else float("nan"))
            cells.append(f"{shown}: {mean:.4g}")
        metric = next(r["metric"] for r in tied if r["task"] == task)
        print(f"| {task} | {metric} | {cells[0]} | {cells[1]} | {means[1] - means[0]:+.4g} | "
              f"{max(spreads):.3g} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--data-dir", default="../shared/data")
    r.add_argument("--tasks", default=",".join(TASKS))
    r.add_argument("--seeds", default="100,101")
    r.set_defaults(func=run)
    sub.add_parser("report").set_defaults(func=report)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
