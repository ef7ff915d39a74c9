"""Views of models and state dicts shared by the tests: one flat vector of a model's parameters,
and every tensor of a nested state dict with its path (to compare two runs bit for bit)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def flat_params(model: nn.Module) -> torch.Tensor:
    """A copy of every parameter of ``model``, flattened and concatenated in registration order."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def state_tensors(obj: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor of a nested state dict (dicts, lists, tuples), with its path, in a fixed
    order (dict keys sorted as strings)."""
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in state_tensors(obj[k], f"{prefix}/{k}")]
    if isinstance(obj, list | tuple):
        return [t for i, v in enumerate(obj) for t in state_tensors(v, f"{prefix}/{i}")]
    return []
