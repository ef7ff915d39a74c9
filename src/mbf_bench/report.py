"""``mbf-bench report DIR``: a markdown table and plots of the runs under ``DIR``.

Per task and optimizer (mean over seeds unless said otherwise):

- final / best training loss: the ``train_loss`` of evaluation lines, i.e. the mean minibatch
  loss of each epoch (less noisy than single steps);
- final / best test metric (error: lower is better; accuracy: higher is better);
- time and steps to target: the median over seeds of the training seconds (and steps) at which
  the task's target is first reached, a seed that never reaches it counting as a miss (the
  median of a majority of misses is a miss). The target is the task's **frozen target** from
  :data:`TARGETS_FILE` (``targets.json``, made by ``benchmarks/protocol_report.py`` from tuned
  Adam and SGD-m and then never moved): an epoch-mean training loss to go below, or a test
  accuracy to reach. A task without one falls back to a relative target, ``target_factor``
  (1.05) times the worst of the optimizers' best losses (finished runs), which moves whenever
  the set of optimizers does: the report says which kind it used;
- seconds per step: the median over all steps of all seeds, and its ratio to ``sgdm``'s.

Plots (``DIR/<task>.png``): training loss against epochs and against seconds, and the test metric
against epochs; one line per optimizer, the mean over seeds with the min-max spread shaded.
Where runs recorded optimizer diagnostics (``diag/...`` in their evaluation lines, MBF's
:meth:`mbf.MBF.diagnostics`), ``DIR/<task>-diagnostics.png`` shows them against epochs: the
ratio of the preconditioned direction's norm to the gradient's (first param group), the
fractions of blocks retried and fallen back, and the share of training seconds spent in
statistics and in factorization.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .optimizers import display_name

__all__ = [
    "TARGETS_FILE",
    "Run",
    "first_reaching",
    "fmt",
    "higher_is_better",
    "load_runs",
    "load_targets",
    "summarize",
    "write_report",
]

BASELINE = "sgdm"
#: The frozen per-task targets shipped with the benchmark (versioned in the repository).
TARGETS_FILE = Path(__file__).with_name("targets.json")


def load_targets(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """Per task ``{"metric": "train_loss" | "test_accuracy", "value": float, ...}``.

    Raises:
        ValueError: the file does not parse or has no ``targets`` table (names the file).
    """
    path = TARGETS_FILE if path is None else Path(path)
    try:
        data = json.loads(path.read_text())
        targets = data["targets"]
        if not isinstance(targets, dict):
            raise ValueError("'targets' is not a table")
        return {task: dict(t) for task, t in targets.items()}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a targets file ({error})") from None


@dataclass
class Run:
    """One run's config and metrics lines, split into step lines and evaluation lines."""

    task: str
    optimizer: str
    seed: str
    config: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: int = 0  # metrics lines that did not parse (a run killed mid-write)

    @property
    def status(self) -> str:
        return str(self.config.get("status", "unknown"))

    @property
    def label(self) -> str:
        """The status as the table shows it: marked when metrics lines were lost."""
        return self.status + (" (metrics truncated)" if self.bad_lines else "")

    @property
    def metric(self) -> str:
        return str(self.config.get("test_metric", "test_error"))


def load_runs(directory: Path, problems: list[str] | None = None) -> list[Run]:
    """Every run under ``directory`` (``<task>/<optimizer>/<seed>/config.json``).

    A run whose ``config.json`` does not parse is left out; metrics lines that do not parse (a
    run killed mid-write) are skipped and counted in :attr:`Run.bad_lines`. Each such problem
    is described, naming the file, in ``problems`` when given.
    """
    runs = []
    for config_path in sorted(Path(directory).glob("*/*/*/config.json")):
        try:
            config = json.loads(config_path.read_text())
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as error:
            if problems is not None:
                problems.append(f"{config_path}: unreadable, run left out ({error})")
            continue
        seed_dir = config_path.parent
        run = Run(seed_dir.parent.parent.name, seed_dir.parent.name, seed_dir.name, config)
        metrics = seed_dir / "metrics.jsonl"
        lines = metrics.read_text(errors="replace").splitlines() if metrics.exists() else []
        for text in lines:
            if not text.strip():
                continue
            try:
                line = json.loads(text)
                if not isinstance(line, dict):
                    raise ValueError("not a JSON object")
            except ValueError:
                run.bad_lines += 1
                continue
            is_eval = any(key.endswith("_loss") and key != "train_loss" for key in line)
            (run.evals if is_eval else run.steps).append(line)
        if run.bad_lines and problems is not None:
            problems.append(f"{metrics}: {run.bad_lines} line(s) unreadable and skipped "
                            "(truncated by a kill?)")
        runs.append(run)
    return runs


