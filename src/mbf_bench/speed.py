"""``mbf-bench speed``: the cost of a training step with each optimizer, side by side.

For every task (its model, batch size and loss from the task registry, :mod:`mbf_bench.tasks`,
on random data of the task's shape, so no dataset is needed) and every optimizer (with the
hyperparameters ``mbf-bench run`` would train it with on that task), one process measures,
interleaving the optimizers after warm-up, the median time of a full training step (forward,
backward, optimizer step) in three modes: statistics and factorization every step (``t_all``),
statistics only (``t_stat``) and neither (``t_plain``). The amortized step for statistics every
``a`` and factorization every ``b`` steps is then
``t_plain + (t_stat - t_plain) / a + (t_all - t_stat) / b``, reported for the optimizer's own
defaults and for the paper's CNN setting (``a = 10, b = 100``). Measuring the phases and
amortizing them, rather than timing 100 real steps, keeps a CPU run to minutes. First-order
optimizers have one mode. MBF queues its batch statistics and folds them into the running
average every ``stat_buffer`` updates, so its statistics-mode sample is the mean over that many
steps (one fold each); in the every-step mode each factorization folds a queue of one, which
charges the factorization a little more than it costs at the real frequency (conservative).
Early refreshes (MBF's ``early_refresh``, the baselines' ``invert_early``) are switched off
while timing: they add at most ``log2(inv_every)`` factorizations at the start of a run, not a
cost per step, and left on they would land inside the statistics-only samples (MBF refreshes at
its 8th and 16th statistics update even when factorization is otherwise off).
Optimizer state is counted from ``state_dict()`` (or the optimizer's ``memory_report()``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .optimizers import OPTIMIZERS, build_optimizer, display_name
from .problems import Problem
from .tasks import TASKS, Data, Task, get_task, make_problem, stand_in_data
from .train import resolve_hparams

__all__ = ["SpeedRecord", "Workload", "main", "measure", "workload"]

PAPER_CNN = {"stat_every": 10, "inv_every": 100}
HUGE = 10**9
#: Options that add factorizations early in a run; off while timing (see the module docstring).
EARLY_REFRESHES = ("invert_early", "early_refresh")


@dataclass(frozen=True)
class Workload:
    """One task's training step on random data of its shape: the model, the batch and the loss
    are the task registry's own (:mod:`mbf_bench.tasks`), so they cannot drift from training."""

    task: Task
    data: Data
    problem: Problem
    batch: Any

    @property
    def family(self) -> str:
        """The task family, which selects the optimizers' defaults."""
        return self.task.family

    def make_model(self) -> nn.Module:
        """A fresh model of the task (initialized from torch's global generator)."""
        return self.task.model(self.data)

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """The task's training loss (penalty included) on ``batch``."""
        return self.problem.loss(model, batch)


def workload(task: str, device: torch.device, seed: int = 0) -> Workload:
    """Task ``task``'s step on random stand-in data (:func:`mbf_bench.tasks.stand_in_data`): one
    batch of the task's batch size (the whole graph for the GCN), on ``device``."""
    spec = get_task(task)
    data = stand_in_data(spec, torch.Generator().manual_seed(seed))
    problem = make_problem(spec, data, seed=seed, device=device)
    return Workload(spec, data, problem, problem.batch(0, 0))


