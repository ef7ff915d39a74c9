"""Tied rows (MBF's ``tie_rows``): one block per column chunk, shared by the rows of a layer.

MBF gives every row of a layer (an output unit of a Linear layer, an (output, input) kernel of
a convolution) blocks of its own, each estimated from that row's gradient alone. With
``tie_rows`` the rows that a layout declares alike (``BlockLayout.row_sharing``: all output
units of a Linear layer; the output channels of an ungrouped convolution, for each input
channel's kernel) share one block per column chunk, estimated from all of them:
``S_k = EMA((1/T) sum_t g_tk g_tk^T)`` over the ``T`` sharing rows' gradient blocks ``g_tk``.
Under K-FAC's independence assumption every row block of a layer has the same shape (the
inputs' covariance) up to a scale, and the graft sets each block's length, so one well
estimated shape serves all rows; statistics and factorization shrink by ``T``.

Rows are numbered ``row * chunks + chunk`` in a unit's ``(num_blocks, s)`` blocks; the rows that
share shared block ``k`` are ``k, k + K, k + 2K, ...`` (``K = tied_blocks``). The functions here
move between that order and the shared blocks' ``(K, T, s)`` order, in which one batched product
applies each shared inverse to all its rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["by_shared_block", "from_shared_blocks", "sum_shared", "tied_estimate"]


def by_shared_block(blocks: Tensor, sharing: int) -> Tensor:
    """``(num_blocks, s)`` blocks in row order as a ``(K, sharing, s)`` view (not contiguous):
    entry ``[k, t]`` is the ``t``-th row's piece that shares block ``k``."""
    return blocks.view(sharing, -1, blocks.shape[-1]).transpose(0, 1)


def from_shared_blocks(solved: Tensor) -> Tensor:
    """Inverse of :func:`by_shared_block`: ``(K, T, s)`` back to ``(T * K, s)`` in row order
    (a new contiguous tensor)."""
    return solved.transpose(0, 1).reshape(-1, solved.shape[-1])


def tied_estimate(
    blocks: Tensor, sharing: int, own: tuple[int, int] | None = None, divisor: int = 0
) -> Tensor:
    """The shared blocks' estimate ``(1/T) sum_t g_tk g_tk^T`` from one gradient's
    ``(num_blocks, s)`` blocks, ``(K, s, s)``; with ``own = (a, b)`` shared blocks ``a..b-1``
    only (a rank's share). ``divisor``: ``T`` when ``blocks`` hold only some of the sharing
    rows (an FSDP2 rank's; the ranks' estimates then sum to the whole one), else ``sharing``."""
    rows = by_shared_block(blocks, sharing)
    if own is not None:
        rows = rows[own[0] : own[1]]
    return torch.bmm(rows.mT, rows).div_(divisor or sharing)


def sum_shared(stats: Tensor, sharing: int) -> Tensor:
    """Per-row ``(num_blocks, s, s)`` statistics summed into the shared blocks' ``(K, s, s)``."""
    size = stats.shape[-1]
    return stats.view(sharing, -1, size, size).sum(0)