def _floats(values: list[Any]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def higher_is_better(metric: str) -> bool:
    """Whether a larger ``metric`` is better (accuracies; losses and errors are not)."""
    return metric.endswith("accuracy")


def _step_seconds(run: Run) -> list[float]:
    times = [0.0] + [float(line["seconds"]) for line in run.steps]
    return [b - a for a, b in zip(times, times[1:], strict=False) if b >= a]


def summarize(
    runs: list[Run],
    target_factor: float = 1.05,
    targets: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per task: ``{"target": value, "target_kind": ..., "metric": name, "rows": {...}}``.

    ``targets``: frozen targets by task (:func:`load_targets`); tasks without one get the
    relative target of ``target_factor``.
    """
    tasks: dict[str, dict[str, Any]] = {}
    for task in sorted({run.task for run in runs}):
        by_opt: dict[str, list[Run]] = {}
        for run in runs:
            if run.task == task:
                by_opt.setdefault(run.optimizer, []).append(run)
        metric = next(iter(by_opt.values()))[0].metric
        better = max if higher_is_better(metric) else min
        rows: dict[str, dict[str, Any]] = {}
        for opt, group in sorted(by_opt.items()):
            losses = [_floats([e.get("train_loss") for e in r.evals]) for r in group]
            metrics = [_floats([e.get(metric) for e in r.evals]) for r in group]
            step_times = [t for r in group for t in _step_seconds(r)]
            statuses: dict[str, int] = {}
            for r in group:
                statuses[r.label] = statuses.get(r.label, 0) + 1
            finished = [min(v) for v, r in zip(losses, group, strict=True)
                        if v and r.status == "finished"]
            rows[opt] = {
                "runs": ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())),
                "finished_best_loss": _mean(finished),
                "final_loss": _mean([v[-1] for v in losses if v]),
                "best_loss": _mean([min(v) for v in losses if v]),
                "final_metric": _mean([v[-1] for v in metrics if v]),
                "best_metric": _mean([better(v) for v in metrics if v]),
                "step_seconds": float(np.median(step_times)) if step_times else math.nan,
                "group": group,
            }
        frozen = (targets or {}).get(task)
        if frozen is not None:
            key, target = str(frozen["metric"]), float(frozen["value"])
            kind = "frozen"
        else:
            # Diverged runs are left out: their early best would make the target trivially easy.
            bests = [row["finished_best_loss"] for row in rows.values()
                     if math.isfinite(row["finished_best_loss"])]
            key, target = "train_loss", max(bests) * target_factor if bests else math.nan
            kind = "relative"
        base = rows.get(BASELINE, {}).get("step_seconds", math.nan)
        for row in rows.values():
            row["relative_step"] = row["step_seconds"] / base if base and base > 0 else math.nan
            hits = [_time_to(r, key, target) for r in row["group"]]
            row["time_to_target"] = _median_with_misses([h[0] for h in hits])
            row["steps_to_target"] = _median_with_misses([h[1] for h in hits])
            row["reached"] = f"{sum(math.isfinite(h[0]) for h in hits)}/{len(row['group'])}"
        tasks[task] = {"target": target, "target_metric": key, "target_kind": kind,
                       "metric": metric, "rows": rows}
    return tasks


def _median_with_misses(values: list[float]) -> float:
    """Median where a miss is infinite: ``inf`` when most seeds missed."""
    return float(np.median(values)) if values else math.nan


def first_reaching(
    points: Iterable[tuple[float | None, float, float]], target: float, higher: bool
) -> tuple[float, float]:
    """``(seconds, step)`` of the first ``(value, seconds, step)`` point whose value reaches
    ``target`` (at least it when ``higher``, else at most); ``(inf, inf)`` when none does.
    Missing and non-finite values never reach it. The one rule of "time to target" for
    ``mbf-bench report`` and ``benchmarks/protocol_report.py``."""
    for value, seconds, step in points:
        if value is None or not math.isfinite(value):
            continue
        if (value >= target) if higher else (value <= target):
            return float(seconds), float(step)
    return math.inf, math.inf


def _time_to(run: Run, key: str, target: float) -> tuple[float, float]:
    """(seconds, step) of the first evaluation line that reaches ``target`` in ``key``."""
    points = ((line.get(key), line["seconds"], line.get("step", math.nan)) for line in run.evals)
    return first_reaching(points, target, higher_is_better(key))


def fmt(value: float, spec: str = ".4g") -> str:
    """A table cell: ``miss`` for a target never reached (``inf``), ``-`` for no value."""
    if math.isinf(value) and value > 0:
        return "miss"
    return "-" if not math.isfinite(value) else format(value, spec)


def markdown(summary: dict[str, dict[str, Any]], target_factor: float) -> str:
    """The report's text: one table per task."""
    out = ["# mbf-bench report", ""]
    for task, info in summary.items():
        metric = info["metric"]
        target = (
            f"Frozen target: {info['target_metric']} {fmt(info['target'])} "
            f"(`{TARGETS_FILE.name}`, set from tuned adam and sgdm; a miss is a miss). "
            if info["target_kind"] == "frozen"
            else f"Relative target: train loss {fmt(info['target'])} = {target_factor} x the "
            "worst of the optimizers' best losses (finished runs; no frozen target for this "
            "task). "
        )
        out += [
            f"## {task}",
            "",
            f"Train losses are epoch means of minibatch losses; metric `{metric}` "
            f"({'higher' if higher_is_better(metric) else 'lower'} is better); means over seeds. "
            + target
            + "Time and steps to target: medians over seeds, a seed that misses counting as "
            "infinite. "
            f"s/step is the median step time; 'vs {BASELINE}' its ratio to {BASELINE}'s.",
            "",
            f"| optimizer | runs | final train loss | best train loss | final {metric} | "
            f"best {metric} | time to target (s) | steps to target | s/step | vs {BASELINE} |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for opt, row in info["rows"].items():
            out.append(
                f"| {display_name(opt)} | {row['runs']} | {fmt(row['final_loss'])} "
                f"| {fmt(row['best_loss'])} "
                f"| {fmt(row['final_metric'])} | {fmt(row['best_metric'])} "
                f"| {fmt(row['time_to_target'], '.3g')} ({row['reached']}) "
                f"| {fmt(row['steps_to_target'], '.0f')} "
                f"| {fmt(row['step_seconds'], '.3g')} | {fmt(row['relative_step'], '.2f')} |"
            )
        out.append("")
    return "\n".join(out)


def _band(curves: list[tuple[list[float], list[float]]]) -> tuple[np.ndarray, ...] | None:
    """Mean, min and max of several curves on the x range they all cover (interpolated)."""
    curves = [(x, y) for x, y in curves if x]
    if not curves:
        return None
    lo = max(x[0] for x, _ in curves)
    hi = min(x[-1] for x, _ in curves)
    grid = np.unique(np.concatenate([np.asarray(x) for x, _ in curves]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    if grid.size == 0:
        grid = np.asarray(curves[0][0])
    ys = np.stack([np.interp(grid, x, y) for x, y in curves])
    return grid, ys.mean(axis=0), ys.min(axis=0), ys.max(axis=0)


def _series(run: Run, x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    points = [(float(e[x_key]), e.get(y_key)) for e in run.evals]
    kept = [(x, float(y)) for x, y in points if y is not None and math.isfinite(float(y))]
    return [x for x, _ in kept], [y for _, y in kept]


def plot_task(task: str, info: dict[str, Any], path: Path) -> Path:
    """Three panels (loss vs epochs, loss vs seconds, metric vs epochs) saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = info["metric"]
    panels = [("epoch", "train_loss", "epochs", "training loss"),
              ("seconds", "train_loss", "training seconds", "training loss"),
              ("epoch", metric, "epochs", metric.replace("_", " "))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (x_key, y_key, x_label, y_label) in zip(axes, panels, strict=True):
        positive = True
        for opt, row in info["rows"].items():
            band = _band([_series(r, x_key, y_key) for r in row["group"]])
            if band is None:
                continue
            grid, mean, low, high = band
            positive = positive and bool((low > 0).all())
            (line,) = ax.plot(grid, mean, marker="o" if grid.size < 3 else None,
                              label=display_name(opt))
            if len(row["group"]) > 1:
                ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.2)
        if y_key == "train_loss" and positive and ax.lines:
            ax.set_yscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{task} (mean over seeds, min-max shaded)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# Panels of the diagnostics plot: (title, [(key of an evaluation line, label)], log scale).
DIAGNOSTIC_PANELS: list[tuple[str, list[tuple[str, str]], bool]] = [
    ("|preconditioned direction| / |gradient|", [("diag/group0/step_to_grad_norm", "")], True),
    ("fraction of factored blocks",
     [("diag/retried_block_fraction", "retried"), ("diag/fallback_block_fraction", "fell back")],
     False),
    ("share of training seconds",
     [("diag/seconds/statistics", "statistics"), ("diag/seconds/factorization", "factorization")],
     False),
]


def _diagnostic_series(run: Run, key: str) -> tuple[list[float], list[float]]:
    """``key`` against epochs; ``diag/seconds/...`` as a share of the run's training seconds."""
    x, y = _series(run, "epoch", key)
    if key.startswith("diag/seconds/"):
        totals = dict(zip(*_series(run, "epoch", "seconds"), strict=True))
        kept = [(e, v / totals[e]) for e, v in zip(x, y, strict=True) if totals.get(e, 0) > 0]
        x, y = [e for e, _ in kept], [v for _, v in kept]
    return x, y


def plot_diagnostics(task: str, info: dict[str, Any], path: Path) -> Path | None:
    """The runs' optimizer diagnostics against epochs (PNG), or ``None`` if none recorded any."""
    runs = [(opt, r) for opt, row in info["rows"].items() for r in row["group"]]
    if not any(key.startswith("diag/") for _, r in runs for e in r.evals for key in e):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DIAGNOSTIC_PANELS), figsize=(15, 4.2))
    for ax, (title, keys, log) in zip(axes, DIAGNOSTIC_PANELS, strict=True):
        for opt, row in info["rows"].items():
            for key, label in keys:
                band = _band([_diagnostic_series(r, key) for r in row["group"]])
                if band is None:
                    continue
                grid, mean, low, high = band
                name = f"{display_name(opt)} {label}".strip()
                (line,) = ax.plot(grid, mean, marker="o" if grid.size < 3 else None, label=name)
                if len(row["group"]) > 1:
                    ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.2)
        if log and ax.lines and all((ln.get_ydata() > 0).all() for ln in ax.lines):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("epochs")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(f"{task}: optimizer diagnostics (mean over seeds, min-max shaded)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(
    directory: Path, target_factor: float = 1.05, targets: Path | None = None
) -> tuple[str, list[Path]]:
    """Write ``DIR/report.md`` and ``DIR/<task>.png``; return the text and the image paths.

    ``targets``: a targets file (default: the frozen :data:`TARGETS_FILE`).

    Raises:
        ValueError: no runs under ``directory``.
    """
    directory = Path(directory)
    problems: list[str] = []
    runs = load_runs(directory, problems)
    if not runs:
        detail = f"; {'; '.join(problems)}" if problems else ""
        raise ValueError(f"no runs under {directory} (expected <task>/<optimizer>/<seed>/)"
                         + detail)
    summary = summarize(runs, target_factor, load_targets(targets))
    text = markdown(summary, target_factor)
    if problems:
        text += "\n## Problems\n\n" + "\n".join(f"- {p}" for p in problems) + "\n"
    (directory / "report.md").write_text(text)
    images = [plot_task(task, info, directory / f"{task}.png") for task, info in summary.items()]
    for task, info in summary.items():
        extra = plot_diagnostics(task, info, directory / f"{task}-diagnostics.png")
        if extra is not None:
            images.append(extra)
    return text, images
