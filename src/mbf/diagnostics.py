"""Figures of an MBF run that a logger takes as they are (:meth:`mbf.MBF.diagnostics`).

One flat ``{name: float}`` dict, names joined with ``/`` so that TensorBoard, Weights & Biases or
a CSV logger group them:

- ``steps``, ``skipped_steps`` (non-finite gradients), ``scaler_skipped_steps`` (steps a
  ``torch.amp.GradScaler`` found non-finite), ``factorizations``: counts since construction;
- ``retried_block_fraction``, ``fallback_block_fraction``, ``nonfinite_block_fraction``: of all
  blocks factored so far, the fraction that needed a retry with more damping or float64, that
  fell back to ``(1/damping) I``, or whose statistics were not finite;
- ``seconds/statistics``, ``seconds/factorization``: host wall-clock seconds spent updating the
  curvature statistics and factoring the damped blocks since construction (on a GPU, kernels
  run asynchronously: these then count launch time, not device time, unless the device is
  synchronized around ``step()``);
- ``group{g}/damping``, ``group{g}/lr``: each param group's current values;
- ``group{g}/step_to_grad_norm``: ``|d| / |g|`` at the latest step, with ``d`` the preconditioned
  direction (``(F + damping I)^-1`` times the momentum, before the learning rate and the
  ``kl_clip`` scale) and ``g`` the gradient, over the group's parameters. Without momentum it
  lies between ``1 / (damping + largest curvature)`` and ``1 / damping``; near ``1 / damping``
  the damping dominates the curvature and MBF steps like SGD at ``lr / damping``.

The norms are kept as tensors at each step and read (one host sync) only when
:meth:`mbf.MBF.diagnostics` is called.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ._compat import foreach

__all__ = ["Diagnostics"]


class Diagnostics:
    """Timers and the latest step's norms of one optimizer."""

    def __init__(self) -> None:
        self.seconds = {"statistics": 0.0, "factorization": 0.0}
        # group -> (sum of squares of d, sum of squares of g), as 0-d tensors (no host sync)
        self._norms: dict[int, tuple[Tensor, Tensor]] = {}

    @contextmanager
    def timed(self, what: str) -> Iterator[None]:
        """Add the wall-clock time of the ``with`` body to ``seconds[what]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[what] += time.perf_counter() - start

    def record_step(
        self, live: list[tuple[Any, list[Tensor]]], directions: dict[int, list[Tensor]]
    ) -> None:
        """Keep the squared norms of each group's directions and gradients of this step."""
        tensors: dict[int, tuple[list[Tensor], list[Tensor]]] = {}
        for unit, grads in live:
            ds, gs = tensors.setdefault(unit.group, ([], []))
            ds.extend(directions[id(unit)])
            gs.extend(grads)
        self._norms = {
            group: (_sum_of_squares(ds), _sum_of_squares(gs))
            for group, (ds, gs) in tensors.items()
        }

    def report(
        self, counters: dict[str, int], param_groups: list[dict[str, Any]]
    ) -> dict[str, float]:
        """The flat dict described in the module docstring."""
        out: dict[str, float] = {
            key: float(counters.get(key, 0))
            for key in ("steps", "skipped_steps", "scaler_skipped_steps", "factorizations")
        }
        factored = counters.get("factored_blocks", 0)
        for kind in ("retried", "fallback", "nonfinite"):
            count = counters.get(f"{kind}_blocks", 0)
            out[f"{kind}_block_fraction"] = count / factored if factored else 0.0
        for what, seconds in self.seconds.items():
            out[f"seconds/{what}"] = seconds
        for g, group in enumerate(param_groups):
            out[f"group{g}/damping"] = float(group["damping"])
            out[f"group{g}/lr"] = float(group["lr"])
            if g in self._norms:
                d_sq, g_sq = (float(t) for t in self._norms[g])
                out[f"group{g}/step_to_grad_norm"] = (
                    (d_sq / g_sq) ** 0.5 if g_sq > 0 else float("nan")
                )
        return out


@torch.no_grad()
def _sum_of_squares(tensors: list[Tensor]) -> Tensor:
    """``sum |t|^2`` over tensors (float32 or wider: MBF's state dtype) that may live on several
    devices, as a 0-d tensor of the first one's dtype and device; no temporary as large as a
    tensor, no host sync."""
    norms = _NORMS(tensors)  # one call for all (``mbf._compat.foreach``)
    return torch.stack([n.to(norms[0]) for n in norms]).square().sum()


_NORMS = foreach("norm")
