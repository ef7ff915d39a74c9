"""A screen of one lever for MBF on transformers (issue 19, item 3): tie the mini-blocks of a
layer's rows. Not a library feature; a prototype to learn whether the lever is worth building.

Why. MBF gives every output unit (row) of a Linear layer its own ``s x s`` blocks over the
inputs, each estimated (``batch`` estimator) from a running average of that row's gradient
outer products over about ``1 / (1 - stat_decay)`` = 10 steps: for ``s`` = 26 a matrix of rank
about 10 plus damping. Under K-FAC's independence assumption the row blocks share one shape (the
inputs' covariance, scaled by the row's output-gradient energy), and the Adam graft sets every
block's length anyway, so only the shape of each block matters. Tying the rows estimates that
shape from every row at once: ``S_c = EMA(G_c^T G_c / rows)`` for the column chunk ``c`` of the
gradient ``G``, one ``s x s`` block per chunk instead of one per row and chunk (Muon whitens
with the same sum over rows, ``M^T M``, of the momentum). Everything else is MBF's default step:
heavy-ball momentum 0.9 on the gradient, the damped inverse ``(S_c + 0.01 tr(S_c)/s I)^-1``
refreshed every 20 statistics updates and after the 1st, 2nd, 4th, 8th, bias-corrected
statistics, and each (row, chunk) piece of the direction rescaled to the length of Adam's step
(beta2 0.999, eps 1e-8) on that piece.

Which parameters. The tied-rows step acts on :func:`mbf_bench.baselines.muon_split`'s hidden
matrices (Muon's split: attention and MLP weights; with ``layers=linear`` every Linear weight,
for the autoencoders); everything else (embeddings, head, LayerNorm, biases) takes Adam's step
at the same learning rate, which is what MBF with blocks of one gives them
(``benchmarks/gpt_ablation.py``). The variant ``tied-rows-mbf`` ties the rows; ``split-mbf``
is the control: MBF itself on the hidden matrices (library code, its own blocks per row) and
Adam's direction on the rest, so the two differ only in the tying.

Usage (one run; ``mbf-bench run``'s arguments after the optimizer name)::

    OMP_NUM_THREADS=1 python benchmarks/tied_rows/prototype.py run --task text-gpt \
        --optimizers tied-rows-mbf --seeds 100 --budget-seconds 180 --clock cpu --holdout 0.1 \
        --schedule warmup-cosine --threads 1 --no-progress --data-dir ../shared/data \
        --out /tmp/gpt_levers/tied-rows
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from torch import Tensor, nn

import mbf
from mbf_bench import optimizers as registry
from mbf_bench.baselines import muon_split
from mbf_bench.cli import main

#: Which update of each 20-update cycle refreshes the inverses. The first runs (rows of
#: runs.jsonl without "refresh") refreshed at the 20th, 40th, ... update; since the equivalence
#: test with mbf.MBF (tests/bench/test_tied_rows_prototype.py) at the 21st, 41st, ... as MBF does.
REFRESH = "21st"

DEFAULTS = {"lr": 3e-3, "momentum": 0.9, "damping": 0.01, "stat_decay": 0.9, "inv_every": 20,
            "max_block_size": 32, "beta2": 0.999, "eps": 1e-8, "layers": "hidden"}


def chunks(width: int, limit: int) -> list[tuple[int, int]]:
    """``width`` columns cut into the fewest near-equal chunks of at most ``limit``.

    Not :func:`mbf.blocks.chunk_plan`'s cut: MBF takes as many chunks but makes them all
    ``ceil(width / chunks)`` wide, the last one shorter and zero-padded (relative damping then
    divides the trace by the padded size). The two agree where ``limit`` divides the width (every
    matrix of the GPTs, and the equivalence tests); they differ on mnist-ae's 784 and 1,000-wide
    rows and Cora's 1,433, which the prototype's rows were measured with."""
    count = math.ceil(width / limit)
    edges = [round(i * width / count) for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


class TiedRowsMBF(torch.optim.Optimizer):
    """MBF's default step with the row blocks of each hidden matrix tied (module docstring)."""

    def __init__(self, hidden: list[nn.Parameter], other: list[nn.Parameter],
                 **hp: Any) -> None:
        groups = [{"params": hidden, "tied": True}, {"params": other, "tied": False}]
        super().__init__([g for g in groups if g["params"]], {**DEFAULTS, **hp})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            mu, b2, eps = group["momentum"], group["beta2"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if not state:
                    state["t"] = 0
                    state["buf"] = torch.zeros_like(p)
                    state["sq"] = torch.zeros_like(p)
                state["t"] += 1
                t = state["t"]
                state["buf"].mul_(mu).add_(g)
                state["sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                adam = (state["buf"] * ((1 - mu) / (1 - mu**t))) / (
                    (state["sq"] / (1 - b2**t)).sqrt_().add_(eps))
                if group["tied"]:
                    adam = self._tied_direction(p, g, adam, state, group)
                p.add_(adam, alpha=-group["lr"])
        return loss

    def _tied_direction(self, p: Tensor, g: Tensor, adam: Tensor, state: dict[str, Any],
                        group: dict[str, Any]) -> Tensor:
        rows = p.shape[0]
        g2, buf, adam2 = g.reshape(rows, -1), state["buf"].reshape(rows, -1), adam.reshape(rows, -1)
        if p.ndim > 2:  # a convolution: MBF's block per kernel, tied over the output channels
            kernel = math.prod(p.shape[2:])
            parts = [(i * kernel, (i + 1) * kernel) for i in range(p.shape[1])]
        else:
            parts = chunks(g2.shape[1], group["max_block_size"])
        if "stats" not in state:
            state["stats"] = [g2.new_zeros(b - a, b - a) for a, b in parts]
            state["inverses"] = [None] * len(parts)
            state["updates"] = 0
        state["updates"] += 1
        n, decay = state["updates"], group["stat_decay"]
        # MBF's schedule: the 1st, 21st, 41st, ... update (library steps 0, 20, 40, ...), and
        # the 2nd, 4th, 8th, 16th (early refreshes).
        refresh = (n - 1) % group["inv_every"] == 0 or (
            n < group["inv_every"] and n & (n - 1) == 0)
        out = torch.empty_like(adam2)
        for i, (a, b) in enumerate(parts):
            gc = g2[:, a:b]
            state["stats"][i].mul_(decay).add_(gc.T @ gc, alpha=(1 - decay) / rows)
            if refresh or state["inverses"][i] is None:
                s = state["stats"][i] / (1 - decay**n)
                s = s + (group["damping"] * s.diagonal().sum() / (b - a) + 1e-30) * torch.eye(
                    b - a, dtype=s.dtype)
                state["inverses"][i] = torch.linalg.inv(s.double()).to(s.dtype)
            d = buf[:, a:b] @ state["inverses"][i]  # each row's piece, one shared block
            length = adam2[:, a:b].norm(dim=1, keepdim=True)
            out[:, a:b] = d * (length / d.norm(dim=1, keepdim=True).clamp_min(1e-30))
        return out.reshape(p.shape)


def _build_tied(model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
    """``layers="hidden"``: Muon's hidden matrices tied, the rest on Adam; ``"linear"``: every
    ``nn.Linear`` weight tied (an autoencoder's input and output layers included);
    ``"linear+conv"``: also every convolution's, one block per kernel (MBF's convolution rule)
    tied over the output channels."""
    hp = dict(hp)
    layers = hp.pop("layers")
    if layers in ("linear", "linear+conv"):
        kinds: tuple[type[nn.Module], ...] = (nn.Linear,) if layers == "linear" else (
            nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        ids = {id(m.weight) for m in model.modules() if isinstance(m, kinds)}
        params = [p for p in model.parameters() if p.requires_grad]
        hidden = [p for p in params if id(p) in ids]
        other = [p for p in params if id(p) not in ids]
    elif layers == "hidden":
        hidden, other = muon_split(model)
    else:
        raise ValueError(f"layers must be 'hidden', 'linear' or 'linear+conv', not {layers!r}")
    return TiedRowsMBF(hidden, other, **hp)


def _build_split(model: nn.Module, hp: dict[str, Any]) -> torch.optim.Optimizer:
    """The control: MBF (library defaults) on the hidden matrices, blocks of one (Adam's
    direction, grafted) on everything else."""
    hidden, other = muon_split(model)
    ids = {id(p) for p in other}
    # A LayerNorm's (gain, bias) pair is one 2x2 block whatever max_block_size says: its weights
    # and biases go into separate groups so that each coordinate is a block of its own.
    weights = [p for n, p in model.named_parameters() if id(p) in ids and n.endswith("weight")]
    rest = [p for p in other if id(p) not in {id(w) for w in weights}]
    groups = [{"params": hidden}, {"params": weights, "max_block_size": 1},
              {"params": rest, "max_block_size": 1}]
    return mbf.MBF([g for g in groups if g["params"]], model=model, **hp)


registry.OPTIMIZERS["tied-rows-mbf"] = registry.OptimizerSpec(
    "tied-rows-mbf", "prototype: MBF with the row blocks of each hidden matrix tied",
    dict(DEFAULTS), _build_tied, needs_model=True, validated=False)
registry.OPTIMIZERS["split-mbf"] = registry.OptimizerSpec(
    "split-mbf", "control: MBF on the hidden matrices, Adam's direction elsewhere",
    {"lr": 3e-3}, _build_split, needs_model=True)


def protocol_runs(tasks: list[str], seeds: list[int], layers: str, data_dir: str,
                  stat_decay: float = DEFAULTS["stat_decay"]) -> None:
    """Runs under protocol v2's tuning conditions (``run_job``, phase ``tune``: the task's CPU
    budget, warmup-cosine with warmup 0.05, the validation split) at the prototype's defaults,
    appended to ``runs.jsonl`` beside this file (a run already there is skipped), to set beside
    ``benchmarks/stat_decay/runs.jsonl``'s MBF rows (the same conditions and seeds)."""
    import json
    from pathlib import Path

    from mbf_bench.protocol import TrialJob, load_rules, screen_run

    torch.set_num_threads(1)
    out = Path(__file__).with_name("runs.jsonl")
    for task in tasks:
        for seed in seeds:
            job = TrialJob("tune", task, "tied-rows-mbf", "tied-rows-mbf",
                           {**DEFAULTS, "layers": layers, "stat_decay": stat_decay}, seed)
            label = {"task": task, "seed": seed, "layers": layers, "refresh": REFRESH,
                     "stat_decay": stat_decay}
            row = screen_run(load_rules(), job, data_dir, out, label)
            if row is not None:
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["protocol-runs"]:  # protocol-runs TASKS SEEDS LAYERS DATA_DIR [DECAY]
        tasks, seeds, layers, data = sys.argv[2:6]
        decay = float(sys.argv[6]) if len(sys.argv) > 6 else DEFAULTS["stat_decay"]
        protocol_runs(tasks.split(","), [int(x) for x in seeds.split(",")], layers, data, decay)
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
