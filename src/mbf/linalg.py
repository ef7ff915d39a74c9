"""Batched damped inverses and solves, with failure handling that never produces NaN.

Every block's preconditioner is the explicit inverse ``(F + damping * I)^-1``, computed through a
batched Cholesky factorization every ``inv_every`` steps. Keeping the inverse rather than the
factor makes every step's solve one batched matrix-vector product, which on CPU is about three
times faster than batched triangular solves (``docs/decisions.md``). A block whose factorization
fails is retried with ten times the damping, then a hundred, then a thousand, in float64; what
still fails (a block with NaN entries, say) gets ``(1 / damping) I``. Failures are counted, so they
are visible to the user instead of hidden.

On the CPU, torch's batched Cholesky calls LAPACK once per block in a serial loop, so a second
thread does not help it (with 2 threads it ran 1.0x on blocks of 32, 0.3x on blocks of 64). With
``torch.get_num_threads() > 1`` the batch is cut into one contiguous part per thread and the
parts run in a thread pool (torch releases the GIL): each block's result is bitwise the same,
because LAPACK factors every block alone either way (``docs/decisions.md``, "Threads").
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FactorReport", "as_rows", "damped_inverse", "damped_inverse_root", "solve_blocks"]

RETRY_FACTORS = (10.0, 100.0, 1000.0)

#: Fewest blocks per thread worth a part of their own (a part costs a task hand-off, ~20 us).
MIN_BLOCKS_PER_THREAD = 256

_POOL_NAME = "mbf-linalg"
_pool: tuple[ThreadPoolExecutor, int] | None = None  # the pool and its number of workers
_pool_lock = threading.Lock()


def _worker_pool(threads: int) -> ThreadPoolExecutor:
    """One process-wide pool, replaced by a larger one when more threads are asked for."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[1] < threads:
            old = _pool
            _pool = (ThreadPoolExecutor(threads, thread_name_prefix=_POOL_NAME), threads)
            if old is not None:
                old[0].shutdown(wait=False)
        return _pool[0]


