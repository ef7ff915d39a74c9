"""``python -m mbf_bench.demo`` (``make demo``): a few minutes' look at the benchmark on a CPU.

Trains the 8x8-digits autoencoder (data shipped with scikit-learn, nothing to download) with
MBF and the baselines, then prints the report table and where the plots went. Optimizers not
registered in this installation are skipped with a note.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

OPTIMIZERS = ("mbf", "adam", "sgdm", "kfac", "shampoo-ours")
TASK = "digits-ae"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m mbf_bench.demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs") / "demo")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per optimizer (default: the task's)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from mbf_bench.optimizers import OPTIMIZERS as REGISTERED
    from mbf_bench.report import write_report
    from mbf_bench.train import RunSpec, run_many

    chosen = []
    for name in OPTIMIZERS:
        if name in REGISTERED:
            chosen.append(name)
        else:
            print(f"note: optimizer {name} is not registered here; skipped")
    start = time.perf_counter()
    specs = [RunSpec(task=TASK, optimizer=name, seed=0, epochs=args.epochs) for name in chosen]
    # The demo's folder is scratch: running the demo again starts its runs over.
    results = run_many(specs, args.out, overwrite=True, progress=not args.no_progress)
    text, images = write_report(args.out)
    print(text)
    for image in images:
        print(f"plot: {image}")
    print(f"report: {args.out / 'report.md'}  ({time.perf_counter() - start:.0f} s in all)")
    return 1 if any(r.status == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
