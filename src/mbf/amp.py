"""Mixed precision: MBF under ``torch.amp.GradScaler``.

The gradients of a scaled loss are ``S`` times too large, and so are the output gradients that
the per-example hooks see: statistics built from them would be ``S^2`` too large and would jump
whenever the scaler changes ``S``. (The ``batch`` estimator needs nothing: it reads the
gradients after the scaler has unscaled them.) Two ways to unscale the per-example statistics:

- **Automatic** (no scaler attached): MBF takes part in GradScaler's protocol for optimizers that
  handle scaling themselves (``_step_supports_amp_scaling``, true while per-example hooks are
  active). ``scaler.step(opt)`` then always calls ``opt.step()``, with ``opt.grad_scale`` (the
  gradients' scale, or ``None`` when ``scaler.unscale_(opt)`` has already unscaled them) and
  ``opt.found_inf`` set for the call. MBF skips the step when the scaler found an inf or NaN
  (parameters and statistics untouched, that step's statistics dropped, counted in
  ``scaler_skipped_steps``), and otherwise unscales the gradients and divides the statistics by
  ``grad_scale^2``. If the gradients were unscaled beforehand the scale of the statistics is
  unknown, and a per-example step raises rather than use them. Frameworks that clip after
  ``scaler.unscale_`` may also refuse clipping for such optimizers (Lightning does).
- **Attached** (:meth:`mbf.MBF.use_grad_scaler`), for loops that call ``scaler.unscale_(opt)``
  before ``step()``, e.g. to clip gradients (the Hugging Face Trainer, Lightning with
  ``gradient_clip_val``): the scaler unscales and skips as for any optimizer, and the hooks read
  ``scaler.get_scale()`` once per backward pass (a host sync on a GPU) and unscale each pass's
  statistics. A scale that changed without a step means the scaler skipped the iteration: its
  statistics are dropped at the next backward pass (and counted in ``scaler_skipped_steps``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ScalerSignal", "read_scaler_signal", "unscale_grads_"]


@dataclass(frozen=True)
class ScalerSignal:
    """What ``GradScaler.step`` told this ``step()`` call (nothing when called directly)."""

    present: bool = False  # step() was called by GradScaler.step
    found_inf: bool = False  # the scaler found a non-finite gradient: skip the step
    grad_scale: float | None = None  # the gradients' scale; None: unscaled already (or absent)


def read_scaler_signal(optimizer: Any) -> ScalerSignal:
    """Read the ``grad_scale`` and ``found_inf`` attributes GradScaler sets around ``step()``."""
    if not hasattr(optimizer, "found_inf"):
        return ScalerSignal()
    found_inf = optimizer.found_inf
    scale = getattr(optimizer, "grad_scale", None)
    return ScalerSignal(
        present=True,
        found_inf=bool(found_inf.item() if isinstance(found_inf, torch.Tensor) else found_inf),
        grad_scale=None if scale is None else float(scale),
    )


@torch.no_grad()
def unscale_grads_(param_groups: list[dict[str, Any]], scale: float) -> None:
    """Divide every parameter's gradient by ``scale`` in place, as ``scaler.unscale_`` would."""
    if scale == 1.0:
        return
    inverse = 1.0 / scale
    for group in param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.mul_(inverse)
