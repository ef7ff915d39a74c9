"""How a bucket's statistics and inverses are stored: MBF's ``storage`` option.

A storage strategy owns everything that depends on the layout of the stored blocks: allocation,
the running-average updates and the fold of queued estimates, factorization, the solve, and the
conversion to and from whole ``(B, s, s)`` blocks (for checkpoints, introspection and the
exchange between ranks, which always travels as upper triangles). The curvature store
(:mod:`mbf.store`) calls only these methods, so it never branches on the storage.

- :class:`FullStorage` keeps every block as an ``s x s`` matrix: the fastest.
- :class:`PackedStorage` keeps the upper triangles (:class:`mbf.packed.SymmetricPacking`), about
  half the memory, and unpacks a few thousand blocks at a time to fold, factor and solve.

Both keep their blocks in the dtype they were allocated in (MBF's ``curvature_dtype``). Blocks
narrower than the vectors they meet (16-bit blocks, float32 gradients) are widened a chunk of
:data:`mbf.packed.CHUNK_BLOCKS` at a time: every update and fold runs in the vectors' dtype on
the chunk and rounds the result once, factorizations run in float32 (:func:`wide_dtype`), and
the solve reads the 16-bit inverses widened per chunk. Blocks of the vectors' own dtype are
worked on in place, as they always were.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from . import packed
from .linalg import FactorReport, as_rows, damped_inverse, solve_blocks
from .packed import SymmetricPacking, packed_size, rounding_damping
from .validation import check_choice

__all__ = [
    "STORAGES",
    "FullStorage",
    "PackedStorage",
    "Storage",
    "fold_rows",
    "rounding_error",
    "storage_named",
    "wide_dtype",
]


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype stored blocks are worked on in: float32 for 16-bit blocks, else their own."""
    return torch.promote_types(dtype, torch.float32)


def rounding_error(dtype: torch.dtype) -> float:
    """The largest relative error of one rounding to ``dtype`` (half its epsilon), or 0 for
    blocks kept in float32 or wider (worked on as they are)."""
    return 0.0 if wide_dtype(dtype) == dtype else torch.finfo(dtype).eps / 2


def _widened(
    stored: Tensor,
    body: Callable[[int, int, Tensor], object],
    *,
    write_back: bool = True,
    dtype: torch.dtype | None = None,
) -> None:
    """``body(lo, hi, wide)`` on each run of ``mbf.packed.CHUNK_BLOCKS`` stored (16-bit)
    blocks, copied into a reused workspace ``wide`` of ``dtype`` (default float32); with
    ``write_back`` the changed ``wide`` is rounded back into ``stored[lo:hi]``, once. Never
    called for no blocks (a rank may own none of a bucket)."""
    work = stored.new_empty(
        (min(packed.CHUNK_BLOCKS, stored.shape[0]), *stored.shape[1:]),
        dtype=dtype or wide_dtype(stored.dtype),
    )
    for lo in range(0, stored.shape[0], max(1, work.shape[0])):
        hi = min(lo + work.shape[0], stored.shape[0])
        wide = work[: hi - lo].copy_(stored[lo:hi])
        body(lo, hi, wide)
        if write_back:
            stored[lo:hi].copy_(wide)


def fold_rows(fisher: Tensor, rows: Tensor, weights: list[float]) -> None:
    """``F <- (1 - a_k) ... (F (1 - a_1) + a_1 g_1 g_1^T) ... + a_k g_k g_k^T`` in one product.

    ``fisher``: ``(B, s, s)`` whole blocks, updated in place; ``rows``: the ``(B, k, s)`` queued
    estimates ``g_i`` (spent: scaled in place); ``weights``: their running-average weights
    ``a_i``. Expanded: ``F * prod_i (1 - a_i) + sum_i c_i g_i g_i^T`` with
    ``c_i = a_i prod_{j > i} (1 - a_j)``, i.e. ``(sqrt(c) G)^T (sqrt(c) G)``.
    """
    coeffs, keep = [], 1.0
    for a in reversed(weights):
        coeffs.append(a * keep)
        keep *= 1.0 - a
    coeffs.reverse()
    # Scale the spent rows in place by sqrt(c) (c >= 0), so that both factors carry half the
    # weight and no temporary of the queue's size is allocated.
    roots = torch.tensor(coeffs, dtype=rows.dtype, device=rows.device).sqrt_()
    rows.mul_(roots[:, None])
    # beta = 0 (a first estimate in the queue) ignores the old statistics, NaN included.
    fisher.baddbmm_(rows.mT, rows, beta=keep, alpha=1.0)


