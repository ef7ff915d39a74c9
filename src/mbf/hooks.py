"""Forward hooks and output-gradient hooks that feed per-example statistics to units.

A forward hook on each served module keeps the module's input (only on steps that update the
statistics) and puts a tensor hook on the module's output; when autograd delivers the output
gradient, the block statistics are computed at once and the input is released. Tensor hooks on
outputs, unlike full module backward hooks, keep working with in-place activations.

Scaling: autograd delivers ``delta_i = c * dl_i/dout`` with ``c = 1/N`` for a mean-reduced loss and
``c = 1`` for a sum. The empirical Fisher ``(1/N) sum_i grad l_i grad l_i^T`` is therefore
``N * sum_i G_i G_i^T`` (mean) or ``(1/N) sum_i G_i G_i^T`` (sum), with ``G_i`` the per-example
parts of the batch gradient. Several backward passes in one step (gradient accumulation) are
averaged, weighted by their number of examples.
"""

from __future__ import annotations

import warnings
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .curvature import CONV_TYPES, Workspace, conv_block_stats, linear_block_stats
from .units import Unit

__all__ = ["PerExampleHooks"]


def _functorch_active() -> bool:
    probe = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(probe()) if probe is not None else False


class PerExampleHooks:
    """Owns the hooks of every module whose units use the per-example estimator."""

    def __init__(self, units: list[Unit], loss_reduction: str, chunk_elements: int) -> None:
        self.loss_reduction = loss_reduction
        self.chunk_elements = chunk_elements
        self._by_module: dict[nn.Module, list[Unit]] = {}
        self._handles: list[RemovableHandle] = []
        self._calls: dict[nn.Module, int] = {}
        self._warned_reuse = False
        self._workspace = Workspace()
        self.add(units)

    def add(self, units: list[Unit]) -> None:
        for unit in units:
            if not unit.per_example or unit.module is None:
                continue
            if unit.module not in self._by_module:
                self._by_module[unit.module] = []
                self._handles.append(unit.module.register_forward_hook(self._forward))
            self._by_module[unit.module].append(unit)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._by_module.clear()

    def new_step(self) -> None:
        self._calls.clear()

    def _forward(self, module: nn.Module, inputs: tuple, output: object) -> None:
        units = self._by_module.get(module, [])
        if not any(u.collect for u in units) or not torch.is_grad_enabled():
            return
        if _functorch_active():  # e.g. the user's own vmap/grad over the model: not a training pass
            return
        if not isinstance(output, Tensor) or not output.requires_grad or not inputs:
            return
        x = inputs[0]
        if not isinstance(x, Tensor):
            return
        self._calls[module] = self._calls.get(module, 0) + 1
        if self._calls[module] == 2 and not self._warned_reuse:
            self._warned_reuse = True
            warnings.warn(
                f"{type(module).__name__} was called more than once in one step; MBF treats each "
                "call's examples separately in its per-example statistics (an approximation).",
                stacklevel=2,
            )
        output.register_hook(partial(self._backward, module, x.detach()))

    def _backward(self, module: nn.Module, x: Tensor, grad: Tensor) -> None:
        units = [u for u in self._by_module.get(module, []) if u.collect]
        if not units:
            return
        dtype = units[0].dtype
        x, grad = x.to(dtype), grad.detach().to(dtype)
        n = x.shape[0]
        scale = float(n * n) if self.loss_reduction == "mean" else 1.0
        if isinstance(module, nn.Linear):
            stats = {
                units[0].role: linear_block_stats(
                    units[0].layout, x, grad, self.chunk_elements, self._workspace
                )
            }
        elif isinstance(module, CONV_TYPES):
            weight_unit = next(u for u in units if u.role == "conv_weight")
            bias_unit = next((u for u in units if u.role == "conv_bias"), None)
            w, b = conv_block_stats(
                module,
                weight_unit.layout,
                None if bias_unit is None else bias_unit.layout,
                x,
                grad,
                self.chunk_elements,
                self._workspace,
            )
            stats = {"conv_weight": w} if b is None else {"conv_weight": w, "conv_bias": b}
        else:  # pragma: no cover - only served types are hooked
            return
        for unit in units:
            value = stats[unit.role]
            if unit.pending is None:
                unit.pending = value.mul_(scale)
            else:
                unit.pending.add_(value, alpha=scale)
            unit.pending_count += n
