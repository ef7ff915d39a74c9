"""Tables, frozen targets and plots from the records of ``benchmarks/protocol.py``.

``python benchmarks/protocol_report.py`` reads ``benchmarks/protocol/**/*.jsonl`` and writes
``benchmarks/protocol/summary.md`` and ``benchmarks/protocol/summary.json`` (every number the
docs quote), the plots ``docs/img/protocol-<task>.png`` and ``docs/img/protocol-profile.png``,
and, once per task, its entry of ``src/mbf_bench/targets.json`` (read by ``mbf-bench report``).

Targets are frozen: per task, the median over seeds of the better of tuned Adam and tuned SGD-m
at the end of the final runs (training loss for autoencoders, test accuracy for classifiers).
The file is written the first time a task has both baselines' final runs, and only read after
that (delete an entry on purpose to refreeze it), so a target does not move when optimizers are
added or retuned. Time to target is the first CPU second at which an optimizer reaches it (for
autoencoders: the mean minibatch loss over the last ``WINDOW`` steps; for classifiers: an
evaluation of the test metric); the median over seeds, a miss counting as infinite.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mbf_bench.optimizers import display_name
from mbf_bench.report import TARGETS_FILE, first_reaching, fmt

sys.path.insert(0, str(Path(__file__).parent))
from protocol import SPACES, _load, tail_loss  # noqa: E402

ROOT = Path(__file__).parent / "protocol"
# Frozen targets live with the benchmark package, where `mbf-bench report` reads them.
TARGETS = TARGETS_FILE
IMG = Path(__file__).parent.parent / "docs" / "img"
WINDOW = 10
FIRST_ORDER = ("adam", "sgdm")
TASK_ORDER = ("mnist-ae", "curves-ae", "digits-ae", "planetoid-gcn", "cifar10-resnet8")


def _final_metric(r: dict[str, Any]) -> float:
    """Training loss at the end (autoencoders) or test accuracy at the end (classifiers)."""
    if r["status"] != "finished":
        return math.nan
    if r["family"] == "autoencoder":
        return tail_loss(r["curve"])
    accs = [v for k, v in r["evals"][-1].items() if k.endswith("accuracy")]
    return accs[0] if accs else math.nan


def _higher_is_better(family: str) -> bool:
    return family != "autoencoder"


def _time_to(r: dict[str, Any], target: float) -> tuple[float, float]:
    """(CPU seconds, steps) at which the run first reaches ``target``; inf when it never does:
    autoencoders by the mean loss of the last ``WINDOW`` steps, classifiers by evaluations."""
    if r["status"] != "finished" or not math.isfinite(target):
        return math.inf, math.inf
    if r["family"] == "autoencoder":
        losses = [c[2] for c in r["curve"]]
        windows = (
            (float(np.mean(losses[i - WINDOW + 1 : i + 1])), r["curve"][i][1], r["curve"][i][0])
            for i in range(WINDOW - 1, len(losses))
        )
        return first_reaching(windows, target, higher=False)
    accuracies = (
        (next((v for k, v in e.items() if k.endswith("accuracy")), None), e["seconds"], e["step"])
        for e in r["evals"]
    )
    return first_reaching(accuracies, target, higher=True)


def _median(values: list[float]) -> float:
    finite_or_inf = [v for v in values if not math.isnan(v)]
    return float(np.median(finite_or_inf)) if finite_or_inf else math.nan


def freeze_targets(records: list[dict[str, Any]]) -> dict[str, Any]:
    path = TARGETS
    frozen = json.loads(path.read_text()) if path.exists() else {"version": 1, "targets": {}}
    changed = False
    for task in TASK_ORDER:
        if task in frozen["targets"]:
            continue
        finals = [r for r in records if r["phase"] == "final" and r["task"] == task]
        per_opt = {}
        for name in FIRST_ORDER:
            runs = [r for r in finals if r["optimizer"] == name]
            if len(runs) < 3:
                break
            per_opt[name] = _median([_final_metric(r) for r in runs])
        else:
            family = finals[0]["family"]
            best = (max if _higher_is_better(family) else min)(
                v for v in per_opt.values() if math.isfinite(v))
            frozen["targets"][task] = {
                "metric": "test_accuracy" if _higher_is_better(family) else "train_loss",
                "value": round(best, 4),
                "rule": "median over 3 seeds of the better of tuned adam and sgdm at the end",
                "from": {k: round(v, 4) for k, v in per_opt.items()},
            }
            changed = True
    if changed:
        path.write_text(json.dumps(frozen, indent=2) + "\n")
    return frozen


def summarize(records: list[dict[str, Any]], targets: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task in TASK_ORDER:
        recs = [r for r in records if r["task"] == task]
        if not recs:
            continue
        family = recs[0]["family"]
        target = targets["targets"].get(task, {}).get("value", math.nan)
        info: dict[str, Any] = {"family": family, "target": target, "tuned": {}, "final": {},
                                "defaults": {}}
        for r in recs:
            if r["phase"] != "tune":
                continue
            score = r["score"] if math.isfinite(r["score"]) else math.inf
            row = info["tuned"].setdefault(r["optimizer"], {"trials": 0, "diverged": 0,
                                                             "best": math.inf, "hparams": {}})
            row["trials"] += 1
            row["diverged"] += r["status"] != "finished"
            if score < row["best"]:
                row["best"], row["hparams"] = score, {
                    k: r["hparams"][k] for k in SPACES.get(r["optimizer"], {})}
        for phase in ("final", "defaults"):
            by_opt: dict[str, list[dict[str, Any]]] = {}
            for r in recs:
                if r["phase"] == phase:
                    by_opt.setdefault(r["optimizer"], []).append(r)
            for name, runs in by_opt.items():
                metrics = [_final_metric(r) for r in runs]
                times = [_time_to(r, target) for r in runs]
                steps = [r["steps"] for r in runs]
                cpu = [r["cpu_seconds"] for r in runs]
                info[phase][name] = {
                    "seeds": len(runs),
                    "diverged": sum(r["status"] != "finished" for r in runs),
                    "metric_median": _median(metrics),
                    "metric_min": float(np.nanmin(metrics)) if any(map(math.isfinite, metrics))
                    else math.nan,
                    "metric_max": float(np.nanmax(metrics)) if any(map(math.isfinite, metrics))
                    else math.nan,
                    "seconds_to_target": _median([t[0] for t in times]),
                    "steps_to_target": _median([t[1] for t in times]),
                    "steps": _median(steps),
                    "seconds_per_step": _median([c / s for c, s in zip(cpu, steps, strict=True)
                                                 if s]),
                }
        out[task] = info
    return out


def ablations(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per task, per variant of MBF's selected setting: loss per seed, steps, time to target."""
    targets_path = TARGETS
    frozen = json.loads(targets_path.read_text())["targets"] if targets_path.exists() else {}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in records:
        if r["phase"] != "ablate":
            continue
        target = frozen.get(r["task"], {}).get("value", math.nan)
        row = out.setdefault(r["task"], {}).setdefault(
            r["hparams"]["variant"], {"losses": [], "steps": [], "to_target": []})
        row["losses"].append(_final_metric(r))
        row["steps"].append(r["steps"])
        row["to_target"].append(_time_to(r, target))
    return out


