"""Per-example empirical Fisher mini-blocks of Linear, ConvNd, Embedding and LayerNorm layers.

For a layer with inputs ``a_i`` and output gradients ``delta_i`` (as autograd delivers them for the
batch loss) the per-example contribution to the weight gradient is ``G_i = delta_i^T a_i`` (Linear,
summed over any extra dimensions) or ``delta_i @ unfold(a_i)^T`` (convolution); an embedding
row's is the sum of the output gradients at the example's positions holding that token, a
LayerNorm's ``(gamma_c, beta_c)`` pair's is ``sum_t (delta_itc xhat_itc, delta_itc)``. The
functions here
return ``sum_i blocks(G_i) blocks(G_i)^T`` for a whole batch, processing at most ``chunk_elems``
per-example gradient entries at a time, so the ``N`` per-example gradients of a layer are never
held at once. Scaling by the loss reduction is the caller's job (``mbf.hooks.PerExampleHooks``); the
layer registry (``mbf.layers``) says which function serves which module type.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._compat import conv_padding, conv_weight_grad
from .blocks import BlockLayout

__all__ = [
    "CONV_TYPES",
    "Workspace",
    "conv_block_stats",
    "embedding_block_stats",
    "layer_norm_block_stats",
    "linear_block_stats",
    "unfold_input",
]

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The convolutions whose per-example statistics :func:`conv_block_stats` computes."""


_Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d


def _as_conv(module: nn.Module) -> _Conv:
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        raise TypeError(f"MBF: expected a Conv1d/2d/3d, got {type(module).__name__}")
    return module