@dataclass
class SpeedRecord:
    """One (task, optimizer) row of the speed table."""

    task: str
    optimizer: str
    device: str
    num_params: int
    state_bytes: int
    forward_backward_seconds: float
    median_step_seconds: float  # amortized at the optimizer's own frequencies for the family
    paper_cnn_step_seconds: float  # amortized at statistics every 10, factorization every 100
    plain_step_seconds: float
    statistics_seconds: float | None = None  # one statistics update (incl. hooks in backward)
    factorization_seconds: float | None = None
    precondition_seconds: float | None = None  # the optimizer step without stats/factorization
    stat_every: int | None = None
    inv_every: int | None = None


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's ``state_dict`` (shared storage counted once), or
    of what the optimizer's ``memory_report()`` says it keeps, whichever is larger."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def walk(value: object) -> None:
        nonlocal total
        if isinstance(value, Tensor):
            key = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
            if key not in seen:
                seen.add(key)
                total += value.untyped_storage().nbytes()
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    sd = optimizer.state_dict()
    walk(sd.get("state", {}))
    walk({k: v for k, v in sd.items() if k not in ("state", "param_groups")})
    # MBF's queued statistics are saved only while something is queued; its own report counts
    # every buffer it keeps (statistics, queue, inverses, momentum) at all times.
    report = getattr(optimizer, "memory_report", None)
    if callable(report):
        total = max(total, sum(report().values()))
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Runner:
    """One optimizer on its own copy of the model, able to time one step in a given mode."""

    def __init__(self, name: str, work: Workload, state: dict, device: torch.device) -> None:
        self.name = name
        self.model = work.make_model().to(device)
        self.model.load_state_dict(state)
        self.work = work
        self.device = device
        params = resolve_hparams(name, work.task, {})  # what `mbf-bench run` would train with
        self.freq = {k: params[k] for k in ("stat_every", "inv_every") if k in params}
        for early in EARLY_REFRESHES:
            if early in OPTIMIZERS[name].defaults:
                params[early] = False
        self.optimizer = build_optimizer(name, self.model, params)
        self.second_order = bool(self.freq)

    def set_mode(self, stats: bool, factor: bool) -> None:
        for group in self.optimizer.param_groups:
            if "stat_every" in group:
                group["stat_every"] = 1 if stats else HUGE
                group["inv_every"] = 1 if factor else HUGE
        # MBF decides what its hooks capture for the next step when a step ends.
        schedule = getattr(self.optimizer, "_schedule_collection", None)
        if callable(schedule):
            schedule()

    def step(self, batch: tuple[Any, ...]) -> tuple[float, float]:
        """Seconds of (forward + backward, optimizer step)."""
        _sync(self.device)
        start = time.perf_counter()
        self.optimizer.zero_grad()
        loss = self.work.loss(self.model, batch)
        loss.backward()
        _sync(self.device)
        middle = time.perf_counter()
        if getattr(self.optimizer, "needs_closure", False):
            # K-FAC's damping adaptation: the closure's first call (with gradients) is the
            # forward and backward just timed; its later call (without) re-evaluates the loss
            # after the update, inside the step's time
            def closure() -> torch.Tensor:
                return loss if torch.is_grad_enabled() else self.work.loss(self.model, batch)

            self.optimizer.step(closure)  # type: ignore[arg-type]
        else:
            self.optimizer.step()
        _sync(self.device)
        return middle - start, time.perf_counter() - middle


