"""Protocol v2 of the optimizer comparison: its search, its runs and its records.

The rules live in a frozen file (``protocol_rules.json`` beside this module; explained in
``docs/protocol.md``), written before any result. This module applies them:

- **Search.** Every optimizer on a task gets the same number of trials, in two rounds. Each
  hyperparameter of each optimizer on each task is drawn from its own random stream
  (:func:`stream_seed`): no two optimizers, tasks or hyperparameters share a sequence. After the
  first round, a dimension whose best trial lies within ``edge.margin`` of an edge of its range
  (in the range's own scale) is widened once on that side by ``edge.widen_by`` of the range's
  width (:func:`second_round_space`); the second round draws from the widened space, or from the
  same space when nothing was on an edge, so the trial count never depends on the outcome.
- **Runs.** One :func:`mbf_bench.train.run` per trial or seed: a budget of CPU seconds of
  training steps (optimizer construction and first-step work inside it), the warmup-cosine
  schedule over that budget (none for Schedule-Free), tuning on a validation split held out of
  the training set with tuning seeds, finals on the test split with final seeds (disjoint).
- **Records.** One JSON line per finished run, in ``<root>/<phase>/<task>/<name>.jsonl``; a run
  already recorded is never run or written again (:class:`RecordStore`), a diverged run is a
  record like any other, an interrupted one left no record and is run again from the start. A
  run that crashes (an exception) is logged and retried by the next command; once it has crashed
  ``crashes.recorded_after`` times with the same exception type it is recorded as ``crashed``
  (:func:`crashed_record`) and ranks with the diverged runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "RULES_FILE",
    "Dimension",
    "ExistingRecordError",
    "RecordStore",
    "TrialJob",
    "best_trial",
    "crashed_record",
    "defaults_jobs",
    "draw_points",
    "final_jobs",
    "library_defaults",
    "load_rules",
    "record_key",
    "run_job",
    "screen_run",
    "second_round_space",
    "space_for",
    "stream_seed",
    "tune_jobs",
]

RULES_FILE = Path(__file__).with_name("protocol_rules.json")
PHASES = ("tune", "final", "defaults")


def load_rules(path: Path = RULES_FILE) -> dict[str, Any]:
    """The protocol's rules (a JSON object); ``ValueError`` naming the file if it is not one."""
    try:
        rules: dict[str, Any] = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"protocol rules {path}: {error}") from None
    return rules


@dataclass(frozen=True)
class Dimension:
    """One searched hyperparameter: a range in a scale, and the hard limits of the value.

    ``scale``: ``"log"`` (log-uniform on [low, high]), ``"one_minus_log"`` (the value is
    1 - x with x log-uniform on [low, high]: momenta and betas near 1) or ``"uniform"``.
    """

    name: str
    scale: str
    low: float
    high: float

    def __post_init__(self) -> None:
        if self.scale not in ("log", "one_minus_log", "uniform"):
            raise ValueError(f"{self.name}: unknown scale {self.scale!r}")
        if not self.low < self.high or (self.scale != "uniform" and self.low <= 0):
            raise ValueError(f"{self.name}: bad range [{self.low}, {self.high}] for {self.scale}")

    def _warp(self, x: float) -> float:
        return x if self.scale == "uniform" else math.log(x)

    def value(self, u: float) -> float:
        """The hyperparameter at unit coordinate ``u`` in [0, 1] (4 significant digits)."""
        lo, hi = self._warp(self.low), self._warp(self.high)
        x = lo + u * (hi - lo)
        x = x if self.scale == "uniform" else math.exp(x)
        return float(f"{(1.0 - x if self.scale == 'one_minus_log' else x):.4g}")

    def unit(self, value: float) -> float:
        """The unit coordinate of ``value`` (the inverse of :meth:`value`, unclipped)."""
        x = 1.0 - value if self.scale == "one_minus_log" else value
        lo, hi = self._warp(self.low), self._warp(self.high)
        return (self._warp(x) - lo) / (hi - lo)

    def widened(self, side: str, by: float) -> Dimension:
        """This range extended on ``side`` (``"low"`` or ``"high"`` of the drawn variable) by
        ``by`` times its width in its scale (a one-minus range stops at x = 1: beta = 0)."""
        lo, hi = self._warp(self.low), self._warp(self.high)
        step = by * (hi - lo)
        lo, hi = (lo - step, hi) if side == "low" else (lo, hi + step)
        if self.scale == "uniform":
            return Dimension(self.name, self.scale, lo, hi)
        new_hi = math.exp(hi)
        if self.scale == "one_minus_log":  # x = 1 - beta stays <= 1: beta >= 0
            new_hi = max(self.high, min(new_hi, 1.0))
        return Dimension(self.name, self.scale, math.exp(lo), new_hi)

    def as_json(self) -> dict[str, Any]:
        return {"scale": self.scale, "low": self.low, "high": self.high}


