"""Every private torch attribute the library touches, in one place.

Private names can move or vanish in any torch release. Each one is read here, once, with the
reason it is needed and what happens without it (a public fallback, or a clear error naming the
attribute), so that a torch upgrade that breaks one shows up in this file and its tests only.
No other module of ``mbf`` reads a private torch attribute; the benchmark package
``mbf_bench`` (its K-FAC baseline) reads them from here too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = [
    "NORM_BASES",
    "TorchFeatureMissing",
    "conv_padding",
    "conv_weight_grad",
    "foreach",
    "functorch_active",
    "queue_engine_callback",
]


class TorchFeatureMissing(RuntimeError):
    """A private torch feature that MBF needs is missing from this torch release."""


# --- affine norm layers ---------------------------------------------------------------------
# ``_NormBase`` is the common base of BatchNorm1d/2d/3d, SyncBatchNorm, the lazy BatchNorms and
# InstanceNorm1d/2d/3d: one entry of the layer registry then serves all of them (and user
# subclasses). Without it, the public classes are listed one by one.
PUBLIC_NORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LazyInstanceNorm1d,
    nn.LazyInstanceNorm2d,
    nn.LazyInstanceNorm3d,
)
"""The public classes derived from ``_NormBase`` (the fallback; a test keeps it complete)."""
_norm_base: Any = getattr(getattr(nn.modules, "batchnorm", None), "_NormBase", None)
NORM_BASES: tuple[type[nn.Module], ...] = (
    (_norm_base,) if isinstance(_norm_base, type) else PUBLIC_NORMS
)
"""Base classes of the BatchNorm / InstanceNorm family (torch's private ``_NormBase``)."""


# --- convolution padding --------------------------------------------------------------------
def _public_conv_padding(module: nn.Module) -> list[int]:
    """``F.pad`` amounts (last dimension first) from the module's public attributes."""
    pads: list[int] = []
    kernel: Any = module.kernel_size
    dilation: Any = module.dilation
    padding: Any = module.padding
    for dim in reversed(range(len(kernel))):
        if padding == "valid":
            lo = hi = 0
        elif padding == "same":
            total = int(dilation[dim]) * (int(kernel[dim]) - 1)
            lo, hi = total // 2, total - total // 2
        else:
            lo = hi = int(padding[dim])
        pads += [lo, hi]
    return pads


def conv_padding(module: nn.Module) -> list[int]:
    """The ``F.pad`` amounts (last dimension first) a ConvNd applies to its input.

    torch keeps them as ``_reversed_padding_repeated_twice``, which its own forward uses for
    non-zero padding modes; reading it keeps MBF's im2col padding identical to the layer's. If the
    attribute is gone, the same amounts are computed from the public ``padding``, ``kernel_size``
    and ``dilation`` (as torch documents ``padding="same"``).
    """
    private = getattr(module, "_reversed_padding_repeated_twice", None)
    if private is None:
        return _public_conv_padding(module)
    return [int(p) for p in private]


# --- per-example conv weight gradients ------------------------------------------------------
def conv_weight_grad(nd: int) -> Callable[..., torch.Tensor] | None:
    """``torch.nn.grad.conv{nd}d_weight``, or ``None`` where this torch lacks it.

    These helpers compute a convolution's weight gradient in one library call; MBF calls them with
    the batch as groups to get every example's gradient at once (``mbf.curvature``). They are not
    part of torch's documented API; without them the im2col route (public ops only) is used.
    """
    grad_module = getattr(nn, "grad", None)
    return getattr(grad_module, f"conv{nd}d_weight", None)


# --- autograd engine ------------------------------------------------------------------------
def queue_engine_callback(callback: Callable[[], None]) -> bool:
    """Run ``callback`` when the running backward pass ends; ``False`` outside a backward pass.

    The per-example hooks count each module's examples once per backward pass, so they must know
    when a pass ends; torch exposes this only as the private
    ``torch.autograd.Variable._execution_engine.queue_callback``. There is no public equivalent,
    so its absence is an error (``TorchFeatureMissing``), not a silent miscount.
    """
    engine = getattr(torch.autograd.Variable, "_execution_engine", None)
    queue = getattr(engine, "queue_callback", None)
    if queue is None:
        raise TorchFeatureMissing(
            "MBF: estimator='per_example' needs torch.autograd.Variable._execution_engine."
            f"queue_callback (to find the end of a backward pass), missing in torch "
            f"{torch.__version__}; use estimator='batch'"
        )
    try:
        queue(callback)
    except RuntimeError:  # not inside the engine: the caller treats the call as a pass of its own
        return False
    return True


def functorch_active() -> bool:
    """Whether a torch.func transform (``vmap``, ``grad``, ...) is running.

    The per-example hooks must not record the user's own ``torch.func`` calls over the model (they
    are not training passes); torch exposes the test only as the private
    ``torch._C._are_functorch_transforms_active``. Without it, nothing is skipped (``False``).
    """
    probe = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(probe()) if probe is not None else False


# --- elementwise work over lists of tensors ---------------------------------------------------
def _mul_(tensors: list[torch.Tensor], scalar: float) -> None:
    for t in tensors:
        t.mul_(scalar)


def _add_(tensors: list[torch.Tensor], other: list[torch.Tensor] | float) -> None:
    for k, t in enumerate(tensors):
        t.add_(other[k] if isinstance(other, list) else other)


def _addcmul_(tensors: list[torch.Tensor], left: list[torch.Tensor],
              right: list[torch.Tensor], value: float) -> None:
    for t, a, b in zip(tensors, left, right, strict=True):
        t.addcmul_(a, b, value=value)


def _sqrt(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.sqrt(t) for t in tensors]


def _div(tensors: list[torch.Tensor], others: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.div(t, o) for t, o in zip(tensors, others, strict=True)]


def _norm(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.linalg.vector_norm(t) for t in tensors]


_PER_TENSOR: dict[str, Callable[..., Any]] = {
    "mul_": _mul_, "add_": _add_, "addcmul_": _addcmul_, "sqrt": _sqrt, "div": _div,
    "norm": _norm,
}


def foreach(name: str, private: bool = True) -> Callable[..., Any]:
    """``torch._foreach_<name>`` for ``name`` in ``mul_``, ``add_``, ``addcmul_``, ``sqrt``,
    ``div``, ``norm``; its per-tensor form where a torch release lacks it (or with
    ``private=False``).

    The step advances Adam's moments of all parameters at once with these
    (``mbf.direction.advance_moments``): one call each instead of one per parameter, which on a
    small transformer was most of the vector phase's time. They are private; without them the
    step takes the per-tensor form: the same operations one tensor at a time, so the same
    results (on the CPU torch's own loop does exactly that), with the per-call cost back.
    ``norm`` serves the diagnostics' norms of every step (``mbf.diagnostics``).
    """
    found = getattr(torch, f"_foreach_{name}", None) if private else None
    return found if callable(found) else _PER_TENSOR[name]