def in_parts(fn: Callable[..., object], *tensors: Tensor) -> None:
    """``fn(*tensors)``, or ``fn`` on contiguous slices along dim 0, one per torch thread, at
    once: for per-block work (each block's result independent of the others, so the same bits).

    Parts only on the CPU, with ``torch.get_num_threads() > 1`` and at least
    :data:`MIN_BLOCKS_PER_THREAD` blocks per part; otherwise one call, as before.
    """
    count = tensors[0].shape[0]
    threads = min(torch.get_num_threads(), count // MIN_BLOCKS_PER_THREAD)
    nested = threading.current_thread().name.startswith(_POOL_NAME)
    if threads <= 1 or tensors[0].device.type != "cpu" or nested:
        fn(*tensors)
        return
    bounds = [count * k // threads for k in range(threads + 1)]
    pool = _worker_pool(threads)
    futures = [
        pool.submit(fn, *(t[lo:hi] for t in tensors))
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    for future in futures:
        future.result()  # re-raises a part's exception here


@dataclass
class FactorReport:
    """What happened in one batched factorization."""

    blocks: int = 0
    retried: int = 0
    fallback: int = 0
    nonfinite: int = 0

    def add(self, other: FactorReport) -> None:
        """Count ``other``'s blocks in this report (factorizations done in parts)."""
        self.blocks += other.blocks
        self.retried += other.retried
        self.fallback += other.fallback
        self.nonfinite += other.nonfinite


def _identity_like(matrix: Tensor) -> Tensor:
    return torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)


def _retry_damping(fisher: Tensor, damping: float | Tensor) -> Tensor:
    """Per block, a positive base for retries, also where the damping is zero."""
    scale = fisher.diagonal(dim1=-2, dim2=-1).abs().mean() if fisher.numel() else 0.0
    floor = max(float(scale), 1.0) * 1e-6
    given = torch.as_tensor(damping, dtype=fisher.dtype, device=fisher.device)
    return torch.where(given > 0, given, floor).expand(fisher.shape[0])


def damped_inverse(
    fisher: Tensor, damping: float | Tensor, out: Tensor | None = None, root: int = 1
) -> tuple[Tensor, FactorReport]:
    """``(fisher + damping * I)^-1`` for a ``(B, s, s)`` stack of symmetric blocks.

    ``damping``: one number, or a ``(B,)`` tensor with each block's own. ``root=2`` gives
    the inverse square root ``(fisher + damping * I)^-1/2`` instead
    (:func:`damped_inverse_root`).

    ``fisher`` is not modified. The inverses (symmetric, of ``fisher``'s dtype) are written into
    ``out`` when given (a ``(B, s, s)`` buffer, e.g. last time's inverses), else a new tensor.
    Returns them and a report.
    """
    if root == 2:
        return damped_inverse_root(fisher, damping, out=out)
    if root != 1:
        raise ValueError(f"damped_inverse: root must be 1 or 2, got {root!r}")
    factor, report = damped_cholesky(fisher, damping, out=out)
    # The factor's column-major view is an upper factor: LAPACK then works in place, without
    # the two transposing copies that a row-major (B, s, s) input costs it.
    in_parts(_cholesky_inverse_, factor)
    return factor, report


def _cholesky_inverse_(factor: Tensor) -> None:
    """Lower factors to their inverses, in place (see :func:`damped_inverse`)."""
    torch.cholesky_inverse(factor.mT, upper=True, out=factor.mT)


def damped_inverse_root(
    fisher: Tensor, damping: float | Tensor, out: Tensor | None = None
) -> tuple[Tensor, FactorReport]:
    """``(fisher + damping * I)^-1/2`` for a ``(B, s, s)`` stack of symmetric PSD blocks.

    Through a batched eigendecomposition (about four times the cost of the Cholesky inverse on
    CPU for blocks of 32). Eigenvalues are floored at the block's damping (their exact lower
    bound; rounding can put them just below), or, without damping, at ``eps`` times the
    block's largest. Blocks with a non-finite entry are counted and treated as zero statistics
    (the damping alone). ``fisher`` is not modified; the result goes into ``out`` when given.
    """
    report = FactorReport(blocks=fisher.shape[0])
    result = torch.empty_like(fisher) if out is None else out
    if fisher.shape[0] == 0:
        return result, report
    finite = torch.isfinite(fisher).all(dim=(-2, -1))
    report.nonfinite = int((~finite).sum())
    damped = torch.where(finite[:, None, None], fisher, torch.zeros((), dtype=fisher.dtype,
                                                                    device=fisher.device))
    per_block = torch.as_tensor(damping, dtype=fisher.dtype, device=fisher.device)
    per_block = per_block.expand(fisher.shape[0])
    damped = damped + per_block[:, None, None] * _identity_like(fisher)
    values, vectors = torch.linalg.eigh(damped)
    info = torch.finfo(fisher.dtype)
    floor = torch.where(
        per_block > 0, per_block, (values.amax(-1) * info.eps).clamp_min(info.tiny)
    )
    scales = values.clamp_min(floor[:, None]).rsqrt()
    torch.matmul(vectors * scales.unsqueeze(-2), vectors.mT, out=result)
    return result, report


def damped_cholesky(
    fisher: Tensor, damping: float | Tensor, out: Tensor | None = None
) -> tuple[Tensor, FactorReport]:
    """Lower Cholesky factors of ``fisher + damping * I``, with retries and fallbacks.

    ``fisher`` must be symmetric; it is not modified. ``damping``: one number, or a ``(B,)``
    tensor with each block's own. The factors go into ``out`` when given.
    """
    report = FactorReport(blocks=fisher.shape[0])
    factor = torch.empty_like(fisher) if out is None else out
    if fisher.shape[0] == 0:
        return factor, report
    factor.copy_(fisher)
    if isinstance(damping, Tensor):
        factor.diagonal(dim1=-2, dim2=-1).add_(damping.to(factor.dtype).unsqueeze(-1))
    else:
        factor.diagonal(dim1=-2, dim2=-1).add_(damping)
    # For a symmetric matrix the transposed view holds the same numbers in column-major order,
    # which is LAPACK's: the upper factor of that view is our lower factor, computed in place.
    info = torch.empty(fisher.shape[0], dtype=torch.int32, device=fisher.device)
    in_parts(_cholesky_, factor, info)
    # A NaN or infinity anywhere in a block's lower triangle reaches a later diagonal entry.
    bad = (info != 0) | ~torch.isfinite(factor.diagonal(dim1=-2, dim2=-1)).all(dim=-1)
    if not bool(bad.any()):
        return factor, report

    idx = bad.nonzero().squeeze(-1)
    sub = fisher.index_select(0, idx).to(torch.float64)
    finite = torch.isfinite(sub).all(dim=(-2, -1))
    report.nonfinite = int((~finite).sum())
    sub = torch.where(
        finite[:, None, None], sub, torch.zeros((), dtype=sub.dtype, device=sub.device)
    )
    given = damping.index_select(0, idx) if isinstance(damping, Tensor) else damping
    base = _retry_damping(sub, given)[:, None, None]
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
    given64 = torch.as_tensor(given, dtype=sub.dtype, device=sub.device)
    fallback = torch.where(given64 > 0, given64, base[:, 0, 0] * RETRY_FACTORS[-1])
    fallback = fallback.expand(sub.shape[0])[:, None, None]
    fixed = torch.where(done[:, None, None], fixed, fallback.sqrt() * eye64)
    factor.index_copy_(0, idx, fixed.to(factor.dtype))
    return factor, report


def _cholesky_(factor: Tensor, info: Tensor) -> None:
    """Damped blocks to their lower factors, in place, LAPACK's status per block in ``info``."""
    torch.linalg.cholesky_ex(factor.mT, upper=True, out=(factor.mT, info))


def as_rows(rhs: Tensor) -> Tensor:
    """Right-hand sides as ``(B, rows, s)`` row vectors for a batched product with ``(B, s, s)``
    blocks: ``(B, s)`` ones as a ``(B, 1, s)`` view, tied rows' ``(B, T, s)`` as they are."""
    return rhs if rhs.dim() == 3 else rhs.unsqueeze(1)


def solve_blocks(inverse: Tensor, rhs: Tensor) -> Tensor:
    """Apply ``(B, s, s)`` symmetric inverses to ``(B, s)`` right-hand sides, or each inverse
    to the ``T`` rows of ``(B, T, s)`` ones (tied rows, :mod:`mbf.tied`).

    Computed as the row vectors ``rhs^T inverse`` (equal, by symmetry): on CPU that batched
    product runs at memory speed, about 4.7x faster than ``inverse @ rhs`` as column vectors.
    """
    solved = torch.bmm(as_rows(rhs), inverse)
    return solved if rhs.dim() == 3 else solved.squeeze(1)
