"""Symmetric blocks stored as their upper triangles: MBF's ``storage="packed"``.

A ``(B, s, s)`` stack of symmetric blocks holds ``s(s+1)/2`` distinct numbers per block; storing
only those (a ``(B, s(s+1)/2)`` tensor) nearly halves the memory of the running-average statistics
and of the inverses. Everything that needs whole blocks (the factorization, the solve) unpacks a
few thousand blocks at a time into a reused buffer that stays in cache, so the extra memory is a
fixed workspace, not a second copy of the state. Triangles kept in a 16-bit dtype are widened
to float32 a chunk at a time (every sum, fold and factorization in float32, rounded once).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
from torch import Tensor

from .linalg import FactorReport, as_rows, damped_inverse

__all__ = ["CHUNK_BLOCKS", "SymmetricPacking", "packed_size", "rounding_damping"]

#: Blocks unpacked at once for a solve or a factorization (~1-4 MB of workspace at s = 9-32).
CHUNK_BLOCKS = 1024


def packed_size(size: int) -> int:
    """Numbers stored per ``size x size`` symmetric block."""
    return size * (size + 1) // 2


def rounding_damping(blocks: Tensor, damping: float | Tensor, error: float) -> Tensor:
    """``(B,)`` dampings for blocks rounded entry by entry (relative error up to ``error``):
    ``damping``, raised by ``error`` times the block's largest absolute row sum for the blocks
    whose Cholesky factorization at ``damping`` fails (in ``blocks``' dtype, float32).

    Rounded statistics differ from the exact ones by a symmetric ``E`` with
    ``|E_ij| <= error |F_ij|``, whose eigenvalues lie within ``error * max_i sum_j |F_ij|``
    (Gershgorin): a positive semi-definite block rounded to 16 bits may have negative
    eigenvalues that large, and with that much more damping it cannot. Low-rank bfloat16 blocks
    at the default damping fail as often as not (and went through the float64 retries one block
    at a time); raising every block's damping by the bound made mnist-ae train as slowly as
    float32 with that damping, so only the blocks that fail get it. A block that is not finite
    keeps its damping (it is reset and falls back as before)."""
    given = torch.as_tensor(damping, dtype=blocks.dtype, device=blocks.device)
    given = given.expand(blocks.shape[0]).clone()
    trial = blocks.clone()
    trial.diagonal(dim1=-2, dim2=-1).add_(given.unsqueeze(-1))
    _, info = torch.linalg.cholesky_ex(trial)
    shift = blocks.abs().sum(-1).amax(-1).mul_(error).nan_to_num_(nan=0.0, posinf=0.0)
    return torch.where(info != 0, given + shift, given)


class SymmetricPacking:
    """Index maps between ``(B, s, s)`` symmetric blocks and ``(B, s(s+1)/2)`` upper triangles."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.size = size
        rows, cols = torch.triu_indices(size, size, device=device)
        self.rows, self.cols = rows, cols
        self.triangle = rows * size + cols  # flat (s*s) position of each stored number
        where = torch.empty(size, size, dtype=torch.long, device=device)
        where[rows, cols] = torch.arange(rows.numel(), device=device)
        where[cols, rows] = where[rows, cols]
        self.full = where.reshape(-1)  # stored number that fills each flat position
        self.diagonal = (rows == cols).nonzero().squeeze(1)  # stored positions of the diagonal

    @staticmethod
    @lru_cache(maxsize=64)
    def of(size: int, device: torch.device) -> SymmetricPacking:
        """The (cached) packing for blocks of ``size`` on ``device``."""
        return SymmetricPacking(size, device)

    def pack(self, blocks: Tensor, out: Tensor | None = None) -> Tensor:
        """Upper triangles of ``(B, s, s)`` symmetric blocks, ``(B, s(s+1)/2)`` (written into
        ``out``, any contiguous tensor of that many entries, when given)."""
        flat = blocks.reshape(blocks.shape[0], self.size * self.size)
        if out is None:
            return flat.index_select(1, self.triangle)
        rows = out.view(flat.shape[0], self.triangle.numel())
        torch.index_select(flat, 1, self.triangle, out=rows)
        return out

    def unpack(self, packed: Tensor, out: Tensor | None = None) -> Tensor:
        """Whole symmetric blocks ``(B, s, s)`` from their packed triangles (in ``out``'s dtype,
        when given: 16-bit triangles are widened before they are unpacked)."""
        n = packed.shape[0]
        if out is None:
            out = packed.new_empty(n, self.size, self.size)
        elif out.dtype != packed.dtype:
            packed = packed.to(out.dtype)
        torch.index_select(packed, 1, self.full, out=out.view(n, self.size * self.size))
        return out

    def trace(self, packed: Tensor) -> Tensor:
        """Traces ``(B,)`` of packed symmetric blocks (summed in float32 for 16-bit blocks)."""
        return packed.index_select(1, self.diagonal).sum(
            1, dtype=torch.promote_types(packed.dtype, torch.float32)
        )

    def outer(self, vectors: Tensor) -> Tensor:
        """Packed ``v v^T`` for ``(B, s)`` vectors."""
        return vectors.index_select(1, self.rows) * vectors.index_select(1, self.cols)

    def lerp_outer_(self, packed: Tensor, vectors: Tensor, weight: float) -> None:
        """``F <- (1 - weight) F + weight v v^T`` in place on packed ``F``, a chunk at a time
        (so the packed outer products stay in cache)."""
        for lo in range(0, packed.shape[0], CHUNK_BLOCKS):
            hi = min(lo + CHUNK_BLOCKS, packed.shape[0])
            if packed.dtype == vectors.dtype:
                packed[lo:hi].lerp_(self.outer(vectors[lo:hi]), weight)
            else:  # 16-bit statistics: in the vectors' dtype, rounded once
                packed[lo:hi] = packed[lo:hi].to(vectors.dtype).lerp_(
                    self.outer(vectors[lo:hi]), weight
                )

    def solve(self, inverse: Tensor, rhs: Tensor) -> Tensor:
        """``inverse_b @ rhs_b`` for packed symmetric ``inverse`` and ``(B, s)`` ``rhs`` (or
        ``(B, T, s)``: each inverse applied to its ``T`` rows)."""
        out = torch.empty_like(rhs)
        work = rhs.new_empty(min(CHUNK_BLOCKS, rhs.shape[0]), self.size, self.size)

        def solve_chunk(lo: int, hi: int, blocks: Tensor) -> None:
            # Row vectors times the (symmetric) inverse: the fast form of CPU bmm.
            torch.bmm(as_rows(rhs[lo:hi]), blocks, out=as_rows(out[lo:hi]))

        self._chunked(inverse, work, solve_chunk)
        return out

    def invert_into(
        self, fisher: Tensor, damping: float | Tensor, out: Tensor, root: int = 1,
        rounded: float = 0.0,
    ) -> FactorReport:
        """Packed ``(F + damping I)^-1`` (``root=2``: ``^-1/2``) of packed ``fisher`` into
        ``out``; the merged report of :func:`mbf.linalg.damped_inverse` over the chunks.

        ``damping``: one number, or a ``(B,)`` tensor with each block's own. ``rounded``: the
        relative rounding error of 16-bit statistics, which raises the damping of the blocks that
        need it (:func:`rounding_damping`)."""
        report = FactorReport()
        wide = torch.promote_types(fisher.dtype, torch.float32)  # 16-bit: factored in float32
        work = fisher.new_empty(min(CHUNK_BLOCKS, fisher.shape[0]), self.size, self.size,
                                dtype=wide)
        inverse = torch.empty_like(work)

        def invert_chunk(lo: int, hi: int, blocks: Tensor) -> None:
            part_damping = damping[lo:hi] if isinstance(damping, Tensor) else damping
            if rounded:
                part_damping = rounding_damping(blocks, part_damping, rounded)
            _, part = damped_inverse(blocks, part_damping, out=inverse[: hi - lo], root=root)
            out[lo:hi] = self.pack(inverse[: hi - lo])
            report.add(part)

        self._chunked(fisher, work, invert_chunk)
        return report

    def _chunked(
        self, packed: Tensor, work: Tensor, body: Callable[[int, int, Tensor], None]
    ) -> None:
        """Call ``body(lo, hi, blocks)`` on unpacked slices of ``work``-sized runs of blocks
        (never, for no blocks: a rank may own none of a bucket)."""
        for lo in range(0, packed.shape[0], max(1, work.shape[0])):
            hi = min(lo + work.shape[0], packed.shape[0])
            body(lo, hi, self.unpack(packed[lo:hi], out=work[: hi - lo]))
