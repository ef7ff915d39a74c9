"""What the mini-blocks keep of the empirical Fisher: a picture and a table, exact in float64.

``mbf-bench curvature`` trains a small MLP and a small CNN briefly on real images, then computes
from ``N`` per-example gradients (``torch.func``) the exact empirical Fisher
``F = (1/N) sum_i g_i g_i^T`` and four approximations of it, each block-diagonal by layer:

- ``diagonal``: ``diag(F)`` (what Adam-like methods precondition with);
- ``mbf``: ``F`` restricted to the library's mini-blocks (:func:`mbf.units.build_units` with the
  default ``max_block_size``);
- ``kfac``: per layer ``Gamma (x) Omega`` (inputs ``Omega``, output gradients ``Gamma``; the
  expanded form of Grosse & Martens for convolutions), its damped inverse applied exactly;
- ``layer``: the exact layer block ``F_LL``.

For each it reports the share of ``||F||_F^2`` kept (sub-matrix methods), the relative Frobenius
error, and the cosine between its damped direction ``(F_approx + lambda I)^-1 g`` and the exact one
``(F + lambda I)^-1 g``, at the level of one layer (reference: that layer's exact block) and of the
whole network (reference: the full Fisher), for ``lambda = gamma * tr(F) / p``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from mbf import DEFAULTS
from mbf.units import Unit, build_units

from .figures import save_compact_png
from .settings import add_threads_argument, positive_list, torch_threads
from .small_data import DataError, digits_images, mnist_test_images
from .tasks import default_data_dir

__all__ = [
    "APPROXIMATIONS",
    "UnitStats",
    "analyze",
    "approximate_directions",
    "capture_layer_io",
    "kfac_factors",
    "main",
    "make_model",
    "per_example_grads",
]

DTYPE = torch.float64
APPROXIMATIONS = ("diagonal", "mbf", "kfac", "layer")
LABELS = {
    "diagonal": "diagonal",
    "mbf": "MBF mini-blocks",
    "kfac": "KFAC",
    "layer": "full layer block",
}


# --- models, data, brief training --------------------------------------------------------------
def make_model(kind: str, side: int, seed: int) -> tuple[nn.Module, str]:
    """A small ``mlp`` or ``cnn`` for ``side x side`` grey images, and its pictured layer's name."""
    with torch.random.fork_rng():  # seeded initialization without touching the global stream
        torch.manual_seed(seed)
        return _build(kind, side)


