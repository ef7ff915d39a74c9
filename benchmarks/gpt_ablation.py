"""Where the mini-block direction helps the GPT: MBF with one parameter type at a time on Adam's
direction.

Every variant is MBF at the library defaults (Adam-grafted, lr 3e-3) on task ``text-gpt``, except
that the parameters of the ablated type go into param groups with ``max_block_size=1``. A block of
one coordinate has the direction of its momentum's sign, and grafting gives it Adam's length, so
those parameters take exactly Adam's step (``tests/test_step_options.py``,
``test_graft_with_blocks_of_one_is_the_first_order_method``) while the others keep their
mini-blocks. Weights and biases of an ablated type go into two separate groups: a LayerNorm's
``(gamma_c, beta_c)`` pair is one 2x2 block whatever ``max_block_size`` says, and only splitting
the pair across groups leaves each coordinate its own block (``mbf.layers``). The script checks
that every ablated parameter ends in blocks of one and every other keeps the default blocks.

Variants: ``mbf`` (mini-blocks everywhere), ``adam-dir:<type>`` for each type of ``TYPES``,
``adam-dir:all`` (every parameter in blocks of one: Adam itself at MBF's lr 3e-3, beta1 0.9,
beta2 0.999, which separates the learning rate from the direction), and ``adamw``, the
registry's AdamW for the transformer family (torch's lr 1e-3, no weight decay).

The model, data and batches are the benchmark's (``mbf_bench.tasks``), with the validation tail
only (``holdout``: the test tail is never read). Validation loss every ``--eval-every`` steps and
at the end. Example (one process per run, in parallel):

    OMP_NUM_THREADS=1 python benchmarks/gpt_ablation.py --data-dir ../shared/data \
        --variant adam-dir:mlp --seed 100 --steps 300 --out benchmarks/gpt_ablation
    python benchmarks/gpt_ablation.py --report benchmarks/gpt_ablation
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mbf
from mbf_bench.optimizers import build_optimizer, defaults_for
from mbf_bench.tasks import get_task, load_data, make_problem

TASK = "text-gpt"

#: Parameter types of the GPT (``mbf_bench.models.gpt``), by the start or part of their names.
TYPES: dict[str, tuple[str, ...]] = {
    "embeddings": ("tok.", "pos."),
    "attention": (".attn.",),
    "mlp": (".fc.", ".proj."),
    "layernorm": (".ln1.", ".ln2.", "ln_f."),
    "head": ("head.",),
}
VARIANTS = ("adamw", "mbf", *(f"adam-dir:{t}" for t in TYPES), "adam-dir:all")


def type_of(name: str) -> str:
    """The parameter type (a key of ``TYPES``) of the GPT parameter called ``name``."""
    dotted = "." + name
    found = [t for t, marks in TYPES.items() if any(m in dotted for m in marks)]
    if len(found) != 1:
        raise ValueError(f"gpt_ablation: parameter {name!r} matches types {found}, not one")
    return found[0]


def mbf_with_adam_direction(model: nn.Module, ablated: set[str]) -> mbf.MBF:
    """MBF at the library defaults, with the parameters of the ``ablated`` types in blocks of
    one (Adam's step under the default Adam graft)."""
    keep, weights, biases = [], [], []
    for name, p in model.named_parameters():
        if type_of(name) not in ablated:
            keep.append(p)
        elif name.endswith("bias"):
            biases.append(p)
        else:
            weights.append(p)
    groups: list[dict[str, Any]] = [{"params": keep}] if keep else []
    groups += [{"params": ps, "max_block_size": 1} for ps in (weights, biases) if ps]
    opt = mbf.MBF(groups, model=model)
    _check_blocks(opt, model, ablated)
    return opt


def _check_blocks(opt: mbf.MBF, model: nn.Module, ablated: set[str]) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    for unit in opt.blocks():
        kinds = {type_of(names[id(p)]) for p in unit.params}
        size = unit.layout.block_size
        if kinds & ablated and (size != 1 or not kinds <= ablated):
            raise AssertionError(f"unit {unit.name}: types {kinds}, blocks of {size}")
        if not kinds & ablated and size == 1:
            raise AssertionError(f"unit {unit.name} kept its type but has blocks of one")


def build(variant: str, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``variant`` (one of ``VARIANTS``) for ``model``."""
    if variant == "adamw":
        hp = defaults_for("adamw", "transformer")
        return build_optimizer("adamw", model, hp)
    if variant == "mbf":
        return mbf_with_adam_direction(model, set())
    kind = variant.removeprefix("adam-dir:")
    return mbf_with_adam_direction(model, set(TYPES) if kind == "all" else {kind})


def run(
    variant: str, seed: int, steps: int, eval_every: int, data_dir: Path, out: Path
) -> dict[str, Any]:
    """Train one variant for ``steps`` steps; validation losses at every ``eval_every`` steps.
    The record is rewritten to ``out`` at every evaluation, so a run cut short keeps its
    losses so far (``steps_done`` says how far it got)."""
    task = get_task(TASK)
    data = load_data(task, data_dir)
    problem = make_problem(task, data, seed=seed, device=torch.device("cpu"), holdout=0.0)
    torch.manual_seed(seed)
    model = task.model(data)
    opt = build(variant, model)
    evals: dict[int, float] = {}
    losses, seconds = [], 0.0
    record: dict[str, Any] = {}
    for step in range(steps):
        epoch, index = divmod(step, problem.steps_per_epoch)
        start = time.perf_counter()
        batch = problem.batch(epoch, index)
        opt.zero_grad(set_to_none=True)
        loss = problem.loss(model, batch)
        loss.backward()
        opt.step()
        seconds += time.perf_counter() - start
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            break
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            evals[step + 1] = problem.evaluate(model)["val_loss"]
            record = {"variant": variant, "seed": seed, "steps": steps, "steps_done": step + 1,
                      "val_loss": evals, "final_val_loss": evals.get(steps, math.nan),
                      "train_seconds": seconds, "threads": torch.get_num_threads()}
            out.write_text(json.dumps(record, indent=1) + "\n")
    return record


def report(directory: Path) -> str:
    """A Markdown table of the runs in ``directory``: validation loss at the last step every run
    reached (median over seeds, each seed, and the median at earlier evaluations)."""
    runs = [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        r["val_loss"] = {int(k): v for k, v in r["val_loss"].items()}
        by_variant.setdefault(r["variant"], []).append(r)
    seeds = sorted({r["seed"] for r in runs})
    last = min(r["steps_done"] for r in runs)
    points = sorted({k for r in runs for k in r["val_loss"] if k < last})

    def median_at(rs: list[dict[str, Any]], step: int) -> float:
        return statistics.median(r["val_loss"][step] for r in rs)

    base = median_at(by_variant["mbf"], last) if "mbf" in by_variant else math.nan
    head = ([f"median at {k}" for k in points] + [f"median at {last}", "vs mbf"]
            + [f"seed {s}" for s in seeds] + ["s/step"])
    rows = ["| variant | " + " | ".join(head) + " |", "|---" * (1 + len(head)) + "|"]
    for variant in VARIANTS:
        rs = by_variant.get(variant)
        if not rs:
            continue
        med = median_at(rs, last)
        per_seed = {r["seed"]: r["val_loss"][last] for r in rs}
        cells = [f"{median_at(rs, k):.3f}" for k in points]
        cells += [f"**{med:.3f}**", f"{med - base:+.3f}"]
        cells += [f"{per_seed[s]:.3f}" if s in per_seed else "-" for s in seeds]
        cells.append(f"{statistics.median(r['train_seconds'] / r['steps_done'] for r in rs):.2f}")
        rows.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/gpt_ablation"))
    parser.add_argument("--report", type=Path, help="print the table of a directory of runs")
    args = parser.parse_args()
    if args.report is not None:
        print(report(args.report))
        return
    if args.variant is None:
        parser.error("--variant is required (or --report)")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{args.variant.replace(':', '-')}_seed{args.seed}.json"
    print(json.dumps(run(args.variant, args.seed, args.steps, args.eval_every, args.data_dir, out)))


if __name__ == "__main__":
    main()
