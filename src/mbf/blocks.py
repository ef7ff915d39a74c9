"""Mini-block partitions: how a layer's parameters map onto a stack of small blocks.

Every layout first arranges the parameters of one *unit* (a Linear weight with its bias, one conv
weight, the affine pair of a norm layer, one arbitrary tensor) into a row matrix of shape
``(rows, row_length)``: a row is the natural mini-block (one output unit of a Linear layer, one
(output, input) kernel of a convolution, one channel's ``(gamma, beta)``). The arrangement is the
same for every layout: tensor ``k``, read row-major as ``(rows, widths[k])``, fills the next
``widths[k]`` columns of every row (a Linear weight the first ``in`` columns, its bias the last
one; a norm layer's gamma column 0, beta column 1). Rows longer than
``max_block_size`` are cut into ``chunks`` near-equal contiguous pieces, each zero-padded to the
same ``block_size``, so that a whole unit is a single ``(num_blocks, block_size)`` tensor and all
its blocks can be factored in one batched call.

Padding is exact: a padded coordinate has zero gradient and zero curvature, so the damped block
``F + damping * I`` is block-diagonal between real and padded coordinates and the solve returns
zero there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "BlockLayout",
    "chunk_plan",
    "conv_layout",
    "embedding_layout",
    "flat_layout",
    "linear_layout",
    "norm_layout",
    "row_layout",
    "shape_layout",
]


@dataclass
class _Piece:
    """Columns ``[src_start, src_end)`` of a tensor's row fill chunks ``[first_chunk,
    end_chunk)`` at offsets ``[first_offset, end_offset)`` (equal widths in every chunk)."""

    src_start: int
    src_end: int
    first_chunk: int
    end_chunk: int
    first_offset: int
    end_offset: int


def chunk_plan(length: int, max_block_size: int) -> tuple[int, int]:
    """Return ``(chunks, block_size)`` to cut a row of ``length`` into near-equal pieces."""
    if length <= 0:
        raise ValueError(f"row length must be positive, got {length}")
    if max_block_size <= 0:
        raise ValueError(f"max_block_size must be positive, got {max_block_size}")
    chunks = math.ceil(length / max_block_size)
    return chunks, math.ceil(length / chunks)


#: Units of at most this many entries move between tensors and blocks through one gather (or one
#: indexed add) instead of strided piece copies: the pieces cost a few Python-level tensor
#: operations each, which dominate on small units (a 128x128 Linear with its bias: 15 us
#: against 28 us, one thread), while on large units the gather's random reads lose (a
#: 1000x784 Linear: 524 us against 194 us; ``docs/decisions.md``, section 3).
GATHER_BELOW = 32768


@dataclass(eq=False)
class BlockLayout:
    """The block structure of one unit.

    The structure is given by ``shapes`` and ``rows`` alone: tensor ``k`` is read row-major as
    ``(rows, widths[k])`` and fills the next ``widths[k]`` columns of every row.

    Attributes:
        kind: a label naming the rule that made the layout (``"linear"``, ``"conv"``,
            ``"norm"``, ``"embedding"``, ``"flat"``, ``"rows"``, or a user rule's own); for
            messages and tests only: no code depends on it.
        shapes: the shapes of the unit's tensors, in order.
        rows: number of rows of the unit's row matrix.
        row_length: length of one row before chunking (the sum of ``widths``).
        chunks: pieces each row is cut into.
        block_size: size of every (padded) block.
        widths: columns of a row that each tensor fills, in order (``numel(shapes[k]) / rows``;
            derived, not passed).
        row_sharing: how many rows share one set of blocks when the param group ties rows
            (MBF's ``tie_rows``): the rows are read as ``(row_sharing, rows / row_sharing)``
            and the rows of one column share their blocks, so block ``b`` (numbered
            ``row * chunks + chunk``) uses the shared block ``b % tied_blocks``. ``rows`` for a
            Linear layer (every output unit shares the input's blocks), the output channels
            for a convolution (each input channel's kernel is shared by every output channel),
            ``1`` where nothing is shared (norm pairs, flat tensors, embeddings).
    """

    kind: str
    shapes: tuple[torch.Size, ...]
    rows: int
    row_length: int
    chunks: int
    block_size: int
    widths: tuple[int, ...] = field(init=False)
    row_sharing: int = 1
    _gather: Tensor | None = field(default=None, repr=False)
    _scatter: Tensor | None = field(default=None, repr=False)
    _slots: list[Tensor] = field(default_factory=list, repr=False)
    _pads: Tensor | None = field(default=None, repr=False)
    _pieces: list[list[_Piece]] = field(default_factory=list, repr=False)
    _on_device: dict[torch.device, tuple[list[Tensor], Tensor | None]] = field(
        default_factory=dict, repr=False
    )
    _flat_on_device: dict[torch.device, Tensor] = field(default_factory=dict, repr=False)
    _scatter_on_device: dict[torch.device, list[Tensor]] = field(
        default_factory=dict, repr=False
    )

    def __post_init__(self) -> None:
        self.widths = self._check_structure()
        padded = self.chunks * self.block_size
        if padded != self.row_length:
            # Column j of a row goes to chunk c at offset o; the slot index row_length is a zero.
            base, extra = divmod(self.row_length, self.chunks)
            gather = torch.full((self.chunks, self.block_size), self.row_length, dtype=torch.long)
            scatter = torch.empty(self.row_length, dtype=torch.long)
            start = 0
            for c in range(self.chunks):
                size = base + (1 if c < extra else 0)
                cols = torch.arange(start, start + size)
                gather[c, :size] = cols
                scatter[cols] = c * self.block_size + torch.arange(size)
                start += size
            self._gather = gather.reshape(-1)
            self._scatter = scatter
            self._pads = (gather.reshape(-1) == self.row_length).nonzero().squeeze(-1)
        # Where each tensor's columns sit in a padded row of chunks * block_size slots.
        columns = torch.arange(self.row_length)
        start = 0
        for width in self.widths:
            cols = columns[start : start + width]
            self._slots.append(cols if self._scatter is None else self._scatter[cols])
            self._pieces.append(self._plan_pieces(start, start + width))
            start += width

    def _plan_pieces(self, begin: int, end: int) -> list[_Piece]:
        """Rectangular pieces that carry row columns ``[begin, end)`` into the padded chunks."""
        base, extra = divmod(self.row_length, self.chunks)
        pieces: list[_Piece] = []
        chunk_start = 0
        for c in range(self.chunks):
            size = base + (1 if c < extra else 0)
            lo, hi = max(begin, chunk_start), min(end, chunk_start + size)
            if lo < hi:
                piece = _Piece(lo - begin, hi - begin, c, c + 1, lo - chunk_start, hi - chunk_start)
                last = pieces[-1] if pieces else None
                if (
                    last is not None
                    and last.first_offset == piece.first_offset
                    and last.end_offset == piece.end_offset
                    and last.src_end == piece.src_start
                    and last.end_chunk == c
                ):
                    last.end_chunk, last.src_end = c + 1, piece.src_end
                else:
                    pieces.append(piece)
            chunk_start += size
        return pieces

    def _check_structure(self) -> tuple[int, ...]:
        """Each tensor's columns in a row; a clear error when the numbers do not fit together."""
        name = f"BlockLayout({self.kind!r}, shapes={[tuple(s) for s in self.shapes]})"
        if not self.shapes:
            raise ValueError(f"{name}: a layout needs at least one tensor shape")
        if self.rows <= 0 or self.chunks <= 0 or self.block_size <= 0:
            raise ValueError(
                f"{name}: rows, chunks and block_size must be positive, got {self.rows}, "
                f"{self.chunks}, {self.block_size}"
            )
        widths = []
        for shape in self.shapes:
            numel = math.prod(shape)
            if numel == 0 or numel % self.rows:
                raise ValueError(
                    f"{name}: a tensor of shape {tuple(shape)} does not fill {self.rows} rows"
                )
            widths.append(numel // self.rows)
        if self.row_sharing <= 0 or self.rows % self.row_sharing:
            raise ValueError(
                f"{name}: row_sharing={self.row_sharing} does not divide {self.rows} rows"
            )
        if sum(widths) != self.row_length:
            raise ValueError(
                f"{name}: the tensors fill rows of {sum(widths)} entries, not "
                f"row_length={self.row_length}"
            )
        if self.chunks > self.row_length or self.block_size != -(-self.row_length // self.chunks):
            raise ValueError(
                f"{name}: rows of {self.row_length} are cut into {self.chunks} near-equal chunks "
                f"of at most {-(-self.row_length // max(self.chunks, 1))}, not blocks of "
                f"{self.block_size} (use chunk_plan)"
            )
        return tuple(widths)

    @property
    def num_blocks(self) -> int:
        """Number of mini-blocks of the unit: ``rows * chunks``."""
        return self.rows * self.chunks

    @property
    def tied_blocks(self) -> int:
        """Number of blocks when rows are tied: ``num_blocks / row_sharing``."""
        return self.num_blocks // self.row_sharing

    @property
    def numel(self) -> int:
        """Number of parameter entries of the unit (padding excluded)."""
        return sum(math.prod(s) for s in self.shapes)

    @property
    def padded(self) -> bool:
        """Whether some blocks carry zero padding (rows cut into chunks of unequal length)."""
        return self._gather is not None

    # --- row matrix <-> tensors -------------------------------------------------------------
    def to_rows(self, tensors: Sequence[Tensor]) -> Tensor:
        """Arrange the unit's tensors (with optional leading batch dims) as ``(..., rows, length)``.

        ``tensors[k]`` has shape ``(*batch, *shapes[k])``.
        """
        lead = tensors[0].shape[: tensors[0].dim() - len(self.shapes[0])]
        parts = [
            t.reshape(*lead, self.rows, w) for t, w in zip(tensors, self.widths, strict=True)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def from_rows(self, rows: Tensor) -> list[Tensor]:
        """Inverse of [`to_rows`][mbf.BlockLayout.to_rows] for tensors without batch dims."""
        parts = torch.split(rows, list(self.widths), dim=-1)
        return [p.reshape(s) for p, s in zip(parts, self.shapes, strict=True)]

    # --- row matrix <-> blocks --------------------------------------------------------------
    def rows_to_blocks(self, rows: Tensor) -> Tensor:
        """``(..., rows, length)`` to ``(..., num_blocks, block_size)`` (zero-padded)."""
        lead, blocks = rows.shape[:-2], rows.shape[-2] * self.chunks
        if self._gather is None:
            return rows.reshape(*lead, blocks, self.block_size)
        gather = self._gather.to(rows.device)
        padded = torch.nn.functional.pad(rows, (0, 1))
        return padded.index_select(-1, gather).reshape(*lead, blocks, self.block_size)

    def blocks_to_rows(self, blocks: Tensor) -> Tensor:
        """Inverse of [`rows_to_blocks`][mbf.BlockLayout.rows_to_blocks] (padding dropped)."""
        lead = blocks.shape[:-2]
        flat = blocks.reshape(*lead, -1, self.chunks * self.block_size)
        if self._scatter is None:
            return flat
        return flat.index_select(-1, self._scatter.to(blocks.device))

    def _indices(self, device: torch.device) -> tuple[list[Tensor], Tensor | None]:
        """Slot and padding indices on ``device`` (copied there once)."""
        if device not in self._on_device:
            pads = None if self._pads is None else self._pads.to(device)
            self._on_device[device] = ([s.to(device) for s in self._slots], pads)
        return self._on_device[device]

    def _flat_gather(self, device: torch.device) -> Tensor:
        """For every block entry, its index in the unit's tensors flattened and concatenated,
        or ``numel`` (one zero appended after them) for padding; on ``device``, built once."""
        if device not in self._flat_on_device:
            starts = [0]
            for shape in self.shapes:
                starts.append(starts[-1] + math.prod(shape))
            rows = self.to_rows([
                torch.arange(a, b).reshape(shape)
                for a, b, shape in zip(starts[:-1], starts[1:], self.shapes, strict=True)
            ])
            if self._gather is not None:
                rows = torch.nn.functional.pad(rows, (0, 1), value=self.numel)
                rows = rows.index_select(-1, self._gather)
            self._flat_on_device[device] = rows.reshape(-1).to(device)
        return self._flat_on_device[device]

    def _flat_scatter(self, device: torch.device) -> list[Tensor]:
        """Per tensor, where each of its entries (row-major) sits in the flattened blocks: the
        inverse of :meth:`_flat_gather`, split by tensor; on ``device``, built once."""
        if device not in self._scatter_on_device:
            gather = self._flat_gather(device).cpu()
            real = gather < self.numel
            where = torch.empty(self.numel, dtype=torch.long)
            where[gather[real]] = real.nonzero().squeeze(-1)
            sizes = [math.prod(shape) for shape in self.shapes]
            self._scatter_on_device[device] = [w.to(device) for w in torch.split(where, sizes)]
        return self._scatter_on_device[device]

    def to_blocks(self, tensors: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
        """The unit's tensors as one ``(num_blocks, block_size)`` tensor.

        One pass over the data (a view, when a single tensor needs no padding); ``out`` (a
        contiguous ``(num_blocks, block_size)`` tensor) receives the blocks when given. Units of
        at most :data:`GATHER_BELOW` entries go through one gather, larger ones through
        strided copies of rectangular pieces: the same values either way.
        """
        if out is None and len(tensors) == 1 and self._pads is None:
            return tensors[0].reshape(self.num_blocks, self.block_size)
        if out is None:
            out = tensors[0].new_empty(self.num_blocks, self.block_size)
        if self.numel <= GATHER_BELOW:
            flat = torch.cat([t.reshape(-1) for t in tensors] + [tensors[0].new_zeros(1)])
            index = self._flat_gather(out.device)
            if flat.dtype == out.dtype and not flat.requires_grad:
                torch.index_select(flat, 0, index, out=out.view(-1))
            else:
                out.view(-1).copy_(flat.index_select(0, index))
            return out
        # Strided copies of a few rectangular pieces: several times faster than index_copy_.
        grid = out.view(self.rows, self.chunks, self.block_size)
        for tensor, pieces in zip(tensors, self._pieces, strict=True):
            values = tensor.reshape(self.rows, -1)
            for pc in pieces:
                grid[:, pc.first_chunk : pc.end_chunk, pc.first_offset : pc.end_offset] = values[
                    :, pc.src_start : pc.src_end
                ].view(self.rows, pc.end_chunk - pc.first_chunk, pc.end_offset - pc.first_offset)
        if self.padded:
            base, extra = divmod(self.row_length, self.chunks)
            grid[:, extra:, base:] = 0
        return out

    def from_blocks(self, blocks: Tensor) -> list[Tensor]:
        """Split a ``(num_blocks, block_size)`` tensor back into tensors of the unit's shapes."""
        flat = blocks.reshape(self.rows, self.chunks * self.block_size)
        slots_on, pads = self._indices(flat.device)
        parts = []
        for shape, cols, slots in zip(self.shapes, self._slots, slots_on, strict=True):
            if pads is None:
                part = flat[:, int(cols[0]) : int(cols[-1]) + 1]
            else:
                part = flat.index_select(1, slots)
            parts.append(part.reshape(shape))
        return parts

    def add_blocks_to_(self, index: int, tensor: Tensor, blocks: Tensor, alpha: float) -> None:
        """``tensor += alpha * part``, with ``part`` the unit's tensor ``index`` in ``(num_blocks,
        block_size)`` ``blocks``: the update of a parameter straight from its direction's blocks.

        With padding, strided adds of the same rectangular pieces as :meth:`to_blocks` (no copy
        of the part, which :meth:`from_blocks` makes); the same values, bit for bit.
        """
        if self._pads is None or not tensor.is_contiguous():
            tensor.add_(self.from_blocks(blocks)[index].to(tensor.dtype), alpha=alpha)
            return
        if self.numel <= GATHER_BELOW:  # one gather of the part, one add (see GATHER_BELOW)
            part = blocks.reshape(-1).index_select(0, self._flat_scatter(blocks.device)[index])
            tensor.view(-1).add_(part.to(tensor.dtype), alpha=alpha)
            return
        grid = blocks.view(self.rows, self.chunks, self.block_size)
        values = tensor.view(self.rows, -1)
        for pc in self._pieces[index]:
            target = values[:, pc.src_start : pc.src_end].view(
                self.rows, pc.end_chunk - pc.first_chunk, pc.end_offset - pc.first_offset
            )
            part = grid[:, pc.first_chunk : pc.end_chunk, pc.first_offset : pc.end_offset]
            target.add_(part.to(tensor.dtype), alpha=alpha)

    def dense_indices(self) -> list[Tensor]:
        """For tests and diagnostics: each block's coordinates in the unit's flattened tensors.

        The flat order is the concatenation of the unit's tensors, each flattened row-major.
        Padded slots are omitted.
        """
        numels = [math.prod(s) for s in self.shapes]
        ids = torch.arange(sum(numels), dtype=torch.float64)
        parts = list(torch.split(ids, numels))
        pieces = [p.reshape(s) for p, s in zip(parts, self.shapes, strict=True)]
        marked = self.to_rows(pieces)
        padded = torch.nn.functional.pad(marked, (0, 1), value=-1.0)
        if self._gather is None:
            blocks = marked.reshape(self.num_blocks, self.block_size)
        else:
            blocks = padded.index_select(-1, self._gather).reshape(self.num_blocks, self.block_size)
        return [b[b >= 0].long() for b in blocks]


def row_layout(
    shapes: Sequence[Sequence[int]], rows: int, max_block_size: int, kind: str = "rows",
    row_sharing: int = 1,
) -> BlockLayout:
    """The general layout: ``rows`` rows, each made of every tensor's next columns.

    Tensor ``k`` (of shape ``shapes[k]``) is read row-major as ``(rows, numel_k / rows)`` and its
    columns follow those of the tensors before it, so row ``j`` is the concatenation of every
    tensor's ``j``-th row; rows longer than ``max_block_size`` are cut by
    [`chunk_plan`][mbf.blocks.chunk_plan]. Every built-in layout except the norm pairs is one of
    these; a rule for a new module type (``mbf.register_layer``) usually is too.

    Args:
        shapes: the unit's tensor shapes, in the order of its parameters.
        rows: number of rows (mini-blocks before chunking), dividing every tensor's size.
        max_block_size: the param group's largest block.
        kind: a label for messages and tests.
        row_sharing: rows that share their blocks under ``tie_rows`` (see
            [`BlockLayout`][mbf.BlockLayout]); ``1``: none.
    """
    sizes = [math.prod(s) for s in shapes]
    if rows <= 0 or any(n % rows for n in sizes):
        raise ValueError(f"row_layout: {rows} rows do not divide tensors of sizes {sizes}")
    chunks, size = chunk_plan(sum(sizes) // rows, max_block_size)
    length = sum(sizes) // rows
    return BlockLayout(kind, tuple(torch.Size(s) for s in shapes), rows, length, chunks, size,
                       row_sharing=row_sharing)


def linear_layout(weight: Tensor, bias: Tensor | None, max_block_size: int) -> BlockLayout:
    """Unit-wise blocks: row ``W[j, :]`` with ``b[j]`` appended, one block per output unit."""
    shapes = [weight.shape] if bias is None else [weight.shape, bias.shape]
    return row_layout(shapes, weight.shape[0], max_block_size, "linear", weight.shape[0])


def conv_layout(weight: Tensor, max_block_size: int, groups: int = 1) -> BlockLayout:
    """One block per (output channel, input channel) kernel: ``prod(kernel_size)`` entries;
    tied, one per input channel's kernel, shared by the output channels. A grouped convolution
    (``groups > 1``) is not tied: its output channels read different input channels."""
    rows = weight.shape[0] * weight.shape[1]
    sharing = weight.shape[0] if groups == 1 else 1
    return row_layout([weight.shape], rows, max_block_size, "conv", sharing)


def norm_layout(weight: Tensor, bias: Tensor) -> BlockLayout:
    """One 2x2 block ``(gamma_c, beta_c)`` per channel of an affine norm layer."""
    return BlockLayout("norm", (weight.shape, bias.shape), weight.numel(), 2, 1, 2)


def embedding_layout(weight: Tensor, max_block_size: int) -> BlockLayout:
    """One block per embedding row (chunked when longer than ``max_block_size``)."""
    return row_layout([weight.shape], weight.shape[0], max_block_size, "embedding")


def flat_layout(tensor: Tensor, max_block_size: int) -> BlockLayout:
    """Contiguous near-equal chunks of the flattened tensor."""
    return row_layout([tensor.shape], 1, max_block_size, "flat")


def shape_layout(tensor: Tensor, max_block_size: int) -> BlockLayout:
    """Layout from the shape alone, for parameters given without their module.

    Tensors of 3 or more dimensions are read as convolution weights (one block per kernel),
    2-d tensors as Linear weights without bias (one block per row), anything else as a flat
    vector. Rows are shared under ``tie_rows`` as those layers' are.
    """
    if tensor.dim() >= 3:
        return conv_layout(tensor, max_block_size)
    if tensor.dim() == 2:
        rows = tensor.shape[0]
        return row_layout([tensor.shape], rows, max_block_size, "rows", rows)
    return flat_layout(tensor, max_block_size)
