"""``mbf-bench``: list tasks, run them, report on the results, tune hyperparameters.

Exit status: 0 when every run finished or diverged (divergence is a result), 1 when a run
crashed, 2 for bad arguments or missing data (one message, no traceback), 130 when interrupted
(Ctrl-C: one message; `run --resume` continues).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mbf_bench.schedule import SCHEDULES

__all__ = ["main", "overrides_for"]

_DELEGATED = {
    "theory": ("mbf_bench.theory", "numerical check of the idealized method's linear convergence"),
    "curvature": ("mbf_bench.curvature_picture", "pictures of the curvature approximations"),
    "speed": ("mbf_bench.speed", "cost of a training step with each optimizer, side by side"),
}


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in _csv(text)]
    except ValueError:
        message = f"seeds must be integers like 0,1,2, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        message = f"seed {', '.join(map(str, repeated))} given twice in {text!r}"
        raise argparse.ArgumentTypeError(message)
    return seeds


def _add_budget(parser: argparse.ArgumentParser, default_epochs: str) -> None:
    parser.add_argument("--budget-seconds", type=float, metavar="S",
                        help="stop after S seconds of training time (evaluation excluded)")
    parser.add_argument("--epochs", type=int, metavar="E",
                        help=f"stop after E epochs (default: {default_epochs}; with "
                             "--budget-seconds, whichever comes first)")
    parser.add_argument("--max-steps", type=int, metavar="N",
                        help="stop after N optimizer steps (smoke tests)")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, help="task name (see `mbf-bench list`)")
    parser.add_argument("--data-dir", metavar="D",
                        help="folder with the data files (default: $MBF_BENCH_DATA, else ./data)")
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="TOML file with one [<optimizer>] table of hyperparameters each")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        dest="overrides",
                        help="hyperparameter override, repeatable; OPT.KEY=VALUE for one optimizer")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--batch-size", type=int, help="override the task's batch size")
    parser.add_argument("--subset", type=int, metavar="N",
                        help="use only the first N training and test examples (smoke tests)")
    parser.add_argument("--dataset", help="planetoid-gcn graph: cora (default), citeseer, pubmed")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch intra-op threads (default: torch's choice); recorded in "
                             "config.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mbf-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    listing = sub.add_parser("list", help="tasks and optimizers with their defaults")
    listing.add_argument("--task", help="also show each optimizer's defaults for this task")

    run = sub.add_parser("run", help="train task x optimizers x seeds")
    _add_common(run)
    run.add_argument("--optimizers", type=_csv, required=True, metavar="A,B",
                     help="comma-separated optimizer names")
    run.add_argument("--seeds", type=_seeds, default=[0], metavar="0,1", help="default 0")
    _add_budget(run, "the task's")
    run.add_argument("--out", type=Path, default=Path("runs"), help="results folder (runs)")
    run.add_argument("--resume", action="store_true",
                     help="continue runs from their last checkpoint")
    run.add_argument("--overwrite", action="store_true",
                     help="start over runs that already exist in --out (their results are "
                          "lost); without it, or --resume, an existing run is an error")
    run.add_argument("--checkpoint-every", type=float, default=120.0, metavar="SECONDS",
                     help="checkpoint interval in wall-clock seconds (default 120; 0: every step)")
    run.add_argument("--holdout", type=float, metavar="F",
                     help="evaluate on a held-out fraction F of the training set, not the test set")
    run.add_argument("--schedule", choices=SCHEDULES, default="constant",
                     help="learning-rate schedule over the budget (default constant: the "
                          "task's own step decay, if any; warmup-cosine replaces it)")
    run.add_argument("--warmup-fraction", type=float, default=0.0, metavar="F",
                     help="fraction of the budget warmed up linearly (warmup-cosine)")
    run.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                     help="what --budget-seconds counts: wall-clock or CPU seconds of the "
                          "training steps (cpu also counts building the optimizer)")
    run.add_argument("--nproc", type=int, default=1, metavar="K",
                     help="train each run with K local processes (torch.distributed data "
                          "parallelism through torchrun; see docs/distributed.md)")

    report = sub.add_parser("report", help="table and plots of a results folder")
    report.add_argument("dir", type=Path, help="the --out folder of `mbf-bench run`")
    report.add_argument("--target-factor", type=float, default=1.05,
                        help="tasks without a frozen target: target loss = factor x the worst "
                             "optimizer's best loss (1.05)")
    report.add_argument("--targets", type=Path, default=None,
                        help="frozen per-task targets (default: the benchmark's targets.json)")

    tune = sub.add_parser("tune", help="grid search on a validation split")
    _add_common(tune)
    tune.add_argument("--optimizer", required=True, help="the optimizer to tune")
    tune.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                      help="values to try (default: the 1-3 log grid around the defaults of lr "
                           "and damping, one decade each way)")
    tune.add_argument("--seed", type=int, default=0)
    _add_budget(tune, "a tenth of the task's epochs per grid point")
    tune.add_argument("--holdout", type=float, default=0.1, metavar="F",
                      help="fraction of the training set held out for validation (0.1)")
    tune.add_argument("--out", type=Path, metavar="FILE",
                      help="TOML file for the best settings (default runs/tune/<task>-<opt>.toml)")
    tune.add_argument("--runs-dir", type=Path, metavar="DIR",
                      help="where the grid's runs go (default: beside --out)")

    for name, (_, help_text) in _DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def overrides_for(
    optimizer: str, config: dict[str, Any], assignments: Sequence[str], known: Sequence[str]
) -> dict[str, Any]:
    """Hyperparameter overrides of one optimizer: its ``[optimizer]`` table of the config,
    then each ``--set KEY=VALUE`` (all optimizers) or ``OPT.KEY=VALUE`` (only ``OPT``)."""
    from mbf_bench.settings import parse_assignment

    table = config.get(optimizer, {})
    if not isinstance(table, dict):
        raise ValueError(f"config: {optimizer} must be a table of hyperparameters")
    result = dict(table)
    for text in assignments:
        key, value = parse_assignment(text)
        prefix, dot, rest = key.rpartition(".")
        if dot:
            if prefix not in known:
                raise ValueError(f"--set {text}: {prefix!r} is not an optimizer")
            if prefix != optimizer:
                continue
            key = rest
        result[key] = value
    return result


def _load_config(path: Path | None, task: str) -> dict[str, Any]:
    from mbf_bench.settings import load_config

    if path is None:
        return {}
    config = load_config(path)
    for key, value in config.items():
        if key == "task":
            if value != task:
                print(f"note: {path} was written for task {value}, running {task}", file=sys.stderr)
        elif not isinstance(value, dict):
            raise ValueError(
                f"config {path}: top-level key {key!r}; put hyperparameters in an "
                "[<optimizer>] table"
            )
    return config


def _specs(args: argparse.Namespace, optimizers: list[str], seeds: list[int]) -> list[Any]:
    from mbf_bench.optimizers import OPTIMIZERS
    from mbf_bench.train import RunSpec, validate

    config = _load_config(args.config, args.task)
    specs = []
    for optimizer in optimizers:
        hparams = overrides_for(optimizer, config, args.overrides, list(OPTIMIZERS))
        for seed in seeds:
            spec = RunSpec(
                task=args.task, optimizer=optimizer, seed=seed, hparams=hparams,
                epochs=args.epochs, budget_seconds=args.budget_seconds,
                max_steps=args.max_steps, batch_size=args.batch_size, subset=args.subset,
                holdout=args.holdout, data_dir=args.data_dir, device=args.device,
                task_options={"dataset": args.dataset} if args.dataset else {},
                checkpoint_every=getattr(args, "checkpoint_every", 120.0),
                schedule=getattr(args, "schedule", "constant"),
                warmup_fraction=getattr(args, "warmup_fraction", 0.0),
                clock=getattr(args, "clock", "wall"),
            )
            validate(spec)
            specs.append(spec)
    return specs


def _list(args: argparse.Namespace) -> int:
    from mbf_bench.optimizers import OPTIMIZERS, display_name
    from mbf_bench.tasks import TASKS, get_task
    from mbf_bench.train import resolve_hparams

    print("tasks:")
    print(f"  {'name':<20} {'family':<12} {'batch':>6} {'epochs':>6}  {'loss':<22} "
          f"{'metric':<14} data")
    for task in TASKS.values():
        batch = "full" if task.batch_size is None else str(task.batch_size)
        print(f"  {task.name:<20} {task.family:<12} {batch:>6} {task.epochs:>6}  "
              f"{task.loss:<22} {task.test_metric:<14} {task.data}")
        print(f"  {'':<20} {task.description}"
              + "".join(f"; --{k} {'|'.join(v)}" for k, v in task.options.items())
              + (f"; lr x{task.lr_gamma} at {task.lr_milestones} of the epochs"
                 if task.lr_milestones else "")
              + ("; weight decay in the loss (first layer)" if task.penalty else ""))
    print("\noptimizers:")
    for name, spec in OPTIMIZERS.items():
        print(f"  {display_name(name):<32} {spec.description}")
    if args.task:
        task = get_task(args.task)
        print(f"\ndefaults for {task.name} ({task.family}):")
        for name in OPTIMIZERS:
            values = ", ".join(f"{k}={v}" for k, v in resolve_hparams(name, task, {}).items())
            print(f"  {display_name(name):<32} {values}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from mbf_bench import parallel
    from mbf_bench.tasks import get_task
    from mbf_bench.train import StorageError, check_new_runs, run_many

    specs = _specs(args, args.optimizers, args.seeds)
    if not parallel.launched():  # before any run starts, and before a launch
        check_new_runs(specs, args.out, resume=args.resume, overwrite=args.overwrite)
    if args.nproc != 1 and not parallel.launched():
        for spec in specs:
            parallel.check_supported(spec.optimizer, get_task(spec.task).batch_size is None)
        return parallel.launch(args.nproc, args.argv)
    try:
        results = run_many(specs, args.out, resume=args.resume, overwrite=args.overwrite,
                           progress=not args.no_progress)
    except StorageError as error:  # a full disk: one line, the files on disk are intact
        print(f"mbf-bench run: error: {error.strerror}", file=sys.stderr)
        return 1
    finally:
        parallel.shutdown()
    if not parallel.is_main_process():
        return 1 if any(r.status == "failed" for r in results) else 0
    for result in results:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in result.last_eval.items()
                          if k.startswith(("test", "val", "train")) and isinstance(v, float))
        print(f"{result.spec.task}/{result.spec.optimizer}/{result.spec.seed}: {result.status}, "
              f"{result.steps} steps, {result.seconds:.1f} s{'; ' + shown if shown else ''}")
    if Path(args.out).is_dir():
        print(f"results in {args.out}; `mbf-bench report {args.out}` for the table and plots")
    return 1 if any(r.status == "failed" for r in results) else 0


def _report(args: argparse.Namespace) -> int:
    from mbf_bench.report import write_report

    text, images = write_report(args.dir, target_factor=args.target_factor,
                                targets=args.targets)
    print(text)
    for image in images:
        print(f"plot: {image}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from mbf_bench.settings import parse_grid
    from mbf_bench.tune import tune

    args.checkpoint_every = 120.0
    (base,) = _specs(args, [args.optimizer], [args.seed])
    out = args.out or Path("runs") / "tune" / f"{args.task}-{args.optimizer}.toml"
    runs_dir = args.runs_dir or out.with_suffix("")
    grid = parse_grid(args.grid) if args.grid else None
    tune(base, grid, out=out, runs_dir=runs_dir, progress=not args.no_progress)
    return 0


def _delegate(command: str, argv: list[str]) -> int:
    module_name = _DELEGATED[command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        print(f"mbf-bench {command}: not available in this installation ({module_name} missing)",
              file=sys.stderr)
        return 2
    return int(module.main(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mbf-bench`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        return _delegate(argv[0], argv[1:])
    args = _parser().parse_args(argv)
    args.argv = argv  # `run --nproc K` relaunches itself with the same arguments
    from mbf_bench.baselines import MissingBaselineLibrary
    from mbf_bench.data import DataError

    handlers = {"list": _list, "run": _run, "report": _report, "tune": _tune}
    if getattr(args, "threads", None) is not None:
        if args.threads <= 0:
            print(f"mbf-bench: error: --threads must be positive, got {args.threads}",
                  file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    try:
        return handlers[args.command](args)
    except (DataError, ValueError, KeyError, MissingBaselineLibrary) as error:
        message = error.args[0] if error.args else str(error)
        print(f"mbf-bench {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The run's files are consistent (config says "interrupted", the checkpoint is whole).
        hint = "; continue with the same command and --resume" if args.command == "run" else ""
        print(f"\nmbf-bench {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
