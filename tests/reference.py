"""Float64 autodiff references: per-example gradients and dense empirical Fisher blocks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from mbf import MBF
from mbf.blocks import BlockLayout


def per_example_grads(
    model: nn.Module, loss_of_output: Callable[[Tensor], Tensor], x: Tensor
) -> dict[str, Tensor]:
    """``{name: (N, *shape)}`` gradients of each example's loss ``loss_of_output(model(x_i))``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return loss_of_output(out)

    return vmap(grad(one), in_dims=(None, 0))(params, x)


def unit_vectors(grads: list[Tensor]) -> Tensor:
    """Concatenate a unit's per-example tensors (``(N, *shape)`` each) into ``(N, numel)``."""
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)


def dense_blocks(layout: BlockLayout, dense: Tensor) -> list[Tensor]:
    """Cut the unit's dense ``(numel, numel)`` matrix into the layout's blocks (no padding)."""
    return [dense[idx][:, idx] for idx in layout.dense_indices()]


def block_diagonal(layout: BlockLayout, blocks: Tensor, damping: float) -> Tensor:
    """Dense ``(numel, numel)`` matrix with the unpadded ``blocks + damping I`` on its diagonal."""
    out = torch.zeros(layout.numel, layout.numel, dtype=blocks.dtype)
    for b, idx in enumerate(layout.dense_indices()):
        k = len(idx)
        out[idx[:, None], idx[None, :]] = blocks[b, :k, :k] + damping * torch.eye(
            k, dtype=blocks.dtype
        )
    return out


#: MBF options that give the paper's update (no grafting, first estimate as it is, fixed
#: refreshes, absolute damping): the form the float64 references in these tests spell out.
PAPER_FORM = {
    "tie_rows": False,
    "graft": None,
    "bias_correction": False,
    "early_refresh": False,
    "relative_damping": False,
}


def paper_mbf(*args: Any, **kwargs: Any) -> MBF:
    """``MBF`` in the paper's form; ``kwargs`` override (the tests' own hyperparameters)."""
    return MBF(*args, **{**PAPER_FORM, **kwargs})