def space_for(rules: dict[str, Any], optimizer: str,
              fixed_by_task: Iterable[str] = ()) -> dict[str, Dimension]:
    """The searched dimensions of ``optimizer``; those the task fixes are not searched.

    Raises:
        ValueError: the rules have no space for ``optimizer``.
    """
    spaces = rules["spaces"]
    if optimizer not in spaces:
        raise ValueError(f"the protocol rules have no search space for {optimizer!r} "
                         f"(spaces: {', '.join(spaces)})")
    fixed = set(fixed_by_task)
    return {name: Dimension(name, d["scale"], d["low"], d["high"])
            for name, d in spaces[optimizer]["dims"].items() if name not in fixed}


def stream_seed(draw_seed: int, task: str, optimizer: str, hparam: str) -> int:
    """The seed of one hyperparameter's stream of draws for one optimizer on one task.

    Derived from the names through SHA-256 (stable across processes and machines, unlike
    ``hash``) and mixed by numpy's ``SeedSequence``: every (task, optimizer, hyperparameter)
    has its own independent stream.
    """
    parts = [int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little")
             for s in (task, optimizer, hparam)]
    state = np.random.SeedSequence([draw_seed, *parts]).generate_state(2, np.uint64)
    return int(state[0])


def draw_points(rules: dict[str, Any], task: str, optimizer: str,
                space: dict[str, Dimension], first: int, count: int) -> list[dict[str, float]]:
    """Trials ``first`` .. ``first + count - 1`` of ``optimizer`` on ``task``: each
    hyperparameter's ``i``-th draw from its own stream, mapped into ``space``."""
    points: list[dict[str, float]] = [{} for _ in range(count)]
    for name, dim in space.items():
        rng = np.random.default_rng(stream_seed(rules["draw_seed"], task, optimizer, name))
        units = rng.random(first + count)[first:]
        for point, u in zip(points, units, strict=True):
            point[name] = dim.value(float(u))
    return points


def second_round_space(rules: dict[str, Any], space: dict[str, Dimension],
                       best: dict[str, Any]) -> tuple[dict[str, Dimension], dict[str, str]]:
    """The space of the second round: each dimension whose ``best`` value lies within the
    rules' ``edge.margin`` of an edge (unit coordinate) widened once on that side.

    Returns:
        The new space and ``{dimension: side}`` for the dimensions widened.
    """
    margin, by = rules["edge"]["margin"], rules["edge"]["widen_by"]
    widened: dict[str, str] = {}
    new = dict(space)
    for name, dim in space.items():
        u = dim.unit(float(best[name]))
        side = "low" if u <= margin else "high" if u >= 1.0 - margin else None
        if side is not None:
            new[name] = dim.widened(side, by)
            widened[name] = side
    return new, widened


class ExistingRecordError(ValueError):
    """A record for this run is already in the store: finished records are never replaced."""


def record_key(record: dict[str, Any]) -> tuple[str, str, str, int, int]:
    """What identifies a run in the records: phase, task, name, trial (-1 outside tuning), seed."""
    return (record["phase"], record["task"], record["name"], int(record.get("trial", -1)),
            int(record["seed"]))


