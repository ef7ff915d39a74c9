"""The comparison protocol: equal tuning budgets, selection off the test set, medians over seeds.

Phases (each appends one JSON line per run under ``--out`` and skips runs already there, so an
interrupted sweep is resumed by running the same command again):

- ``tune``: every optimizer gets the same number of trials (``--trials``) from its documented
  search space (:data:`SPACES`, a scrambled Halton sequence with a fixed seed: the same points
  on every machine) and the same per-trial budget of CPU seconds (``--cpu-seconds``). Autoencoders
  are judged by their training loss (the paper's measure: mean minibatch loss over the last
  tenth of the budget); classifiers by accuracy on a validation split of the training set
  (CIFAR: 10 % held out; Cora: its validation nodes). The test set is never looked at.
- ``final``: the selected settings of each optimizer (its best ``tune`` trial), ``--seeds``,
  training on the whole training set, test metric at the end.
- ``defaults``: every optimizer with its library defaults (no per-task values), ``--seeds``.
- ``ablate``: MBF's selected setting with one lever changed at a time (:data:`ABLATIONS`).
- ``summary``: freezes the targets (``targets.json``: from the tuned first-order baselines,
  written once and then only read), and writes tables and plots.

Time is CPU time of the training steps (``time.process_time``, one intra-op thread), so that
runs sharing the machine with other work are still comparable; evaluation is not counted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import qmc

from mbf_bench.optimizers import OPTIMIZERS, build_optimizer
from mbf_bench.tasks import get_task, load_data, make_problem

# Per optimizer: the hyperparameters searched, as (kind, low, high). "log": log-uniform;
# "one_minus_log": 1 - log-uniform (for beta2 and momentum close to 1). Everything else keeps
# the optimizer's registry value for the task family.
SPACES: dict[str, dict[str, tuple[str, float, float]]] = {
    "sgdm": {"lr": ("log", 1e-3, 1.0), "momentum": ("one_minus_log", 0.01, 0.2)},
    "adam": {"lr": ("log", 1e-4, 3e-2), "beta2": ("one_minus_log", 1e-3, 1e-1),
             "eps": ("log", 1e-10, 1e-5)},
    "adamw": {"lr": ("log", 1e-4, 3e-2), "beta2": ("one_minus_log", 1e-3, 1e-1),
              "eps": ("log", 1e-10, 1e-5)},
    "mbf": {"lr": ("log", 1e-4, 3e-2), "damping": ("log", 1e-4, 1.0)},
    "mbf-sgd": {"lr": ("log", 1e-3, 1.0), "damping": ("log", 1e-4, 1.0)},
    "mbf-paper": {"lr": ("log", 1e-4, 1e-1), "damping": ("log", 1e-3, 10.0)},
    "kfac": {"lr": ("log", 1e-4, 1.0), "damping": ("log", 1e-2, 1e3)},
    "shampoo-ours": {"lr": ("log", 1e-5, 1e-1), "damping": ("log", 1e-4, 10.0)},
    "tnt": {"lr": ("log", 1e-4, 1.0), "damping": ("log", 1e-2, 1e3)},
}

FIRST_ORDER = ("adam", "sgdm")

# One lever of MBF's tuned setting changed at a time (phase ``ablate``): what each is worth.
ABLATIONS: dict[str, dict[str, Any]] = {
    "tuned": {},
    "no bias correction": {"bias_correction": False},
    "no early refresh": {"early_refresh": False},
    "absolute damping 1e-5": {"relative_damping": False, "damping": 1e-5},
    "damping x1e4 (direction ~ momentum)": {"damping_factor": 1e4},
    "blocks of 8": {"max_block_size": 8},
    "blocks of 64": {"max_block_size": 64},
    "graft onto SGD-m's norms at tuned SGD-m's lr": {"graft": "sgd", "lr_from": "sgdm"},
}
CLASSIFIER_HOLDOUT = 0.1


def trial_points(optimizer: str, trials: int) -> list[dict[str, float]]:
    """The ``trials`` search points of ``optimizer``: scrambled Halton, seed 0, mapped."""
    space = SPACES[optimizer]
    unit = qmc.Halton(d=len(space), scramble=True, seed=0).random(trials)
    points = []
    for row in unit:
        point = {}
        for u, (name, (kind, lo, hi)) in zip(row, space.items(), strict=True):
            value = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
            point[name] = float(f"{(1.0 - value if kind == 'one_minus_log' else value):.4g}")
        points.append(point)
    return points


def _eval_every(total_hint: int) -> int:
    return max(1, total_hint // 20)


def train_once(
    task_name: str,
    optimizer: str,
    hparams: dict[str, Any],
    *,
    seed: int,
    cpu_seconds: float,
    data_dir: Path,
    validation: bool,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """One run; returns its curve (step, CPU s, minibatch loss), evaluations and status."""
    task = get_task(task_name)
    data = load_data(task, data_dir, {}, None)
    classifier = task.family != "autoencoder"
    holdout = (CLASSIFIER_HOLDOUT if validation else None) if classifier else None
    if task.family == "gcn" and validation:
        holdout = CLASSIFIER_HOLDOUT  # GraphProblem: any holdout means "evaluate on val nodes"
    problem = make_problem(task, data, seed=seed, device=torch.device("cpu"), holdout=holdout)
    torch.manual_seed(seed)
    model = task.model(data)
    merged = {**OPTIMIZERS[optimizer].defaults, **hparams}
    opt = build_optimizer(optimizer, model, merged)
    steps_per_epoch = problem.steps_per_epoch
    curve: list[tuple[int, float, float]] = []
    evals: list[dict[str, float]] = []
    spent, step, epoch, index = 0.0, 0, 0, 0
    status = "finished"
    eval_every = _eval_every(task.epochs * steps_per_epoch if task.batch_size is None else 200)
    while spent < cpu_seconds and (max_steps is None or step < max_steps):
        start = time.process_time()
        batch = problem.batch(epoch, index)
        opt.zero_grad(set_to_none=True)
        loss = problem.loss(model, batch)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        spent += time.process_time() - start
        step += 1
        index += 1
        if index == steps_per_epoch:
            epoch, index = epoch + 1, 0
        if not math.isfinite(value) or value > 1e8:
            status = "diverged"
            curve.append((step, spent, float("nan")))
            break
        curve.append((step, round(spent, 4), value))
        if classifier and step % eval_every == 0:
            evals.append({"step": step, "seconds": spent, **problem.evaluate(model)})
    if status == "finished" and (classifier or not validation):
        last = problem.evaluate(model)
        if not evals or evals[-1]["step"] != step:
            evals.append({"step": step, "seconds": spent, **last})
    return {"status": status, "steps": step, "cpu_seconds": spent, "curve": curve,
            "evals": evals}


def tail_loss(curve: list[list[float]], fraction: float = 0.1) -> float:
    """Mean minibatch loss over the last ``fraction`` of the run's steps (NaN if diverged)."""
    losses = [c[2] for c in curve]
    if not losses or not all(math.isfinite(v) for v in losses):
        return math.nan
    k = max(1, int(len(losses) * fraction))
    return float(np.mean(losses[-k:]))


