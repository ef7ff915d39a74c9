"""Should ``tie_rows`` be MBF's default? A validation screen of the library option on every task
of protocol v2, against MBF's current defaults, with the rule written down before the runs
(README.md, "The library option").

Each run is a protocol v2 tuning run (``mbf_bench.protocol.run_job``, phase ``tune``: the task's
CPU-second budget, warmup-cosine, the validation split; the test split is never read) of
``mbf.MBF`` at the library defaults with ``tie_rows=True`` and ``stat_decay`` 0.9 (named
``mbf-tied`` in the rows; since the screen these are the library defaults) on seeds 100 and 101.
MBF's defaults before the screen (``stat_decay`` 0.99, untied) ran in the same conditions on the
same seeds for ``benchmarks/stat_decay/``; the report reads those rows from there. Records
go to ``library.jsonl``; a run already there is not run again.

    OMP_NUM_THREADS=1 python benchmarks/tied_rows/screen.py run --data-dir ../shared/data \
        [--tasks digits-ae,...] [--seeds 100,101] [--set max_block_size=64 ...]
    python benchmarks/tied_rows/screen.py report

``--set key=value`` (a JSON value) screens a variant of the tied defaults; its rows carry the
changed settings, and the report gives each variant a row of its own.
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
RUNS = HERE / "library.jsonl"
UNTIED = HERE.parent / "stat_decay" / "runs.jsonl"  # MBF's defaults: stat_decay 0.99, untied
TASKS = ("digits-ae", "text-gpt-tiny", "planetoid-gcn", "cifar10-resnet8", "curves-ae",
         "mnist-ae", "text-gpt")


def _changes(pairs: list[str]) -> dict[str, object]:
    changes = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        changes[key] = json.loads(value)
    return changes


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    rules = load_rules()
    changes = _changes(args.set)
    for task in args.tasks.split(","):
        for seed in map(int, args.seeds.split(",")):
            hparams = {**library_defaults("mbf", task), "tie_rows": True, "stat_decay": 0.9,
                       **changes}
            job = TrialJob("tune", task, "mbf-tied", "mbf", hparams, seed)
            row = screen_run(rules, job, args.data_dir, RUNS,
                             {"task": task, "optimizer": "mbf-tied", "seed": seed, **changes})
            if row is not None:
                print(json.dumps(row), flush=True)
    return 0


LABEL = ("task", "optimizer", "seed", "status", "steps", "cpu_seconds", "metric", "value",
         "score")


def _variant(row: dict) -> str:
    """The settings a row changed from the tied defaults, ``""`` for none."""
    return ", ".join(f"{k}={v}" for k, v in sorted(row.items()) if k not in LABEL)


def _by_seed(rows: list[dict], task: str, variant: str | None = None) -> dict[int, float | None]:
    """Seed -> value of ``task``'s rows (of one variant of the tied rows' when given)."""
    return {r["seed"]: r["value"] for r in rows
            if r["task"] == task and variant in (None, _variant(r))}


def report(args: argparse.Namespace) -> int:
    """Each variant of the tied rows against the untied defaults on the seeds both have."""
    tied = [json.loads(t) for t in RUNS.read_text().splitlines()]
    untied = [r for r in map(json.loads, UNTIED.read_text().splitlines())
              if r["stat_decay"] == 0.99]
    print("| task | metric | tied rows, changed | seeds | MBF untied, `stat_decay` 0.99: mean "
          "| tied rows: mean | difference | largest spread |")
    print("|---|---|---|---|---|---|---|---|")
    variants = sorted({_variant(r) for r in tied})
    for task, variant in ((t, v) for t in TASKS for v in variants):
        a, b = _by_seed(untied, task), _by_seed(tied, task, variant)
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue
        cells, means, spreads = [], [], []
        for values in (a, b):
            vals = [values[s] for s in seeds]
            shown = " / ".join("diverged" if v is None else f"{v:.4g}" for v in vals)
            ok = [v for v in vals if v is not None]
            whole = len(ok) == len(vals)
            means.append(statistics.fmean(ok) if whole else float("nan"))
            spreads.append(max(ok) - min(ok) if whole else float("nan"))
            cells.append(f"{shown}: {means[-1]:.4g}")
        metric = next(r["metric"] for r in tied if r["task"] == task)
        print(f"| {task} | {metric} | {variant or '-'} | {', '.join(map(str, seeds))} | "
              f"{cells[0]} | {cells[1]} | {means[1] - means[0]:+.4g} | {max(spreads):.3g} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    def arguments(run: argparse.ArgumentParser) -> None:
        run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="a setting changed from the tied defaults (JSON value); repeatable")

    return screen_main(__doc__ or "", TASKS, run, report, arguments, argv)

if __name__ == "__main__":
    sys.exit(main())
