"""The mini-block partition rules of DESIGN.md section 2, and exact round trips."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mbf.blocks
from mbf.blocks import (
    BlockLayout,
    chunk_plan,
    conv_layout,
    embedding_layout,
    flat_layout,
    linear_layout,
    norm_layout,
    row_layout,
    shape_layout,
)


@pytest.mark.parametrize(
    ("length", "mbs", "chunks", "size"),
    [
        (10, 32, 1, 10),
        (33, 32, 2, 17),
        (785, 32, 25, 32),
        (1001, 32, 32, 32),
        (9, 4, 3, 3),
        (7, 1, 7, 1),
    ],
)
def test_chunk_plan_near_equal(length: int, mbs: int, chunks: int, size: int) -> None:
    assert chunk_plan(length, mbs) == (chunks, size)


def _check_partition(layout, tensors) -> None:
    """Blocks cover every coordinate exactly once and round-trip exactly."""
    blocks = layout.to_blocks(tensors)
    assert blocks.shape == (layout.num_blocks, layout.block_size)
    back = layout.from_blocks(blocks)
    for a, b in zip(tensors, back, strict=True):
        assert torch.equal(a, b)
    covered = torch.cat(layout.dense_indices())
    assert torch.equal(covered.sort().values, torch.arange(layout.numel))
    sizes = [len(i) for i in layout.dense_indices()]
    assert max(sizes) - min(sizes) <= 1 and max(sizes) <= layout.block_size


def test_linear_rows_get_their_bias_appended() -> None:
    lin = nn.Linear(5, 3)
    layout = linear_layout(lin.weight, lin.bias, max_block_size=32)
    assert (layout.num_blocks, layout.block_size) == (3, 6)
    blocks = layout.to_blocks([lin.weight, lin.bias])
    for j in range(3):
        assert torch.equal(blocks[j, :5], lin.weight[j]) and blocks[j, 5] == lin.bias[j]
    _check_partition(layout, [lin.weight.detach(), lin.bias.detach()])


def test_long_rows_are_split_into_near_equal_chunks_with_zero_padding() -> None:
    w, b = torch.randn(4, 10), torch.randn(4)
    layout = linear_layout(w, b, max_block_size=4)  # rows of 11 -> chunks 4, 4, 3
    assert (layout.chunks, layout.block_size, layout.num_blocks) == (3, 4, 12)
    blocks = layout.to_blocks([w, b])
    assert torch.equal(blocks[2, :3], torch.cat([w[0], b[:1]])[8:])
    assert blocks[2, 3] == 0  # padding
    _check_partition(layout, [w, b])


@pytest.mark.parametrize(
    "conv", [nn.Conv1d(3, 4, 5), nn.Conv2d(4, 6, 3, groups=2), nn.Conv3d(2, 3, (1, 2, 3))]
)
def test_conv_blocks_are_kernels(conv: nn.Module) -> None:
    w = conv.weight.detach()
    layout = conv_layout(w, max_block_size=32)
    assert layout.num_blocks == w.shape[0] * w.shape[1]
    blocks = layout.to_blocks([w])
    assert torch.equal(blocks[w.shape[1] + 1], w[1, 1].reshape(-1))  # kernel (out=1, in=1)
    _check_partition(layout, [w])


def test_norm_pairs_and_embedding_rows_and_flat_chunks() -> None:
    bn = nn.BatchNorm2d(5)
    g, b = torch.randn(5), torch.randn(5)
    layout = norm_layout(bn.weight, bn.bias)
    assert torch.equal(layout.to_blocks([g, b]), torch.stack([g, b], 1))
    _check_partition(layout, [g, b])
    ln = torch.randn(2, 3)
    _check_partition(norm_layout(ln, ln), [ln, ln.clone() + 1])
    emb = torch.randn(7, 40)
    layout = embedding_layout(emb, max_block_size=16)
    assert (layout.num_blocks, layout.block_size) == (21, 14)
    _check_partition(layout, [emb])
    vec = torch.randn(70)
    layout = flat_layout(vec, max_block_size=32)
    assert (layout.num_blocks, layout.block_size) == (3, 24)
    _check_partition(layout, [vec])


def test_shape_rules_without_a_module() -> None:
    assert shape_layout(torch.randn(4, 3, 3, 3), 32).kind == "conv"
    rows = shape_layout(torch.randn(4, 70), 32)
    assert (rows.kind, rows.num_blocks, rows.block_size) == ("rows", 12, 24)
    assert shape_layout(torch.randn(9), 32).kind == "flat"
    _check_partition(rows, [torch.randn(4, 70)])


def test_batched_rows_keep_leading_dims() -> None:
    w, b = torch.randn(6, 3, 10), torch.randn(6, 3)
    layout = linear_layout(w[0], b[0], max_block_size=4)
    rows = layout.to_rows([w, b])
    assert rows.shape == (6, 3, 11)
    blocks = layout.rows_to_blocks(rows)
    assert blocks.shape == (6, layout.num_blocks, layout.block_size)
    assert torch.equal(blocks[2], layout.to_blocks([w[2], b[2]]))


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="max_block_size"):
        chunk_plan(5, 0)


@pytest.mark.parametrize("mbs", [1, 3, 8, 32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("route", [0, 10**9], ids=["pieces", "gather"])
def test_strided_packing_matches_the_gather_route(
    mbs: int, bias: bool, route: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # to_blocks copies rectangular pieces; rows_to_blocks gathers by index: they must agree for
    # every row length (padded or not, bias straddling a chunk edge or not), also into a dirty
    # buffer whose padding must come back as zeros; by both of to_blocks' routes (small units
    # gather, large ones copy pieces) and into a buffer of a wider dtype.
    monkeypatch.setattr(mbf.blocks, "GATHER_BELOW", route)
    gen = torch.Generator().manual_seed(mbs)
    for in_features in range(1, 70):
        weight = torch.randn(3, in_features, generator=gen)
        tensors = [weight, torch.randn(3, generator=gen)] if bias else [weight]
        layout = linear_layout(weight, tensors[1] if bias else None, mbs)
        dirty = torch.full((layout.num_blocks, layout.block_size), float("nan"))
        packed = layout.to_blocks(tensors, out=dirty)
        assert torch.equal(packed, layout.rows_to_blocks(layout.to_rows(tensors)))
        wide = torch.full_like(dirty, float("nan"), dtype=torch.float64)
        layout.to_blocks(tensors, out=wide)
        assert torch.equal(wide, packed.double())
        for back, original in zip(layout.from_blocks(packed), tensors, strict=True):
            assert torch.equal(back, original)


@pytest.mark.parametrize("mbs", [1, 3, 8, 32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("route", [0, 10**9], ids=["pieces", "gather"])
def test_adding_blocks_to_the_tensors_is_adding_their_parts(
    mbs: int, bias: bool, route: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # add_blocks_to_ (the update straight from the blocks, by strided pieces) must give the bits
    # of adding from_blocks' parts, padded or not, for contiguous and strided tensors alike; the
    # padding slots (NaN here) must never reach a tensor; by both routes (see GATHER_BELOW).
    monkeypatch.setattr(mbf.blocks, "GATHER_BELOW", route)
    gen = torch.Generator().manual_seed(mbs)
    for in_features in range(1, 70):
        weight = torch.randn(3, in_features, generator=gen)
        tensors = [weight, torch.randn(3, generator=gen)] if bias else [weight]
        layout = linear_layout(weight, tensors[1] if bias else None, mbs)
        blocks = layout.to_blocks([torch.randn(t.shape, generator=gen) for t in tensors])
        for block, real in zip(blocks, layout.dense_indices(), strict=True):
            block[len(real) :] = float("nan")  # a block's padding follows its entries
        parts = layout.from_blocks(blocks)
        want = [t.clone().add_(part, alpha=-0.3) for t, part in zip(tensors, parts, strict=True)]
        for index, tensor in enumerate(tensors):
            got = tensor.clone()
            layout.add_blocks_to_(index, got, blocks, alpha=-0.3)
            assert torch.equal(got, want[index])
            if tensor.dim() == 2 and in_features > 1:  # a transposed view: not contiguous
                strided = tensor.t().contiguous().t()
                layout.add_blocks_to_(index, strided, blocks, alpha=-0.3)
                assert torch.equal(strided, want[index])


def test_kind_is_a_label_only() -> None:
    # The same structure under another label cuts and restores tensors identically: no code
    # depends on ``kind``.
    w, b = torch.randn(4, 10), torch.randn(4)
    named = linear_layout(w, b, max_block_size=4)
    other = BlockLayout("anything", named.shapes, named.rows, named.row_length, 3, 4)
    assert other.widths == named.widths == (10, 1)
    assert torch.equal(other.to_rows([w, b]), named.to_rows([w, b]))
    assert torch.equal(other.to_blocks([w, b]), named.to_blocks([w, b]))
    for x, y in zip(other.from_blocks(named.to_blocks([w, b])), [w, b], strict=True):
        assert torch.equal(x, y)
    assert [i.tolist() for i in other.dense_indices()] == [
        i.tolist() for i in named.dense_indices()
    ]
    norm = norm_layout(torch.randn(6), torch.randn(6))
    assert norm.widths == (1, 1)


def test_row_layout_puts_each_tensors_rows_side_by_side() -> None:
    # Three tensors of 3 rows: a (3, 2) matrix, a (3,) vector and a (3, 2, 2) stack.
    a, v, s = torch.randn(3, 2), torch.randn(3), torch.randn(3, 2, 2)
    layout = row_layout([a.shape, v.shape, s.shape], 3, max_block_size=3)
    assert (layout.widths, layout.chunks, layout.block_size) == ((2, 1, 4), 3, 3)
    rows = layout.to_rows([a, v, s])
    assert torch.equal(rows, torch.cat([a, v[:, None], s.reshape(3, 4)], 1))
    _check_partition(layout, [a, v, s])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("x", (), 2, 3, 1, 3), "at least one tensor shape"),
        (("x", (torch.Size([5]),), 2, 3, 1, 3), r"shape \(5,\) does not fill 2 rows"),
        (("x", (torch.Size([4]),), 2, 3, 1, 3), "rows of 2 entries, not row_length=3"),
        (("x", (torch.Size([4, 3]),), 4, 3, 1, 5), "not blocks of 5"),
        (("x", (torch.Size([4, 3]),), 4, 3, 0, 3), "must be positive"),
    ],
)
def test_inconsistent_layouts_are_refused(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BlockLayout(*args)
