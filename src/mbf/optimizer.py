"""The MBF optimizer: mini-block empirical Fisher preconditioning as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import amp as _amp
from . import distributed as _distributed
from .blocks import BlockLayout
from .diagnostics import Diagnostics
from .hooks import PerExampleHooks
from .linalg import FactorReport, damped_inverse, solve_blocks
from .packed import SymmetricPacking, packed_size
from .units import Unit, build_units, state_dtype
from .validation import GRAFTS, check_group, check_params, format_bytes, positive_int

__all__ = ["DEFAULTS", "GRAFTS", "MBF", "PAPER", "UnitState"]

ESTIMATORS = ("batch", "per_example")
STORAGES = ("full", "packed")
REDUCTIONS = ("mean", "sum")
NONFINITE_POLICIES = ("skip", "raise")

DEFAULTS: dict[str, Any] = {
    "lr": 3e-3,
    "momentum": 0.9,
    "damping": 1e-2,
    "stat_decay": 0.9,
    "stat_every": 1,
    "inv_every": 20,
    "max_block_size": 32,
    "weight_decay": 0.0,
    "decoupled_weight_decay": False,
    "kl_clip": None,
    "graft": "adam",
    "graft_beta2": 0.999,
    "graft_eps": 1e-8,
    "bias_correction": True,
    "early_refresh": True,
    "relative_damping": True,
}
"""The library's default hyperparameters: MBF's mini-block directions at Adam's per-block step
lengths (``graft="adam"``, so ``lr`` means what it means for Adam), bias-corrected statistics,
early inverse refreshes and damping relative to each block's scale. They were chosen by the
comparison protocol of ``benchmarks/protocol.py``; ``docs/decisions.md`` gives the evidence."""

PAPER: dict[str, Any] = {
    "lr": 0.01,
    "momentum": 0.9,
    "damping": 0.3,
    "stat_decay": 0.9,
    "stat_every": 1,
    "inv_every": 20,
    "graft": None,
    "bias_correction": False,
    "early_refresh": False,
    "relative_damping": False,
}
"""The paper's MBF (Bahamou, Goldfarb & Ren, 2023): ``m <- mu m + g``,
``d_b = (F_b + damping I)^-1 m_b``, ``theta <- theta - lr d``, with ``F_b`` a running average
whose first estimate is taken as it is and inverses refreshed every ``inv_every`` steps only, at
the hyperparameters of the authors' framework. ``MBF(model, **PAPER)`` gives exactly that form
whatever the library defaults are."""


class UnitState(NamedTuple):
    """One unit as [`MBF.blocks`][mbf.MBF.blocks] shows it.

    Attributes:
        name: the unit's name, e.g. ``"0 (Linear)"`` (module name and type) or a parameter's
            name when no module rule applies; the keys of ``memory_report()``.
        layout: how the unit's parameters are cut into mini-blocks.
        params: the unit's parameters, in the layout's order.
        fisher: the running-average statistics ``F_b``, ``(num_blocks, block_size, block_size)``.
        inverse: the damped inverses ``(F_b + damping * I)^-1`` last factored, same shape.
    """

    name: str
    layout: BlockLayout
    params: list[Tensor]
    fisher: Tensor
    inverse: Tensor


@dataclass(eq=False)
class _Bucket:
    """Blocks of equal size from the units of one param group, factored in one batched call."""

    group: int
    block_size: int
    units: list[Unit]
    fisher: Tensor
    inverse: Tensor
    factored: bool = False
    sharded: bool = False  # curvature only partly valid on this rank (see mbf.distributed)


def _check_group(group: dict[str, Any]) -> None:
    check_group(group)  # mbf.validation: one home for every rule


def _fold_rows(fisher: Tensor, rows: Tensor, weights: list[float]) -> None:
    """``F <- (1 - a_k) ... (F (1 - a_1) + a_1 g_1 g_1^T) ... + a_k g_k g_k^T`` in one product.

    ``fisher``: ``(B, s, s)`` statistics, updated in place; ``rows``: the ``(B, k, s)`` queued
    estimates ``g_i`` (spent: scaled in place); ``weights``: their running-average weights
    ``a_i``. Expanded: ``F * prod_i (1 - a_i) + sum_i c_i g_i g_i^T`` with
    ``c_i = a_i prod_{j > i} (1 - a_j)``, i.e. ``(sqrt(c) G)^T (sqrt(c) G)``.
    """
    coeffs, keep = [], 1.0
    for a in reversed(weights):
        coeffs.append(a * keep)
        keep *= 1.0 - a
    coeffs.reverse()
    # Scale the spent rows in place by sqrt(c) (c >= 0), so that both factors carry half the
    # weight and no temporary of the queue's size is allocated.
    roots = torch.tensor(coeffs, dtype=rows.dtype, device=rows.device).sqrt_()
    rows.mul_(roots[:, None])
    # beta = 0 (a first estimate in the queue) ignores the old statistics, NaN included.
    fisher.baddbmm_(rows.mT, rows, beta=keep, alpha=1.0)


class MBF(torch.optim.Optimizer):
    """Mini-block Fisher optimizer (Bahamou, Goldfarb & Ren, AISTATS 2023).

    Preconditions each step with a block-diagonal approximation of the empirical Fisher matrix in
    which every layer is cut into many small mini-blocks (one per output unit of a Linear layer,
    one per kernel of a convolution; see [`mbf.blocks`][mbf.blocks]), all factored in batched calls:

        m <- momentum * m + (g + weight_decay * theta)       (L2 decay, the default)
        d_b = (F_b + damping * I)^-1 m_b                     for every mini-block b
        d_b <- |a_b| d_b / |d_b|                             (graft: a = Adam's or SGD-m's step)
        theta <- theta - lr * d   [- lr * weight_decay * theta when decoupled]

    ``MBF(model, **PAPER)`` is the paper's form (no grafting, first estimate as it is, factoring
    every ``inv_every`` steps); :data:`DEFAULTS` are the library's defaults.

    ``F_b`` is a running average (``stat_decay``) of a per-step estimate refreshed every
    ``stat_every`` steps and factored every ``inv_every`` steps.

    Args:
        params: an ``nn.Module`` (module-aware blocks, per-example hooks; a
            ``DistributedDataParallel`` wrapper is looked through), or an iterable of parameters
            or param groups (blocks from shapes, unless ``model`` is given too).
        lr: learning rate.
        momentum: heavy-ball momentum, applied before preconditioning.
        damping: ``lambda`` added to every block's diagonal.
        stat_decay: running-average factor of the curvature statistics.
        stat_every: steps between statistics updates.
        inv_every: steps between factorizations.
        max_block_size: rows longer than this are cut into near-equal chunks.
        weight_decay: L2 coefficient (added to the gradient) or, with
            ``decoupled_weight_decay=True``, decoupled decay (AdamW style).
        decoupled_weight_decay: shrink the parameters by ``lr * weight_decay`` directly
            instead of adding the L2 term to the gradient (then it is not preconditioned).
        kl_clip: if set, scale the update so ``lr**2 * d . m <= kl_clip`` (KFAC's KL clip).
        graft: ``None`` (the paper's step), ``"adam"`` or ``"sgd"``: keep the direction
            ``d_b`` of every mini-block but give it the length of Adam's update
            ``m_hat / (sqrt(v_hat) + graft_eps)`` (or of SGD-m's, the momentum ``m_b``) for the
            same block, so that ``lr`` means what it means for that optimizer and one damping
            serves blocks of any scale (as Distributed Shampoo grafts onto Adam).
        graft_beta2: Adam's ``beta2`` for ``graft="adam"`` (its ``beta1`` is ``momentum``;
            the second moment costs one float per parameter).
        graft_eps: Adam's ``eps`` for ``graft="adam"``.
        bias_correction: start the statistics from zero with weight ``1 - stat_decay`` and
            divide by ``1 - stat_decay^n`` when factoring (Adam's bias correction), instead of
            taking the first estimate as it is.
        early_refresh: also factor after the 1st, 2nd, 4th, 8th, ... statistics update (below
            ``inv_every``), so the first inverses are not rank-one estimates kept for
            ``inv_every`` steps.
        relative_damping: add ``damping * tr(F_b) / s`` to each block (damping measured in
            units of the block's mean eigenvalue, so one value serves blocks of any scale)
            instead of ``damping`` itself.
        estimator: ``"batch"`` (``F_b`` estimated by ``g_b g_b^T`` of the minibatch gradient;
            any layer) or ``"per_example"`` (the empirical Fisher ``(1/N) sum_i g_ib g_ib^T`` from
            hooks on Linear and ConvNd modules called through their ``forward``; every other
            parameter falls back to ``"batch"`` with a warning: norm, embedding and recurrent
            layers, ``nn.MultiheadAttention`` (its ``out_proj`` is applied functionally), a
            Linear or ConvNd whose weight is tied to another module's, and any Linear or ConvNd
            whose forward hook never runs on a statistics step).
        loss_reduction: how the loss combines examples, ``"mean"`` or ``"sum"``; needed by the
            ``per_example`` estimator to undo autograd's ``1/N``. With gradient accumulation it
            describes the whole accumulated batch: ``"mean"`` for micro-batch means divided by
            the number of micro-batches (Hugging Face's Trainer, Lightning), ``"sum"`` for
            micro-batch sums; the statistics are then those of all the accumulated examples
            (:mod:`mbf.hooks`).
        model: the module the parameters belong to, for module-aware blocks with param groups.
        nonfinite: ``"skip"`` (default) skips a step whose gradient is not finite, leaving every
            parameter and statistic untouched and counting it; ``"raise"`` raises
            ``FloatingPointError`` with the state untouched. Under ``torch.amp.GradScaler``
            (``scaler.step(opt)``) MBF unscales gradients and per-example statistics itself and
            skips the steps the scaler finds non-finite (:mod:`mbf.amp`,
            :meth:`use_grad_scaler`).
        max_state_bytes: refuse to build when curvature state would exceed this many bytes.
        chunk_elements: per-example gradient entries materialized at once (memory bound).
        stat_buffer: with the ``batch`` estimator, how many steps' gradient blocks are queued
            and folded into the running average together, as one batched rank-``k`` product
            (at the latest before each factorization). The result is the same running average
            (up to rounding); the statistics, the largest tensor, are then read and written once
            per ``stat_buffer`` updates instead of every update. Costs ``stat_buffer`` floats per
            parameter; ``1`` folds every update at once.
        storage: ``"full"`` keeps every block's statistics and inverse as ``s x s`` matrices
            (``2 s + stat_buffer + 1`` floats per parameter, fastest); ``"packed"`` keeps their
            upper triangles (``s + 2`` floats per parameter: about half the memory) and unpacks
            a few thousand blocks at a time to factor and solve, which makes the step slower
            (``docs/results.md``). ``"packed"`` folds statistics at once (no queue) and runs in
            a single process.
        process_group: data parallelism (see ``mbf.distributed``). ``None`` (default): the
            ``DistributedDataParallel`` model's group, else the default group, when
            ``torch.distributed`` is initialized with several ranks; the curvature work is then
            sharded over the ranks and per-example statistics summed over them. ``True``: the
            same, but an error when ``torch.distributed`` is not initialized. ``False``: a
            single-process optimizer even then. Or an explicit ``ProcessGroup``.
    """

    def __init__(
        self,
        params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = DEFAULTS["lr"],
        *,
        momentum: float = DEFAULTS["momentum"],
        damping: float = DEFAULTS["damping"],
        stat_decay: float = DEFAULTS["stat_decay"],
        stat_every: int = DEFAULTS["stat_every"],
        inv_every: int = DEFAULTS["inv_every"],
        max_block_size: int = DEFAULTS["max_block_size"],
        weight_decay: float = DEFAULTS["weight_decay"],
        decoupled_weight_decay: bool = DEFAULTS["decoupled_weight_decay"],
        kl_clip: float | None = DEFAULTS["kl_clip"],
        graft: str | None = DEFAULTS["graft"],
        graft_beta2: float = DEFAULTS["graft_beta2"],
        graft_eps: float = DEFAULTS["graft_eps"],
        bias_correction: bool = DEFAULTS["bias_correction"],
        early_refresh: bool = DEFAULTS["early_refresh"],
        relative_damping: bool = DEFAULTS["relative_damping"],
        estimator: str = "batch",
        loss_reduction: str = "mean",
        model: nn.Module | None = None,
        nonfinite: str = "skip",
        max_state_bytes: int | None = 8 * 2**30,
        chunk_elements: int = 1 << 24,
        stat_buffer: int = 4,
        storage: str = "full",
        process_group: Any = None,
    ) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"MBF: estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if loss_reduction not in REDUCTIONS:
            raise ValueError(
                f"MBF: loss_reduction must be one of {REDUCTIONS}, got {loss_reduction!r}"
            )
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"MBF: nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}"
            )
        chunk_elements = positive_int("chunk_elements", chunk_elements)
        stat_buffer = positive_int("stat_buffer", stat_buffer)
        if max_state_bytes is not None:
            max_state_bytes = positive_int("max_state_bytes", max_state_bytes)
        self.stat_buffer = stat_buffer
        if storage not in STORAGES:
            raise ValueError(f"MBF: storage must be one of {STORAGES}, got {storage!r}")
        self.storage = storage
        if isinstance(params, nn.Module):
            if model is not None and model is not params:
                raise ValueError("MBF: pass the model either as params or as model=, not both")
            model = params
            params = [p for p in params.parameters() if p.requires_grad]
        if estimator == "per_example" and model is None:
            raise ValueError(
                "MBF: estimator='per_example' needs the model (pass the nn.Module, or model=)"
            )
        self.estimator = estimator
        self.loss_reduction = loss_reduction
        self.nonfinite = nonfinite
        self.max_state_bytes = max_state_bytes
        self._model = model
        self._units: list[Unit] = []
        self._buckets: list[_Bucket] = []
        self._ready = False
        self._step_count = 0
        self._counters = {
            "steps": 0,
            "skipped_steps": 0,
            "scaler_skipped_steps": 0,
            "factorizations": 0,
            "factored_blocks": 0,
            "retried_blocks": 0,
            "fallback_blocks": 0,
            "nonfinite_blocks": 0,
            "overflowed_updates": 0,
        }
        self._warned: set[str] = set()
        self._diag = Diagnostics()
        self._consecutive_skips = 0  # steps skipped in a row (warnings), not saved
        self._dist: _distributed.ShardedMBF | None = None
        defaults = dict(
            DEFAULTS,
            lr=lr,
            momentum=momentum,
            damping=damping,
            stat_decay=stat_decay,
            stat_every=stat_every,
            inv_every=inv_every,
            max_block_size=max_block_size,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            kl_clip=kl_clip,
            graft=graft,
            graft_beta2=graft_beta2,
            graft_eps=graft_eps,
            bias_correction=bias_correction,
            early_refresh=early_refresh,
            relative_damping=relative_damping,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_group(group)
        self._hooks = PerExampleHooks([], loss_reduction, chunk_elements)
        self._rebuild()
        self._ready = True
        # Data parallelism (mbf.distributed): None in a single process.
        self._dist = _distributed.setup(self, process_group, model)
        if self._dist is not None and storage == "packed":
            raise ValueError(
                "MBF: storage='packed' runs in a single process; use storage='full' with ranks"
            )

    # ------------------------------------------------------------------ construction
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (as in ``torch.optim.Optimizer``) and build its mini-blocks.

        The group's hyperparameters are checked like the constructor's; the curvature of units
        already there is kept. With several ranks, every rank must add the same group.
        """
        engine = getattr(self, "_dist", None)
        if engine is not None:  # mbf.distributed: rebuild from the full curvature
            engine.consolidate(self)
        if not getattr(self, "_ready", False):  # construction: __init__ checks every group
            super().add_param_group(param_group)
            return
        count, rebuilt = len(self.param_groups), False
        try:
            super().add_param_group(param_group)
            _check_group(self.param_groups[-1])
            check_params(self.param_groups)
            rebuilt = True
            self._rebuild()
            if self._dist is not None:  # mbf.distributed: every rank must add the same group
                self._dist.check_config(self)
        except Exception:
            # A refused group leaves the optimizer as before (no half-added group; the units
            # are rebuilt only if they were touched).
            del self.param_groups[count:]
            if rebuilt:
                self._rebuild()
            raise

    def _rebuild(self) -> None:
        """(Re)build units and buckets; existing curvature of unchanged units is kept."""
        check_params(self.param_groups)
        for unit in self._units:
            self._fold_queue(unit)
        old = {tuple(id(p) for p in u.params): u for u in self._units}
        units = build_units(self.param_groups, self._model, self.estimator == "per_example")
        for unit in units:
            unit.packed = self.storage == "packed"
            queued = not unit.per_example and self.stat_buffer > 1 and not unit.packed
            unit.queue_capacity = self.stat_buffer if queued else 0
        self._check_budget(units)
        self._warn_fallbacks(units)
        for unit in units:
            prev = old.get(tuple(id(p) for p in unit.params))
            if prev is not None and prev.layout.num_blocks == unit.layout.num_blocks:
                unit.fisher, unit.inverse = prev.fisher, prev.inverse
                unit.stat_updates, unit.stat_mass = prev.stat_updates, prev.stat_mass
                unit.inverse_scale = prev.inverse_scale
        self._units = units
        self._buckets = self._make_buckets(units)
        self._hooks.remove()
        self._hooks.add(units)
        self._schedule_collection()

    def _check_budget(self, units: list[Unit]) -> None:
        if self.max_state_bytes is None:
            return
        total = sum(u.state_bytes() for u in units)
        if total <= self.max_state_bytes:
            return
        worst = max(units, key=lambda u: u.state_bytes())
        raise ValueError(
            f"MBF: curvature state would take {format_bytes(total)}, over max_state_bytes="
            f"{format_bytes(self.max_state_bytes)}; the largest unit is {worst.name} "
            f"({format_bytes(worst.state_bytes())} in blocks of {worst.layout.block_size}). "
            "Lower max_block_size (state grows linearly with it) or raise max_state_bytes."
        )

    def _warn_fallbacks(self, units: list[Unit]) -> None:
        if self.estimator != "per_example":
            return
        names = [u.name for u in units if not u.per_example]
        if names and "fallback" not in self._warned:
            self._warned.add("fallback")
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            warnings.warn(
                "MBF: per-example statistics serve Linear and Conv1d/2d/3d layers called "
                "through their forward, with weights of their own (not tied, not "
                f"MultiheadAttention's out_proj); these use the 'batch' estimator instead: {shown}",
                stacklevel=3,
            )

    def _make_buckets(self, units: list[Unit]) -> list[_Bucket]:
        keyed: dict[tuple, list[Unit]] = {}
        for unit in units:
            key = (unit.group, unit.layout.block_size, unit.device, unit.dtype)
            keyed.setdefault(key, []).append(unit)
        buckets = []
        for (group, size, device, dtype), members in keyed.items():
            total = sum(u.layout.num_blocks for u in members)
            per_block = (packed_size(size),) if self.storage == "packed" else (size, size)
            fisher = torch.zeros(total, *per_block, dtype=dtype, device=device)
            inverse = torch.zeros_like(fisher)
            offset = 0
            for unit in members:
                nb = unit.layout.num_blocks
                if unit.fisher.shape == (nb, *per_block):
                    fisher[offset : offset + nb].copy_(unit.fisher)
                    inverse[offset : offset + nb].copy_(unit.inverse)
                unit.fisher = fisher[offset : offset + nb]
                unit.inverse = inverse[offset : offset + nb]
                unit.offset = offset
                offset += nb
            bucket = _Bucket(group, size, members, fisher, inverse)
            bucket.factored = all(u.stat_updates > 0 for u in members)
            buckets.append(bucket)
        return buckets

    # ------------------------------------------------------------------ introspection
    @property
    def distributed(self) -> _distributed.ShardedMBF | None:
        """The data-parallel engine (process group, rank, traffic), or ``None`` in one process."""
        return self._dist

    @property
    def counters(self) -> dict[str, int]:
        """Steps taken and skipped, factorizations, and blocks that needed a retry or fallback.

        ``steps``: steps taken; ``skipped_steps``: steps skipped for a non-finite gradient
        (``nonfinite="skip"``; warned at the first and at 10, 100, ... in a row);
        ``overflowed_updates``: steps whose statistics were updated but whose preconditioned
        update was not finite, so the parameters were left alone (warned once);
        ``factorizations``, ``factored_blocks``, ``retried_blocks`` (factored with more
        damping), ``fallback_blocks`` (preconditioned by ``(1/damping) I``) and
        ``nonfinite_blocks`` (statistics that were not finite, started afresh).
        """
        return dict(self._counters)

    def diagnostics(self) -> dict[str, float]:
        """A flat ``{name: number}`` dict for loggers: counts, fractions of blocks retried or
        fallen back, seconds in statistics and factorization, per-group damping and the ratio of
        the preconditioned direction's norm to the gradient's (:mod:`mbf.diagnostics`)."""
        return self._diag.report(self._counters, self.param_groups)

    def memory_report(self) -> dict[str, int]:
        """Bytes of curvature state (statistics, factors, momentum) for each unit, by name."""
        return {u.name: u.state_bytes() for u in self._units}

    def blocks(self) -> list[UnitState]:
        """Every unit's name, layout, parameters, running-average blocks and damped inverses.

        The tensors are live views of the optimizer's state (read them, do not keep them), or
        unpacked copies with ``storage="packed"``; queued statistics (see ``stat_buffer``) are
        folded in first.
        """
        for unit in self._units:
            self._fold_queue(unit)
        if self.storage == "packed":  # whole blocks, as copies
            return [
                UnitState(u.name, u.layout, list(u.params), *self._unpacked(u))
                for u in self._units
            ]
        return [
            UnitState(u.name, u.layout, list(u.params), u.fisher, u.inverse) for u in self._units
        ]

    @staticmethod
    def _unpacked(unit: Unit) -> tuple[Tensor, Tensor]:
        packing = SymmetricPacking.of(unit.layout.block_size, unit.device)
        return packing.unpack(unit.fisher), packing.unpack(unit.inverse)

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """torch.amp.GradScaler's protocol (:mod:`mbf.amp`): ``step()`` unscales gradients and
        per-example statistics itself while hooks collect them and no scaler is attached."""
        hooks = getattr(self, "_hooks", None)
        return hooks is not None and hooks.active and hooks.grad_scaler is None

    def use_grad_scaler(self, scaler: Any) -> None:
        """Read the loss scale of this ``torch.amp.GradScaler`` during backward passes, so that
        per-example statistics are unscaled even when ``scaler.unscale_(optimizer)`` runs before
        ``step()`` (as for gradient clipping; see :mod:`mbf.amp`). ``None`` detaches it."""
        if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
            raise TypeError(f"MBF: use_grad_scaler needs a torch.amp.GradScaler, got {scaler!r}")
        self._hooks.grad_scaler = scaler

    def remove_hooks(self) -> None:
        """Detach the per-example hooks from the model; the optimizer goes on as ``batch``."""
        self._hooks.remove()
        for unit in self._units:
            unit.per_example = False
            unit.clear_pending()

    # ------------------------------------------------------------------ stepping
    def _is_stat_step(self, unit: Unit) -> bool:
        every = self.param_groups[unit.group]["stat_every"]
        return self._step_count % every == 0 or unit.stat_updates == 0

    def _schedule_collection(self) -> None:
        for unit in self._units:
            unit.collect = unit.per_example and self._is_stat_step(unit)
        self._hooks.new_step()

    def _grads(self, unit: Unit) -> list[Tensor] | None:
        grads = [p.grad for p in unit.params]
        if all(g is None for g in grads):
            return None
        for g in grads:
            if g is not None and g.is_sparse:
                raise ValueError(f"MBF: sparse gradients are not supported ({unit.name})")
        return [
            (torch.zeros_like(p) if g is None else g).to(unit.dtype)
            for p, g in zip(unit.params, grads, strict=True)
        ]

    def _all_finite(self, grads: list[list[Tensor]]) -> bool:
        # One reduction per tensor: a sum is non-finite iff an entry is (or the sum overflows
        # float32, i.e. the gradient is ~1e38: no step worth taking either).
        sums = [
            g.sum(dtype=torch.promote_types(g.dtype, torch.float32)) for gs in grads for g in gs
        ]
        return bool(torch.isfinite(torch.stack(sums)).all()) if sums else True

    def _estimate(self, unit: Unit, grads: list[Tensor]) -> Tensor | None:
        if unit.per_example:
            if unit.pending is None or unit.pending_count == 0:
                self._hooks_missed(unit)
                return unit.layout.to_blocks(grads)
            return unit.pending.div_(unit.pending_count)
        return unit.layout.to_blocks(grads)

    def _hooks_missed(self, unit: Unit) -> None:
        """A per-example unit has a gradient but its module's hooks saw no pass: the module was
        applied functionally (its parent calls ``F.linear`` on its weight) or outside its
        ``forward``. It uses the batch estimator from now on, as unserved modules do."""
        unit.per_example = False
        unit.clear_pending()
        if f"nocapture:{unit.name}" not in self._warned:
            self._warned.add(f"nocapture:{unit.name}")
            warnings.warn(
                f"MBF: {unit.name} received a gradient but its forward hook never ran (applied "
                "functionally, outside its forward?); it uses the 'batch' estimator instead of "
                "per-example statistics.",
                stacklevel=7,  # the caller of step()
            )

    def _update_stats(self, unit: Unit, grads: list[Tensor], blocks: slice = slice(None)) -> bool:
        """Blend this step's estimate into the unit's statistics (``blocks``: only those blocks,
        as a data-parallel rank does; its per-example ``pending`` then holds just those)."""
        estimate = self._estimate(unit, grads)
        unit.clear_pending()
        if estimate is None:
            return False
        fisher = unit.fisher[blocks]
        # The first estimate is taken as it is (or, with bias correction, enters a running
        # average that starts from zero); later ones enter the running average.
        group = self.param_groups[unit.group]
        first = unit.stat_updates == 0 and not group["bias_correction"]
        weight = 1.0 if first else 1.0 - group["stat_decay"]
        unit.stat_mass = (1.0 - weight) * unit.stat_mass + weight
        if unit.packed:
            packing = SymmetricPacking.of(unit.layout.block_size, unit.device)
            if estimate.dim() == 2:
                packing.lerp_outer_(fisher, estimate[blocks], weight)
            else:
                fisher.lerp_(packing.pack(estimate), weight)
        elif estimate.dim() == 2 and unit.queue_capacity and self._dist is None:
            self._enqueue(unit, estimate, weight)
        elif estimate.dim() == 2:  # batch estimator: g_b g_b^T, fused so no (B, s, s) temporary
            # (unsqueeze(1) rather than a transposed view: CPU bmm is ~2.4x faster on it)
            vectors = estimate[blocks]
            fisher.baddbmm_(
                vectors.unsqueeze(-1), vectors.unsqueeze(1), beta=1.0 - weight, alpha=weight
            )
        else:
            fisher.lerp_(estimate, weight)
        unit.stat_updates += 1
        return True

    def _enqueue(self, unit: Unit, estimate: Tensor, weight: float) -> None:
        """Queue one batch estimate; fold the queue into the statistics when it is full."""
        if unit.queue is None:
            unit.queue = estimate.new_empty(
                unit.layout.num_blocks, unit.queue_capacity, unit.layout.block_size
            )
        unit.queue[:, len(unit.queue_weights)].copy_(estimate)
        unit.queue_weights.append(weight)
        if len(unit.queue_weights) == unit.queue_capacity:
            self._fold_queue(unit)

    @staticmethod
    def _fold_queue(unit: Unit) -> None:
        """Fold the unit's queued estimates into its statistics (see :func:`_fold_rows`)."""
        if unit.queue_weights and unit.queue is not None:
            _fold_rows(unit.fisher, unit.queue[:, : len(unit.queue_weights)], unit.queue_weights)
            unit.queue_weights.clear()

    def _factor_range(self, bucket: _Bucket, lo: int, hi: int) -> FactorReport:
        """Factor the bucket's blocks ``lo:hi`` into its inverses (all of it, or a rank's share).

        The inverse of the corrected statistics ``(F / c + damping I)^-1`` is
        ``c (F + c damping I)^-1``, with ``c`` the unit's ``stat_mass``: blocks are factored
        with damping ``c * damping`` in runs of units of equal ``c`` (one run as a rule), and
        ``c`` is kept as the unit's ``inverse_scale`` for the solve.
        """
        report = FactorReport()
        damping = self.param_groups[bucket.group]["damping"]
        runs: list[tuple[int, int, float]] = []
        for unit in bucket.units:
            # Every rank sets every unit's scale: all of them apply all directions.
            scale = unit.inverse_scale = unit.stat_mass if unit.stat_mass > 0 else 1.0
            a, b = max(lo, unit.offset), min(hi, unit.offset + unit.layout.num_blocks)
            if a >= b:
                continue
            self._fold_queue(unit)
            if runs and runs[-1][1] == a and runs[-1][2] == scale:
                runs[-1] = (runs[-1][0], b, scale)
            else:
                runs.append((a, b, scale))
        packing = SymmetricPacking.of(bucket.block_size, bucket.fisher.device)
        packed = self.storage == "packed"
        for a, b, scale in runs:
            fisher, out = bucket.fisher[a:b], bucket.inverse[a:b]
            block_damping: float | Tensor = damping * scale
            if self.param_groups[bucket.group]["relative_damping"]:
                block_damping = self._relative_damping(fisher, damping, packing if packed else None)
            if packed:
                part = packing.damped_inverse(fisher, block_damping, out=out)
            else:
                _, part = damped_inverse(fisher, block_damping, out=out)
            if part.nonfinite:
                # A poisoned statistic would poison every later step: start that block afresh.
                per_block = tuple(range(1, fisher.dim()))
                fisher[~torch.isfinite(fisher).all(dim=per_block)] = 0.0
            report.add(part)
        return report

    @staticmethod
    def _relative_damping(
        fisher: Tensor, damping: float, packing: SymmetricPacking | None
    ) -> Tensor:
        """Per block ``damping * tr(F_b) / s``: damping in units of the block's mean eigenvalue.

        Scale-free: the same for statistics ``F`` and ``c F`` (bias correction's ``c``
        included). Blocks with no statistics yet take the run's mean scale (or ``damping``).
        """
        size = fisher.shape[-1] if packing is None else packing.size
        trace = fisher.diagonal(dim1=-2, dim2=-1).sum(-1) if packing is None else (
            packing.trace(fisher))
        per_block = trace.abs() / size
        positive = per_block > 0
        fill = per_block[positive].mean() if bool(positive.any()) else per_block.new_ones(())
        return damping * torch.where(positive, per_block, fill)

    def _factor(self, bucket: _Bucket) -> None:
        with self._diag.timed("factorization"):
            report = self._factor_range(bucket, 0, bucket.fisher.shape[0])
        bucket.factored = True
        c = self._counters
        c["factorizations"] += 1
        c["factored_blocks"] += report.blocks
        c["retried_blocks"] += report.retried
        c["fallback_blocks"] += report.fallback
        c["nonfinite_blocks"] += report.nonfinite

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Take one MBF step; ``closure`` (optional) re-evaluates the loss with gradients."""
        for group in self.param_groups:  # also catches changes made through param_groups
            _check_group(group)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._counters["scaler_skipped_steps"] += self._hooks.scaler_skips
        self._hooks.scaler_skips = 0
        scaler = _amp.read_scaler_signal(self)  # set by torch.amp.GradScaler.step (mbf.amp)
        if scaler.found_inf:
            self._counters["scaler_skipped_steps"] += 1
            for unit in self._units:
                unit.clear_pending()
            self._hooks.new_step()
            return loss
        self._hooks.finish(self._units, scaler)  # per-example sums -> empirical Fisher scale
        if scaler.grad_scale is not None:
            _amp.unscale_grads_(self.param_groups, scaler.grad_scale)
        active = [(u, self._grads(u)) for u in self._units]
        live = [(u, g) for u, g in active if g is not None]
        if not self._all_finite([g for _, g in live]):
            self._counters["skipped_steps"] += 1
            self._note_skip()
            for unit in self._units:
                unit.clear_pending()
            self._hooks.new_step()
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    "MBF: non-finite gradient; the step was not taken and no state was changed"
                )
            return loss

        live_ids = {id(u) for u, _ in live}
        refreshed: set[int] = set()
        with self._diag.timed("statistics"):
            if self._dist is not None:  # mbf.distributed: each rank updates the blocks it owns
                refreshed = self._dist.update_statistics(self, live)
            else:
                for unit, grads in live:
                    if self._is_stat_step(unit) and self._update_stats(unit, grads):
                        refreshed.add(id(unit))

        if self._dist is not None:  # mbf.distributed: owners invert and solve, then share
            directions = self._dist.precondition(self, live_ids, refreshed)
        else:
            directions = self._precondition(live_ids, refreshed)
        self._diag.record_step(live, directions)
        if self._all_finite(list(directions.values())):
            self._apply(live, directions)
            self._consecutive_skips = 0
        else:  # finite gradients, but a preconditioned update that is not (see _note_overflow)
            self._note_overflow()
        self._step_count += 1
        self._counters["steps"] += 1
        self._schedule_collection()
        return loss

    def _note_skip(self) -> None:
        """Warn when steps start being skipped, and again at 10, 100, ... skips in a row."""
        self._consecutive_skips += 1
        run = self._consecutive_skips
        if self._counters["skipped_steps"] == 1 and self.nonfinite == "skip":
            warnings.warn(
                "MBF: skipped a step whose gradient is not finite (parameters and statistics "
                "left as they were); optimizer.counters['skipped_steps'] counts them",
                stacklevel=5,  # past the torch wrappers of step(): the caller
            )
        elif run >= 10 and math.log10(run).is_integer() and self.nonfinite == "skip":
            warnings.warn(
                f"MBF: the last {run} steps were all skipped for non-finite gradients: "
                "training has stalled (check the loss, the learning rate, the data)",
                stacklevel=5,  # past the torch wrappers of step(): the caller
            )

    def _note_overflow(self) -> None:
        """An update that overflowed (e.g. ``damping=0`` and a stale inverse ``1/g^2`` of a tiny
        gradient, met by a larger one): the parameters are left as they were, never made
        non-finite. Statistics and momentum took the step's gradient (it was finite)."""
        self._counters["overflowed_updates"] += 1
        if "overflow" not in self._warned:
            self._warned.add("overflow")
            warnings.warn(
                "MBF: a preconditioned update was not finite and was not applied (parameters "
                "left as they were; counters['overflowed_updates']); raise the damping",
                stacklevel=5,  # past the torch wrappers of step(): the caller
            )

    def _factor_due(self, bucket: _Bucket, members: list[Unit], refreshed: set[int]) -> bool:
        """Whether the bucket is factored this step: on schedule, on first statistics, or never."""
        group = self.param_groups[bucket.group]
        due = self._step_count % group["inv_every"] == 0
        first = any(id(u) in refreshed and self._early(u.stat_updates, group) for u in members)
        return due or first or not bucket.factored

    @staticmethod
    def _early(updates: int, group: dict[str, Any]) -> bool:
        """Whether a unit's ``updates``-th statistics update calls for a factorization now."""
        if updates == 1:
            return True
        power_of_two = updates & (updates - 1) == 0
        return bool(group["early_refresh"]) and power_of_two and updates < group["inv_every"]

    def _precondition(self, live_ids: set[int], refreshed: set[int]) -> dict[int, list[Tensor]]:
        """Factor what is due and solve every live unit's blocks; ``{id(unit): [d, ...]}``."""
        directions: dict[int, list[Tensor]] = {}
        for bucket in self._buckets:
            members = [u for u in bucket.units if id(u) in live_ids]
            if not members:
                continue
            group = self.param_groups[bucket.group]
            if self._factor_due(bucket, members, refreshed):
                self._factor(bucket)
            rhs = bucket.fisher.new_empty(bucket.fisher.shape[0], bucket.block_size)
            for u in members:
                self._momentum_blocks(u, group, rhs[u.offset : u.offset + u.layout.num_blocks])
            solve = (
                SymmetricPacking.of(bucket.block_size, rhs.device).solve
                if self.storage == "packed"
                else solve_blocks
            )
            if len(members) == len(bucket.units):
                solved = solve(bucket.inverse, rhs)
                parts = [solved[u.offset : u.offset + u.layout.num_blocks] for u in members]
            else:
                parts = [
                    solve(u.inverse, rhs[u.offset : u.offset + u.layout.num_blocks])
                    for u in members
                ]
            for unit, part in zip(members, parts, strict=True):
                directions[id(unit)] = self._finish_direction(unit, part)
        return directions

    def _finish_direction(self, unit: Unit, solved: Tensor) -> list[Tensor]:
        """The unit's solved blocks as parameter-shaped directions, corrected and grafted.

        ``solved`` (the unit's ``(num_blocks, s)`` ``inverse`` times momentum) is scaled in place
        by the inverse's bias correction, or, with ``graft``, to the grafted step's block lengths.
        """
        if unit.graft_norms is not None:
            lengths = torch.linalg.vector_norm(solved, dim=1, keepdim=True)
            tiny = torch.finfo(solved.dtype).tiny
            solved.mul_(unit.graft_norms.unsqueeze(1) / lengths.clamp_min_(tiny))
            unit.graft_norms = None
        elif unit.inverse_scale != 1.0:
            solved.mul_(unit.inverse_scale)
        return unit.layout.from_blocks(solved)

    def _momentum_blocks(self, unit: Unit, group: dict[str, Any], out: Tensor) -> None:
        """Update the momentum of the unit's parameters and write it, as blocks, into ``out``.

        With ``graft``, also leave the per-block lengths of the grafted step (Adam's
        ``m_hat / (sqrt(v_hat) + eps)``, or the momentum itself) in ``unit.graft_norms``.
        """
        mu, wd = group["momentum"], group["weight_decay"]
        l2 = wd if (wd and not group["decoupled_weight_decay"]) else 0.0
        graft = group["graft"]
        bufs, adam_steps = [], []
        for p in unit.params:
            g = p.grad
            d = (
                torch.zeros(p.shape, dtype=unit.dtype, device=p.device)
                if g is None
                else g.to(unit.dtype)
            )
            if l2:
                d = d.add(p.to(unit.dtype), alpha=l2)
            state = self.state[p]
            if graft == "adam":
                sq = state.get("graft_sq")
                if sq is None:
                    sq = state["graft_sq"] = torch.zeros_like(d)
                    state["graft_steps"] = 0
                beta2 = group["graft_beta2"]
                sq.mul_(beta2).addcmul_(d, d, value=1.0 - beta2)
                state["graft_steps"] += 1
                denom = (sq / (1.0 - beta2 ** state["graft_steps"])).sqrt_()
                denom.add_(group["graft_eps"])
            if mu:
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.clone()
                    state["momentum_steps"] = 1
                else:
                    buf.mul_(mu).add_(d)
                    state["momentum_steps"] = state.get("momentum_steps", 0) + 1
                d = buf
            if graft == "adam":
                # Adam's bias-corrected first moment is (1 - mu) m / (1 - mu^t) of our heavy ball.
                first = (1.0 - mu) / (1.0 - mu ** state["momentum_steps"]) if mu else 1.0
                adam_steps.append(d.mul(first).div_(denom))
            bufs.append(d)
        unit.layout.to_blocks(bufs, out=out)
        if graft == "adam":
            steps = unit.layout.to_blocks(adam_steps)
            unit.graft_norms = torch.linalg.vector_norm(steps, dim=1)
        elif graft == "sgd":
            unit.graft_norms = torch.linalg.vector_norm(out, dim=1)
        else:
            unit.graft_norms = None

    def _apply(
        self, live: list[tuple[Unit, list[Tensor]]], directions: dict[int, list[Tensor]]
    ) -> None:
        scale_of_group: dict[int, float] = {}
        for g, group in enumerate(self.param_groups):
            clip = group["kl_clip"]
            if clip is None:
                continue
            lr = float(group["lr"])
            wd = group["weight_decay"]
            l2 = wd if (wd and not group["decoupled_weight_decay"]) else 0.0
            terms = []
            for unit, _ in live:
                if unit.group != g:
                    continue
                for p, d in zip(unit.params, directions[id(unit)], strict=True):
                    # The vector that was preconditioned: the momentum buffer, or without
                    # momentum the gradient with its L2 term (as _momentum_blocks formed it).
                    # A buffer left from before momentum was set to 0 is stale: not used.
                    ref = self.state[p].get("momentum_buffer") if group["momentum"] else None
                    if ref is None and p.grad is not None:
                        ref = p.grad.to(d.dtype)
                        if l2:
                            ref = ref.add(p.to(d.dtype), alpha=l2)
                    if ref is not None:
                        terms.append(torch.vdot(d.reshape(-1), ref.to(d.dtype).reshape(-1)))
            # One host sync per group (a model may span devices: gather the terms on one).
            vg = float(torch.stack([t.to(terms[0].device) for t in terms]).sum()) if terms else 0.0
            scale_of_group[g] = (
                min(1.0, math.sqrt(clip / (lr * lr * vg))) if vg > 0 and lr > 0 else 1.0
            )

        for unit, _ in live:
            group = self.param_groups[unit.group]
            lr = group["lr"]
            wd = group["weight_decay"]
            scale = scale_of_group.get(unit.group, 1.0)
            for p, d in zip(unit.params, directions[id(unit)], strict=True):
                if p.grad is None:
                    continue
                if wd and group["decoupled_weight_decay"]:
                    p.mul_(1.0 - lr * wd)
                p.add_(d.to(p.dtype), alpha=-lr * scale)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The usual optimizer state plus curvature (statistics, inverses) and counters.

        With several ranks, call [`consolidate_state_dict`][mbf.MBF.consolidate_state_dict] on
        every rank first.
        """
        if self._dist is not None:  # mbf.distributed: refuse a state dict with others' shares
            self._dist.check_consolidated(self)
        sd = super().state_dict()
        sd["mbf"] = {
            "version": 2,
            "storage": self.storage,
            "step": self._step_count,
            "counters": dict(self._counters),
            "units": [
                {
                    "name": u.name,
                    "num_blocks": u.layout.num_blocks,
                    "block_size": u.layout.block_size,
                    "fisher": u.fisher,
                    "inverse": u.inverse,
                    "stat_updates": u.stat_updates,
                    "stat_mass": u.stat_mass,
                    "inverse_scale": u.inverse_scale,
                    "queued": None
                    if u.queue is None or not u.queue_weights
                    else u.queue[:, : len(u.queue_weights)],
                    "queued_weights": list(u.queue_weights),
                }
                for u in self._units
            ],
            "factored": [b.factored for b in self._buckets],
        }
        return sd

    def __getstate__(self) -> dict[str, Any]:
        """Everything, for ``copy.deepcopy`` and pickling (``torch.Optimizer`` keeps only the
        param groups and momenta, which left a copy without its units).

        The copy carries the model the units were built from (``_model`` and each unit's
        module, with the per-example hooks registered on it), so ``deepcopy((model, opt))``
        gives an optimizer bound to the copied model, and ``deepcopy(opt)`` or a pickle gives
        one bound to its own copy of the model (reach it as the parameters in
        ``param_groups``). A data-parallel optimizer holds a process group and cannot be
        copied: save its :meth:`state_dict` instead.
        """
        if self.__dict__.get("_dist") is not None:
            raise TypeError(
                "MBF: a data-parallel optimizer holds a process group and cannot be copied or "
                "pickled; call consolidate_state_dict() and save state_dict() instead"
            )
        state = dict(self.__dict__)
        # An LR scheduler's wrapper of ``step`` on the instance: a local function that does not
        # pickle, and that torch drops as well; the copy steps with MBF.step itself.
        state.pop("step", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # torch's fix-ups of older states (hooks dicts, defaults)
        # Units view their bucket's tensors; pickle stores each view's storage apart, so the
        # buckets are rebuilt from the units' (equal) values and the views made again.
        factored = [b.factored for b in self._buckets]
        self._buckets = self._make_buckets(self._units)
        for bucket, was in zip(self._buckets, factored, strict=True):
            bucket.factored = was

    def consolidate_state_dict(self) -> None:
        """Gather every rank's share of the curvature, so that ``state_dict`` is complete.

        Data-parallel runs only (a no-op in one process). Every rank must call it, e.g. just
        before rank 0 saves; the state dict is then the one a single process would have, and
        loads on any number of ranks (see ``mbf.distributed``).
        """
        if self._dist is not None:
            self._dist.consolidate(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by [`state_dict`][mbf.MBF.state_dict] (on any device)."""
        sd = dict(state_dict)
        extra = sd.pop("mbf", None)
        if extra is None:
            raise ValueError(
                "MBF: this state dict holds no MBF curvature (saved by another optimizer?)"
            )
        backup = (
            [dict(g) for g in self.param_groups],
            {p: dict(v) for p, v in self.state.items()},
            self._units,
            self._buckets,
        )
        try:
            self._load(sd, extra)
        except Exception:
            # A state dict that does not fit leaves the optimizer exactly as it was.
            groups, state, self._units, self._buckets = backup
            for group, saved in zip(self.param_groups, groups, strict=True):
                group.clear()
                group.update(saved)
            self.state.clear()
            self.state.update(state)
            self._hooks.remove()
            self._hooks.add(self._units)
            self._schedule_collection()
            raise

    @staticmethod
    def _in_storage(unit: Unit, fisher: Tensor, inverse: Tensor) -> tuple[Tensor, Tensor]:
        """Saved curvature converted to this optimizer's storage (full <-> packed)."""
        size = unit.layout.block_size
        full_shape = fisher.dim() == 3 and fisher.shape[1:] == (size, size)
        packed_shape = fisher.dim() == 2 and fisher.shape[1] == packed_size(size)
        packing = SymmetricPacking.of(size, fisher.device)
        if unit.packed and full_shape:
            return packing.pack(fisher), packing.pack(inverse)
        if not unit.packed and packed_shape:
            return packing.unpack(fisher), packing.unpack(inverse)
        return fisher, inverse

    def _load(self, sd: dict[str, Any], extra: dict[str, Any]) -> None:
        saved_state = sd.get("state", {})
        super().load_state_dict(sd)
        for group in self.param_groups:
            _check_group(group)
        self._rebuild()
        # torch casts state to the parameter dtype; MBF keeps float32 state for half params.
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                for key, value in saved_state.get(index, {}).items():
                    if isinstance(value, Tensor):
                        value = value.to(device=p.device, dtype=state_dtype(p.dtype))
                        self.state[p][key] = value.clone()
                index += 1
        units = extra["units"]
        if len(units) != len(self._units):
            raise ValueError(
                f"MBF: the state dict has {len(units)} units, this optimizer {len(self._units)}: "
                "was it saved for another model or param grouping?"
            )
        for unit, saved in zip(self._units, units, strict=True):
            fisher, inverse = saved["fisher"], saved["inverse"]
            queued = saved.get("queued")
            weights = [float(w) for w in saved.get("queued_weights", [])]
            # A queue this optimizer cannot keep (shorter queue, packed storage, several ranks
            # that update statistics at once) is folded into the saved statistics first.
            keeps = self._dist is None and len(weights) <= unit.queue_capacity
            if queued is not None and not keeps:
                fisher = fisher.clone()
                _fold_rows(fisher, queued.clone(), weights)
                queued, weights = None, []
            fisher, inverse = self._in_storage(unit, fisher, inverse)
            if fisher.shape != unit.fisher.shape:
                raise ValueError(
                    f"MBF: unit {unit.name} was saved with blocks {tuple(saved['fisher'].shape)} "
                    f"but has {tuple(unit.fisher.shape)} here (saved for another model?)"
                )
            unit.fisher.copy_(fisher)
            unit.inverse.copy_(inverse)
            unit.stat_updates = int(saved["stat_updates"])
            # Saved before bias correction existed: the first estimate was taken as it is.
            unit.stat_mass = float(saved.get("stat_mass", 1.0 if unit.stat_updates else 0.0))
            unit.inverse_scale = float(saved.get("inverse_scale", 1.0))
            unit.queue_weights = []
            if queued is not None:
                unit.queue = unit.fisher.new_empty(
                    unit.layout.num_blocks, unit.queue_capacity, unit.layout.block_size
                )
                unit.queue[:, : len(weights)].copy_(queued)
                unit.queue_weights = weights
        for bucket, factored in zip(self._buckets, extra.get("factored", []), strict=False):
            bucket.factored = bool(factored)
        self._step_count = int(extra["step"])
        self._counters.update(extra["counters"])
        self._schedule_collection()