class RecordStore:
    """The protocol's records under ``root``: ``<phase>/<task>/<name>.jsonl``, append-only."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, phase: str, task: str, name: str) -> Path:
        """The file that holds the records of one phase, task and optimizer entry."""
        return self.root / phase / task / f"{name}.jsonl"

    def load(self, phase: str | None = None, task: str | None = None) -> list[dict[str, Any]]:
        """Every record (of ``phase`` and ``task`` when given), file by file in name order."""
        base = self.root / phase if phase else self.root
        if task and phase:
            base = base / task
        files = sorted(base.rglob("*.jsonl")) if base.is_dir() else []
        records = [json.loads(line) for f in files for line in f.read_text().splitlines()
                   if line.strip()]
        return [r for r in records if task is None or r["task"] == task]

    def append(self, record: dict[str, Any]) -> None:
        """Add one record; :class:`ExistingRecordError` if its run is already recorded."""
        path = self.path(record["phase"], record["task"], record["name"])
        key = record_key(record)
        existing = [json.loads(t) for t in path.read_text().splitlines()] if path.exists() else []
        if any(record_key(r) == key for r in existing):
            raise ExistingRecordError(f"{path} already holds the run {key}; records are never "
                                      "replaced (move the file away to run it again)")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()

    def crash_log(self, phase: str, task: str, name: str) -> Path:
        """Where the crashes of one entry's runs are logged (not records: no ``.jsonl``)."""
        return self.root / phase / task / f"{name}.crashes"

    def note_crash(self, job: TrialJob, error: BaseException) -> int:
        """Log one crash of ``job``'s run; return how many crashes of that run with the same
        exception type the log holds, this one included."""
        path = self.crash_log(job.phase, job.task, job.name)
        entry = {"trial": job.trial, "seed": job.seed, "error": type(error).__name__,
                 "message": str(error)[:500]}
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write(json.dumps(entry) + "\n")
        logged = [json.loads(t) for t in path.read_text().splitlines() if t.strip()]
        return sum((e["trial"], e["seed"], e["error"]) == (job.trial, job.seed, entry["error"])
                   for e in logged)


@dataclass
class TrialJob:
    """One run the protocol asks for: which entry (``name``), with what, judged on what."""

    phase: str
    task: str
    name: str
    optimizer: str
    hparams: dict[str, Any]
    seed: int
    trial: int = -1
    round: int = 0
    space: dict[str, Any] | None = None
    widened: dict[str, str] | None = None

    def record_base(self) -> dict[str, Any]:
        base = {"phase": self.phase, "task": self.task, "name": self.name,
                "optimizer": self.optimizer, "seed": self.seed, "trial": self.trial,
                "hparams": self.hparams}
        if self.phase == "tune":
            base.update(round=self.round, space=self.space, widened=self.widened or {})
        return base


def library_defaults(optimizer: str, task: str) -> dict[str, Any]:
    """The library's defaults, with only what the task itself fixes (the GCN's weight decay)."""
    from mbf_bench.optimizers import OPTIMIZERS
    from mbf_bench.tasks import get_task

    defaults = dict(OPTIMIZERS[optimizer].defaults)
    defaults.update({k: v for k, v in get_task(task).hparam_defaults.items() if k in defaults})
    return defaults


def check_available(rules: dict[str, Any], optimizer: str) -> None:
    """``ValueError`` if ``optimizer`` is not registered, or its name still means what it meant
    before a rename the rules know of (the registry's ``shampoo`` before the library one)."""
    from mbf_bench.optimizers import OPTIMIZERS

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer {optimizer!r} is not in this registry (not installed or "
                         "not merged yet)")
    moved = rules.get("renamed", {}).get(optimizer)
    if moved is not None and moved not in OPTIMIZERS:
        raise ValueError(f"the registry's {optimizer!r} is still the one the rules call "
                         f"{moved!r}; the protocol waits for the new {optimizer!r}")


def _task_fixed(task: str) -> set[str]:
    from mbf_bench.tasks import get_task

    return set(get_task(task).hparam_defaults)


def tune_jobs(rules: dict[str, Any], store: RecordStore, task: str,
              optimizer: str) -> list[TrialJob]:
    """The tuning runs of ``optimizer`` on ``task`` still to do: the first round, then (once
    the first round is recorded) the second, from the space :func:`second_round_space` gives.

    Raises:
        ValueError: the recorded first round was drawn from another space than the rules'
            (the rules changed after results: refused).
    """
    check_available(rules, optimizer)
    space = space_for(rules, optimizer, _task_fixed(task))
    spec = rules["spaces"][optimizer]
    base = library_defaults(optimizer, task)
    unknown = sorted((set(space) | set(spec.get("fixed", {}))) - set(base))
    if unknown:
        raise ValueError(f"the rules search {', '.join(unknown)} of {optimizer!r}, which its "
                         f"registry entry does not take (it takes {', '.join(sorted(base))})")
    base.update(spec.get("fixed", {}))
    seed = rules["seeds"]["tune"][0]
    first, second = rules["trials"]["first_round"], rules["trials"]["second_round"]
    done = [r for r in store.load("tune", task) if r["name"] == optimizer]
    frozen = {n: d.as_json() for n, d in space.items()}
    for r in done:
        if r["round"] == 1 and r["space"] != frozen:
            raise ValueError(f"{task}/{optimizer}: the recorded trials were drawn from "
                             f"{r['space']}, the rules now say {frozen}; rules are frozen once "
                             "results exist")
    recorded = {r["trial"] for r in done}
    jobs = [TrialJob("tune", task, optimizer, optimizer, {**base, **point}, seed, i, 1, frozen)
            for i, point in enumerate(draw_points(rules, task, optimizer, space, 0, first))
            if i not in recorded]
    if jobs:
        return jobs
    best = best_trial([r for r in done if r["round"] == 1])
    widened: dict[str, str] = {}
    if best is None:  # every first-round trial diverged: no edge to widen toward
        wider = space
    else:
        wider, widened = second_round_space(rules, space, best["hparams"])
    second_space = {n: d.as_json() for n, d in wider.items()}
    points = draw_points(rules, task, optimizer, wider, first, second)
    return [TrialJob("tune", task, optimizer, optimizer, {**base, **point}, seed, first + i, 2,
                     second_space, widened)
            for i, point in enumerate(points) if first + i not in recorded]


