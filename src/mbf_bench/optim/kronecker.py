"""Shampoo and TNT: one Kronecker factor per tensor mode, built from minibatch-gradient statistics.

For a parameter whose gradient ``G`` (reshaped, see ``conv_reshape``) has ``k`` modes of sizes
``n_1..n_k``, each preconditioned mode ``i`` keeps ``H_i``, a running statistic of
``G_(i) G_(i)^T`` (``G_(i)``: the mode-``i`` unfolding, ``n_i x prod_{j!=i} n_j``). The
direction is the momentum ``M`` multiplied along every mode by a matrix ``P_i``::

    d = M x_1 P_1 x_2 P_2 ... x_k P_k

* **Shampoo** (Gupta, Koren & Singer, ICML 2018): ``P_i = (H_i + eps I)^(-1/(2k))``; for a matrix
  ``d = (L + eps I)^-1/4 M (R + eps I)^-1/4`` with ``L = H_1``, ``R = H_2``.
* **TNT** (Ren & Goldfarb, NeurIPS 2021, "Tensor normal training"): ``H_i`` are rescaled to the
  factors ``U_i`` of a tensor-normal covariance with equal trace per dimension,
  ``c = (tr H / prod n)^(1/k)``, ``U_i = H_i / (c^(k-1) prod_{j!=i} n_j)`` (so
  ``U_i * prod_{j!=i} tr U_j = H_i``), and ``P_i = (U_i + eps I)^-1``.

Statistics: ``accumulate="ema"`` (the authors' framework: the first estimate as is, then
``H <- stat_decay H + (1 - stat_decay) H_hat``) or ``"sum"`` (Gupta et al.'s running sum, where
``eps I`` plays the role of their initial ``eps I``). They come from the plain minibatch gradient
(no momentum, no weight decay), every ``stat_every`` steps; the ``P_i`` are recomputed every
``inv_every`` steps. TNT's paper estimates the statistics from gradients with labels sampled from
the model; here they come from the true labels (the "EF" variant of the authors' code), because
the plain training loop gives the optimizer nothing but gradients.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ._common import (
    all_finite,
    apply_update,
    check_common,
    damped_power,
    inverse_with_damping,
    momentum_of,
)

__all__ = ["METHODS", "Shampoo", "TNT", "KroneckerFactored"]

METHODS = ("shampoo", "tnt")
ACCUMULATE = ("ema", "sum")
CONV_RESHAPES = ("filter", "kfac", "none")


def mode_shape(shape: torch.Size, conv_reshape: str) -> tuple[int, ...]:
    """The shape whose modes get factors: 4-D (conv) weights are reshaped as asked.

    ``"filter"``: ``(out, in, kh*kw)`` (the authors' "filter flattening"); ``"kfac"``:
    ``(out, in*kh*kw)`` (K-FAC's layout); ``"none"``: the 4-D tensor as it is.
    """
    if len(shape) == 4 and conv_reshape == "filter":
        return (shape[0], shape[1], shape[2] * shape[3])
    if len(shape) == 4 and conv_reshape == "kfac":
        return (shape[0], shape[1] * shape[2] * shape[3])
    return tuple(shape)


def mode_statistics(g: Tensor, active: list[bool]) -> list[Tensor | None]:
    """``G_(i) G_(i)^T`` for every active mode ``i`` of ``g`` (None for the others)."""
    out: list[Tensor | None] = []
    for i, on in enumerate(active):
        if not on:
            out.append(None)
            continue
        unfolded = g.movedim(i, 0).reshape(g.shape[i], -1)
        out.append(unfolded @ unfolded.T)
    return out


def apply_modes(m: Tensor, factors: list[Tensor | None]) -> Tensor:
    """``m x_1 P_1 ... x_k P_k`` (symmetric ``P_i``; None means the identity on that mode)."""
    d = m
    for p in factors:
        d = d.movedim(0, -1) if p is None else torch.tensordot(d, p, dims=([0], [0]))
    return d


class KroneckerFactored(torch.optim.Optimizer):
    """Shampoo or TNT (``method``); see the module docstring for the formulas.

    Args:
        params: parameters or param groups, or an ``nn.Module`` (its trainable parameters).
        lr: learning rate.
        method: ``"shampoo"`` or ``"tnt"``.
        momentum: heavy-ball momentum on the gradient, before preconditioning.
        damping: ``eps`` added to every factor before its inverse (root).
        stat_decay: running-average factor of the statistics (``accumulate="ema"``).
        stat_every: steps between statistics updates.
        inv_every: steps between recomputations of the ``P_i`` (also after the first statistics).
        invert_early: also recompute them after every statistics update during the first
            ``inv_every`` steps (the authors' framework), so early steps use fresh curvature.
        weight_decay: L2 coefficient, or decoupled decay with ``decoupled_weight_decay=True``.
        accumulate: ``"ema"`` (the authors' framework) or ``"sum"`` (Gupta et al.).
        conv_reshape: how 4-D weights are seen, ``"filter"``, ``"kfac"`` or ``"none"``.
        max_precond_dim: modes larger than this get no factor (identity), bounding memory.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | nn.Module,
        lr: float,
        *,
        method: str,
        momentum: float = 0.9,
        damping: float = 1e-3,
        stat_decay: float = 0.9,
        stat_every: int = 1,
        inv_every: int = 20,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        invert_early: bool = True,
        accumulate: str = "ema",
        conv_reshape: str = "filter",
        max_precond_dim: int = 8192,
    ) -> None:
        owner = {"shampoo": "Shampoo", "tnt": "TNT"}.get(method)
        if owner is None:
            raise ValueError(f"KroneckerFactored: method must be one of {METHODS}, got {method!r}")
        self.owner = owner
        if accumulate not in ACCUMULATE:
            raise ValueError(f"{owner}: accumulate must be one of {ACCUMULATE}, got {accumulate!r}")
        if conv_reshape not in CONV_RESHAPES:
            raise ValueError(
                f"{owner}: conv_reshape must be one of {CONV_RESHAPES}, got {conv_reshape!r}"
            )
        if (
            isinstance(max_precond_dim, bool)
            or not isinstance(max_precond_dim, int)
            or max_precond_dim < 1
        ):
            raise ValueError(
                f"{owner}: max_precond_dim must be a positive integer, got {max_precond_dim!r}"
            )
        if isinstance(params, nn.Module):
            params = [p for p in params.parameters() if p.requires_grad]
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "damping": damping,
            "stat_decay": stat_decay,
            "stat_every": stat_every,
            "inv_every": inv_every,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "invert_early": invert_early,
            "accumulate": accumulate,
            "conv_reshape": conv_reshape,
            "max_precond_dim": max_precond_dim,
            "step": 0,
        }
        self.method = method
        super().__init__(params, defaults)
        for group in self.param_groups:
            check_common(owner, group)

    # ------------------------------------------------------------------ statistics and factors
    def _update_stats(self, st: dict[str, Any], g: Tensor, group: dict[str, Any]) -> bool:
        active = [n <= group["max_precond_dim"] for n in g.shape]
        stats = mode_statistics(g, active)
        if not all_finite(*(s for s in stats if s is not None)):
            return False
        first = st.get("stat_updates", 0) == 0
        decay = group["stat_decay"]
        for i, s in enumerate(stats):
            if s is None:
                continue
            key = f"stat_{i}"
            if first:
                st[key] = s
            elif group["accumulate"] == "sum":
                st[key].add_(s)
            else:
                st[key].mul_(decay).add_(s, alpha=1.0 - decay)
        st["stat_updates"] = st.get("stat_updates", 0) + 1
        return True

    def _factors(self, st: dict[str, Any], shape: tuple[int, ...], group: dict[str, Any]) -> None:
        k = len(shape)
        eps = group["damping"]
        stats = [st.get(f"stat_{i}") for i in range(k)]
        if self.method == "shampoo":
            for i, h in enumerate(stats):
                if h is not None:
                    st[f"precond_{i}"] = damped_power(h, eps, -1.0 / (2 * k))
            return
        # TNT: equal-trace-per-dimension tensor-normal factors, then damped inverses.
        present = [h for h in stats if h is not None]
        trace = float(present[0].diagonal().sum()) if present else 0.0
        total = math.prod(shape)
        c = (trace / total) ** (1.0 / k) if trace > 0 else 0.0
        for i, h in enumerate(stats):
            if h is None:
                continue
            others = total // shape[i]
            u = h / (c ** (k - 1) * others) if c > 0 else torch.zeros_like(h)
            st[f"precond_{i}"] = inverse_with_damping(u, eps)

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step; ``closure`` (optional) re-evaluates the loss with gradients."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            check_common(self.owner, group)
            k = group["step"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"{self.owner}: sparse gradients are not supported")
                st = self.state[p]
                shape = mode_shape(p.shape, group["conv_reshape"])
                if len(shape) == 0:
                    apply_update(p, momentum_of(st, p, group), group)
                    continue
                fresh = False
                if k % group["stat_every"] == 0 or st.get("stat_updates", 0) == 0:
                    fresh = self._update_stats(st, p.grad.reshape(shape), group)
                early = fresh and (
                    st["stat_updates"] == 1 or (group["invert_early"] and k < group["inv_every"])
                )
                has = st.get("stat_updates", 0) > 0
                if has and (k % group["inv_every"] == 0 or early or "factored" not in st):
                    self._factors(st, shape, group)
                    st["factored"] = True
                m = momentum_of(st, p, group)
                if "factored" in st:
                    factors = [st.get(f"precond_{i}") for i in range(len(shape))]
                    d = apply_modes(m.reshape(shape), factors).reshape(p.shape)
                else:
                    d = m
                apply_update(p, d, group)
            group["step"] = k + 1
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a saved state; the tensors are copied, so the saver can go on independently."""
        super().load_state_dict(copy.deepcopy(state_dict))


class Shampoo(KroneckerFactored):
    """Shampoo (Gupta et al. 2018) in the authors' framework form; see :mod:`.kronecker`."""

    def __init__(
        self, params: Iterable[Tensor] | Iterable[dict[str, Any]] | nn.Module, lr: float, **kw: Any
    ) -> None:
        super().__init__(params, lr, method="shampoo", **kw)


class TNT(KroneckerFactored):
    """TNT (Ren & Goldfarb 2021) with true-label gradient statistics; see :mod:`.kronecker`."""

    def __init__(
        self, params: Iterable[Tensor] | Iterable[dict[str, Any]] | nn.Module, lr: float, **kw: Any
    ) -> None:
        super().__init__(params, lr, method="tnt", **kw)
