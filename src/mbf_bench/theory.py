"""Idealized MBF converges linearly: measured on an over-parameterized two-layer ReLU network.

``mbf-bench theory`` trains ``f(x) = m^-1/2 sum_r a_r relu(w_r^T x)`` (signs ``a_r`` fixed, only
``W`` trained; the setting of Zhang, Martens & Grosse 2019) with full-batch squared loss
``L = (1/2n) sum_i (f(x_i) - y_i)^2`` on ``n <= d`` examples whose input matrix has full row rank,
in float64, with these preconditioners ``P`` in ``W <- W - eta P grad L``:

- ``gradient_descent``: ``P = I``;
- ``gauss_newton``: the exact Gauss-Newton matrix ``J^T J / n`` (the natural gradient of this
  loss), inverted exactly;
- ``kfac``: its Kronecker factorization ``G (x) A`` with ``A = X^T X / n`` and ``G`` the mean of
  ``delta delta^T``, ``delta = df/dh`` at the pre-activations;
- ``idealized_mbf``: the exact Gauss-Newton mini-blocks ``J_b^T J_b / n`` on the library's partition
  (:func:`mbf.units.build_units`), one block per hidden unit (``max_block_size >= d``); when
  ``d`` exceeds the library's default ``max_block_size`` the rows are also cut as the optimizer
  cuts them (``mbf_chunked``).

"Exact solve" means vanishing damping: every inverse is ``(C + eps * mean diag(C) I)^-1`` with
``eps = 1e-12`` applied to a vector in the range of ``C``, i.e. the pseudo-inverse.

Linearizing the outputs, one step maps the residual ``e = f - y`` to ``(I - eta M) e`` with
``M = J P J^T / n``. Each method steps with ``eta = alpha * 2 / (mu_min + mu_max)`` over the
eigenvalues of its ``M`` at initialization (``alpha = 1`` is the best fixed step of the linear
model), and the linearized trajectory ``(I - eta M)^k e_0`` is the theory's prediction that every
measured curve is compared with. For idealized MBF, ``M = diag(c)`` with ``c_i`` the number of
neurons active at sample ``i`` (DESIGN.md section 2): the per-sample contraction ``1 - eta c_i``
is checked directly.
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
from torch import Tensor, nn

from mbf import DEFAULTS
from mbf.blocks import BlockLayout
from mbf.units import build_units

from .figures import save_compact_png
from .settings import add_threads_argument, positive_list, torch_threads
from .small_data import DataError, digits_images, mnist_test_images
from .tasks import default_data_dir

__all__ = [
    "RegressionProblem",
    "Snapshot",
    "TwoLayerReLU",
    "fit_rate",
    "gauss_newton_blocks",
    "load_problem",
    "main",
    "methods_for",
    "min_norm_solve",
    "run",
]

DTYPE = torch.float64
#: Loss (relative to the initial loss) below which float64 round-off dominates; runs stop there.
FLOOR = 1e-26
#: A run whose loss exceeds this multiple of the initial loss (or is not finite) has diverged.
DIVERGED = 1e8
#: Memory the dense per-example Jacobians (and their copies) may take.
MAX_BYTES = 8 * 2**30
#: Fits use the iterations whose loss is above this fraction of the initial loss.
FIT_FLOOR = 1e-22

LABELS = {
    "gradient_descent": "gradient descent",
    "gauss_newton": "exact Gauss-Newton (natural gradient)",
    "kfac": "KFAC (one layer)",
    "idealized_mbf": "idealized MBF (unit-wise blocks)",
    "mbf_chunked": "idealized MBF, library chunking",
}


# --- problem -----------------------------------------------------------------------------------
@dataclass
class RegressionProblem:
    """Inputs ``x`` ``(n, d)`` with unit-norm rows and scalar targets ``y`` ``(n,)``: the
    full-batch least-squares problem of the theory run (not a training
    :class:`mbf_bench.problems.Problem`)."""

    name: str
    x: Tensor
    y: Tensor


def load_problem(
    data: str, n: int, *, dim: int = 64, data_dir: str | Path | None = None, seed: int = 0
) -> RegressionProblem:
    """``n`` examples of ``digits``, ``mnist`` (test images) or ``random`` Gaussian inputs.

    MNIST is read from ``data_dir`` (default: :func:`mbf_bench.tasks.default_data_dir`).

    Rows are scaled to unit norm (the setting's assumption). Targets are +1 for even digits and
    -1 for odd ones, random signs for ``random``. Raises if the inputs lack full row rank.
    """
    rng = np.random.default_rng(seed)
    if data == "random":
        x = rng.standard_normal((n, dim))
        y = rng.choice([-1.0, 1.0], size=n)
    elif data in ("digits", "mnist"):
        if data == "digits":
            images, labels = digits_images()
        else:
            images, labels = mnist_test_images(data_dir or default_data_dir())
        if n > len(images):
            raise ValueError(f"--n {n} exceeds the {len(images)} {data} images")
        pick = rng.choice(len(images), size=n, replace=False)
        x = images[pick].reshape(n, -1)
        y = np.where(labels[pick] % 2 == 0, 1.0, -1.0)
    else:
        raise ValueError(f"unknown data set {data!r}; use digits, mnist or random")
    xt = torch.as_tensor(x, dtype=DTYPE)
    xt = xt / xt.norm(dim=1, keepdim=True).clamp_min(1e-12)
    rank = int(torch.linalg.matrix_rank(xt))
    if n > xt.shape[1] or rank < n:
        raise ValueError(
            f"{data}: the {n} x {xt.shape[1]} input matrix has rank {rank}; the theory needs full "
            "row rank (n <= d): use a smaller --n"
        )
    return RegressionProblem(data, xt, torch.as_tensor(y, dtype=DTYPE))


class TwoLayerReLU(nn.Module):
    """``f(x) = m^-1/2 sum_r a_r relu(w_r^T x)`` with ``w_r ~ N(0, I)`` and fixed signs ``a_r``."""

    a: Tensor

    def __init__(self, dim: int, width: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.hidden = nn.Linear(dim, width, bias=False, dtype=DTYPE)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.randn(width, dim, generator=gen, dtype=DTYPE))
        signs = torch.randint(0, 2, (width,), generator=gen).to(DTYPE) * 2 - 1
        self.register_buffer("a", signs)
        self.width = width

    def head(self, pre: Tensor) -> Tensor:
        """The output as a function of the pre-activations ``h = W x``."""
        return torch.relu(pre) @ self.a / math.sqrt(self.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.hidden(x))


# --- exact curvature quantities ----------------------------------------------------------------
@dataclass
class Snapshot:
    """Everything the steps need at the current weights."""

    x: Tensor  # (n, d)
    residual: Tensor  # (n,) f - y
    pre: Tensor  # (n, m) pre-activations
    jac: Tensor  # (n, m, d) output Jacobian with respect to W
    delta: Tensor  # (n, m) df/dh

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def loss(self) -> float:
        return 0.5 * float(self.residual.square().mean())

    def active(self) -> Tensor:
        """``c_i``: number of neurons active at each sample."""
        return (self.pre > 0).sum(dim=1).to(DTYPE)


def snapshot(model: TwoLayerReLU, problem: RegressionProblem) -> Snapshot:
    """Outputs, output gradients ``delta_i = df/dh`` and per-example output Jacobians.

    The examples do not interact, so one backward pass of ``sum_i f(x_i)`` with respect to the
    pre-activations gives every ``delta_i`` exactly; the Jacobian of ``f(x_i)`` with respect to
    ``W`` is then ``delta_i x_i^T`` (tests check both against ``torch.func`` autodiff).
    """
    with torch.no_grad():
        pre = model.hidden(problem.x)
    pre_var = pre.clone().requires_grad_(True)
    with torch.enable_grad():
        out = model.head(pre_var)
        (delta,) = torch.autograd.grad(out.sum(), pre_var)
    jac = delta[:, :, None] * problem.x[:, None, :]
    return Snapshot(problem.x, out.detach() - problem.y, pre, jac, delta)


def jacobian_blocks(snap: Snapshot, layout: BlockLayout) -> Tensor:
    """Each example's output Jacobian cut into the layout's blocks: ``(B, n, s)``, zero-padded."""
    return layout.rows_to_blocks(layout.to_rows([snap.jac])).transpose(0, 1)


def gauss_newton_blocks(snap: Snapshot, layout: BlockLayout) -> Tensor:
    """The exact Gauss-Newton mini-blocks ``J_b^T J_b / n`` as a ``(B, s, s)`` stack."""
    jb = jacobian_blocks(snap, layout)
    return jb.mT @ jb / snap.n


def min_norm_solve(jb: Tensor, rhs: Tensor, eps: float) -> Tensor:
    """Minimum-norm least-squares solutions of ``J_b d = rhs`` for a ``(B, n, s)`` stack.

    Equivalently ``(J_b^T J_b)^+ J_b^T rhs``, the exact block step for a right-hand side in the
    range. Computed with vanishing damping ``eps * mean diag`` on the smaller Gram matrix
    (``n x n`` or ``s x s``); ``rhs`` is ``(n, k)`` and the result ``(B, s, k)``.
    """
    n, s = jb.shape[-2:]
    gram = jb @ jb.mT if s >= n else jb.mT @ jb
    size = gram.shape[-1]
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1)
    # Relative to each block's own scale; the floor keeps all-zero blocks (dead neurons) solvable.
    lam = eps * (scale + scale.mean() * 1e-6 + torch.finfo(DTYPE).tiny)
    gram = gram + lam[:, None, None] * torch.eye(size, dtype=gram.dtype)
    factor, info = torch.linalg.cholesky_ex(gram)
    if bool((info != 0).any()):
        raise ValueError(f"{int((info != 0).sum())} blocks not positive definite; raise --eps")
    if s >= n:
        return jb.mT @ torch.cholesky_solve(rhs.expand(jb.shape[0], -1, -1), factor)
    return torch.cholesky_solve(jb.mT @ rhs, factor)


# --- directions: P grad L for residual columns E (n, k), returned as (k, m, d) -----------------
Direction = Callable[[Snapshot, Tensor], Tensor]


def _gradient_descent(snap: Snapshot, res: Tensor) -> Tensor:
    return torch.einsum("imd,ik->kmd", snap.jac, res) / snap.n


def _gauss_newton(eps: float) -> Direction:
    def step(snap: Snapshot, res: Tensor) -> Tensor:
        flat = snap.jac.reshape(1, snap.n, -1)
        d = min_norm_solve(flat, res, eps)[0]  # (p, k)
        return d.T.reshape(res.shape[1], *snap.jac.shape[1:])

    return step


def _kfac(eps: float) -> Direction:
    """``(G + l_G)^-1 grad (A + l_A)^-1`` with both inverses moved to ``n x n`` duals."""

    def step(snap: Snapshot, res: Tensor) -> Tensor:
        # Push-through: (D^T D/n + l)^-1 D^T = D^T (D D^T/n + l)^-1, the same for X.
        n, eye = snap.n, torch.eye(snap.n, dtype=DTYPE)
        dd = snap.delta @ snap.delta.T / n
        xx = snap.x @ snap.x.T / n
        sg = torch.linalg.solve(dd + eps * dd.diagonal().mean() * eye, eye)
        sa = torch.linalg.solve(xx + eps * xx.diagonal().mean() * eye, snap.x)
        left = snap.delta.T @ sg  # (m, n)
        return torch.einsum("mq,qk,qd->kmd", left, res, sa) / n

    return step


def _block_method(layout: BlockLayout, eps: float) -> Direction:
    def step(snap: Snapshot, res: Tensor) -> Tensor:
        d = min_norm_solve(jacobian_blocks(snap, layout), res, eps)  # (B, s, k)
        rows = layout.blocks_to_rows(d.permute(2, 0, 1))  # (k, m, d): a bias-free Linear's rows
        return rows.reshape(res.shape[1], *snap.jac.shape[1:])

    return step


def library_layout(model: TwoLayerReLU, max_block_size: int) -> BlockLayout:
    """The hidden layer's layout exactly as :class:`mbf.MBF` builds it for this model."""
    groups = [{"params": [model.hidden.weight], "max_block_size": max_block_size}]
    (unit,) = build_units(groups, model, per_example=False)
    return unit.layout


def methods_for(model: TwoLayerReLU, eps: float) -> dict[str, Direction]:
    """The compared methods for ``model`` (``mbf_chunked`` only when the library chunks rows)."""
    dim = model.hidden.in_features
    methods: dict[str, Direction] = {
        "gradient_descent": _gradient_descent,
        "gauss_newton": _gauss_newton(eps),
        "kfac": _kfac(eps),
        "idealized_mbf": _block_method(library_layout(model, dim), eps),
    }
    default_mbs = int(DEFAULTS["max_block_size"])
    if dim > default_mbs:
        methods["mbf_chunked"] = _block_method(library_layout(model, default_mbs), eps)
    return methods


def linear_operator(direction: Direction, snap: Snapshot) -> Tensor:
    """``M`` with ``J (P grad L(e)) = M e``: the residual map of the linearized step."""
    eye = torch.eye(snap.n, dtype=DTYPE)
    d = direction(snap, eye)  # (n, m, d): column j is the direction for residual e_j
    return snap.jac.reshape(snap.n, -1) @ d.reshape(snap.n, -1).T


# --- fits and runs -----------------------------------------------------------------------------
def fit_rate(losses: list[float], stop: int | None = None) -> dict[str, float]:
    """Least-squares line through ``log(loss)`` against the iteration.

    The window is iterations ``0 .. stop - 1``; by default every iteration whose loss is above
    ``FIT_FLOOR`` times the initial loss (below it, round-off flattens the curve). Returns the
    slope, the per-iteration loss factor ``exp(slope)``, R^2 and the window length.
    """
    values = np.asarray(losses, dtype=np.float64)
    if stop is None:
        below = np.flatnonzero(~(values > FIT_FLOOR * values[0]))
        stop = int(below[0]) if below.size else len(values)
    stop = min(len(values), max(stop, 3))
    k = np.arange(stop, dtype=np.float64)
    logs = np.log(values[:stop])
    slope, intercept = np.polyfit(k, logs, 1)
    total = float(np.sum((logs - logs.mean()) ** 2))
    rss = float(np.sum((logs - (slope * k + intercept)) ** 2))
    r2 = 1.0 - rss / total if total > 0 else 1.0
    return {"slope": float(slope), "factor": math.exp(slope), "r2": r2, "iterations": stop}


def _run_method(
    name: str,
    problem: RegressionProblem,
    width: int,
    iters: int,
    alpha: float,
    eps: float,
    seed: int,
) -> dict[str, Any]:
    """Train one method from the shared initialization; compare with its linearized prediction."""
    model = TwoLayerReLU(problem.x.shape[1], width, seed)
    direction = methods_for(model, eps)[name]
    snap = snapshot(model, problem)
    op = linear_operator(direction, snap)
    mu = torch.linalg.eigvalsh((op + op.T) / 2)
    eta = alpha * 2.0 / float(mu[0] + mu[-1])
    step_map = torch.eye(snap.n, dtype=DTYPE) - eta * op
    e0, pre0 = snap.residual.clone(), snap.pre.clone()
    losses, predicted = [snap.loss], [snap.loss]
    contraction: list[float] = []
    bound: list[float] = []  # max_i |1 - eta c_i| at the weights the step starts from
    e_pred, first_residual = e0.clone(), e0
    for _ in range(iters):
        e_old = snap.residual
        bound.append(float((1 - eta * snap.active()).abs().max()))
        d = direction(snap, e_old[:, None])[0]
        with torch.no_grad():
            model.hidden.weight.sub_(eta * d)
        snap = snapshot(model, problem)
        if len(losses) == 1:
            first_residual = snap.residual
        e_pred = step_map @ e_pred
        losses.append(snap.loss)
        predicted.append(0.5 * float(e_pred.square().mean()))
        contraction.append(float(snap.residual.norm() / e_old.norm()))
        if not FLOOR * losses[0] < snap.loss < DIVERGED * losses[0]:
            break
    fit = fit_rate(losses)
    rho = float((1 - eta * mu).abs().max())
    scale = float(e0.abs().max())
    result: dict[str, Any] = {
        "data": problem.name,
        "width": width,
        "eta": eta,
        "mu_min": float(mu[0]),
        "mu_max": float(mu[-1]),
        "loss": losses,
        "predicted_loss": predicted,
        "fit": fit,
        "predicted_fit": fit_rate(predicted, int(fit["iterations"])),
        "asymptotic_factor": rho**2,
        "first_step_dev_from_linearized": float(
            (first_residual - step_map @ e0).abs().max() / scale
        ),
        "residual_contraction": contraction,
        "flipped_activations": float(((snap.pre > 0) != (pre0 > 0)).to(DTYPE).mean()),
        "diverged": not snap.loss < DIVERGED * losses[0],
    }
    if name == "idealized_mbf":
        c0 = (pre0 > 0).sum(dim=1).to(DTYPE)
        result["prediction_check"] = {
            "c_min": float(c0.min()),
            "c_max": float(c0.max()),
            "operator_vs_diag_c": float((op - torch.diag(c0)).norm() / c0.norm()),
            "first_step_dev_from_1_minus_eta_c": float(
                (first_residual - (1 - eta * c0) * e0).abs().max() / scale
            ),
            "bound_max_abs_1_minus_eta_c": bound,
        }
    return result


def block_mass(
    problem: RegressionProblem, width: int, seed: int, max_block_size: int
) -> float:
    """Fraction of the Gauss-Newton matrix's squared Frobenius norm inside the mini-blocks."""
    model = TwoLayerReLU(problem.x.shape[1], width, seed)
    snap = snapshot(model, problem)
    blocks = gauss_newton_blocks(snap, library_layout(model, max_block_size))
    flat = snap.jac.reshape(snap.n, -1)
    total = (flat @ flat.T / snap.n).square().sum()  # ||J^T J||_F = ||J J^T||_F
    return float(blocks.square().sum() / total)


def run(
    datasets: list[str],
    widths: list[int],
    *,
    iters: int = 40,
    alpha: float = 0.5,
    n: int | None = None,
    dim: int = 64,
    eps: float = 1e-12,
    data_dir: str | Path | None = None,
    seed: int = 0,
    methods: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the methods (default: all) on every (data set, width) and collect the JSON report.

    ``mbf_chunked`` runs only where the library would cut rows (``d > max_block_size``).
    """
    wanted = list(LABELS) if methods is None else methods
    unknown = sorted(set(wanted) - set(LABELS))
    if unknown or "idealized_mbf" not in wanted:
        raise ValueError(
            f"--methods {' '.join(wanted)}: choose among {', '.join(LABELS)} "
            "(idealized_mbf included)"
        )
    report: dict[str, Any] = {
        "setting": {
            "model": "f(x) = m^-1/2 sum_r a_r relu(w_r^T x), only W trained, float64",
            "loss": "(1/2n) sum_i (f(x_i) - y_i)^2, full batch",
            "step": "eta = alpha * 2 / (mu_min + mu_max) of the linearized residual map M at init",
            "alpha": alpha,
            "iters": iters,
            "eps": eps,
            "seed": seed,
            "widths": widths,
            "datasets": {},
        },
        "labels": dict(LABELS),
        "block_mass": [],
    }
    default_mbs = int(DEFAULTS["max_block_size"])
    for data in datasets:
        count = n if n is not None else (64 if data == "mnist" else 48)
        problem = load_problem(data, count, dim=dim, data_dir=data_dir, seed=seed)
        gram = problem.x @ problem.x.T
        ev = torch.linalg.eigvalsh(gram)
        report["setting"]["datasets"][data] = {
            "n": problem.x.shape[0],
            "d": problem.x.shape[1],
            "cond_XXt": float(ev[-1] / ev[0]),
        }
        for width in widths:
            need = 4 * 8 * problem.x.shape[0] * width * problem.x.shape[1]  # J and a few copies
            if need > MAX_BYTES:
                raise ValueError(
                    f"{data}, width {width}: about {need / 2**30:.1f} GiB of Jacobians; "
                    "use smaller --widths or --n"
                )
            available = methods_for(TwoLayerReLU(problem.x.shape[1], 1, seed), eps)
            for name in (k for k in available if k in wanted):
                start = time.perf_counter()
                res = _run_method(name, problem, width, iters, alpha, eps, seed)
                fit = res["fit"]
                log(
                    f"{data:7s} m={width:5d} {name:17s} loss factor/iter {fit['factor']:.4f} "
                    f"(R^2 {fit['r2']:.4f}, predicted {res['predicted_fit']['factor']:.4f}) "
                    f"{time.perf_counter() - start:.1f}s"
                )
                report.setdefault(name, {"runs": []})["runs"].append(res)
            mass = {"data": data, "width": width}
            mass["unit_blocks"] = block_mass(problem, width, seed, problem.x.shape[1])
            if problem.x.shape[1] > default_mbs:
                mass["library_blocks"] = block_mass(problem, width, seed, default_mbs)
            report["block_mass"].append(mass)
    first_data, last_width = datasets[0], widths[-1]
    for name in LABELS:
        runs = report.get(name, {}).get("runs", [])
        head = [r for r in runs if r["data"] == first_data and r["width"] == last_width]
        if head:
            report[name]["loss"] = head[0]["loss"]
    report["headline"] = {"data": first_data, "width": last_width}
    return report


# --- figures and command line ------------------------------------------------------------------
COLORS = {
    "gradient_descent": "tab:gray",
    "gauss_newton": "tab:blue",
    "kfac": "tab:green",
    "idealized_mbf": "tab:red",
    "mbf_chunked": "tab:orange",
}


def plot(report: dict[str, Any], path: str | Path) -> None:
    """Log training loss against iterations: one panel per (data set, width).

    Solid lines are measured, dashed lines the linearized prediction ``(I - eta M)^k e_0``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(report["setting"]["datasets"])
    widths = report["setting"]["widths"]
    fig, axes = plt.subplots(
        len(datasets),
        len(widths),
        figsize=(3.3 * len(widths), 2.7 * len(datasets)),
        squeeze=False,
        sharey=True,
    )
    labeled: set[str] = set()
    runs = [r for name in LABELS for r in report.get(name, {}).get("runs", [])]
    top = 1e3 * max(r["loss"][0] for r in runs)
    for row, data in enumerate(datasets):
        info = report["setting"]["datasets"][data]
        for col, width in enumerate(widths):
            ax = axes[row][col]
            for name in LABELS:
                mine = report.get(name, {}).get("runs", [])
                match = [r for r in mine if r["data"] == data and r["width"] == width]
                if not match:
                    continue
                res = match[0]
                label = None if name in labeled else LABELS[name]
                labeled.add(name)
                ax.semilogy(res["loss"], color=COLORS[name], lw=1.6, label=label)
                ax.semilogy(res["predicted_loss"], color=COLORS[name], lw=0.9, ls="--")
                if res["diverged"]:  # stopped: mark where, inside the axes
                    ax.plot(len(res["loss"]) - 1, top, "x", color=COLORS[name], ms=7, mew=2)
            ax.set_title(f"{data} (n={info['n']}, d={info['d']}), m={width}", fontsize=8)
            ax.set_ylim(1e-28, top * 10)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            if row == len(datasets) - 1:
                ax.set_xlabel("iteration", fontsize=8)
            if col == 0:
                ax.set_ylabel("training loss", fontsize=8)
    fig.legend(loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(
        "Full-batch training loss (solid) and its linearized prediction (dashed)\n"
        f"step fraction alpha={report['setting']['alpha']}"
        + ("; x: diverged (run stopped)" if any(r["diverged"] for r in runs) else ""),
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 0.94))
    save_compact_png(fig, path)
    plt.close(fig)


def plot_check(report: dict[str, Any], path: str | Path) -> None:
    """Idealized MBF's measured residual contraction against ``max_i |1 - eta c_i|``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(report["setting"]["datasets"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.0 * len(datasets), 3.0), squeeze=False)
    cmap = plt.get_cmap("viridis")
    widths = report["setting"]["widths"]
    for col, data in enumerate(datasets):
        ax = axes[0][col]
        for j, res in enumerate(r for r in report["idealized_mbf"]["runs"] if r["data"] == data):
            color = cmap(j / max(1, len(widths) - 1))
            ax.plot(res["residual_contraction"], color=color, lw=1.5, label=f"m={res['width']}")
            ax.plot(
                res["prediction_check"]["bound_max_abs_1_minus_eta_c"], color=color, lw=0.9, ls="--"
            )
        ax.set_title(f"{data}: |e_k+1| / |e_k| (solid), max_i |1 - eta c_i| (dashed)", fontsize=8)
        ax.set_xlabel("iteration", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_compact_png(fig, path)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mbf-bench theory",
        description="Idealized MBF against gradient descent, exact Gauss-Newton and KFAC on an "
        "over-parameterized two-layer ReLU network (full batch, float64).",
    )
    parser.add_argument("--json", type=Path, help="write the report (losses, fits) here")
    parser.add_argument("--plot", type=Path, help="write the loss figure (PNG) here")
    parser.add_argument(
        "--check-plot", type=Path, help="write MBF's contraction vs max|1 - eta c_i| (PNG) here"
    )
    parser.add_argument(
        "--data",
        nargs="+",
        choices=["digits", "mnist", "random"],
        default=["digits", "random"],
        help="data sets (default: digits random)",
    )
    parser.add_argument(
        "--data-dir", help="folder with the MNIST files (default: $MBF_BENCH_DATA, else ./data)"
    )
    parser.add_argument(
        "--widths",
        type=positive_list(int, "64,256"),
        default=[64, 256, 1024],
        help="hidden widths m",
    )
    parser.add_argument("--iters", type=int, default=40, help="iterations per run")
    parser.add_argument(
        "--n", type=int, default=None, help="examples (default 48; 64 for mnist); must be <= d"
    )
    parser.add_argument("--dim", type=int, default=64, help="input dimension of random data")
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="step as a fraction of 2/(mu_min + mu_max)"
    )
    parser.add_argument("--eps", type=float, default=1e-12, help="relative vanishing damping")
    parser.add_argument(
        "--methods", nargs="+", default=None, help=f"subset of: {' '.join(LABELS)} (default all)"
    )
    parser.add_argument("--seed", type=int, default=0)
    add_threads_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mbf-bench theory``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.iters <= 0:
        parser.error("--iters must be positive")
    if (args.n is not None and args.n <= 0) or args.dim <= 0:
        parser.error("--n and --dim must be positive")
    if not args.eps > 0:
        parser.error("--eps must be positive (it is the vanishing damping)")
    if not 0 < args.alpha < 1.5:
        parser.error("--alpha must be in (0, 1.5); 1 is the best step of the linear model")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    try:
        with torch_threads(args.threads):
            report = run(
                args.data,
                args.widths,
                iters=args.iters,
                alpha=args.alpha,
                n=args.n,
                dim=args.dim,
                eps=args.eps,
                data_dir=args.data_dir,
                seed=args.seed,
                methods=args.methods,
            )
    except (DataError, ValueError) as err:
        parser.exit(2, f"mbf-bench theory: error: {err}\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot(report, args.plot)
    if args.check_plot:
        args.check_plot.parent.mkdir(parents=True, exist_ok=True)
        plot_check(report, args.check_plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
