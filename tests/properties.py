"""Random small architectures for the property-based tests (``tests/test_properties.py``).

An :class:`Arch` is drawn by hypothesis and built into a :class:`Net`: token embeddings, a chain
of Linear / Conv1d / Conv2d / LayerNorm / BatchNorm1d / MultiheadAttention / GRU layers of widths
1-4, a classification head, side modules with a zero in their shape, optionally a tied weight
(embedding and decoder, or two Linear layers), a frozen parameter and two param groups.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

from mbf.curvature import CONV_TYPES

KINDS = ("linear", "conv", "conv2d", "norm", "batchnorm", "mha", "gru")
# The per-example reference splits the loss into examples; batch norm couples them.
PER_EXAMPLE_KINDS = tuple(k for k in KINDS if k != "batchnorm")
EMPTIES = ("linear_0_in", "linear_0_out", "vector_0", "matrix_3x0")
TIES = ("none", "embedding_decoder", "linear_linear")


@dataclass(frozen=True)
class Arch:
    """What to build; every field is drawn by :func:`archs`."""

    vocab: int
    width: int
    length: int
    batch: int
    classes: int
    layers: tuple[tuple[str, int, bool], ...]  # (kind, width or heads, bias / affine flag)
    empties: tuple[str, ...]
    tie: str
    freeze: int | None  # index into the trainable parameters, frozen before the optimizer
    split: tuple[bool, ...]  # which parameters go to the second param group (cycled)
    reduction: str
    seed: int


class Net(nn.Module):
    """The model an :class:`Arch` describes, on ``(batch, length)`` token ids."""

    def __init__(self, arch: Arch) -> None:
        super().__init__()
        torch.manual_seed(arch.seed)
        self.arch = arch
        self.embed = nn.Embedding(arch.vocab, arch.width)
        self.layers = nn.ModuleList()
        d = arch.width
        for kind, size, flag in arch.layers:
            layer: nn.Module
            if kind == "linear":
                layer, d = nn.Linear(d, size, bias=flag), size
            elif kind == "conv":
                kernel = 1 + 2 * (size % 2)  # 1 or 3, padded to keep the length
                layer, d = nn.Conv1d(d, size, kernel, padding=kernel // 2, bias=flag), size
            elif kind == "conv2d":  # the sequence as a 1 x length image, (1, k) kernels
                kernel = 1 + 2 * (size % 2)
                layer = nn.Conv2d(d, size, (1, kernel), padding=(0, kernel // 2), bias=flag)
                d = size
            elif kind == "norm":
                layer = nn.LayerNorm(d, elementwise_affine=flag)
            elif kind == "batchnorm":
                layer = nn.BatchNorm1d(d, affine=flag)
            elif kind == "mha":
                heads = next(h for h in (size, 2, 1) if d % h == 0)
                layer = nn.MultiheadAttention(d, heads, bias=flag, batch_first=True)
            else:
                layer, d = nn.GRU(d, size, batch_first=True, bias=flag), size
            self.layers.append(layer)
        self.head = nn.Linear(d, arch.classes)
        if arch.tie == "linear_linear":  # the head's weight reused by a second Linear
            self.twin = nn.Linear(d, arch.classes)
            self.twin.weight = self.head.weight
        if arch.tie == "embedding_decoder":  # logits over the vocabulary, weight tying
            self.to_width = nn.Linear(d, arch.width)
            self.decoder = nn.Linear(arch.width, arch.vocab)
            self.decoder.weight = self.embed.weight
        self.sides = nn.ModuleDict()
        self.empty = nn.ParameterList()
        for name in arch.empties:
            if name == "linear_0_in":
                self.sides[name] = nn.Linear(0, 3)
            elif name == "linear_0_out":
                self.sides[name] = nn.Linear(3, 0)
            else:
                shape = (0,) if name == "vector_0" else (3, 0)
                self.empty.append(nn.Parameter(torch.empty(shape)))

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                h = torch.tanh(layer(h))
            elif isinstance(layer, (nn.Conv1d, nn.BatchNorm1d)):
                h = layer(h.transpose(1, 2)).transpose(1, 2)
                h = torch.tanh(h) if isinstance(layer, nn.Conv1d) else h
            elif isinstance(layer, nn.Conv2d):
                h = torch.tanh(layer(h.transpose(1, 2).unsqueeze(2)).squeeze(2).transpose(1, 2))
            elif isinstance(layer, nn.MultiheadAttention):
                h = h + layer(h, h, h, need_weights=False)[0]
            elif isinstance(layer, nn.GRU):
                h = layer(h)[0]
            else:
                h = layer(h)
        pooled = h.mean(dim=1)
        logits = self.head(pooled)
        if self.arch.tie == "linear_linear":
            logits = logits + 0.5 * self.twin(pooled.flip(-1))
        if self.arch.tie == "embedding_decoder":
            vocab = self.decoder(torch.tanh(self.to_width(pooled)))
            logits = logits + vocab[:, : self.arch.classes]
        extra = pooled.new_zeros(pooled.shape[0], 1)
        for name, side in self.sides.items():
            x = pooled.new_ones(pooled.shape[0], 0 if name == "linear_0_in" else 3)
            extra = extra + 0.1 * side(x).sum(dim=1, keepdim=True)
        for p in self.empty:
            extra = extra + p.sum()
        return logits + extra


@st.composite
def archs(draw: Any, estimator: str) -> Arch:
    """A random :class:`Arch`; no batch norm for the per-example estimator (see above)."""
    kinds = PER_EXAMPLE_KINDS if estimator == "per_example" else KINDS
    layers = draw(
        st.lists(
            st.tuples(st.sampled_from(kinds), st.integers(1, 4), st.booleans()),
            min_size=0,
            max_size=3,
        )
    )
    return Arch(
        vocab=draw(st.integers(3, 6)),
        width=draw(st.integers(1, 4)),
        length=draw(st.integers(1, 3)),
        # training-mode batch norm needs two values per channel
        batch=draw(st.integers(2 if any(k == "batchnorm" for k, _, _ in layers) else 1, 4)),
        classes=draw(st.integers(2, 3)),
        layers=tuple(layers),
        empties=tuple(draw(st.lists(st.sampled_from(EMPTIES), max_size=2, unique=True))),
        tie=draw(st.sampled_from(TIES)),
        freeze=draw(st.none() | st.integers(0, 50)),
        split=tuple(draw(st.lists(st.booleans(), min_size=1, max_size=4))),
        reduction=draw(st.sampled_from(("mean", "sum"))),
        seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def hyperparameters(draw: Any) -> dict[str, Any]:
    """Every hyperparameter a step depends on, drawn explicitly (never MBF's defaults)."""
    return {
        "lr": draw(st.floats(1e-3, 1.0)),
        "momentum": draw(st.sampled_from((0.0, 0.5, 0.9))),
        "damping": draw(st.sampled_from((1e-3, 0.03, 0.3, 1.0))),
        "stat_decay": draw(st.sampled_from((0.0, 0.5, 0.95))),
        "stat_every": draw(st.integers(1, 2)),
        "inv_every": draw(st.integers(1, 3)),
        "max_block_size": draw(st.integers(1, 6)),
        "weight_decay": draw(st.sampled_from((0.0, 0.1))),
        "decoupled_weight_decay": draw(st.booleans()),
        "kl_clip": None,
        "stat_buffer": draw(st.integers(1, 3)),
        "tie_rows": draw(st.booleans()),
    }


def build(arch: Arch, dtype: torch.dtype = torch.float64) -> Net:
    """The net in ``dtype``, with ``arch.freeze`` applied (the same weights on every call)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notice that empty tensors are not initialized
        net = Net(arch).to(dtype)
    trainable = [p for p in net.parameters() if p.requires_grad]
    if arch.freeze is not None and arch.freeze < len(trainable):
        trainable[arch.freeze].requires_grad_(False)
    return net


def param_groups(net: Net, arch: Arch, hp: dict[str, Any]) -> list[dict[str, Any]]:
    """One or two groups; the second with its own lr, damping and the other ``tie_rows``."""
    first, second = [], []
    for i, p in enumerate(q for q in net.parameters() if q.requires_grad):
        (second if arch.split[i % len(arch.split)] else first).append(p)
    groups = [{"params": first}] if first else []
    if second:
        groups.append({"params": second, "lr": hp["lr"] / 2, "damping": hp["damping"] * 3,
                       "tie_rows": not hp["tie_rows"]})
    return groups


def batch(arch: Arch, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, arch.vocab, (arch.batch, arch.length), generator=gen)
    return tokens, torch.randint(0, arch.classes, (arch.batch,), generator=gen)


def loss(net: Net, tokens: Tensor, labels: Tensor, reduction: str) -> Tensor:
    return nn.functional.cross_entropy(net(tokens), labels, reduction=reduction)


def served_by_hooks(net: Net, groups: list[dict[str, Any]]) -> set[int]:
    """Ids of the parameters the per-example estimator should serve, by the documented rule:
    the weight of a Linear, ConvNd or Embedding called through its forward (not
    MultiheadAttention's ``out_proj``) that no other module shares, and its bias when in the
    same param group; a LayerNorm's weight and bias when both are in one param group."""
    group_of = {id(p): g for g, group in enumerate(groups) for p in group["params"]}
    owners: dict[int, int] = {}
    for module in net.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    functional = {m.out_proj for m in net.modules() if isinstance(m, nn.MultiheadAttention)}
    served: set[int] = set()
    for module in net.modules():
        if isinstance(module, nn.LayerNorm):
            pair = (module.weight, module.bias)
            if all(p is not None and owners[id(p)] == 1 for p in pair) and (
                group_of.get(id(pair[0]), -1) == group_of.get(id(pair[1]), -2)
            ):
                served.update(map(id, pair))
            continue
        if not isinstance(module, (nn.Linear, nn.Embedding, *CONV_TYPES)) or module in functional:
            continue
        weight, bias = module.weight, getattr(module, "bias", None)
        if id(weight) not in group_of or weight.numel() == 0 or owners[id(weight)] > 1:
            continue
        served.add(id(weight))
        if bias is not None and group_of.get(id(bias)) == group_of[id(weight)]:
            served.add(id(bias))
    return served


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