def _chunks(batch: int, per_example: int, chunk_elems: int) -> Iterator[slice]:
    size = max(1, chunk_elems // max(1, per_example))
    for start in range(0, batch, size):
        yield slice(start, min(batch, start + size))


#: Per-example conv gradients come from one grouped weight-gradient convolution (the batch as
#: groups) when the output has at least this many positions, else from im2col and a batched
#: product. Measured on CPU (docs/decisions.md): the grouped route is 1.3-6.6x faster at 256-1024
#: positions and 1.2-3.5x slower at 4-64. Other devices use im2col (not measured there).
GROUPED_MIN_POSITIONS = 128


class Workspace:
    """Reused scratch tensors for the chunked per-example computations.

    Chunks are bounded by ``chunk_elems``, so the workspace is too; reusing it avoids a fresh
    allocation per chunk, whose first touch (page faults) cost more than the arithmetic on the
    project's machine (``docs/decisions.md``, section 3).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialized ``shape`` tensor of ``like``'s dtype and device, reusing memory."""
        key = (name, like.dtype, like.device)
        numel = math.prod(shape)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = like.new_empty(numel)
        return buffer[:numel].view(shape)


def _add_outer_sum(out: Tensor, blocks: Tensor, workspace: Workspace | None = None) -> None:
    """``out += sum_n b_n b_n^T`` for ``(n, B, s)`` blocks and a ``(B, s, s)`` ``out``."""
    # Block-major rows first: the batched product then runs ~2x faster than an einsum.
    n, b, s = blocks.shape
    if workspace is None:
        rows = blocks.transpose(0, 1).contiguous()
    else:
        rows = workspace.get("rows", (b, n, s), blocks)
        rows.copy_(blocks.transpose(0, 1))
    out.baddbmm_(rows.mT, rows)


def linear_block_stats(
    layout: BlockLayout,
    inputs: Tensor,
    grad_outputs: Tensor,
    chunk_elems: int = 1 << 24,
    workspace: Workspace | None = None,
    tied: int = 1,
) -> Tensor:
    """``sum_i`` of the block outer products of each example's Linear gradient; with ``tied``
    equal to the layout's rows (MBF's ``tie_rows``), also summed over the rows that share each
    block: ``(chunks, s, s)``, without forming every row's blocks.

    Args:
        layout: the unit's layout (``linear`` kind; with bias when it has two shapes).
        inputs: ``(N, *, in)`` layer inputs.
        grad_outputs: ``(N, *, out)`` gradients of the loss with respect to the layer output.
        chunk_elems: bound on the per-example entries materialized at once.
        workspace: reused scratch memory for the chunks (optional).
        tied: rows sharing each block: 1 (every row's blocks) or ``layout.rows``.
    """
    if tied not in (1, layout.rows):
        raise ValueError(f"MBF: a Linear layout's rows are tied all or none, not {tied}")
    has_bias = len(layout.shapes) == 2
    n = inputs.shape[0]
    a = inputs.reshape(n, -1, inputs.shape[-1])
    d = grad_outputs.reshape(n, -1, grad_outputs.shape[-1])
    if has_bias:
        a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
    blocks = layout.num_blocks // tied
    out = torch.zeros(blocks, layout.block_size, layout.block_size, dtype=a.dtype,
                      device=a.device)
    if a.shape[1] == 1:
        # G_i = delta_i a_i^T is rank one: block (j, c) is sum_i delta_ij^2 a_ic a_ic^T, a GEMM;
        # tied, summed over the rows j too: sum_i |delta_i|^2 a_ic a_ic^T, a GEMM of one row.
        a2, weights = a[:, 0], d[:, 0].square()
        if tied > 1:
            weights = weights.sum(1, keepdim=True)
        per = layout.chunks * layout.block_size**2
        # (out or 1, chunks * s * s): one GEMM, accumulated in place
        flat = out.view(weights.shape[1], -1)
        for sl in _chunks(n, per, chunk_elems):
            ab = layout.rows_to_blocks(a2[sl].unsqueeze(1))  # (n, chunks, s)
            outer = (ab.unsqueeze(-1) * ab.unsqueeze(-2)).reshape(ab.shape[0], -1)
            flat.addmm_(weights[sl].T, outer)
        return out
    for sl in _chunks(n, layout.rows * layout.row_length, chunk_elems):
        grads = torch.einsum("ntj,ntk->njk", d[sl], a[sl])  # per-example (n, out, in[+1])
        per_row = layout.rows_to_blocks(grads)  # (n, out * chunks, s)
        _add_outer_sum(out, per_row.reshape(-1, blocks, layout.block_size), workspace)
    return out


def embedding_block_stats(
    module: nn.Module, layout: BlockLayout, inputs: Tensor, grad_outputs: Tensor,
    chunk_elems: int = 1 << 24,
) -> Tensor:
    """``sum_i`` of the block outer products of each example's ``nn.Embedding`` gradient.

    Example ``i``'s gradient of row ``t`` is the sum of the output gradients at ``i``'s positions
    holding token ``t`` (none for ``padding_idx``; divided by ``t``'s count in the whole batch
    with ``scale_grad_by_freq``, as autograd does). Only the (example, token) pairs that occur
    are formed, so the cost grows with the batch's tokens, not with the vocabulary.

    Args:
        module: the ``nn.Embedding`` (``padding_idx``, ``scale_grad_by_freq``).
        layout: the unit's ``embedding`` layout (one row per token).
        inputs: ``(N, *)`` token ids (any dtype holding them exactly: the hooks pass the
            statistics dtype, exact for ids below ``2**24`` in float32).
        grad_outputs: ``(N, *, embedding_dim)``.
        chunk_elems: bound on the per-example entries materialized at once.
    """
    n, rows, s, chunks = inputs.shape[0], layout.rows, layout.block_size, layout.chunks
    ids = inputs.reshape(n, -1).long()
    d = grad_outputs.reshape(n, ids.shape[1], layout.row_length)
    weight = torch.ones(ids.shape, dtype=d.dtype, device=d.device)
    padding_idx = getattr(module, "padding_idx", None)
    if padding_idx is not None:
        weight[ids == padding_idx] = 0.0
    if getattr(module, "scale_grad_by_freq", False):
        counts = torch.bincount(ids.reshape(-1), minlength=rows).to(d.dtype)
        weight = weight / counts[ids]
    out = torch.zeros(layout.num_blocks, s, s, dtype=d.dtype, device=d.device)
    grid = out.view(rows, chunks, s, s)
    for sl in _chunks(n, ids.shape[1] * chunks * s * s, chunk_elems):
        count = sl.stop - sl.start
        example = torch.arange(count, device=ids.device)[:, None]
        pairs, where = torch.unique((example * rows + ids[sl]).reshape(-1), return_inverse=True)
        grads = d.new_zeros(pairs.numel(), layout.row_length)
        grads.index_add_(0, where, (d[sl] * weight[sl, :, None]).reshape(-1, layout.row_length))
        blocks = layout.rows_to_blocks(grads).view(pairs.numel(), chunks, s)
        grid.index_add_(0, pairs % rows, blocks.unsqueeze(-1) * blocks.unsqueeze(-2))
    return out


def layer_norm_block_stats(
    module: nn.Module, layout: BlockLayout, inputs: Tensor, grad_outputs: Tensor,
    chunk_elems: int = 1 << 24,
) -> Tensor:
    """``sum_i`` of ``G_i G_i^T`` per channel for an affine ``nn.LayerNorm``: example ``i``'s
    ``(gamma_c, beta_c)`` gradient is ``sum_t (delta_itc xhat_itc, delta_itc)`` over its
    positions ``t``, ``xhat`` the normalized input, recomputed from ``inputs`` as the layer
    does (biased variance, ``eps``).

    Args:
        module: the ``nn.LayerNorm`` (``normalized_shape``, ``eps``).
        layout: the unit's ``norm`` layout (one 2x2 block per entry of ``normalized_shape``).
        inputs: ``(N, *, *normalized_shape)``.
        grad_outputs: the same shape.
        chunk_elems: bound on the entries materialized at once.
    """
    normalized = tuple(getattr(module, "normalized_shape", ()))
    dims = tuple(range(-len(normalized), 0))
    n, channels = inputs.shape[0], layout.rows
    out = torch.zeros(channels, 2, 2, dtype=inputs.dtype, device=inputs.device)
    for sl in _chunks(n, inputs[0].numel(), chunk_elems):
        x, delta = inputs[sl], grad_outputs[sl]
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        xhat = (x - mean) * torch.rsqrt(var + getattr(module, "eps", 1e-5))
        count = x.shape[0]
        pair = torch.stack(
            [(delta * xhat).reshape(count, -1, channels).sum(1),
             delta.reshape(count, -1, channels).sum(1)],
            dim=-1,
        )  # (examples, channels, 2)
        out += torch.einsum("nci,ncj->cij", pair, pair)
    return out


def _conv_padding(conv: _Conv, x: Tensor) -> tuple[Tensor, int]:
    """Pad ``x`` as the convolution does; returns the padded input and ``nd``."""
    nd = len(conv.kernel_size)
    pads = conv_padding(conv)
    if conv.padding_mode != "zeros":
        return F.pad(x, pads, mode=conv.padding_mode), nd
    return (F.pad(x, pads) if any(pads) else x), nd


def unfold_input(module: nn.Module, x: Tensor) -> Tensor:
    """im2col for Conv1d/2d/3d: ``(N, C_in, *spatial)`` to ``(N, C_in * prod(k), P)``.

    Rows are ordered as the flattened weight ``(C_in, *k)``, columns as the flattened output.
    """
    module = _as_conv(module)
    x, nd = _conv_padding(module, x)
    for dim in range(nd):
        span = module.dilation[dim] * (module.kernel_size[dim] - 1) + 1
        x = x.unfold(2 + dim, span, module.stride[dim])
    if any(step > 1 for step in module.dilation):  # keep every dilation-th tap of each window
        taps: list[slice] = [slice(None)] * (2 + nd)
        taps += [slice(None, None, step) for step in module.dilation]
        x = x[tuple(taps)]
    n, c = x.shape[:2]
    out_dims = list(range(2, 2 + nd))
    win_dims = list(range(2 + nd, 2 + 2 * nd))
    x = x.permute(0, 1, *win_dims, *out_dims)
    return x.reshape(n, c * math.prod(module.kernel_size), -1)


def conv_block_stats(
    module: nn.Module,
    layout: BlockLayout,
    bias_layout: BlockLayout | None,
    inputs: Tensor,
    grad_outputs: Tensor,
    chunk_elems: int = 1 << 24,
    workspace: Workspace | None = None,
    tied: int = 1,
) -> tuple[Tensor, Tensor | None]:
    """``sum_i`` of block outer products of each example's conv weight (and bias) gradient;
    with ``tied`` the weight's also summed over each group of ``tied`` rows that share a block
    (MBF's ``tie_rows``: the output channels), ``(num_blocks / tied, s, s)``."""
    module = _as_conv(module)
    n = inputs.shape[0]
    groups = module.groups
    c_out = grad_outputs.shape[1]
    k = math.prod(module.kernel_size)
    s = layout.block_size
    w_out = inputs.new_zeros(layout.num_blocks // tied, s, s)
    b_out = None
    if bias_layout is not None:
        bs = bias_layout.block_size
        b_out = inputs.new_zeros(bias_layout.num_blocks, bs, bs)
    spatial = math.prod(grad_outputs.shape[2:])
    grouped = (
        inputs.device.type == "cpu"
        and spatial >= GROUPED_MIN_POSITIONS
        and conv_weight_grad(len(module.kernel_size)) is not None
    )
    per = inputs[0].numel() * k + c_out * spatial + layout.numel
    for sl in _chunks(n, per, chunk_elems):
        d = grad_outputs[sl].reshape(-1, groups, c_out // groups, spatial)
        if grouped:
            grads = _grouped_weight_grads(module, inputs[sl], grad_outputs[sl])
        else:
            u = unfold_input(module, inputs[sl])
            u = u.reshape(u.shape[0], groups, -1, u.shape[-1])
            # (n, G, O_g, C_g * k), written into reused memory when there is a workspace
            shape = (*d.shape[:3], u.shape[2])
            out_grads = None if workspace is None else workspace.get("grads", shape, d)
            grads = torch.matmul(d, u.transpose(-1, -2), out=out_grads)
        rows = grads.reshape(grads.shape[0], layout.rows, layout.row_length)
        per_row = layout.rows_to_blocks(rows)  # (n, rows * chunks, s); tied: rows' sum too
        _add_outer_sum(w_out, per_row.reshape(-1, w_out.shape[0], s), workspace)
        if bias_layout is not None and b_out is not None:
            bias_grads = d.sum(-1).reshape(-1, 1, c_out)
            _add_outer_sum(b_out, bias_layout.rows_to_blocks(bias_grads), workspace)
    return w_out, b_out


def _grouped_weight_grads(module: _Conv, inputs: Tensor, grad_outputs: Tensor) -> Tensor:
    """Each example's weight gradient, ``(n, C_out, C_in / groups * prod(k))``.

    The ``n`` examples become ``n * groups`` groups of a single convolution, whose weight
    gradient is then exactly the stack of the per-example ones: one library call instead of
    im2col (``prod(k)`` times the input) and ``n`` small products.
    """
    x, nd = _conv_padding(module, inputs)  # padding applied here, so the call pads nothing
    weight_grad = conv_weight_grad(nd)
    assert weight_grad is not None  # checked by the caller
    n, c_out = x.shape[0], grad_outputs.shape[1]
    weight_size = (n * c_out, *module.weight.shape[1:])
    grads = weight_grad(
        x.reshape(1, -1, *x.shape[2:]),
        weight_size,
        grad_outputs.reshape(1, -1, *grad_outputs.shape[2:]),
        stride=module.stride,
        padding=0,
        dilation=module.dilation,
        groups=n * module.groups,
    )
    return grads.reshape(n, c_out, -1)