def measure(
    task: str,
    optimizers: Sequence[str],
    device: torch.device,
    repeats: int = 5,
    warmup: int = 2,
) -> list[SpeedRecord]:
    """Time every optimizer on one task shape; see the module docstring for the method."""
    work = workload(task, device)
    torch.manual_seed(0)
    state = work.make_model().state_dict()
    batch = work.batch
    runners = [_Runner(name, work, state, device) for name in optimizers]
    modes = {"all": (True, True), "stat": (True, False), "plain": (False, False)}
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for mode, (stats, factor) in modes.items():
        active = [r for r in runners if r.second_order or mode == "plain"]
        for r in active:
            r.set_mode(stats, factor)
            for _ in range(warmup):
                r.step(batch)
        for _ in range(repeats):
            for r in active:  # interleaved, so drift in machine speed hits every optimizer alike
                r.set_mode(stats, factor)
                # MBF folds its queued statistics once every `stat_buffer` updates: a sample of
                # the statistics mode is the mean over that many steps, so it holds one fold.
                n = getattr(r.optimizer, "stat_buffer", 1) if mode == "stat" else 1
                steps = [r.step(batch) for _ in range(n)]
                times.setdefault((r.name, mode), []).append(
                    (sum(t[0] for t in steps) / n, sum(t[1] for t in steps) / n)
                )
    records = []
    for r in runners:

        def med(mode: str, part: int | None = None, runner: _Runner = r) -> float:
            values = times[(runner.name, mode)]
            return statistics.median(v[0] + v[1] if part is None else v[part] for v in values)

        plain = med("plain")
        fwd_bwd = med("plain", 0)
        record = SpeedRecord(
            task=task,
            optimizer=r.name,
            device=str(device),
            num_params=sum(p.numel() for p in r.model.parameters()),
            state_bytes=state_bytes(r.optimizer),
            forward_backward_seconds=fwd_bwd,
            median_step_seconds=plain,
            paper_cnn_step_seconds=plain,
            plain_step_seconds=plain,
        )
        if r.second_order:
            stat_cost = max(0.0, med("stat") - plain)
            factor_cost = max(0.0, med("all") - med("stat"))
            a, b = r.freq.get("stat_every", 1), r.freq.get("inv_every", 1)
            record.median_step_seconds = plain + stat_cost / a + factor_cost / b
            record.paper_cnn_step_seconds = (
                plain + stat_cost / PAPER_CNN["stat_every"] + factor_cost / PAPER_CNN["inv_every"]
            )
            record.statistics_seconds = stat_cost
            record.factorization_seconds = factor_cost
            record.precondition_seconds = med("plain", 1)
            record.stat_every, record.inv_every = a, b
        records.append(record)
    return records


def format_table(records: Sequence[SpeedRecord]) -> str:
    """A markdown table with ratios to Adam (and SGD) measured in the same run."""
    lines = [
        "| task | optimizer | step s (own freq) | x Adam | step s (stats/10, inv/100) | x Adam "
        "| stats s | factor s | state / params (floats) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task in dict.fromkeys(r.task for r in records):
        rows = [r for r in records if r.task == task]
        adam = next((r for r in rows if r.optimizer == "adam"), None)
        own_ref = adam.median_step_seconds if adam else None
        cnn_ref = adam.paper_cnn_step_seconds if adam else None
        for r in rows:

            def ratio(value: float, ref: float | None) -> str:
                return f"{value / ref:.2f}" if ref else "-"

            lines.append(
                f"| {task} | {display_name(r.optimizer)} | {r.median_step_seconds:.4f} | "
                f"{ratio(r.median_step_seconds, own_ref)} | "
                f"{r.paper_cnn_step_seconds:.4f} | "
                f"{ratio(r.paper_cnn_step_seconds, cnn_ref)} | "
                f"{'-' if r.statistics_seconds is None else f'{r.statistics_seconds:.4f}'} | "
                f"{'-' if r.factorization_seconds is None else f'{r.factorization_seconds:.4f}'} | "
                f"{r.state_bytes / 4 / r.num_params:.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mbf-bench speed", description=__doc__)
    parser.add_argument("--tasks", default="mnist-ae,cifar10-resnet32,cifar100-vgg16,planetoid-gcn")
    parser.add_argument(
        "--optimizers", default="sgdm,adam,mbf,mbf-per_example,kfac,shampoo-ours"
    )
    parser.add_argument("--json", type=Path, help="write the records here as a JSON list")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    names = [o for o in args.optimizers.split(",") if o]
    for t in tasks:
        if t not in TASKS:
            parser.error(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    for o in names:
        if o not in OPTIMIZERS:
            parser.error(f"unknown optimizer {o!r}; choose from {', '.join(OPTIMIZERS)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA device")
    records: list[SpeedRecord] = []
    for t in tasks:
        print(f"timing {t} ...", file=sys.stderr, flush=True)
        records += measure(t, names, device, args.repeats, args.warmup)
    print(format_table(records))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in records], indent=1))
        print(f"wrote {args.json}")
    return 0