class Storage(ABC):
    """The interface of a storage strategy; ``stored`` tensors are ``(B, *block_shape(s))``."""

    name = ""
    #: Whether batch estimates are queued and folded ``stat_buffer`` at a time (``stat_buffer``
    #: floats per parameter, fewer passes over the statistics): full storage's speed/memory
    #: trade; packed storage exists to save memory and folds every estimate at once.
    queues = True

    @abstractmethod
    def block_shape(self, size: int) -> tuple[int, ...]:
        """Shape of one stored block of ``size x size``."""

    def allocate(self, blocks: int, size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Zeroed storage for ``blocks`` blocks."""
        return torch.zeros(blocks, *self.block_shape(size), dtype=dtype, device=device)

    def block_bytes(self, size: int, itemsize: int) -> int:
        """Bytes of one stored block."""
        return math.prod(self.block_shape(size)) * itemsize

    @abstractmethod
    def add_outer_(self, stored: Tensor, vectors: Tensor, weight: float) -> None:
        """``F <- (1 - weight) F + weight v v^T`` for ``(B, s)`` vectors."""

    @abstractmethod
    def lerp_(self, stored: Tensor, blocks: Tensor, weight: float) -> None:
        """``F <- (1 - weight) F + weight E`` for whole ``(B, s, s)`` estimates ``E``."""

    @abstractmethod
    def fold_(self, stored: Tensor, rows: Tensor, weights: list[float]) -> None:
        """Fold queued ``(B, k, s)`` estimates into the statistics (:func:`fold_rows`)."""

    @abstractmethod
    def trace(self, stored: Tensor) -> Tensor:
        """Traces ``(B,)`` of the stored blocks."""

    @abstractmethod
    def factor(
        self, stored: Tensor, damping: float | Tensor, out: Tensor, root: int = 1
    ) -> FactorReport:
        """``(F + damping I)^-1`` (``root=2``: ``^-1/2``) of every block into ``out`` (same
        storage); the report.

        ``damping``: one number or a ``(B,)`` tensor. Blocks whose statistics are not finite
        are reset to zero in ``stored`` (they would poison every later step).
        """

    @abstractmethod
    def solve(self, inverse: Tensor, rhs: Tensor) -> Tensor:
        """``inverse_b rhs_b`` for ``(B, s)`` right-hand sides (or ``(B, T, s)``: each
        inverse applied to its ``T`` rows, for tied rows)."""

    @abstractmethod
    def to_blocks(self, stored: Tensor, size: int) -> Tensor:
        """Whole ``(B, s, s)`` blocks (the tensor itself when already whole)."""

    @abstractmethod
    def from_blocks(self, blocks: Tensor) -> Tensor:
        """This storage's form of whole ``(B, s, s)`` blocks (the tensor itself if whole)."""

    @abstractmethod
    def to_triangles(self, stored: Tensor, size: int) -> Tensor:
        """``(B, s(s+1)/2)`` upper triangles: the form curvature travels in between ranks."""

    @abstractmethod
    def from_triangles(self, triangles: Tensor, size: int, out: Tensor) -> None:
        """Write ``(B, s(s+1)/2)`` upper triangles into ``out`` (this storage's form)."""

    def check_dtype(self, dtype: torch.dtype, device: torch.device, work: torch.dtype) -> None:
        """Refuse, naming MBF's ``curvature_dtype``, blocks of ``dtype`` on ``device`` that this
        storage cannot update, factor and solve with ``work``-dtype vectors (an operation
        missing for that dtype on that device): tried on two small blocks."""
        if dtype == work:
            return
        try:
            stored, inverse = (self.allocate(2, 2, dtype, device) for _ in range(2))
            vectors = torch.ones(2, 2, dtype=work, device=device)
            self.add_outer_(stored, vectors, 0.5)
            self.fold_(stored, vectors.unsqueeze(1).clone(), [0.5])
            self.factor(stored, 1.0, out=inverse)
            self.solve(inverse, vectors)
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            raise ValueError(
                f"MBF: curvature_dtype={dtype} cannot be used on {device} with {self.name} "
                f"storage ({type(exc).__name__}: {exc}); choose another curvature_dtype"
            ) from exc

    def convert(self, saved: Tensor, size: int) -> Tensor:
        """Saved blocks of either storage (``(B, s, s)`` whole, ``(B, s(s+1)/2)`` packed) in
        this one's form, so checkpoints load across storages; a tensor of another block size is
        returned as it is (the caller's shape check names the unit)."""
        if saved.dim() == 2:
            if saved.shape[1] != packed_size(size):
                return saved
            saved = SymmetricPacking.of(size, saved.device).unpack(saved)
        if saved.dim() != 3 or saved.shape[1:] != (size, size):
            return saved
        return self.from_blocks(saved)


def _zero_nonfinite(stored: Tensor) -> None:
    per_block = tuple(range(1, stored.dim()))
    stored[~torch.isfinite(stored).all(dim=per_block)] = 0.0


class FullStorage(Storage):
    """Every block as a whole ``s x s`` matrix (``2 s^2`` numbers per block with its inverse)."""

    name = "full"

    def block_shape(self, size: int) -> tuple[int, ...]:
        return (size, size)

    def add_outer_(self, stored: Tensor, vectors: Tensor, weight: float) -> None:
        if stored.dtype != vectors.dtype:
            _widened(stored, lambda lo, hi, wide: self.add_outer_(wide, vectors[lo:hi], weight),
                     dtype=vectors.dtype)
            return
        # Fused so that no (B, s, s) temporary is made (unsqueeze(1) rather than a transposed
        # view: CPU bmm is ~2.4x faster on it).
        stored.baddbmm_(
            vectors.unsqueeze(-1), vectors.unsqueeze(1), beta=1.0 - weight, alpha=weight
        )

    def lerp_(self, stored: Tensor, blocks: Tensor, weight: float) -> None:
        if stored.dtype != blocks.dtype:
            _widened(stored, lambda lo, hi, wide: wide.lerp_(blocks[lo:hi], weight),
                     dtype=blocks.dtype)
            return
        stored.lerp_(blocks, weight)

    def fold_(self, stored: Tensor, rows: Tensor, weights: list[float]) -> None:
        if stored.dtype != rows.dtype:
            _widened(stored, lambda lo, hi, wide: fold_rows(wide, rows[lo:hi], weights),
                     dtype=rows.dtype)
            return
        fold_rows(stored, rows, weights)

    def trace(self, stored: Tensor) -> Tensor:
        return stored.diagonal(dim1=-2, dim2=-1).sum(-1, dtype=wide_dtype(stored.dtype))

    def factor(
        self, stored: Tensor, damping: float | Tensor, out: Tensor, root: int = 1
    ) -> FactorReport:
        if stored.dtype == wide_dtype(stored.dtype):
            _, report = damped_inverse(stored, damping, out=out, root=root)
        else:  # float32 statistics and inverses of a chunk at a time, each rounded once
            report = FactorReport()
            inverse = stored.new_empty(
                (min(packed.CHUNK_BLOCKS, stored.shape[0]), *stored.shape[1:]), dtype=torch.float32
            )

            error = rounding_error(stored.dtype)

            def invert_chunk(lo: int, hi: int, wide: Tensor) -> None:
                part = damping[lo:hi] if isinstance(damping, Tensor) else damping
                part = rounding_damping(wide, part, error)
                _, chunk = damped_inverse(wide, part, out=inverse[: hi - lo], root=root)
                out[lo:hi].copy_(inverse[: hi - lo])
                report.add(chunk)

            _widened(stored, invert_chunk, write_back=False)
        if report.nonfinite:
            _zero_nonfinite(stored)
        return report

    def solve(self, inverse: Tensor, rhs: Tensor) -> Tensor:
        if inverse.dtype == rhs.dtype:
            return solve_blocks(inverse, rhs)
        out = torch.empty_like(rhs)

        def solve_chunk(lo: int, hi: int, wide: Tensor) -> None:
            torch.bmm(as_rows(rhs[lo:hi]), wide, out=as_rows(out[lo:hi]))

        _widened(inverse, solve_chunk, write_back=False, dtype=rhs.dtype)
        return out

    def to_blocks(self, stored: Tensor, size: int) -> Tensor:
        return stored

    def from_blocks(self, blocks: Tensor) -> Tensor:
        return blocks

    def to_triangles(self, stored: Tensor, size: int) -> Tensor:
        return SymmetricPacking.of(size, stored.device).pack(stored)

    def from_triangles(self, triangles: Tensor, size: int, out: Tensor) -> None:
        SymmetricPacking.of(size, triangles.device).unpack(triangles, out=out)


class PackedStorage(Storage):
    """Upper triangles only (``s(s+1)`` numbers per block with its inverse), unpacked a chunk
    at a time into a reused workspace to fold, factor and solve."""

    name = "packed"
    queues = False

    def block_shape(self, size: int) -> tuple[int, ...]:
        return (packed_size(size),)

    @staticmethod
    def _packing(stored: Tensor) -> SymmetricPacking:
        size = int(round(((8 * stored.shape[-1] + 1) ** 0.5 - 1) / 2))
        return SymmetricPacking.of(size, stored.device)

    def add_outer_(self, stored: Tensor, vectors: Tensor, weight: float) -> None:
        self._packing(stored).lerp_outer_(stored, vectors, weight)

    def lerp_(self, stored: Tensor, blocks: Tensor, weight: float) -> None:
        packing = self._packing(stored)
        if stored.dtype != blocks.dtype:
            _widened(stored, lambda lo, hi, wide: wide.lerp_(packing.pack(blocks[lo:hi]), weight),
                     dtype=blocks.dtype)
            return
        stored.lerp_(packing.pack(blocks), weight)

    def fold_(self, stored: Tensor, rows: Tensor, weights: list[float]) -> None:
        # Whole blocks a chunk at a time: the same products as full storage, so the same bits
        # (in float32 for 16-bit statistics, rounded once per chunk).
        packing = self._packing(stored)
        work = stored.new_empty(min(packed.CHUNK_BLOCKS, stored.shape[0]), packing.size,
                                packing.size, dtype=rows.dtype)
        for lo in range(0, stored.shape[0], max(1, work.shape[0])):  # none: a rank may own none
            hi = min(lo + work.shape[0], stored.shape[0])
            blocks = packing.unpack(stored[lo:hi], out=work[: hi - lo])
            fold_rows(blocks, rows[lo:hi], weights)
            stored[lo:hi] = packing.pack(blocks)

    def trace(self, stored: Tensor) -> Tensor:
        return self._packing(stored).trace(stored)

    def factor(
        self, stored: Tensor, damping: float | Tensor, out: Tensor, root: int = 1
    ) -> FactorReport:
        report = self._packing(stored).invert_into(stored, damping, out=out, root=root,
                                                    rounded=rounding_error(stored.dtype))
        if report.nonfinite:
            _zero_nonfinite(stored)
        return report

    def solve(self, inverse: Tensor, rhs: Tensor) -> Tensor:
        return self._packing(inverse).solve(inverse, rhs)

    def to_blocks(self, stored: Tensor, size: int) -> Tensor:
        return SymmetricPacking.of(size, stored.device).unpack(stored)

    def from_blocks(self, blocks: Tensor) -> Tensor:
        return SymmetricPacking.of(blocks.shape[-1], blocks.device).pack(blocks)

    def to_triangles(self, stored: Tensor, size: int) -> Tensor:
        return stored

    def from_triangles(self, triangles: Tensor, size: int, out: Tensor) -> None:
        out.copy_(triangles)


STORAGES: dict[str, Storage] = {"full": FullStorage(), "packed": PackedStorage()}


def storage_named(name: str) -> Storage:
    """The storage strategy called ``name`` (``"full"`` or ``"packed"``)."""
    check_choice("storage", name, tuple(STORAGES))
    return STORAGES[name]
