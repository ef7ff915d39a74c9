"""Pieces shared by the baseline optimizers written here (KFAC, Shampoo, TNT).

All of them follow the update of the MBF paper's experiment framework (the TNT / K-BFGS code of
the same authors), so that MBF and the baselines differ only in their preconditioner::

    m <- momentum * m + (g + weight_decay * theta)      (L2 decay, the default)
    d  = P(m)                                           (the method's preconditioner)
    theta <- theta - lr * d   [- lr * weight_decay * theta when decoupled]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def check_common(owner: str, group: dict[str, Any]) -> None:
    """Raise a ``ValueError`` naming ``owner`` for a bad shared hyperparameter in ``group``."""

    def bad(msg: str) -> ValueError:
        return ValueError(f"{owner}: {msg}")

    lr = float(group["lr"])
    if not (lr >= 0.0 and math.isfinite(lr)):
        raise bad(f"lr must be a finite number >= 0, got {group['lr']!r}")
    if not (0.0 <= group["momentum"] < 1.0):
        raise bad(f"momentum must be in [0, 1), got {group['momentum']!r}")
    if not (group["damping"] >= 0.0 and math.isfinite(group["damping"])):
        raise bad(f"damping must be a finite number >= 0, got {group['damping']!r}")
    if not (0.0 <= group["stat_decay"] < 1.0):
        raise bad(f"stat_decay must be in [0, 1), got {group['stat_decay']!r}")
    for key in ("stat_every", "inv_every"):
        value = group[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise bad(f"{key} must be a positive integer, got {value!r}")
    if not (group["weight_decay"] >= 0.0):
        raise bad(f"weight_decay must be >= 0, got {group['weight_decay']!r}")


def momentum_of(state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> Tensor:
    """Update and return the heavy-ball buffer ``m = momentum * m + (g + l2 * theta)`` of ``p``."""
    assert p.grad is not None
    d = p.grad
    wd = group["weight_decay"]
    if wd and not group["decoupled_weight_decay"]:
        d = d.add(p, alpha=wd)
    mu = group["momentum"]
    if not mu:
        return d
    buf = state.get("momentum_buffer")
    if buf is None:
        buf = state["momentum_buffer"] = d.clone()
    else:
        buf.mul_(mu).add_(d)
    return buf


def apply_update(p: Tensor, direction: Tensor, group: dict[str, Any]) -> None:
    """``theta <- theta - lr * d``, with decoupled weight decay first when asked for."""
    lr, wd = group["lr"], group["weight_decay"]
    if wd and group["decoupled_weight_decay"]:
        p.mul_(1.0 - lr * wd)
    p.add_(direction.to(p.dtype), alpha=-lr)


def all_finite(*tensors: Tensor) -> bool:
    """Whether every entry is finite, with one reduction per tensor (NaN and inf survive a sum)."""
    return all(bool(torch.isfinite(t.sum())) for t in tensors)


def inverse_with_damping(matrix: Tensor, damping: float) -> Tensor:
    """``(matrix + damping * I)^-1`` of a symmetric PSD matrix, never NaN: the inverse alone.

    (Unlike :func:`mbf.linalg.damped_inverse`, which returns the inverse with a factorization
    report, the baselines need only the matrix; hence the different name.)

    Cholesky first; if it fails (indefinite from rounding, or zero damping), an eigendecomposition
    in float64 with eigenvalues clamped at zero; a matrix with non-finite entries gives
    ``I / damping`` (or ``I`` when ``damping`` is zero).
    """
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    factor, info = torch.linalg.cholesky_ex(matrix + damping * eye)
    if int(info) == 0:
        inverse = torch.cholesky_solve(eye, factor)  # about 4x faster than cholesky_inverse on CPU
        if all_finite(inverse):
            return inverse
    return damped_power(matrix, damping, -1.0)


def _psd_eigen(sym: Tensor) -> tuple[Tensor, Tensor] | None:
    """Eigenvalues and vectors of a symmetric PSD matrix, or None if every method failed.

    LAPACK's ``syevd`` can fail on the nearly low-rank statistics these methods build: it raises
    for some matrices and, in float32 on CPU, silently returns NaN for others (seen with a
    500 x 500 bias statistic of rank 255). So: eigh in the input dtype, then in float64, then an
    SVD in float64 (for a PSD matrix its singular triplets are the eigenpairs), each checked.
    """
    attempts: list[Callable[[], tuple[Tensor, Tensor]]] = [
        lambda: torch.linalg.eigh(sym),
        lambda: torch.linalg.eigh(sym.to(torch.float64)),
    ]

    def by_svd() -> tuple[Tensor, Tensor]:
        u, s, _ = torch.linalg.svd(sym.to(torch.float64))
        return s, u

    attempts.append(by_svd)
    for attempt in attempts:
        try:
            vals, vecs = attempt()
        except torch.linalg.LinAlgError:
            continue
        if bool(torch.isfinite(vals).all()) and bool(torch.isfinite(vecs).all()):
            return vals, vecs
    return None


def damped_power(matrix: Tensor, damping: float, power: float) -> Tensor:
    """``(matrix + damping * I)^power`` of a symmetric PSD matrix by eigendecomposition.

    Eigenvalues are clamped at zero before the damping is added (rounding can make them slightly
    negative). A matrix with non-finite entries, or one no method can decompose, gives
    ``(damping or 1) ** power * I``, so a bad statistic never turns into NaN parameters.
    """
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    fallback = eye * (damping if damping > 0 else 1.0) ** power
    if not bool(torch.isfinite(matrix).all()):
        return fallback
    found = _psd_eigen(0.5 * (matrix + matrix.T))
    if found is None:
        return fallback
    vals, vecs = found
    vals = vals.clamp_min(0.0) + damping
    scaled = vals.clamp_min(torch.finfo(vals.dtype).tiny).pow(power)
    return ((vecs * scaled) @ vecs.T).to(matrix.dtype)