def ablation_markdown(table: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = []
    for task, variants in table.items():
        lines += [f"| {task}: MBF variant | train loss (seeds) | steps | CPU s to target "
                  "(seeds) | steps to target (seeds) |", "|---|---|---|---|---|"]
        for name, row in variants.items():
            losses = " / ".join(fmt(v) for v in row["losses"])
            steps = fmt(float(np.mean(row["steps"])), ".0f")
            secs = " / ".join(fmt(t[0], ".3g") for t in row["to_target"])
            stps = " / ".join(fmt(t[1], ".0f") for t in row["to_target"])
            lines.append(f"| {name} | {losses} | {steps} | {secs} | {stps} |")
        lines.append("")
    return "\n".join(lines)


def markdown(summary: dict[str, Any]) -> str:
    lines = ["# Protocol summary (generated by benchmarks/protocol_report.py)", ""]
    for task, info in summary.items():
        family = info["family"]
        metric = "test accuracy" if _higher_is_better(family) else "train loss"
        lines += [f"## {task}", "", f"Frozen target ({metric}): {fmt(info['target'])}", "",
                  "Tuning (equal trials, selection on training loss / validation accuracy):", "",
                  "| optimizer | trials | diverged | best score | selected |",
                  "|---|---|---|---|---|"]
        for name, row in info["tuned"].items():
            sel = ", ".join(f"{k}={v:.3g}" for k, v in row["hparams"].items())
            lines.append(f"| {display_name(name)} | {row['trials']} | {row['diverged']} | "
                         f"{fmt(row['best'])} | {sel} |")
        for phase, title in (("final", "Tuned settings, seeds 0-2"),
                             ("defaults", "Library defaults (no per-task values)")):
            if not info[phase]:
                continue
            lines += ["", f"{title}: median [min, max] over seeds", "",
                      f"| optimizer | {metric} | CPU s to target | steps to target | steps | "
                      "CPU s/step | diverged |", "|---|---|---|---|---|---|---|"]
            rows = sorted(info[phase].items(),
                          key=lambda kv: (-1 if _higher_is_better(family) else 1)
                          * (kv[1]["metric_median"] if math.isfinite(kv[1]["metric_median"])
                             else (-math.inf if _higher_is_better(family) else math.inf)))
            for name, row in rows:
                lines.append(
                    f"| {display_name(name)} | {fmt(row['metric_median'])} "
                    f"[{fmt(row['metric_min'])}, "
                    f"{fmt(row['metric_max'])}] | {fmt(row['seconds_to_target'], '.3g')} | "
                    f"{fmt(row['steps_to_target'], '.0f')} | {fmt(row['steps'], '.0f')} | "
                    f"{fmt(row['seconds_per_step'], '.3g')} | {row['diverged']}/{row['seeds']} |")
        lines.append("")
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMG.mkdir(parents=True, exist_ok=True)
    colors: dict[str, str] = {}
    palette = plt.get_cmap("tab10").colors
    for task, info in summary.items():
        runs = [r for r in records if r["task"] == task and r["phase"] == "final"]
        if not runs:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for r in runs:
            name = r["optimizer"]
            color = colors.setdefault(name, palette[len(colors) % len(palette)])
            label = display_name(name) if r["seed"] == 0 else None
            if info["family"] == "autoencoder":
                c = np.array([x for x in r["curve"] if math.isfinite(x[2])])
                if len(c) < WINDOW:
                    continue
                smooth = np.convolve(c[:, 2], np.ones(WINDOW) / WINDOW, mode="valid")
                axes[0].plot(c[WINDOW - 1 :, 0], smooth, color=color, label=label, lw=1)
                axes[1].plot(c[WINDOW - 1 :, 1], smooth, color=color, label=label, lw=1)
            else:
                ev = [(e["step"], e["seconds"], next(v for k, v in e.items()
                                                     if k.endswith("accuracy")))
                      for e in r["evals"]]
                if not ev:
                    continue
                e = np.array(ev)
                axes[0].plot(e[:, 0], e[:, 2], color=color, label=label, lw=1)
                axes[1].plot(e[:, 1], e[:, 2], color=color, label=label, lw=1)
        ylabel = "train loss (mean of 10 steps)" if info["family"] == "autoencoder" else (
            "test accuracy")
        for ax, xlabel in zip(axes, ("steps", "CPU seconds (1 thread)"), strict=True):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if math.isfinite(info["target"]):
                ax.axhline(info["target"], color="gray", ls="--", lw=0.8)
            if info["family"] == "autoencoder":
                finite = [row["metric_median"] for row in info["final"].values()
                          if math.isfinite(row["metric_median"])]
                if finite:
                    ax.set_ylim(min(finite) * 0.9, max(finite) * 1.6)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{task}: tuned settings, seeds 0-2 (dashed: frozen target)")
        fig.tight_layout()
        fig.savefig(IMG / f"protocol-{task}.png", dpi=80)
        plt.close(fig)
    # Performance profile over tasks: fraction of tasks reached within tau x the best time.
    names = sorted({n for info in summary.values() for n in info["final"]})
    taus = np.logspace(0, 1.3, 200)
    fig, ax = plt.subplots(figsize=(6, 4))
    tasks = [t for t, info in summary.items() if info["final"]]
    for name in names:
        ratios = []
        for task in tasks:
            times = {n: row["seconds_to_target"] for n, row in summary[task]["final"].items()}
            best = min(times.values())
            t = times.get(name, math.inf)
            ratios.append(t / best if math.isfinite(t) and best > 0 else math.inf)
        frac = [np.mean([r <= tau for r in ratios]) for tau in taus]
        ax.step(taus, frac, where="post", label=name,
                color=colors.setdefault(name, palette[len(colors) % len(palette)]))
    ax.set_xscale("log")
    ax.set_xlabel("tau: CPU time to target / the best optimizer's")
    ax.set_ylabel(f"fraction of the {len(tasks)} tasks")
    ax.legend(fontsize=8)
    ax.set_title("Performance profile (tuned settings, medians over seeds)")
    fig.tight_layout()
    fig.savefig(IMG / "protocol-profile.png", dpi=80)
    plt.close(fig)


def main() -> None:
    records = _load(ROOT)
    targets = freeze_targets(records)
    summary = summarize(records, targets)
    (ROOT / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    text = markdown(summary) + "\n## Ablations of MBF (one lever at a time)\n\n" + (
        ablation_markdown(ablations(records)))
    (ROOT / "summary.md").write_text(text)
    plot(records, summary)
    print(text)


if __name__ == "__main__":
    main()
