"""CPU seconds to the frozen target, from protocol v2's records (issue 19's second mnist-ae and
transformer target: tuned MBF's time to the frozen target at most 0.8x the best other
optimizer's).

The target is the one frozen for protocol v1 (``src/mbf_bench/targets.json``: for mnist-ae the
training loss 97.07, tuned Adam's median at 90 CPU s), read by the one rule of "time to target"
(``mbf_bench.report.first_reaching``) over each run's evaluation lines (one per epoch: the
epoch's mean training loss and the CPU seconds of training steps so far). Per entry: the median
over its seeds (a seed that never reaches it counts as never), and how many seeds reached it.

    python benchmarks/time_to_target.py --task mnist-ae [--phase final] [--records DIR]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

from mbf_bench.protocol import RecordStore
from mbf_bench.report import first_reaching, higher_is_better, load_targets

ROOT = Path(__file__).resolve().parent / "protocol2"


def seconds_to_target(record: dict, metric: str, target: float) -> float:
    """CPU seconds at the first evaluation that reaches ``target`` in ``metric`` (inf: none)."""
    points = ((e.get(metric), e["seconds"], e.get("step", math.nan))
              for e in record.get("evals") or [])
    seconds, _ = first_reaching(points, target, higher_is_better(metric))
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist-ae")
    parser.add_argument("--phase", default="final", choices=("final", "defaults"))
    parser.add_argument("--records", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    target = load_targets()[args.task]
    metric, value = target["metric"], float(target["value"])
    by_name: dict[str, list[float]] = {}
    for record in RecordStore(args.records).load(args.phase, args.task):
        by_name.setdefault(record["name"], []).append(
            seconds_to_target(record, metric, value))
    rows = sorted((statistics.median(times), name, times) for name, times in by_name.items())
    print(f"{args.task}, {args.phase} phase: CPU seconds to {metric} {value:g} (frozen target)")
    print("| entry | median CPU s | seeds reaching it | per seed |")
    print("|---|---|---|---|")
    for median, name, times in rows:
        cells = " / ".join("miss" if math.isinf(t) else f"{t:.1f}" for t in times)
        reached = sum(math.isfinite(t) for t in times)
        shown = "miss" if math.isinf(median) else f"{median:.1f}"
        print(f"| {name} | {shown} | {reached}/{len(times)} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