def _build(kind: str, side: int) -> tuple[nn.Module, str]:
    if kind == "mlp":
        model = nn.Sequential(
            nn.Flatten(),
            nn.Linear(side * side, 24),
            nn.Tanh(),
            nn.Linear(24, 16),
            nn.Tanh(),
            nn.Linear(16, 10),
        )
        return model, "3"
    if kind == "cnn":
        pool = 2 if side <= 8 else 4
        model = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1, bias=False),
            nn.ReLU(),
            nn.AvgPool2d(pool),
            nn.Flatten(),
            nn.Linear(8 * (side // pool) ** 2, 10),
        )
        return model, "2"
    raise ValueError(f"unknown model kind {kind!r}; use mlp or cnn")


def load_images(data: str, data_dir: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """``(N, 1, side, side)`` float64 images, standardized with the data set's pixel mean and
    standard deviation, and their labels."""
    if data == "digits":
        images, labels = digits_images()
    elif data == "mnist":
        images, labels = mnist_test_images(data_dir or default_data_dir())
    else:
        raise ValueError(f"unknown data set {data!r}; use digits or mnist")
    x = torch.as_tensor(images, dtype=DTYPE).unsqueeze(1)
    x = (x - x.mean()) / x.std()
    return x, torch.as_tensor(labels)


def train_briefly(
    model: nn.Module, x: Tensor, y: Tensor, steps: int, seed: int, lr: float = 3e-3
) -> float:
    """A few Adam steps on minibatches of 64 (curvature of a trained, not a random, network).

    Returns the training accuracy afterwards.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


# --- exact per-example quantities --------------------------------------------------------------
def per_example_grads(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``{name: (N, *shape)}`` gradients of each example's cross-entropy (``torch.func``)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def capture_layer_io(model: nn.Module, x: Tensor, y: Tensor) -> dict[nn.Module, tuple]:
    """Inputs and output gradients ``dl_i/d out_i`` of every Linear and Conv2d, per example.

    One backward pass of the *summed* loss gives each example's own output gradient, because
    the examples do not interact (no batch norm in these models).
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    inputs: dict[nn.Module, Tensor] = {}
    outputs: dict[nn.Module, Tensor] = {}

    def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
        inputs[module] = args[0].detach()
        out.retain_grad()
        outputs[module] = out

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        F.cross_entropy(model(x), y, reduction="sum").backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    result: dict[nn.Module, tuple] = {}
    for m in layers:
        out_grad = outputs[m].grad
        assert out_grad is not None
        result[m] = (inputs[m], out_grad.detach())
    return result


def kfac_factors(module: nn.Module, inputs: Tensor, out_grads: Tensor) -> tuple[Tensor, Tensor]:
    """KFAC's ``(Gamma, Omega)`` for a Linear (input with 1 appended when it has a bias) or a
    Conv2d (patches of ``F.unfold``; Grosse & Martens 2016):

    ``Omega = (1/N) sum_i sum_t u_it u_it^T``, ``Gamma = (1/(N T)) sum_i sum_t d_it d_it^T``, so
    that ``Gamma (x) Omega`` approximates ``(1/N) sum_i vec(G_i) vec(G_i)^T`` with ``G_i`` the
    ``(out, in)`` weight gradient of example ``i`` (row-major ``vec``).
    """
    n = inputs.shape[0]
    if isinstance(module, nn.Linear):
        a = inputs.reshape(n, -1, inputs.shape[-1])
        d = out_grads.reshape(n, -1, out_grads.shape[-1])
        if module.bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
    elif isinstance(module, nn.Conv2d):
        if module.bias is not None or module.groups != 1 or isinstance(module.padding, str):
            raise ValueError(
                "kfac_factors: Conv2d with bias, groups or string padding is not handled here"
            )
        u = F.unfold(
            inputs,
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        )
        a = u.transpose(1, 2)  # (N, T, C_in * k)
        d = out_grads.flatten(2).transpose(1, 2)  # (N, T, C_out)
    else:
        raise ValueError(f"kfac_factors: no KFAC rule for {type(module).__name__}")
    positions = d.shape[1]
    omega = torch.einsum("ntj,ntk->jk", a, a) / n
    gamma = torch.einsum("ntj,ntk->jk", d, d) / (n * positions)
    return gamma, omega


# --- units, approximations, directions ---------------------------------------------------------
@dataclass
class UnitStats:
    """One unit (a layer's parameters with one block layout) and its per-example gradients."""

    unit: Unit
    grads: Tensor  # (N, p_u) in the unit's flat order (its tensors flattened and concatenated)
    kron: Tensor  # (N, out, in) per-example gradients in KFAC's (Gamma (x) Omega) layout
    kron_index: Tensor  # (out, in): flat index of each KFAC coordinate
    gamma: Tensor
    omega: Tensor

    @property
    def numel(self) -> int:
        return self.grads.shape[1]


def _kron_view(unit: Unit, tensors: list[Tensor]) -> Tensor:
    """The unit's tensors (leading batch dim allowed) as KFAC's ``(out, in)`` matrices."""
    if isinstance(unit.module, nn.Linear):
        return unit.layout.to_rows(tensors)  # [W | b]
    first = tensors[0]
    lead = first.dim() - len(unit.layout.shapes[0])
    return first.reshape(*first.shape[:lead], first.shape[lead], -1)


def unit_stats(model: nn.Module, x: Tensor, y: Tensor) -> list[UnitStats]:
    """Per-unit per-example gradients and KFAC factors for the library's units of ``model``."""
    groups = [{"params": list(model.parameters()), "max_block_size": DEFAULTS["max_block_size"]}]
    units = build_units(groups, model, per_example=False)
    names = {id(p): k for k, p in model.named_parameters()}
    grads = per_example_grads(model, x, y)
    io = capture_layer_io(model, x, y)
    stats = []
    for unit in units:
        if unit.module not in io:
            raise ValueError(f"{unit.name}: only Linear and Conv2d layers are analyzed")
        per = [grads[names[id(p)]] for p in unit.params]
        flat = torch.cat([g.reshape(len(x), -1) for g in per], dim=1)
        numels = [p.numel() for p in unit.params]
        marks = [
            i.reshape(p.shape)
            for i, p in zip(torch.arange(sum(numels)).split(numels), unit.params, strict=True)
        ]
        gamma, omega = kfac_factors(unit.module, *io[unit.module])
        stats.append(
            UnitStats(unit, flat, _kron_view(unit, per), _kron_view(unit, marks), gamma, omega)
        )
    return stats


def _split(stats: UnitStats, flat: Tensor) -> list[Tensor]:
    """A ``(..., p_u)`` tensor as the unit's tensors (with the same leading dims)."""
    numels = [p.numel() for p in stats.unit.params]
    lead = flat.shape[:-1]
    return [
        part.reshape(*lead, *p.shape)
        for part, p in zip(flat.split(numels, dim=-1), stats.unit.params, strict=True)
    ]


def _mbf_blocks(stats: UnitStats) -> Tensor:
    """The unit's exact empirical Fisher mini-blocks ``(B, s, s)`` (zero-padded as the library)."""
    layout = stats.unit.layout
    per = layout.rows_to_blocks(layout.to_rows(_split(stats, stats.grads)))  # (N, B, s)
    return torch.einsum("nbs,nbt->bst", per, per) / per.shape[0]


def _woodbury(grads: Tensor, g: Tensor, lam: float) -> Tensor:
    """``(G^T G / N + lam I)^-1 g`` through the ``N x N`` system (``G`` is ``(N, p)``)."""
    n = grads.shape[0]
    small = grads @ grads.T + n * lam * torch.eye(n, dtype=grads.dtype)
    return (g - grads.T @ torch.linalg.solve(small, grads @ g)) / lam


def approximate_directions(stats: UnitStats, g: Tensor, lam: float) -> dict[str, Tensor]:
    """Each approximation's damped direction ``(F_approx + lam I)^-1 g`` for one unit's ``g``."""
    layout = stats.unit.layout
    diag = stats.grads.square().mean(0)
    blocks = _mbf_blocks(stats)
    eye = torch.eye(layout.block_size, dtype=DTYPE)
    g_blocks = layout.to_blocks(_split(stats, g))
    d_blocks = torch.linalg.solve(blocks + lam * eye, g_blocks.unsqueeze(-1)).squeeze(-1)
    mbf = torch.cat([t.reshape(-1) for t in layout.from_blocks(d_blocks)])
    # KFAC: (Gamma (x) Omega + lam I)^-1 in the eigenbases of the two factors, exactly.
    eg, qg = torch.linalg.eigh(stats.gamma)
    ea, qa = torch.linalg.eigh(stats.omega)
    g_mat = g[stats.kron_index]
    inner = (qg.T @ g_mat @ qa) / (eg[:, None] * ea[None, :] + lam)
    kfac = torch.empty_like(g)
    kfac[stats.kron_index] = qg @ inner @ qa.T
    return {
        "diagonal": g / (diag + lam),
        "mbf": mbf,
        "kfac": kfac,
        "layer": _woodbury(stats.grads, g, lam),
    }


def _frobenius(stats: UnitStats) -> dict[str, float]:
    """Squared Frobenius norms: the unit's Fisher, what each sub-matrix keeps, and KFAC's terms."""
    n = stats.grads.shape[0]
    total = float((stats.grads @ stats.grads.T).square().sum()) / n**2
    k = stats.kron
    cross = float(torch.einsum("noi,op,npj,ij->", k, stats.gamma, k, stats.omega)) / n
    return {
        "total": total,
        "diagonal": float(stats.grads.square().mean(0).square().sum()),
        "mbf": float(_mbf_blocks(stats).square().sum()),
        "layer": total,
        "kfac_cross": cross,
        "kfac_self": float(stats.gamma.square().sum() * stats.omega.square().sum()),
    }


def _errors(parts: dict[str, float], total: float) -> dict[str, dict[str, float | None]]:
    """Share of ``||F||^2`` kept and relative Frobenius error of each approximation."""
    out: dict[str, dict[str, float | None]] = {}
    for name in APPROXIMATIONS:
        if name == "kfac":
            sq = total - 2 * parts["kfac_cross"] + parts["kfac_self"]
            out[name] = {"mass_kept": None, "rel_error": math.sqrt(max(sq, 0.0) / total)}
        else:
            kept = parts[name] / total
            out[name] = {"mass_kept": kept, "rel_error": math.sqrt(max(1.0 - kept, 0.0))}
    return out


def _cosine(a: Tensor, b: Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def stored_entries(stats: UnitStats) -> dict[str, int]:
    """Curvature entries each approximation keeps for the unit."""
    layout = stats.unit.layout
    return {
        "diagonal": stats.numel,
        "mbf": layout.num_blocks * layout.block_size**2,
        "kfac": stats.gamma.numel() + stats.omega.numel(),
        "layer": stats.numel**2,
    }


def analyze(
    model: nn.Module, x: Tensor, y: Tensor, layer: str, dampings: list[float]
) -> dict[str, Any]:
    """The exact Fisher of ``model`` on ``(x, y)`` against its approximations.

    Measured for the unit of module ``layer`` and for the whole network.
    """
    stats = unit_stats(model, x, y)
    layer_module = model.get_submodule(layer)
    picked = next(s for s in stats if s.unit.module is layer_module)
    all_grads = torch.cat([s.grads for s in stats], dim=1)
    n, p = all_grads.shape
    g = all_grads.mean(0)
    g_units = g.split([s.numel for s in stats])
    trace_mean = float(all_grads.square().sum()) / n / p
    net_total = float((all_grads @ all_grads.T).square().sum()) / n**2
    unit_parts = [_frobenius(s) for s in stats]
    net_parts = {k: sum(part[k] for part in unit_parts) for k in unit_parts[0]}
    layer_parts = unit_parts[stats.index(picked)]
    result: dict[str, Any] = {
        "layer": picked.unit.name,
        "layer_params": picked.numel,
        "network_params": p,
        "examples": n,
        "blocks": {
            "count": picked.unit.layout.num_blocks,
            "block_size": picked.unit.layout.block_size,
            "max_block_size": DEFAULTS["max_block_size"],
        },
        "stored_entries": stored_entries(picked),
        "layer_frobenius": _errors(layer_parts, layer_parts["total"]),
        "network_frobenius": _errors(net_parts, net_total),
        "dampings": [],
    }
    for gamma in dampings:
        lam = gamma * trace_mean
        exact = _woodbury(all_grads, g, lam)
        per_unit = [
            approximate_directions(s, gu, lam) for s, gu in zip(stats, g_units, strict=True)
        ]
        mine = per_unit[stats.index(picked)]
        result["dampings"].append(
            {
                "gamma": gamma,
                "lambda": lam,
                "layer_cosine": {k: _cosine(mine[k], mine["layer"]) for k in APPROXIMATIONS},
                "network_cosine": {
                    k: _cosine(torch.cat([d[k] for d in per_unit]), exact) for k in APPROXIMATIONS
                },
                "gradient_layer_cosine": _cosine(g_units[stats.index(picked)], mine["layer"]),
                "gradient_network_cosine": _cosine(g, exact),
            }
        )
    order = torch.cat(picked.unit.layout.dense_indices())
    dense = picked.grads.T @ picked.grads / n
    result["_dense_block_order"] = dense[order][:, order]
    result["_block_sizes"] = [len(i) for i in picked.unit.layout.dense_indices()]
    return result


# --- the command -------------------------------------------------------------------------------
def _analyze_seed(
    x: Tensor,
    y: Tensor,
    examples: int,
    train_steps: int,
    dampings: tuple[float, ...],
    seed: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Both models for one seed (data order, initialization, minibatches)."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    models: dict[str, Any] = {}
    for kind in ("mlp", "cnn"):
        start = time.perf_counter()
        model, layer = make_model(kind, x.shape[-1], seed)
        model = model.to(DTYPE)
        accuracy = train_briefly(model, x, y, train_steps, seed)
        res = analyze(model, x[:examples], y[:examples], layer, list(dampings))
        res["train_accuracy"] = accuracy
        models[kind] = res
        log(
            f"seed {seed} {kind}: {res['layer']} ({res['layer_params']} of "
            f"{res['network_params']} params), train accuracy {accuracy:.3f}, "
            f"{time.perf_counter() - start:.1f}s"
        )
    return models


def _summary(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model and approximation, each headline number's values over the seeds."""
    out: dict[str, Any] = {}
    for kind in per_seed[0]:
        rows: dict[str, dict[str, list[float]]] = {}
        for name in (*APPROXIMATIONS, "gradient"):
            row: dict[str, list[float]] = {}
            for models in per_seed:
                res = models[kind]
                if name != "gradient" and name != "kfac":
                    mass = res["layer_frobenius"][name]["mass_kept"]
                    row.setdefault("layer mass kept", []).append(mass)
                for level in ("layer", "network"):
                    for d in res["dampings"]:
                        value = (
                            d[f"gradient_{level}_cosine"]
                            if name == "gradient"
                            else d[f"{level}_cosine"][name]
                        )
                        row.setdefault(f"{level} cos, gamma={d['gamma']:g}", []).append(value)
            rows[name] = row
        out[kind] = rows
    return out


def run(
    data: str = "digits",
    *,
    examples: int = 512,
    train_steps: int = 300,
    dampings: tuple[float, ...] = (1e-3, 1e-2, 1e-1),
    data_dir: str | Path | None = None,
    seeds: tuple[int, ...] = (0,),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train each small model briefly and analyze its Fisher, for every seed.

    ``models`` holds the first seed's full analysis (the one pictured); with several seeds,
    ``across_seeds`` lists each headline number's values over all of them.
    """
    x, y = load_images(data, data_dir)
    if examples > len(x):
        raise ValueError(f"--examples {examples} exceeds the {len(x)} {data} images")
    per_seed = [_analyze_seed(x, y, examples, train_steps, dampings, s, log) for s in seeds]
    report: dict[str, Any] = {
        "data": data,
        "examples": examples,
        "train_steps": train_steps,
        "seeds": list(seeds),
        "labels": dict(LABELS),
        "models": per_seed[0],
    }
    if len(seeds) > 1:
        report["across_seeds"] = _summary(per_seed)
    return report


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(report: dict[str, Any]) -> str:
    """Markdown tables: per model, the pictured layer and the whole network."""
    lines: list[str] = []
    for kind, res in report["models"].items():
        gammas = [d["gamma"] for d in res["dampings"]]
        cos_heads = " | ".join(f"cos, gamma={g:g}" for g in gammas)
        for level in ("layer", "network"):
            fro = res[f"{level}_frobenius"]
            where = (
                f"layer `{res['layer']}` ({res['layer_params']} parameters, "
                f"{res['blocks']['count']} mini-blocks of {res['blocks']['block_size']})"
                if level == "layer"
                else f"whole network ({res['network_params']} parameters)"
            )
            lines += [
                f"**{kind.upper()}, {where}**; cosine with the exact damped direction of the "
                + ("layer block" if level == "layer" else "full Fisher")
                + ":",
                "",
                "| approximation | entries kept | Frobenius mass kept | relative error | "
                f"{cos_heads} |",
                "|---" * (4 + len(gammas)) + "|",
            ]
            for name in APPROXIMATIONS:
                kept = str(res["stored_entries"][name]) if level == "layer" else "-"
                cos = " | ".join(_fmt(d[f"{level}_cosine"][name]) for d in res["dampings"])
                lines.append(
                    f"| {LABELS[name]} | {kept} | {_fmt(fro[name]['mass_kept'])} | "
                    f"{_fmt(fro[name]['rel_error'])} | {cos} |"
                )
            grad_cos = " | ".join(_fmt(d[f"gradient_{level}_cosine"]) for d in res["dampings"])
            lines += [f"| gradient (no preconditioner) | 0 | - | - | {grad_cos} |", ""]
    if "across_seeds" in report:
        lines += _seed_table(report)
    return "\n".join(lines)


def _seed_table(report: dict[str, Any]) -> list[str]:
    """Mean and range over the seeds of the layer's mass kept and of the cosines."""
    seeds = report["seeds"]
    lines = [
        f"**Over {len(seeds)} seeds** ({', '.join(map(str, seeds))}): mean (min to max).",
        "",
    ]
    for kind, rows in report["across_seeds"].items():
        keys = [k for k in rows["diagonal"] if k != "layer mass kept"]
        lines += [
            f"| {kind.upper()} | layer mass kept | " + " | ".join(keys) + " |",
            "|---" * (2 + len(keys)) + "|",
        ]
        for name, row in rows.items():
            cells = [_spread(row.get("layer mass kept"))] + [_spread(row[k]) for k in keys]
            label = LABELS.get(name, "gradient (no preconditioner)")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _spread(values: list[float] | None) -> str:
    if not values:
        return "-"
    return f"{np.mean(values):.2f} ({min(values):.2f} to {max(values):.2f})"


def plot(report: dict[str, Any], path: str | Path) -> None:
    """Heat maps of ``|F|`` of each pictured layer with mini-block boundaries, and the cosines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    models = report["models"]
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(5.0 * (len(models) + 1), 4.6))
    for ax, (kind, res) in zip(axes, models.items(), strict=False):
        dense = res["_dense_block_order"].abs().numpy()
        top = float(dense.max())
        image = ax.imshow(
            np.maximum(dense, top * 1e-4),
            norm=LogNorm(vmin=top * 1e-4, vmax=top),
            cmap="magma_r",
            interpolation="nearest",
        )
        start = 0
        for size in res["_block_sizes"]:
            ax.add_patch(
                Rectangle(
                    (start - 0.5, start - 0.5), size, size, fill=False, lw=0.5, color="tab:cyan"
                )
            )
            start += size
        mass = res["layer_frobenius"]["mbf"]["mass_kept"]
        ax.set_title(
            f"{kind.upper()} {res['layer']}: |F|, {res['layer_params']} params\n"
            f"{res['blocks']['count']} mini-blocks (cyan) keep {100 * mass:.1f}% of ||F||^2",
            fontsize=8,
        )
        ax.tick_params(labelsize=6)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    ax = axes[-1]
    names = list(APPROXIMATIONS)
    width = 0.8 / (2 * len(models))
    pos = np.arange(len(names))
    for j, (kind, res) in enumerate(models.items()):
        mid = res["dampings"][len(res["dampings"]) // 2]
        for k, level in enumerate(("layer", "network")):
            values = [mid[f"{level}_cosine"][n] for n in names]
            offset = (2 * j + k - (2 * len(models) - 1) / 2) * width
            ax.bar(
                pos + offset,
                values,
                width,
                label=f"{kind.upper()} {level} (gamma={mid['gamma']:g})",
                hatch="" if level == "layer" else "//",
                color=f"C{j}",
                alpha=0.9 if level == "layer" else 0.55,
            )
    ax.set_xticks(pos, [LABELS[n] for n in names], fontsize=7, rotation=15)
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.3)
    ax.set_ylabel("cosine with exact damped natural gradient", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6, loc="upper left", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"Empirical Fisher of briefly trained small networks on {report['data']} "
        f"({report['examples']} examples, float64, seed {report['seeds'][0]}; "
        "coordinates ordered block by block)",
        fontsize=9,
    )
    fig.tight_layout()
    save_compact_png(fig, path, dpi=90)
    plt.close(fig)


def _seed_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,1,2, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mbf-bench curvature",
        description="The exact empirical Fisher of a layer of a small MLP and a small CNN, and how "
        "much of it the diagonal, MBF mini-blocks, KFAC and the layer block keep.",
    )
    parser.add_argument("--plot", type=Path, help="write the figure (PNG) here")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--table", type=Path, help="write the markdown tables here")
    parser.add_argument("--data", choices=["digits", "mnist"], default="digits")
    parser.add_argument(
        "--data-dir", help="folder with the MNIST files (default: $MBF_BENCH_DATA, else ./data)"
    )
    parser.add_argument("--examples", type=int, default=512, help="examples in the Fisher")
    parser.add_argument("--train-steps", type=int, default=300, help="Adam steps before")
    parser.add_argument(
        "--dampings",
        type=positive_list(float, "1e-3,1e-2"),
        default=[1e-3, 1e-2, 1e-1],
        help="gamma values; lambda = gamma * tr(F) / p",
    )
    parser.add_argument(
        "--seeds",
        type=_seed_list,
        default=[0],
        help="seeds (data order, initialization, minibatches); the first is pictured, several "
        "add a summary over all (default 0)",
    )
    add_threads_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mbf-bench curvature``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.examples < 2:
        parser.error("--examples must be at least 2")
    if args.train_steps < 0:
        parser.error("--train-steps must be >= 0")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    try:
        with torch_threads(args.threads):
            report = run(
                args.data,
                examples=args.examples,
                train_steps=args.train_steps,
                dampings=tuple(args.dampings),
                data_dir=args.data_dir,
                seeds=tuple(args.seeds),
            )
    except (DataError, ValueError) as err:
        parser.exit(2, f"mbf-bench curvature: error: {err}\n")
    text = table(report)
    print(text)
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(report, args.plot)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(text + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        clean = {
            **report,
            "models": {
                kind: {k: v for k, v in res.items() if not k.startswith("_")}
                for kind, res in report["models"].items()
            },
        }
        args.json.write_text(json.dumps(clean, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
