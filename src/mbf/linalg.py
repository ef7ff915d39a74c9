"""Batched damped factorization and solves, with failure handling that never produces NaN.

Every block is represented by a lower Cholesky factor ``L`` with ``L L^T = F + damping * I``.
A block whose factorization fails is retried with ten times the damping, then a hundred, then a
thousand, in float64; what still fails (a block with NaN entries, say) is given the factor
``sqrt(damping) * I``, i.e. the preconditioner ``(1 / damping) I``. Failures are counted, so they
are visible to the user instead of hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FactorReport", "damped_cholesky", "solve_blocks", "symmetric_outer"]

RETRY_FACTORS = (10.0, 100.0, 1000.0)


@dataclass
class FactorReport:
    """What happened in one batched factorization."""

    blocks: int = 0
    retried: int = 0
    fallback: int = 0
    nonfinite: int = 0


def _identity_like(matrix: Tensor) -> Tensor:
    return torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)


def _retry_damping(fisher: Tensor, damping: float) -> float:
    """A positive base for retries, also when the user's damping is zero."""
    if damping > 0:
        return damping
    scale = fisher.diagonal(dim1=-2, dim2=-1).abs().mean().item() if fisher.numel() else 0.0
    return max(scale, 1.0) * 1e-6


def damped_cholesky(fisher: Tensor, damping: float) -> tuple[Tensor, FactorReport]:
    """Cholesky factors of ``fisher + damping * I`` for a ``(B, s, s)`` stack of blocks.

    ``fisher`` is not modified. Returns factors of the same dtype as ``fisher`` and a report.
    """
    report = FactorReport(blocks=fisher.shape[0])
    if fisher.shape[0] == 0:
        return fisher.clone(), report
    eye = _identity_like(fisher)
    factor, info = torch.linalg.cholesky_ex(fisher + damping * eye)
    bad = (info != 0) | ~torch.isfinite(factor).all(dim=(-2, -1))
    if not bool(bad.any()):
        return factor, report

    idx = bad.nonzero().squeeze(-1)
    sub = fisher.index_select(0, idx).to(torch.float64)
    finite = torch.isfinite(sub).all(dim=(-2, -1))
    report.nonfinite = int((~finite).sum())
    sub = torch.where(
        finite[:, None, None], sub, torch.zeros((), dtype=sub.dtype, device=sub.device)
    )
    base = _retry_damping(sub, damping)
    eye64 = _identity_like(sub)
    fixed = torch.zeros_like(sub)
    done = torch.zeros(sub.shape[0], dtype=torch.bool, device=sub.device)
    for multiple in RETRY_FACTORS:
        trial, trial_info = torch.linalg.cholesky_ex(sub + (base * multiple) * eye64)
        ok = (trial_info == 0) & torch.isfinite(trial).all(dim=(-2, -1)) & finite & ~done
        fixed = torch.where(ok[:, None, None], trial, fixed)
        done |= ok
        if bool(done[finite].all()):
            break
    report.retried = int(done.sum())
    report.fallback = int((~done).sum())
    fallback_damping = damping if damping > 0 else base * RETRY_FACTORS[-1]
    fixed = torch.where(done[:, None, None], fixed, (fallback_damping**0.5) * eye64)
    factor = factor.index_copy(0, idx, fixed.to(factor.dtype))
    return factor, report


def solve_blocks(factor: Tensor, rhs: Tensor) -> Tensor:
    """Solve ``(L L^T) x = rhs`` for ``(B, s, s)`` factors and ``(B, s)`` right-hand sides."""
    return torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)


def symmetric_outer(vectors: Tensor) -> Tensor:
    """``v v^T`` for each row of a ``(..., B, s)`` tensor, giving ``(..., B, s, s)``."""
    return vectors.unsqueeze(-1) * vectors.unsqueeze(-2)