def score(record: dict[str, Any]) -> float:
    """Selection score, lower is better: tail training loss (AE) or -validation accuracy."""
    if record["status"] != "finished":
        return math.inf
    if record["family"] == "autoencoder":
        value = tail_loss(record["curve"])
        return value if math.isfinite(value) else math.inf
    accs = [e[k] for e in record["evals"] for k in e if k.endswith("accuracy")]
    return -accs[-1] if accs else math.inf


def _load(path: Path) -> list[dict[str, Any]]:
    """Every record in a JSON-lines file, or in all ``*.jsonl`` files under a directory."""
    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path] if path.exists() else []
    return [json.loads(line) for f in files for line in f.read_text().splitlines()
            if line.strip()]


def records_file(root: Path, phase: str, task: str, optimizer: str) -> Path:
    """Where a run's record goes: one file per phase, task and optimizer."""
    return root / phase / task / f"{optimizer}.jsonl"


def _append(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _key(r: dict[str, Any]) -> tuple:
    return (r["phase"], r["task"], r["optimizer"], r["seed"], json.dumps(r["hparams"],
                                                                         sort_keys=True))


def best_settings(records: list[dict[str, Any]], task: str) -> dict[str, dict[str, Any]]:
    """Per optimizer, the hyperparameters of its best tuning trial on ``task``."""
    best: dict[str, tuple[float, dict[str, Any]]] = {}
    for r in records:
        if r["phase"] != "tune" or r["task"] != task:
            continue
        s = score(r)
        if r["optimizer"] not in best or s < best[r["optimizer"]][0]:
            best[r["optimizer"]] = (s, r["hparams"])
    return {k: v[1] for k, v in best.items() if math.isfinite(v[0])}


def run_phase(args: argparse.Namespace) -> None:
    from mbf_bench.optimizers import defaults_for

    root = Path(args.out)
    done = {_key(r) for r in _load(root)}
    task = get_task(args.task)
    jobs: list[tuple[str, dict[str, Any], int]] = []
    for name in args.optimizers.split(","):
        family_defaults = defaults_for(name, task.family)
        family_defaults.update(
            {k: v for k, v in task.hparam_defaults.items() if k in family_defaults})
        if args.phase == "tune":
            for point in trial_points(name, args.trials):
                jobs.append((name, {**family_defaults, **point}, 0))
        elif args.phase == "final":
            tuned = best_settings(_load(root / "tune"), args.task)
            if name not in tuned:
                print(f"{name}: no finished tuning trial on {args.task}; skipped", flush=True)
                continue
            for seed in args.seeds:
                jobs.append((name, tuned[name], seed))
        elif args.phase == "ablate":
            selected = best_settings(_load(root / "tune"), args.task)
            for variant, change in ABLATIONS.items():
                hp = {**selected[name], **{k: v for k, v in change.items()
                                           if not k.endswith(("_factor", "_from"))}}
                hp["damping"] = hp["damping"] * change.get("damping_factor", 1.0)
                if "lr_from" in change:
                    hp["lr"] = selected[change["lr_from"]]["lr"]
                hp["variant"] = variant
                for seed in args.seeds:
                    jobs.append((name, hp, seed))
        else:  # defaults: the library's defaults, only what the task itself fixes
            library = dict(OPTIMIZERS[name].defaults)
            library.update({k: v for k, v in task.hparam_defaults.items() if k in library})
            for seed in args.seeds:
                jobs.append((name, library, seed))
    for name, hparams, seed in jobs:
        record = {"phase": args.phase, "task": args.task, "optimizer": name, "seed": seed,
                  "hparams": hparams, "family": task.family}
        if _key(record) in done:
            continue
        t0 = time.time()
        hp = {k: v for k, v in hparams.items() if k != "variant"}
        result = train_once(args.task, name, hp, seed=seed, cpu_seconds=args.cpu_seconds,
                            data_dir=Path(args.data_dir), validation=args.phase == "tune",
                            max_steps=args.max_steps)
        record.update(result, budget_cpu_seconds=args.cpu_seconds, threads=1,
                      wall_seconds=round(time.time() - t0, 1))
        record["score"] = score(record)
        _append(records_file(root, args.phase, args.task, name), record)
        shown = {k: hparams[k] for k in SPACES.get(name, {}) if k in hparams}
        print(f"{args.phase} {args.task} {name} {hparams.get('variant', '')} seed {seed} "
              f"{shown}: {result['status']}, "
              f"{result['steps']} steps, score {record['score']:.4g}", flush=True)


def main(argv: list[str] | None = None) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("tune", "final", "defaults", "ablate"))
    parser.add_argument("--task", required=True)
    parser.add_argument("--optimizers", required=True)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--cpu-seconds", type=float, required=True)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")],
                        default=[0, 1, 2])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--out", default="benchmarks/protocol",
                        help="records root: <out>/<phase>/<task>/<optimizer>.jsonl")
    args = parser.parse_args(argv)
    run_phase(args)


if __name__ == "__main__":
    sys.exit(main())
