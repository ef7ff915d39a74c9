"""A screen of one lever for MBF on transformers (issue 19, item 3): precondition the output side
of a layer too. Not a library feature; a prototype to learn whether the lever is worth building.

Why. With tied rows (MBF's default) a Linear layer's direction is ``M R_c^-1`` per column chunk
``c``: the inputs' side is whitened, block by block, and the Adam graft gives every (row, chunk)
piece its length. Nothing mixes the rows: the output side is preconditioned only by those
per-piece lengths. The optimizers that beat MBF on the small GPT (`docs/results.md`: Muon and
SOAP, 1.395 against MBF's 1.431 at defaults) act on both sides: Muon's update
``(M M^T)^(-1/2) M`` whitens the rows of the momentum, SOAP runs Adam in the eigenbases of both
Shampoo factors. The same tying gives MBF an output-side factor at the same cost: one ``s x s``
block per row chunk ``r`` estimated from all columns, ``L_r = EMA(G_r G_r^T / cols)``, and the
direction ``L_r^(-1/a) (M R_c^(-1/b))`` per (row chunk, column chunk), then grafted as before.

``left_root`` ``a``: 0 (no output-side factor: the tied-rows step of
``benchmarks/tied_rows/prototype.py``, the control), 1 (inverse: a block-diagonal K-FAC of the
empirical Fisher, both factors inverted) or 2 (inverse square root); ``right_root`` ``b``: 1
(MBF's inverse) or 2. Damping, refresh schedule, bias correction, momentum and graft are the
tied-rows prototype's (MBF's defaults), on both factors alike. Roots by ``eigh`` in float64 at
each refresh (a prototype; cost is not measured here).

Which parameters: Muon's hidden matrices (``layers="hidden"``, the GPTs) or every Linear weight
(``layers="linear"``, the autoencoders), everything else on Adam's step, as in the tied-rows
prototype; 2-d matrices only.

    OMP_NUM_THREADS=1 python benchmarks/two_sided/prototype.py run --data-dir ../shared/data \
        --tasks text-gpt-tiny --seeds 100,101,102,103,104 --set left_root=1
    python benchmarks/two_sided/prototype.py report

Rows go to ``runs.jsonl`` beside this file (a run already there is skipped); the rule that
decides what the screen leads to is in ``README.md``, written before the runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mbf_bench import optimizers as registry
from mbf_bench.baselines import muon_split
from mbf_bench.protocol import TrialJob, library_defaults, load_rules, screen_main, screen_run

HERE = Path(__file__).resolve().parent


def _tied_rows_prototype() -> Any:
    """``benchmarks/tied_rows/prototype.py`` (a module of the same file name as this one)."""
    path = HERE.parent / "tied_rows" / "prototype.py"
    spec = importlib.util.spec_from_file_location("tied_rows_prototype", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_TIED = _tied_rows_prototype()
TiedRowsMBF, chunks, TIED_DEFAULTS = _TIED.TiedRowsMBF, _TIED.chunks, _TIED.DEFAULTS
RUNS = HERE / "runs.jsonl"
DEFAULTS = {**TIED_DEFAULTS, "left_root": 0, "right_root": 1}
TASKS = ("text-gpt-tiny", "text-gpt", "mnist-ae", "curves-ae")


def damped_power(stat: Tensor, mass: float, damping: float, root: int) -> Tensor:
    """``(S + damping tr(S)/s I)^(-1/root)`` of the bias-corrected statistics ``S = stat / mass``
    (MBF's relative damping), in float64, returned in ``stat``'s dtype."""
    s = stat.double() / mass
    size = s.shape[0]
    s = s + (damping * s.diagonal().sum() / size + 1e-30) * torch.eye(size, dtype=s.dtype)
    if root == 1:
        return torch.linalg.inv(s).to(stat.dtype)
    values, vectors = torch.linalg.eigh(s)
    values = values.clamp_min(values.max() * 1e-12)
    return ((vectors * values.pow(-1.0 / root)) @ vectors.T).to(stat.dtype)


class TwoSidedMBF(TiedRowsMBF):
    """The tied-rows step with an optional output-side factor (module docstring)."""

    def __init__(self, hidden: list[nn.Parameter], other: list[nn.Parameter],
                 **hp: Any) -> None:
        super().__init__(hidden, other, **{**DEFAULTS, **hp})

    def _tied_direction(self, p: Tensor, g: Tensor, adam: Tensor, state: dict[str, Any],
                        group: dict[str, Any]) -> Tensor:
        if p.ndim != 2:
            raise ValueError("the two-sided prototype serves 2-d matrices only")
        rows, cols = p.shape
        limit, decay = group["max_block_size"], group["stat_decay"]
        left_root, right_root = group["left_root"], group["right_root"]
        col_parts, row_parts = chunks(cols, limit), chunks(rows, limit)
        if "right" not in state:
            state["right"] = [g.new_zeros(b - a, b - a) for a, b in col_parts]
            state["left"] = [g.new_zeros(b - a, b - a) for a, b in row_parts]
            state["right_inv"], state["left_inv"] = [None] * len(col_parts), [None] * len(
                row_parts)
            state["updates"] = 0
        state["updates"] += 1
        n = state["updates"]
        mass = 1 - decay**n
        refresh = (n - 1) % group["inv_every"] == 0 or (
            n < group["inv_every"] and n & (n - 1) == 0)
        for i, (a, b) in enumerate(col_parts):
            gc = g[:, a:b]
            state["right"][i].mul_(decay).add_(gc.T @ gc, alpha=(1 - decay) / rows)
            if refresh:
                state["right_inv"][i] = damped_power(state["right"][i], mass, group["damping"],
                                                     right_root)
        if left_root:
            for j, (a, b) in enumerate(row_parts):
                gr = g[a:b]
                state["left"][j].mul_(decay).add_(gr @ gr.T, alpha=(1 - decay) / cols)
                if refresh:
                    state["left_inv"][j] = damped_power(state["left"][j], mass,
                                                        group["damping"], left_root)
        buf = state["buf"]
        d = torch.empty_like(buf)
        for i, (a, b) in enumerate(col_parts):
            d[:, a:b] = buf[:, a:b] @ state["right_inv"][i]
        if left_root:
            for j, (a, b) in enumerate(row_parts):
                d[a:b] = state["left_inv"][j] @ d[a:b]
        out = torch.empty_like(d)
        for a, b in col_parts:  # each (row, column chunk) piece at Adam's length for it
            length = adam[:, a:b].norm(dim=1, keepdim=True)
            piece = d[:, a:b]
            out[:, a:b] = piece * (length / piece.norm(dim=1, keepdim=True).clamp_min(1e-30))
        return out


def _build(model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
    """``layers="hidden"``: Muon's hidden matrices (the GPTs); ``"linear"``: every
    ``nn.Linear`` weight (the autoencoders); everything else on Adam's step."""
    hp = dict(hp)
    layers = hp.pop("layers", "hidden")
    if layers == "hidden":
        hidden, other = muon_split(model)
    elif layers == "linear":
        ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
        params = [p for p in model.parameters() if p.requires_grad]
        hidden = [p for p in params if id(p) in ids]
        other = [p for p in params if id(p) not in ids]
    else:
        raise ValueError(f"layers must be 'hidden' or 'linear', not {layers!r}")
    return TwoSidedMBF(hidden, other, **hp)


registry.OPTIMIZERS["two-sided-mbf"] = registry.OptimizerSpec(
    "two-sided-mbf", "prototype: tied-rows MBF with an output-side factor too",
    dict(DEFAULTS), _build, needs_model=True, validated=False)


def _changes(pairs: list[str]) -> dict[str, Any]:
    return {k: json.loads(v) for k, _, v in (pair.partition("=") for pair in pairs)}


HIDDEN_RUNS = HERE / "library.jsonl"


def run(args: argparse.Namespace) -> int:
    """The prototype at ``--set`` changes (rows in ``runs.jsonl``), or the library option on
    the hidden layers, ``--optimizer mbf-two-sided`` (rows in ``library.jsonl``)."""
    torch.set_num_threads(1)
    rules = load_rules()
    library = args.optimizer == "mbf-two-sided"
    settings = {**DEFAULTS, **_changes(args.set)}
    for task in args.tasks.split(","):
        for seed in map(int, args.seeds.split(",")):
            if library:
                job = TrialJob("tune", task, args.optimizer, args.optimizer,
                               library_defaults(args.optimizer, task), seed)
                path = HIDDEN_RUNS
                label = {"task": task, "optimizer": args.optimizer, "seed": seed}
            else:
                job = TrialJob("tune", task, args.optimizer, args.optimizer, settings, seed)
                path = RUNS
                label = {"task": task, "seed": seed, "left_root": settings["left_root"],
                         "right_root": settings["right_root"], "layers": settings["layers"]}
            row = screen_run(rules, job, args.data_dir, path, label)
            if row is not None:
                print(json.dumps(row), flush=True)
    return 0


def report(args: argparse.Namespace) -> int:
    """Per task and (left_root, right_root): the values by seed, their mean and spread, and the
    difference to the control (0, 1) on the seeds both have."""
    rows = [json.loads(t) for t in RUNS.read_text().splitlines() if t.strip()]
    print("| task | left_root | right_root | seeds | validation loss by seed | mean | spread "
          "| minus control (same seeds) |")
    print("|---|---|---|---|---|---|---|---|")
    for task in TASKS:
        ours = [r for r in rows if r["task"] == task]
        control = {r["seed"]: r["value"] for r in ours
                   if (r["left_root"], r["right_root"]) == (0, 1)}
        for key in sorted({(r["left_root"], r["right_root"]) for r in ours}):
            values = {r["seed"]: r["value"] for r in ours
                      if (r["left_root"], r["right_root"]) == key}
            seeds = sorted(values)
            vals = [values[s] for s in seeds]
            if any(v is None or not math.isfinite(v) for v in vals):
                print(f"| {task} | {key[0]} | {key[1]} | {seeds} | diverged | | | |")
                continue
            both = [s for s in seeds if s in control]
            diff = (statistics.fmean(values[s] for s in both)
                    - statistics.fmean(control[s] for s in both)) if both else float("nan")
            print(f"| {task} | {key[0]} | {key[1]} | {', '.join(map(str, seeds))} | "
                  f"{' / '.join(f'{v:.4f}' for v in vals)} | {statistics.fmean(vals):.4f} | "
                  f"{max(vals) - min(vals):.4f} | {diff:+.4f} |")
    if LIBRARY.exists():
        print()
        report_library()
    return 0


def _library_rows(path: Path, **match: Any) -> dict[str, dict[int, dict[str, Any]]]:
    """task -> seed -> row of ``path``'s rows whose fields include ``match``."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    if path.exists():
        for text in path.read_text().splitlines():
            row = json.loads(text) if text.strip() else None
            if row and all(row.get(k) == v for k, v in match.items()):
                out.setdefault(row["task"], {})[row["seed"]] = row
    return out


LIBRARY = HERE.parent / "tied_rows" / "library.jsonl"
LIBRARY_TASKS = ("digits-ae", "text-gpt-tiny", "planetoid-gcn", "cifar10-resnet8", "curves-ae",
                 "mnist-ae", "text-gpt")


def report_library() -> None:
    """The library option against the tied defaults (``tied_rows/library.jsonl`` rows without
    changes), on the seeds both have: on every tied layer (``screen.py run --set
    two_sided=true``) and on the hidden layers only (``--optimizer mbf-two-sided``)."""
    label = {"task", "optimizer", "seed", "status", "steps", "cpu_seconds", "metric", "value",
             "score"}
    tied: dict[str, dict[int, dict[str, Any]]] = {}
    for text in LIBRARY.read_text().splitlines():
        row = json.loads(text)
        if set(row) <= label:
            tied.setdefault(row["task"], {})[row["seed"]] = row
    print("| task | metric | two_sided on | seeds | tied defaults: by seed (mean) | two_sided: "
          "by seed (mean) | difference | larger spread | steps, tied / two-sided |")
    print("|---|---|---|---|---|---|---|---|---|")
    variants = (("every tied layer", _library_rows(LIBRARY, two_sided=True)),
                ("hidden layers", _library_rows(HIDDEN_RUNS, optimizer="mbf-two-sided")))
    for task in LIBRARY_TASKS:
        for where, rows in variants:
            a, b = tied.get(task, {}), rows.get(task, {})
            seeds = sorted(set(a) & set(b))
            if not seeds:
                continue
            cells, means, spreads = [], [], []
            for side in (a, b):
                vals = [side[s]["value"] for s in seeds]
                if any(v is None for v in vals):
                    cells.append("diverged")
                    means.append(float("nan"))
                    spreads.append(float("nan"))
                    continue
                means.append(statistics.fmean(vals))
                spreads.append(max(vals) - min(vals))
                cells.append(" / ".join(f"{v:.4g}" for v in vals) + f" ({means[-1]:.4g})")
            steps = " / ".join(
                f"{statistics.fmean(side[s]['steps'] for s in seeds):.0f}" for side in (a, b))
            print(f"| {task} | {a[seeds[0]]['metric']} | {where} | "
                  f"{', '.join(map(str, seeds))} | {cells[0]} | {cells[1]} | "
                  f"{means[1] - means[0]:+.4g} | {max(spreads):.3g} | {steps} |")


def main(argv: list[str] | None = None) -> int:
    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="a setting changed from the prototype's defaults (JSON value)")
        parser.add_argument("--optimizer", default="two-sided-mbf",
                            choices=("two-sided-mbf", "mbf-two-sided"),
                            help="the prototype, or the library option on the hidden layers "
                                 "(rows in library.jsonl)")

    return screen_main(__doc__ or "", TASKS, run, report, arguments, argv)


if __name__ == "__main__":
    sys.exit(main())
