"""Mixed precision: MBF under ``torch.amp.GradScaler``.

The gradients of a scaled loss are ``S`` times too large, and so are the output gradients that
the per-example hooks see: statistics built from them would be ``S^2`` too large and would jump
whenever the scaler changes ``S``. MBF therefore takes part in GradScaler's protocol for
optimizers that handle scaling themselves (``_step_supports_amp_scaling``): ``scaler.step(opt)``
always calls ``opt.step()``, with ``opt.grad_scale`` (the scale of the gradients, or ``None``
when ``scaler.unscale_(opt)`` has already unscaled them) and ``opt.found_inf`` set for the call.
MBF then

- skips the step (parameters and statistics untouched, counted in ``scaler_skipped_steps``)
  when the scaler found an inf or NaN, dropping that step's per-example statistics instead of
  mixing them into the next step's, as would happen if the step were simply not called;
- unscales the gradients itself when ``grad_scale`` is given, and divides the per-example
  statistics by ``grad_scale^2``;
- when the gradients were unscaled beforehand (``scaler.unscale_(opt)``, e.g. to clip them), the
  scale of the hooks' statistics is only known if the scaler was attached with
  :meth:`mbf.MBF.use_grad_scaler`: the hooks then read ``scaler.get_scale()`` once per backward
  pass. Without it, a per-example step raises rather than use statistics ``S^2`` too large.
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
