"""``mbf-bench tune``: grid search of an optimizer's hyperparameters on a validation split.

Each grid point is one short run (the base spec's budget) that trains on the training set minus
a held-out fraction and is judged on that held-out part (``val_error`` for autoencoders, lowest
wins; ``val_accuracy`` otherwise, highest wins; ties broken by ``val_loss``). The test set is
never looked at. The best point is written as a TOML file for ``mbf-bench run --config FILE``;
every point's result goes to ``<runs_dir>/tune_results.json``.

The default grid is the paper's 1-3 log grid (..., 1e-4, 3e-4, 1e-3, ...) within one decade
either side of the optimizer's default ``lr`` and, for optimizers that have one, ``damping``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Any

from mbf_bench.optimizers import display_name
from mbf_bench.settings import dump_config, format_value
from mbf_bench.tasks import Task, get_task
from mbf_bench.train import RunResult, RunSpec, resolve_hparams, run_many, validate

__all__ = ["default_grid", "log13_grid", "tune"]


def log13_grid(center: float, decades: float = 1.0) -> list[float]:
    """The values ``{1, 3} x 10^k`` within ``decades`` of ``center`` (both ways), ascending."""
    if not center > 0:
        raise ValueError(f"a log grid needs a positive center, got {center}")
    lo, hi = center / 10**decades, center * 10**decades
    values = []
    for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for mantissa in (1, 3):
            value = float(f"{mantissa}e{k}")
            if lo * (1 - 1e-9) <= value <= hi * (1 + 1e-9):
                values.append(value)
    return values


def default_grid(optimizer: str, task: Task) -> dict[str, list[Any]]:
    """lr and (when the optimizer has one) damping on the 1-3 log grid around the defaults."""
    defaults = resolve_hparams(optimizer, task, {})
    grid: dict[str, list[Any]] = {"lr": log13_grid(float(defaults["lr"]))}
    damping = defaults.get("damping")
    if isinstance(damping, float | int) and not isinstance(damping, bool) and damping > 0:
        grid["damping"] = log13_grid(float(damping))
    return grid


def _label(point: dict[str, Any]) -> str:
    return ",".join(f"{k}={format_value(v)}" for k, v in point.items())


def _score(result: RunResult, metric: str) -> tuple[float, float] | None:
    """Sort key, lower is better; None for a run without a finite validation result."""
    value, loss = result.last_eval.get(metric), result.last_eval.get("val_loss")
    if result.status != "finished" or value is None or not math.isfinite(value):
        return None
    sign = -1.0 if metric.endswith("accuracy") else 1.0
    return sign * value, loss if loss is not None and math.isfinite(loss) else math.inf


def tune(
    base: RunSpec,
    grid: dict[str, list[Any]] | None,
    *,
    out: Path,
    runs_dir: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every point of ``grid`` (default :func:`default_grid`) and write the best as TOML.

    ``base`` gives the task, optimizer, seed, budget and fixed overrides; its ``holdout``
    (default 0.1 when None) is the validation fraction. Without a budget each point trains
    for the task's ``tune_epochs`` (by default a tenth of its epochs).

    Returns:
        ``{"best": point, "score": value, "metric": name, "results": [...]}``.

    Raises:
        ValueError: a grid value the optimizer refuses (before any point trains), or every
            point diverged or failed, so there is nothing to recommend.
    """
    task = get_task(base.task)
    grid = grid or default_grid(base.optimizer, task)
    holdout = base.holdout if base.holdout is not None else 0.1
    if base.epochs is None and base.budget_seconds is None and base.max_steps is None:
        base = dataclasses.replace(base, epochs=task.tune_epochs or max(1, task.epochs // 10))
    metric = task.test_metric.replace("test", "val")
    points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    print(f"tuning {display_name(base.optimizer)} on {base.task}: {len(points)} points, "
          f"validation on {holdout:.0%} of the training set, judged by {metric}")
    specs = [dataclasses.replace(base, hparams={**base.hparams, **p}, holdout=holdout)
             for p in points]
    for spec in specs:  # every grid value judged before the first point trains
        validate(spec)
    results: list[dict[str, Any]] = []
    for point, spec in zip(points, specs, strict=True):
        (result,) = run_many([spec], runs_dir / _label(point), overwrite=True, progress=progress)
        score = _score(result, metric)
        results.append({"point": point, "status": result.status,
                        metric: result.last_eval.get(metric),
                        "val_loss": result.last_eval.get("val_loss"),
                        "score": None if score is None else list(score)})
        print(f"  {_label(point):<40} {result.status:<9} {metric}="
              f"{result.last_eval.get(metric, float('nan')):.5g}")
    ranked = [r for r in results if r["score"] is not None]
    if not ranked:
        raise ValueError(f"every grid point of {base.optimizer} on {base.task} diverged or failed; "
                         "try smaller learning rates (--grid lr=...)")
    best = min(ranked, key=lambda r: tuple(r["score"]))
    budget = ", ".join(f"{k}={v}" for k, v in (("epochs", base.epochs),
                                                ("budget_seconds", base.budget_seconds),
                                                ("max_steps", base.max_steps)) if v is not None)
    text = dump_config(
        {base.optimizer: {**base.hparams, **best["point"]}},
        top={"task": base.task},
        comments=[
            f"mbf-bench tune: {display_name(base.optimizer)} on {base.task}, seed {base.seed}, "
            f"{budget} per point, {len(points)} points",
            f"chosen by {metric} = {best[metric]:.6g} on {holdout:.0%} of the training set "
            "held out (the test set is never used)",
            f"grid: {', '.join(f'{k}={v}' for k, v in grid.items())}",
        ],
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    runs_dir.mkdir(parents=True, exist_ok=True)
    summary = {"best": best["point"], "score": best[metric], "metric": metric,
               "holdout": holdout, "grid": grid, "results": results}
    (runs_dir / "tune_results.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"best: {_label(best['point'])} ({metric}={best[metric]:.6g}); wrote {out}")
    return summary
