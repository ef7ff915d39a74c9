"""The output side of a tied layer (MBF's ``two_sided``): blocks over chunks of its rows.

With tied rows (:mod:`mbf.tied`) a layer's direction is ``M R_c^-1`` per column chunk ``c`` of
its ``T x W`` row matrix (a Linear layer's ``out x (in + 1)``, a convolution's output channels by
their kernels): the input side is preconditioned, and the rows are never mixed. ``two_sided``
adds the output side, the same way: one ``s x s`` block per chunk ``r`` of the rows, estimated
from every column, ``L_r = EMA(G_r G_r^T / W)``, and the direction
``L_r^-1 (M R_c^-1)`` (``inverse_root=2``: both roots), before the graft sets each (row, chunk)
piece's length. Together the two are a block-diagonal Kronecker-factored curvature, as K-FAC's
(both factors inverted), estimated from the gradient; a screen found it 0.07 nats better than
the input side alone on a small GPT (``benchmarks/two_sided/``).

The output side's statistics come from the minibatch gradient (the ``batch`` estimator)
whichever estimator the input side uses, are kept in float32 or wider whatever
``curvature_dtype`` says, and live in the optimizer's per-parameter state of the layer's first
parameter (``"output_side"``), so they checkpoint with ``torch.optim``'s state. Every rank
holds and factors them whole (they are ``2 s T`` numbers per layer): data-parallel ranks
compute the same ones from the same gradient. FSDP2 models, whose ranks hold some rows each,
are refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .blocks import chunk_plan
from .linalg import FactorReport, damped_inverse
from .store import relative_damping, running_weight
from .units import Unit

__all__ = ["OutputSide", "output_side"]

KEY = "output_side"


class OutputSide:
    """One tied unit's output-side blocks, over its state dict entry (see the module
    docstring). ``rows``: the unit's ``T``, cut as a row of ``T`` entries would be
    (:func:`mbf.blocks.chunk_plan` with the group's ``max_block_size``); ``size``: rows per
    chunk (the last chunk padded with zero rows)."""

    def __init__(self, unit: Unit, state: dict[str, Any], max_block_size: int) -> None:
        self.rows = unit.tied
        self.columns = unit.layout.numel // self.rows  # without padding
        self.chunks, self.size = chunk_plan(self.rows, max_block_size)
        self.state = state

    @property
    def padded_rows(self) -> int:
        return self.chunks * self.size

    def _fresh(self, like: Tensor) -> None:
        shape = (self.chunks, self.size, self.size)
        self.state.update(fisher=like.new_zeros(shape), inverse=like.new_zeros(shape),
                          stat_updates=0, stat_mass=0.0, inverse_scale=1.0)

    def _by_chunk(self, blocks: Tensor) -> Tensor:
        """A unit's ``(num_blocks, s)`` blocks in row order as ``(chunks, size, W')``, the rows
        padded with zeros to whole chunks (``W'`` the padded row length)."""
        matrix = blocks.reshape(self.rows, -1)
        if self.padded_rows != self.rows:
            matrix = torch.cat([matrix, matrix.new_zeros(self.padded_rows - self.rows,
                                                         matrix.shape[1])])
        return matrix.view(self.chunks, self.size, -1)

    def absorb(self, grad_blocks: Tensor, group: dict[str, Any]) -> None:
        """Blend ``G_r G_r^T / W`` of this step's gradient blocks into the statistics, with
        the running average and bias correction of the unit's own (``mbf.store``)."""
        if "fisher" not in self.state:
            self._fresh(grad_blocks)
        rows = self._by_chunk(grad_blocks)
        estimate = torch.bmm(rows, rows.mT).div_(self.columns)
        weight, self.state["stat_mass"] = running_weight(self.state["stat_updates"],
                                                         self.state["stat_mass"], group)
        self.state["fisher"].lerp_(estimate.to(self.state["fisher"].dtype), weight)
        self.state["stat_updates"] += 1

    def factor(self, group: dict[str, Any]) -> FactorReport:
        """The damped inverses of the corrected statistics, as the store factors its blocks:
        ``c (F + c damping I)^-1`` with ``c`` the running average's mass (kept as the scale),
        damping relative to each block's trace when the group says so."""
        if "fisher" not in self.state:
            return FactorReport()
        scale = self.state["stat_mass"] if self.state["stat_mass"] > 0 else 1.0
        root = group["inverse_root"]
        fisher = self.state["fisher"]
        damping: float | Tensor = group["damping"] * scale
        if group["relative_damping"]:
            trace = fisher.diagonal(dim1=-2, dim2=-1).sum(-1)
            damping = relative_damping(trace, self.size, group["damping"], scale)
        _, report = damped_inverse(fisher, damping, out=self.state["inverse"], root=root)
        self.state["inverse_scale"] = scale ** (1.0 / root)
        return report

    def apply(self, solved: Tensor) -> Tensor:
        """``L_r^-1`` (its root) applied to the unit's input-side-solved ``(num_blocks, s)``
        blocks in row order; a new tensor of the same shape."""
        if "fisher" not in self.state or self.state["stat_updates"] == 0:
            return solved
        rows = self._by_chunk(solved)
        mixed = torch.bmm(self.state["inverse"].to(rows.dtype), rows)
        mixed.mul_(self.state["inverse_scale"])
        return mixed.reshape(self.padded_rows, -1)[: self.rows].reshape(solved.shape)


def output_side(unit: Unit, state: dict[str, Any], max_block_size: int) -> OutputSide:
    """The output side of ``unit`` over ``state`` (the per-parameter state of its first
    parameter), its entry created when missing."""
    return OutputSide(unit, state.setdefault(KEY, {}), max_block_size)
