"""Does our K-FAC reproduce its published behaviour on the MNIST autoencoder (issue 19 item 1)?

Martens & Grosse (2015) report K-FAC clearly ahead of SGD with momentum per iteration on the
Hinton & Salakhutdinov MNIST autoencoder (task ``mnist-ae``: 784-1000-500-250-30 and back,
Bernoulli loss summed over pixels, batch 1000). This script trains it for a fixed number of
steps with each optimizer of the registry (``build_optimizer``, the family's defaults plus the
overrides given) and records the training loss of every step and the loss on a held-out tenth
of the training set (``holdout=0.1``, never trained on) every ``--eval-every`` steps.

K-FAC with ``adapt_damping`` is stepped as ``opt.step(closure)`` (the closure evaluates the
minibatch loss, its backward only when gradients are enabled); every other run uses the
benchmark's loop ``zero_grad(); loss.backward(); step()``. The seconds recorded are the process
CPU time of the steps (one thread), the extra forward of the damping adaptation included.

Two phases, both written to ``benchmarks/kfac_validation/``:

* ``tune``: each K-FAC setting of ``--grid`` (JSON list of override dicts) on the tuning seed;
  the best by final validation loss is the one taken to the final seeds.
* ``final``: each ``--runs`` entry (``name`` and ``overrides``) on each ``--seeds``.
* ``summary``: a markdown table of every ``.jsonl`` of the folder into ``summary.md``.

Commands that made the committed results are in ``benchmarks/kfac_validation/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from mbf_bench.optimizers import build_optimizer, defaults_for
from mbf_bench.tasks import get_task, load_data, make_problem

OUT = Path(__file__).resolve().parent / "kfac_validation"
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def run_one(name: str, overrides: dict[str, Any], seed: int, steps: int,
            eval_every: int) -> dict[str, Any]:
    """Train ``mnist-ae`` for ``steps`` steps with optimizer ``name``; the per-step record."""
    task = get_task("mnist-ae")
    data = load_data(task, DATA)
    problem = make_problem(task, data, seed=seed, device=torch.device("cpu"), holdout=0.1)
    torch.manual_seed(seed)
    model = task.model(data)
    hp = {**defaults_for(name, task.family), **overrides}
    opt = build_optimizer(name, model, hp)
    use_closure = name == "kfac" and bool(hp.get("adapt_damping"))
    train_loss: list[float | None] = []
    val: list[tuple[int, float]] = []
    dampings: list[float] = []
    cpu = 0.0
    status = "ok"
    for step in range(steps):
        epoch, index = divmod(step, problem.steps_per_epoch)
        batch = problem.batch(epoch, index)
        start = time.process_time()
        if use_closure:
            def closure(batch: tuple[torch.Tensor, torch.Tensor] = batch) -> torch.Tensor:
                opt.zero_grad(set_to_none=True)
                loss = problem.loss(model, batch)
                if torch.is_grad_enabled():
                    loss.backward()
                return loss

            value = float(opt.step(closure).detach())
        else:
            opt.zero_grad(set_to_none=True)
            loss = problem.loss(model, batch)
            loss.backward()
            opt.step()
            value = float(loss.detach())
        cpu += time.process_time() - start
        if name == "kfac":
            dampings.append(float(opt.param_groups[0]["damping"]))
        if not math.isfinite(value):
            train_loss.append(None)
            status = "diverged"
            break
        train_loss.append(value)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            val.append((step + 1, problem.evaluate(model)["val_loss"]))
    return {
        "optimizer": name, "overrides": overrides, "hparams": {k: hp[k] for k in sorted(hp)},
        "seed": seed, "steps": steps, "status": status, "cpu_seconds": cpu,
        "train_loss": train_loss, "val_loss": val,
        "final_val_loss": val[-1][1] if val and status == "ok" else None,
        "damping": dampings if name == "kfac" else None,
    }


def _label(record: dict[str, Any]) -> str:
    over = ",".join(f"{k}={v}" for k, v in sorted(record["overrides"].items()))
    return f"{record['optimizer']}({over})" if over else record["optimizer"]


def summarize(records: list[dict[str, Any]], marks: list[int]) -> str:
    """A markdown table per run label: median [min, max] over seeds of the training loss at the
    ``marks`` steps (mean of the 10 steps ending there) and of the final validation loss, and the
    CPU seconds per step."""
    import statistics

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(_label(r), []).append(r)
    head = ["run", "seeds", *[f"train@{m}" for m in marks], "val@end", "val per seed", "CPU s/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(values: list[float | None]) -> str:
        ok = [v for v in values if v is not None]
        if len(ok) < len(values):
            return f"{len(values) - len(ok)} diverged"
        med = statistics.median(ok)
        return f"{med:.1f}" if len(ok) == 1 else f"{med:.1f} [{min(ok):.1f}, {max(ok):.1f}]"

    for label, runs in groups.items():
        row = [label, ",".join(str(r["seed"]) for r in runs)]
        for m in marks:
            vals: list[float | None] = []
            for r in runs:
                window = r["train_loss"][max(0, m - 10):m]
                ok = len(window) == 10 and all(v is not None for v in window)
                vals.append(sum(window) / 10 if ok else None)
            row.append(cell(vals))
        finals = [r["final_val_loss"] for r in runs]
        row.append(cell(finals))
        row.append(", ".join("div" if v is None else f"{v:.1f}" for v in finals))
        steps = sum(len(r["train_loss"]) for r in runs)
        row.append(f"{sum(r['cpu_seconds'] for r in runs) / steps:.3f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["tune", "final", "summary"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[100])
    parser.add_argument("--grid", default="[]", help="tune: JSON list of K-FAC override dicts")
    parser.add_argument("--runs", default="[]",
                        help='final: JSON list of {"name": ..., "overrides": {...}}')
    parser.add_argument("--out", default=None, help="output file name under kfac_validation/")
    args = parser.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(exist_ok=True)
    if args.phase == "summary":  # every .jsonl of the folder, one table each, into summary.md
        marks = [m for m in (50, 100, 150, 200, 250, 300, 400, 500) if m <= args.steps]
        parts = []
        for path in sorted(OUT.glob("*.jsonl")):
            records = [json.loads(line) for line in path.read_text().splitlines() if line]
            parts.append(f"## {path.name}\n\n{summarize(records, marks)}")
        (OUT / "summary.md").write_text("# K-FAC validation on mnist-ae (generated by "
                                        "`benchmarks/kfac_validation.py summary`)\n\n"
                                        + "\n".join(parts))
        print((OUT / "summary.md").read_text())
        return
    if args.phase == "tune":
        jobs = [("kfac", o, s) for o in json.loads(args.grid) for s in args.seeds]
    else:
        jobs = [(r["name"], r.get("overrides", {}), s) for r in json.loads(args.runs)
                for s in args.seeds]
    path = OUT / (args.out or f"{args.phase}.jsonl")
    for name, overrides, seed in jobs:
        record = run_one(name, overrides, seed, args.steps, args.eval_every)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        last = next((v for v in reversed(record["train_loss"]) if v is not None), None)
        print(f"{name} {json.dumps(overrides)} seed {seed}: {record['status']}, "
              f"train {last}, val {record['final_val_loss']}, cpu {record['cpu_seconds']:.0f} s",
              flush=True)


if __name__ == "__main__":
    main()