def best_trial(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The record with the lowest score (validation loss, or minus validation accuracy);
    None when every run diverged. Ties go to the earlier trial."""
    finite = [r for r in records if r["score"] is not None and math.isfinite(r["score"])]
    return min(finite, key=lambda r: (r["score"], r["trial"])) if finite else None


def final_jobs(rules: dict[str, Any], store: RecordStore, task: str,
               optimizer: str) -> list[TrialJob]:
    """The final runs (final seeds, the best tuning trial's settings) still to do.

    Raises:
        ValueError: the tuning of ``optimizer`` on ``task`` is not complete.
    """
    trials = [r for r in store.load("tune", task) if r["name"] == optimizer]
    wanted = rules["trials"]["first_round"] + rules["trials"]["second_round"]
    if len(trials) < wanted:
        raise ValueError(f"{task}/{optimizer}: {len(trials)} of {wanted} tuning trials "
                         "recorded; finish `tune` first")
    best = best_trial(trials)
    if best is None:
        raise ValueError(f"{task}/{optimizer}: every tuning trial diverged; nothing to select")
    done = {r["seed"] for r in store.load("final", task) if r["name"] == optimizer}
    return [TrialJob("final", task, optimizer, optimizer, best["hparams"], s, -1)
            for s in rules["seeds"]["final"] if s not in done]


def defaults_jobs(rules: dict[str, Any], store: RecordStore, task: str,
                  name: str) -> list[TrialJob]:
    """The defaults-track runs of entry ``name`` still to do: an optimizer at its library's
    defaults, or one of the rules' extra entries (AdamW at lr 3e-3)."""
    extra = rules["defaults_track"]["extra"].get(name)
    optimizer = extra["optimizer"] if extra else name
    check_available(rules, optimizer)
    hparams = {**library_defaults(optimizer, task), **(extra["hparams"] if extra else {})}
    done = {r["seed"] for r in store.load("defaults", task) if r["name"] == name}
    return [TrialJob("defaults", task, name, optimizer, hparams, s)
            for s in rules["seeds"]["final"] if s not in done]


def crashed_record(job: TrialJob, error: BaseException, attempts: int) -> dict[str, Any]:
    """The record of a run that crashed ``attempts`` times with the same exception: status
    ``crashed``, no value, ranked with the diverged runs (worst score)."""
    return {**job.record_base(), "status": "crashed", "steps": 0, "cpu_seconds": 0.0,
            "metric": "", "value": None, "score": None,
            "error": f"{type(error).__name__}: {str(error)[:500]}", "attempts": attempts}


def _score(line: dict[str, Any], prefix: str) -> tuple[str, float | None, float]:
    """(metric name, its value, score: lower is better) of an evaluation line: the accuracy
    on the ``prefix`` split (``val`` or ``test``) if the task has one, else its loss."""
    accuracy = f"{prefix}_accuracy" in line
    key = f"{prefix}_accuracy" if accuracy else f"{prefix}_loss"
    if key not in line:
        raise ValueError(f"the run's last evaluation has no {key} (it has {', '.join(line)})")
    value = line[key]
    if value is None or not math.isfinite(value):
        return key, None, math.inf
    return key, value, -value if accuracy else value


def _curve(lines: list[dict[str, Any]], points: int = 100) -> list[list[float]]:
    """(step, seconds, train loss) of at most ``points`` step lines, evenly spaced, last kept."""
    steps = [x for x in lines if not any(k.endswith("_loss") and k != "train_loss" for k in x)]
    keep = max(1, math.ceil(len(steps) / points))
    chosen = steps[::keep] + ([steps[-1]] if steps and (len(steps) - 1) % keep else [])
    return [[x["step"], round(x["seconds"], 3), x["train_loss"]] for x in chosen]


def run_job(rules: dict[str, Any], job: TrialJob, data_dir: str | None,
            overrides: dict[str, Any] | None = None,
            on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train one job under the rules and return its record (not yet stored).

    ``overrides``: extra :class:`~mbf_bench.train.RunSpec` fields (tests shrink the data with
    ``subset`` and ``batch_size``); the record keeps them.
    """
    from mbf_bench.train import RunSpec, run

    task_rules = rules["tasks"][job.task]
    schedule = rules["schedule"]
    scheduled = job.optimizer not in schedule["none_for"]
    spec = RunSpec(
        task=job.task, optimizer=job.optimizer, seed=job.seed, hparams=job.hparams,
        budget_seconds=task_rules["cpu_seconds"], data_dir=data_dir,
        holdout=task_rules["holdout"] if job.phase == "tune" else None,
        schedule=schedule["name"] if scheduled else "constant",
        warmup_fraction=schedule["warmup_fraction"] if scheduled else 0.0,
        clock=rules["clock"], checkpoint_every=1e9, **(overrides or {}),
    )
    with tempfile.TemporaryDirectory(prefix="mbf-protocol-") as scratch:
        result = run(spec, Path(scratch), resume=False, overwrite=True, progress=False,
                     on_step=on_step)
        lines = [json.loads(t) for t in
                 (result.directory / "metrics.jsonl").read_text().splitlines()]
        config = json.loads((result.directory / "config.json").read_text())
    evals = [x for x in lines if any(k.endswith("_loss") and k != "train_loss" for k in x)]
    status = result.status
    prefix = "val" if job.phase == "tune" else "test"
    metric, value, score = _score(evals[-1], prefix) if evals else ("", None, math.inf)
    if status == "finished" and value is None:
        status = "diverged"  # a non-finite evaluation is a divergence, never a missing trial
    if status != "finished":
        value, score = None, math.inf
    return {
        **job.record_base(), "status": status, "steps": result.steps,
        "cpu_seconds": round(result.seconds, 3), "budget_cpu_seconds": spec.budget_seconds,
        "setup_seconds": round(config["setup_seconds"], 4), "schedule": spec.schedule,
        "metric": metric, "value": value, "score": score if math.isfinite(score) else None,
        "curve": _curve(lines), "evals": [
            {k: v for k, v in x.items() if not k.startswith("diag/")} for x in evals],
        "overrides": overrides or {}, "versions": config["versions"],
    }


def screen_run(rules: dict[str, Any], job: TrialJob, data_dir: str | None, path: Path,
               label: dict[str, Any],
               overrides: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """A screen's run: ``job`` under the protocol's conditions (:func:`run_job`), kept out of
    its records, in ``path`` (JSON lines) instead.

    Skipped (None) when ``path`` holds a row whose fields include ``label``, so a screen resumes;
    else appends and returns the row: ``label``, then the run's status, steps, CPU seconds,
    metric, value and score (no curves).
    """
    rows = [json.loads(t) for t in path.read_text().splitlines() if t.strip()] if (
        path.exists()) else []
    if any(all(r.get(k) == v for k, v in label.items()) for r in rows):
        return None
    record = run_job(rules, job, data_dir, overrides)
    row = {**label, **{k: record[k] for k in (
        "status", "steps", "cpu_seconds", "metric", "value", "score")}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")
    return row


def screen_main(doc: str, tasks: Iterable[str], run: Callable[[argparse.Namespace], int],
                report: Callable[[argparse.Namespace], int],
                run_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                argv: list[str] | None = None) -> int:
    """The command line of a screen script: ``run`` (``--data-dir``, ``--tasks`` defaulting to
    ``tasks``, ``--seeds`` defaulting to 100 and 101, and what ``run_arguments`` adds) and
    ``report``; returns the chosen function's exit status. ``doc``'s first line describes it."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0] if doc else None)
    sub = parser.add_subparsers(dest="command", required=True)
    runner = sub.add_parser("run")
    runner.add_argument("--data-dir", default="../shared/data")
    runner.add_argument("--tasks", default=",".join(tasks))
    runner.add_argument("--seeds", default="100,101")
    if run_arguments is not None:
        run_arguments(runner)
    runner.set_defaults(func=run)
    sub.add_parser("report").set_defaults(func=report)
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status
