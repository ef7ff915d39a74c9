"""Forward hooks and output-gradient hooks that feed per-example statistics to units.

A forward hook on each served module keeps the module's input (only on steps that update the
statistics) and puts a tensor hook on the module's output; when autograd delivers the output
gradient, the block statistics are computed at once and the input is released. Tensor hooks on
outputs, unlike full module backward hooks, keep working with in-place activations.

Scaling. Let ``G_i`` be example ``i``'s part of the gradient the optimizer steps on, summed over
every backward pass since the last step (gradient accumulation: ``k`` micro-batches, then one
step), and ``N`` the number of examples in all those passes. ``loss_reduction`` describes the
loss of that whole accumulated batch:

- ``"mean"``: the accumulated gradient is ``(1/N) sum_i grad l_i``, as when each micro-batch's
  mean loss is divided by ``k`` (Hugging Face's Trainer, Lightning, ``loss / k`` by hand) or a
  sum is divided by ``N``. Then ``grad l_i = N G_i`` and the empirical Fisher
  ``(1/N) sum_i grad l_i grad l_i^T`` is ``N sum_i G_i G_i^T``.
- ``"sum"``: the accumulated gradient is ``sum_i grad l_i`` (micro-batch sums, not divided), so
  ``grad l_i = G_i`` and the empirical Fisher is ``(1/N) sum_i G_i G_i^T``.

Neither needs ``k``, only ``N``: the hooks sum ``G_i G_i^T`` as autograd delivers them and count
each module's examples once per backward pass (the end of a pass is marked by an autograd
engine callback); :meth:`PerExampleHooks.finish` applies ``N`` at the step. With ``"mean"`` and
micro-batches of unequal sizes divided by ``k``, the accumulated gradient is not an exact mean
over examples, and neither are the statistics (each example weighted as its gradient is).

A module called several times in one backward pass (shared weights, a recurrent cell) has
``R > N`` rows: each call's rows are taken as separate examples, ``(N^2/R) sum_rows G G^T``
(``"mean"``) or ``(1/R) sum_rows G G^T`` (``"sum"``), which drops the cross terms between the
calls of one example (an approximation, warned about once).
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._compat import functorch_active, queue_engine_callback
from .amp import ScalerSignal
from .curvature import Workspace
from .layers import StatsContext, StatsFn, rule_for
from .tied import sum_shared
from .units import Unit

__all__ = ["PerExampleHooks"]


class PerExampleHooks:
    """Owns the hooks of every module whose units use the per-example estimator."""

    def __init__(self, units: list[Unit], loss_reduction: str, chunk_elements: int) -> None:
        self.loss_reduction = loss_reduction
        self.chunk_elements = chunk_elements
        self._by_module: dict[nn.Module, list[Unit]] = {}
        # The block_stats of each hooked module's rule, as found when it was hooked; kept by
        # remove(), so units built under a registration that has since ended keep their rule
        # when hooked again (a failed load_state_dict restoring the old units).
        self._stats_of: dict[nn.Module, StatsFn] = {}
        self._handles: list[RemovableHandle] = []
        self._warned_reuse = False
        # A torch.amp.GradScaler attached with MBF.use_grad_scaler (see mbf.amp), the
        # 1 / scale^2 of the running backward pass, the scale of the statistics pending since
        # the last step, and how many iterations the scaler skipped (their statistics dropped).
        self.grad_scaler: Any = None
        self._pass_unscale = 1.0
        self._pending_scale: float | None = None
        self.scaler_skips = 0
        # Backward passes: a counter, whether one is running, and each module's latest pass.
        self._pass = 0
        self._in_pass = False
        self._pass_of: dict[nn.Module, int] = {}
        self._workspace = Workspace()
        self.add(units)

    def add(self, units: list[Unit]) -> None:
        """Hook the modules of the units that use the per-example estimator, with the
        ``block_stats`` of the rule of the module's type (``mbf.layers``)."""
        for unit in units:
            if not unit.per_example or unit.module is None:
                continue
            if unit.module not in self._by_module:
                rule = rule_for(type(unit.module))
                if rule is not None and rule.block_stats is not None:
                    self._stats_of[unit.module] = rule.block_stats
                if unit.module not in self._stats_of:
                    continue
                self._by_module[unit.module] = []
                self._handles.append(unit.module.register_forward_hook(self._forward))
            self._by_module[unit.module].append(unit)

    @property
    def active(self) -> bool:
        """Whether any module is hooked."""
        return bool(self._by_module)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._by_module.clear()

    def new_step(self) -> None:
        """Forget the passes of the last step (their statistics were consumed or dropped)."""
        self._pass_of.clear()
        self._in_pass = False
        self._pending_scale = None

    def finish(self, units: list[Unit], scaler: ScalerSignal | None = None) -> None:
        """Turn the units' summed ``G_i G_i^T`` into sums whose mean over ``pending_count`` rows
        is the empirical Fisher (see the module docstring), unscaled when a GradScaler scaled
        the loss (:mod:`mbf.amp`); call once per step, before the statistics are read (and
        before they are summed over data-parallel ranks: each rank's gradients carry its own
        ``N``)."""
        pending = [u for u in units if u.pending is not None and u.pending_examples]
        factor = 1.0
        if scaler is not None and scaler.present and self.grad_scaler is None:
            if scaler.grad_scale is None and pending:
                raise RuntimeError(
                    "MBF: GradScaler.unscale_(optimizer) ran before step(), so the scale of the "
                    "per-example statistics (collected from scaled gradients) is unknown; call "
                    "optimizer.use_grad_scaler(scaler) once, before training"
                )
            if scaler.grad_scale is not None:
                factor = 1.0 / scaler.grad_scale**2
        for unit in pending:
            n = float(unit.pending_examples) if self.loss_reduction == "mean" else 1.0
            if n * n * factor != 1.0:
                assert unit.pending is not None
                unit.pending.mul_(n * n * factor)

    def _enter_pass(self) -> int:
        """The number of the backward pass now running (a new one after the last has ended)."""
        if not self._in_pass:
            self._pass += 1
            scaler = self.grad_scaler
            scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
            if self._pending_scale is not None and scale != self._pending_scale:
                # The scale changed without a step: the scaler skipped the last iteration (an
                # inf or NaN; it then lowers the scale). Its statistics must not enter the next.
                self._drop_pending()
                self.scaler_skips += 1
            self._pending_scale = scale
            self._pass_unscale = 1.0 / scale**2
            # Outside the engine (False), every call is a pass of its own.
            self._in_pass = queue_engine_callback(self._leave_pass)
        return self._pass

    def _drop_pending(self) -> None:
        for units in self._by_module.values():
            for unit in units:
                unit.clear_pending()
        self._pass_of.clear()

    def _leave_pass(self) -> None:
        self._in_pass = False

    def _forward(self, module: nn.Module, inputs: tuple, output: object) -> None:
        units = self._by_module.get(module, [])
        if not any(u.collect for u in units) or not torch.is_grad_enabled():
            return
        if functorch_active():  # e.g. the user's own vmap/grad over the model: not a training pass
            return
        if not isinstance(output, Tensor) or not output.requires_grad or not inputs:
            return
        x = inputs[0]
        if not isinstance(x, Tensor):
            return
        output.register_hook(partial(self._backward, module, x.detach()))

    def _backward(self, module: nn.Module, x: Tensor, grad: Tensor) -> None:
        hooked = self._by_module.get(module, [])
        units = [u for u in hooked if u.collect]
        if not units:
            return
        current = self._enter_pass()
        new_examples = self._pass_of.get(module) != current
        self._pass_of[module] = current
        if not new_examples and not self._warned_reuse:
            self._warned_reuse = True
            warnings.warn(
                f"{type(module).__name__} was called more than once in one backward pass; MBF "
                "treats each call's rows as separate examples in its per-example statistics "
                "(an approximation that drops the cross terms between calls).",
                stacklevel=2,
            )
        dtype = units[0].dtype
        x, grad = x.to(dtype), grad.detach().to(dtype)
        n = x.shape[0]
        layouts = [u.layout for u in hooked]
        tied = tuple(u.tied for u in hooked)
        context = StatsContext(self.chunk_elements, self._workspace, tied)
        stats = self._stats_of[module](module, layouts, x, grad, context)
        _check_stats(module, layouts, tied, stats)
        for unit, value in zip(hooked, stats, strict=True):
            if not unit.collect:
                continue
            if self._pass_unscale != 1.0:
                value.mul_(self._pass_unscale)
            if unit.tied > 1 and value.shape[0] != unit.curvature_blocks:
                value = sum_shared(value, unit.tied)  # every row's: the shared blocks' sums
            if unit.pending is None:
                unit.pending = value
            else:
                unit.pending.add_(value)
            unit.pending_count += n
            if new_examples:
                unit.pending_examples += n


def _check_stats(module: nn.Module, layouts: list, tied: tuple[int, ...], stats: object) -> None:
    """A clear error when a rule's ``block_stats`` returns what the units cannot take (every
    row's blocks, or for a tied layout the shared blocks' sums)."""
    where = f"MBF: the per-example statistics of {type(module).__name__} (its LayerRule)"
    if not isinstance(stats, (list, tuple)) or len(stats) != len(layouts):
        raise RuntimeError(f"{where} must be a list of {len(layouts)} tensors, got {stats!r}")
    for k, (value, layout, rows) in enumerate(zip(stats, layouts, tied, strict=True)):
        shape = (layout.num_blocks, layout.block_size, layout.block_size)
        shared = (layout.num_blocks // rows, *shape[1:])
        if not isinstance(value, Tensor) or tuple(value.shape) not in (shape, shared):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            wanted = f"{shape}" if rows == 1 else f"{shape} or, tied, {shared}"
            raise RuntimeError(f"{where}: entry {k} must have shape {wanted}, got {got}")
