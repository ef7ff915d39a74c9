"""A small GPT: the decoder-only transformer of the benchmark's language-modelling task.

``logits = head(ln_f(blocks(tok(x) + pos(t))))`` with pre-LayerNorm blocks
``h <- h + attn(ln1(h))``, ``h <- h + mlp(ln2(h))``: causal multi-head self-attention and a GELU
MLP of four times the width. Every weight is a plain module of a type MBF has a rule for
(``docs/layers.md``): the token and position tables are ``nn.Embedding``, the query, key, value
and output projections and the two MLP layers are ``nn.Linear`` (so each output unit's row is a
mini-block), the norms are ``nn.LayerNorm``. The attention itself is
``F.scaled_dot_product_attention(is_causal=True)``, which has no parameters.

The output head is a separate ``nn.Linear`` (no bias), not tied to the token embedding: every
parameter then belongs to exactly one module, so each optimizer treats the head and the
embedding by their own rules (a tied matrix is one tensor with two roles and, in MBF, falls back
to the batch estimator; docs/layers.md). At this size untying costs ``vocab * width`` parameters.

Initialization (GPT-2's): linear and embedding weights normal with std 0.02, the projections
that write into the residual stream (attention output, second MLP layer) with
``0.02 / sqrt(2 * layers)``, biases zero, LayerNorm at (1, 0). No dropout: the benchmark's runs
are minutes long and far from overfitting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GPT", "GPTConfig"]

INIT_STD = 0.02


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a :class:`GPT`.

    Attributes:
        vocab_size: number of token ids (inputs and outputs).
        context: the longest sequence (rows of the position table).
        layers: transformer blocks.
        width: model width (embedding size), divisible by ``heads``.
        heads: attention heads.
        mlp_ratio: hidden width of the MLP over the model width.
    """

    vocab_size: int
    context: int
    layers: int = 2
    width: int = 128
    heads: int = 4
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context", "layers", "width", "heads", "mlp_ratio"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig: {name} must be positive, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(
                f"GPTConfig: width {self.width} is not divisible by heads {self.heads}"
            )


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position ``t`` sees positions ``<= t`` only."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        """``(batch, time, width)`` to the same shape."""
        b, t, c = x.shape

        def split(y: Tensor) -> Tensor:  # (b, t, c) -> (b, heads, t, c / heads)
            return y.view(b, t, self.heads, c // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            split(self.query(x)), split(self.key(x)), split(self.value(x)), is_causal=True
        )
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: attention, then a GELU MLP, each around a residual."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, mlp_ratio * width)
        self.proj = nn.Linear(mlp_ratio * width, width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Token ids ``(batch, time)``, ``time <= context``, to next-token logits
    ``(batch, time, vocab_size)``.

    Args:
        config: the model's shape.
        seed: draw the initial weights from ``torch.Generator().manual_seed(seed)``; ``None``
            draws them from torch's global generator (as the benchmark's other models do, after
            the run's ``torch.manual_seed``).
    """

    def __init__(self, config: GPTConfig, seed: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.tok = nn.Embedding(config.vocab_size, config.width)
        self.pos = nn.Embedding(config.context, config.width)
        self.blocks = nn.ModuleList(
            Block(config.width, config.heads, config.mlp_ratio) for _ in range(config.layers)
        )
        self.ln_f = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab_size, bias=False)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """GPT-2's initialization (module docstring), from ``seed`` or the global generator."""
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        residual_std = INIT_STD / math.sqrt(2 * self.config.layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                std = residual_std if name.endswith(("attn.out", "proj")) else INIT_STD
                module.weight.normal_(0.0, std, generator=generator)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        if t > self.config.context:
            raise ValueError(f"GPT: a sequence of {t} tokens exceeds the context of "
                             f"{self.config.context}")
        positions = torch.arange(t, device=tokens.device)
        x = self.tok(tokens) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
