"""The vector MBF preconditions, and the step it makes of the solved blocks.

Per unit and step: :func:`form_vector` updates the momentum (with the L2 term) and writes it, as
blocks, into the right-hand side that the curvature store solves; with ``graft`` it also returns
the per-block lengths of the step the direction is grafted onto. :func:`finish` turns the solved
blocks into the step's direction: rescaled to the grafted lengths, or by the inverse's bias
correction. The right-hand side is formed once per step and is also the reference vector of the
KL clip (:func:`kl_term`), so both always see the same vector.

The elementwise work on each parameter of the default step (Adam's second moment, the momentum,
Adam's step that the graft measures) is one function, :func:`adam_moments`; :class:`Moments`
runs it eagerly or, with ``MBF(compile=True)``, through ``torch.compile`` (one fused loop instead
of six passes), falling back to eager with one warning where compiling fails. In eager mode
:func:`advance_moments` does the same for every parameter of the step at once, with torch's
``_foreach`` operations (the same operations tensor by tensor, so the same bits, but one call
each instead of one per parameter: on a small transformer the per-call cost was most of it).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._compat import foreach
from .units import Unit

__all__ = ["Moments", "adam_moments", "advance_moments", "finish", "form_vector", "kl_term"]


def adam_moments(
    d: Tensor, sq: Tensor, buf: Tensor, beta2: float, mu: float, eps: float
) -> Tensor:
    """Update Adam's second moment ``sq`` and the heavy-ball momentum ``buf`` in place with this
    step's vector ``d``; return ``buf / (sqrt(sq) + eps)``, a new tensor (Adam's step up to the
    scalar corrections the caller applies to the block lengths)."""
    sq.mul_(beta2).addcmul_(d, d, value=1.0 - beta2)
    buf.mul_(mu).add_(d)
    denom = torch.sqrt(sq).add_(eps)
    return torch.div(buf, denom, out=denom)


class Moments:
    """:func:`adam_moments`, eager or compiled.

    ``compile=True`` runs it through ``torch.compile`` (shapes dynamic, so one compilation serves
    every parameter; the scalars are passed as 0-d tensors, so the bias correction's changing
    ``eps`` does not recompile). Tensors under ``min_numel`` entries run eagerly: a compiled
    call costs tens of microseconds more than it saves on them (ResNet-32's hundred small tensors
    made the step slower). If compiling or running the compiled code raises (no C++ compiler, an
    unsupported backend), it warns once and runs eagerly from then on. Compiled results equal
    eager ones to float32 rounding, not bitwise (fused multiply-adds).
    """

    def __init__(self, compile: bool = False, min_numel: int = 1 << 16) -> None:
        self.min_numel = min_numel
        self.compiled: Callable[..., Tensor] | None = None
        if compile:
            try:
                self.compiled = torch.compile(_moments_of_tensors, dynamic=True)
            except Exception as error:  # noqa: BLE001 - any failure means: run eagerly
                self._fall_back(error)

    def __call__(
        self, d: Tensor, sq: Tensor, buf: Tensor, beta2: float, mu: float, eps: float
    ) -> Tensor:
        if self.compiled is not None and d.numel() >= self.min_numel:
            try:
                scalars = torch.tensor([beta2, mu, eps], dtype=torch.float64)
                return self.compiled(d, sq, buf, scalars.to(device=sq.device, dtype=sq.dtype))
            except Exception as error:  # noqa: BLE001 - any failure means: run eagerly
                self._fall_back(error)
        return adam_moments(d, sq, buf, beta2, mu, eps)

    def __reduce__(self) -> tuple[type, tuple[bool, int]]:
        """Copies and pickles compile afresh (a compiled function does not pickle)."""
        return (Moments, (self.compiled is not None, self.min_numel))

    def _fall_back(self, error: Exception) -> None:
        self.compiled = None
        warnings.warn(
            f"MBF: compile=True, but torch.compile failed ({type(error).__name__}: {error}); "
            "the step runs eagerly (same results, unfused)",
            stacklevel=3,
        )


def _moments_of_tensors(d: Tensor, sq: Tensor, buf: Tensor, scalars: Tensor) -> Tensor:
    """:func:`adam_moments` with ``(beta2, mu, eps)`` as one tensor, for ``torch.compile``."""
    beta2, mu, eps = scalars[0], scalars[1], scalars[2]
    sq.mul_(beta2).add_(d * d * (1.0 - beta2))
    buf.mul_(mu).add_(d)
    return buf / (torch.sqrt(sq) + eps)


#: Adam's step of a parameter (``buf / (sqrt(sq) + eps)``) and the scalar its block lengths take.
Advanced = tuple[Tensor, float]


def advance_moments(
    units: Sequence[Unit],
    groups: Sequence[dict[str, Any]],
    state: MutableMapping[Tensor, Any],
    compiled: Callable[[Tensor, Tensor, Tensor, float, float, float], Tensor] | None = None,
) -> dict[int, Advanced]:
    """:func:`adam_moments` for every parameter of ``units`` in the steady state of the default
    step (Adam graft, momentum, both buffers already there, a gradient): with ``_foreach``
    operations over all of them at once (one batch per distinct ``(beta2, mu, eps)``), or with
    ``compiled`` (a compiling :class:`Moments`) one tensor at a time.

    Returns, by ``id`` of the parameter, Adam's step and its scale (bias corrections), with the
    buffers and the step counters updated as :func:`form_vector` would; :func:`form_vector`
    takes these and does the rest (parameters not returned go through it one by one).
    """
    batches: dict[
        tuple[float, float, float], tuple[list[int], list[Tensor], list[Tensor], list[Tensor]]
    ] = {}
    scales: dict[int, float] = {}
    advanced: dict[int, Advanced] = {}
    for unit in units:
        group = groups[unit.group]
        mu, wd = group["momentum"], group["weight_decay"]
        if group["graft"] != "adam" or not mu:
            continue
        l2 = wd if (wd and not group["decoupled_weight_decay"]) else 0.0
        beta2 = group["graft_beta2"]
        for p in unit.params:
            st = state[p]
            if p.grad is None or "graft_sq" not in st or "momentum_buffer" not in st:
                continue
            d = p.grad.to(unit.dtype)
            if l2:
                d = d.add(p.to(unit.dtype), alpha=l2)
            st["graft_steps"] += 1
            root_b = math.sqrt(1.0 - beta2 ** st["graft_steps"])
            st["momentum_steps"] = st.get("momentum_steps", 0) + 1
            first = (1.0 - mu) / (1.0 - mu ** st["momentum_steps"])
            hyper = (beta2, mu, group["graft_eps"] * root_b)
            if compiled is not None:
                step = compiled(d, st["graft_sq"], st["momentum_buffer"], *hyper)
                advanced[id(p)] = (step, first * root_b)
                continue
            ids, ds, sqs, bufs = batches.setdefault(hyper, ([], [], [], []))
            ids.append(id(p))
            ds.append(d)
            sqs.append(st["graft_sq"])
            bufs.append(st["momentum_buffer"])
            scales[id(p)] = first * root_b
    mul_, add_, addcmul_ = foreach("mul_"), foreach("add_"), foreach("addcmul_")
    sqrt, div = foreach("sqrt"), foreach("div")
    for (beta2, mu, eps), (ids, ds, sqs, bufs) in batches.items():
        mul_(sqs, beta2)
        addcmul_(sqs, ds, ds, value=1.0 - beta2)
        mul_(bufs, mu)
        add_(bufs, ds)
        denoms = sqrt(sqs)
        add_(denoms, eps)
        for ident, step in zip(ids, div(bufs, denoms), strict=True):
            advanced[ident] = (step, scales[ident])
    return advanced


def form_vector(
    unit: Unit,
    group: dict[str, Any],
    state: MutableMapping[Tensor, Any],
    out: Tensor,
    advanced: dict[int, Advanced] | None = None,
) -> Tensor | None:
    """Update the momentum of the unit's parameters and write it, as blocks, into ``out``.

    ``state``: the optimizer's per-parameter state (momentum and Adam's second moment live
    there, so they checkpoint with ``torch.optim``'s state). Returns, with ``graft``, the
    ``(num_blocks,)`` lengths of the grafted step per block (Adam's
    ``m_hat / (sqrt(v_hat) + eps)``, or the momentum itself), else ``None``. ``advanced``:
    what :func:`advance_moments` already did for some of the unit's parameters this step (the
    steady state of the default step); the others are advanced here one by one, with the
    operations of :func:`adam_moments` (so the same bits).
    """
    mu, wd = group["momentum"], group["weight_decay"]
    l2 = wd if (wd and not group["decoupled_weight_decay"]) else 0.0
    graft = group["graft"]
    bufs, adam_steps, adam_scales = [], [], []
    for p in unit.params:
        done = advanced.get(id(p)) if advanced else None
        if done is not None:
            adam_steps.append(done[0])
            adam_scales.append(done[1])
            bufs.append(state[p]["momentum_buffer"])
            continue
        g = p.grad
        d = (
            torch.zeros(p.shape, dtype=unit.dtype, device=p.device)
            if g is None
            else g.to(unit.dtype)
        )
        if l2:
            d = d.add(p.to(unit.dtype), alpha=l2)
        st = state[p]
        if graft == "adam":
            sq = st.get("graft_sq")
            if sq is None:
                sq = st["graft_sq"] = torch.zeros_like(d)
                st["graft_steps"] = 0
            beta2 = group["graft_beta2"]
            st["graft_steps"] += 1
            # m_hat / (sqrt(v / b) + eps) = sqrt(b) m_hat / (sqrt(v) + sqrt(b) eps) with
            # b = 1 - beta2^t: no division of the whole tensor by b (a third of this step's cost
            # on the autoencoder); the scalar sqrt(b) is applied to the block lengths.
            root_b = math.sqrt(1.0 - beta2 ** st["graft_steps"])
            eps = group["graft_eps"] * root_b
            sq.mul_(beta2).addcmul_(d, d, value=1.0 - beta2)
            denom = torch.sqrt(sq).add_(eps)
        if mu:
            buf = st.get("momentum_buffer")
            if buf is None:
                buf = st["momentum_buffer"] = d.clone()
                st["momentum_steps"] = 1
            else:
                buf.mul_(mu).add_(d)
                st["momentum_steps"] = st.get("momentum_steps", 0) + 1
            d = buf
        if graft == "adam":
            # Adam's bias-corrected first moment is (1 - mu) m / (1 - mu^t) of our heavy ball.
            first = (1.0 - mu) / (1.0 - mu ** st["momentum_steps"]) if mu else 1.0
            adam_steps.append(torch.div(d, denom, out=denom))
            adam_scales.append(first * root_b)
        bufs.append(d)
    lengths = None
    if graft == "adam":
        if len(set(adam_scales)) > 1:  # parameters of the unit that started at different steps
            for step, scale in zip(adam_steps, adam_scales, strict=True):
                step.mul_(scale)
            adam_scales = [1.0]
        # Adam's step as blocks: a view where the layout allows one, else written into ``out``
        # (overwritten by the momentum below) rather than a fresh tensor each step.
        is_view = len(adam_steps) == 1 and not unit.layout.padded
        steps = unit.layout.to_blocks(adam_steps, out=None if is_view else out)
        lengths = torch.linalg.vector_norm(steps, dim=1).mul_(adam_scales[0])
    unit.layout.to_blocks(bufs, out=out)
    if lengths is not None:
        return lengths
    if graft == "sgd":
        return torch.linalg.vector_norm(out, dim=1)
    return None


def finish(
    solved: Tensor, graft_norms: Tensor | None, inverse_scale: float, rhs: Tensor
) -> tuple[Tensor, int]:
    """The unit's direction blocks from its solved ``(num_blocks, s)`` blocks, in place, and
    how many blocks overflowed.

    With ``graft_norms`` every block is rescaled to that length; otherwise multiplied by
    ``inverse_scale`` (the bias correction of the inverse, see :mod:`mbf.store`).

    With grafting only the direction of a block matters, so a block whose solve overflowed (an
    entry or its length not finite) takes the direction of its right-hand side ``rhs``: the
    limit of a damping-dominated inverse. That is what happens to a block whose statistics
    decayed to almost nothing (an embedding row or output unit of a token unseen for hundreds
    of steps; with relative damping its inverse approaches the float32 maximum) when a fresh
    gradient meets its inverse before the next factorization. Without grafting such a block
    stays non-finite and the step is not applied (``overflowed_updates``).
    """
    if graft_norms is None:
        if inverse_scale != 1.0:
            solved.mul_(inverse_scale)
        return solved, 0
    lengths = torch.linalg.vector_norm(solved, dim=1, keepdim=True)
    overflowed = ~torch.isfinite(lengths.squeeze(1))
    count = int(overflowed.sum())
    if count:
        solved[overflowed] = rhs[overflowed]
        lengths[overflowed] = torch.linalg.vector_norm(rhs[overflowed], dim=1, keepdim=True)
    tiny = torch.finfo(solved.dtype).tiny
    solved.mul_(graft_norms.unsqueeze(1) / lengths.clamp_min_(tiny))
    return solved, count


def kl_term(direction: Tensor, vector: Tensor) -> Tensor:
    """``d . m`` of a unit's direction blocks and the vector that was preconditioned (padding
    is zero in the vector, so the blocks give the parameters' dot product)."""
    return torch.vdot(direction.reshape(-1), vector.reshape(-1))
