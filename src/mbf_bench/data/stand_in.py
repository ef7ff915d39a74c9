"""Random stand-ins for a task's data: the right shapes, no files.

A task (``mbf_bench.tasks``) declares the shape of its data once, as a :class:`SplitShape` or a
:class:`GraphShape`; ``mbf-bench speed`` times training steps on the random data these build,
so it needs no data set and cannot drift from the model, batch size and loss the task trains
with. The values are only plausible (inputs in [0, 1] for autoencoders, whose Bernoulli losses
need targets there; standard normal images; sparse, row-normalized graph features): they set
the cost of a step, not what it learns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .planetoid import Graph, normalized_adjacency
from .split import Split
from .text import Text

__all__ = ["DataShape", "GraphShape", "SplitShape", "TextShape"]


@dataclass(frozen=True)
class SplitShape:
    """Examples of shape ``example`` (e.g. ``(784,)`` or ``(3, 32, 32)``), with class labels
    in ``range(num_classes)``, or no labels (autoencoders) when ``num_classes`` is None."""

    example: tuple[int, ...]
    num_classes: int | None = None

    def random(self, generator: torch.Generator, examples: int) -> Split:
        """A :class:`Split` with ``examples`` random training and as many test examples."""
        if examples <= 0:
            raise ValueError(f"SplitShape.random: examples must be positive, got {examples}")
        size = (examples, *self.example)
        if self.num_classes is None:
            return Split(
                torch.rand(size, generator=generator), None,
                torch.rand(size, generator=generator), None, None,
            )  # fmt: skip
        return Split(
            torch.randn(size, generator=generator),
            torch.randint(0, self.num_classes, (examples,), generator=generator),
            torch.randn(size, generator=generator),
            torch.randint(0, self.num_classes, (examples,), generator=generator),
            self.num_classes,
        )


@dataclass(frozen=True)
class GraphShape:
    """A node-classification graph: ``nodes`` nodes with ``features`` sparse binary features
    (a fraction ``feature_density`` of them set), ``edges`` undirected edges, ``num_classes``
    classes, and the first ``train_nodes`` nodes labelled for training (the Planetoid split)."""

    nodes: int
    features: int
    num_classes: int
    edges: int
    train_nodes: int
    feature_density: float = 0.0127

    def random(self, generator: torch.Generator) -> Graph:
        """A random :class:`Graph` of this shape, preprocessed as the Planetoid loader does
        (row-normalized features, ``D^-1/2 (A + I) D^-1/2``); validation and test nodes follow
        the training ones."""
        n = self.nodes
        draws = torch.rand(n, self.features, generator=generator)
        features = (draws < self.feature_density).float()
        features = features / features.sum(1, keepdim=True).clamp_min(1.0)
        ends = torch.randint(0, n, (2, self.edges), generator=generator).numpy()
        train = torch.zeros(n, dtype=torch.bool)
        train[: self.train_nodes] = True
        val = torch.zeros(n, dtype=torch.bool)
        val[self.train_nodes : 2 * self.train_nodes] = True
        return Graph(
            features=features,
            adjacency=normalized_adjacency(ends[0].astype(np.int64), ends[1].astype(np.int64), n),
            labels=torch.randint(0, self.num_classes, (n,), generator=generator),
            train_mask=train,
            val_mask=val,
            test_mask=~(train | val),
            num_classes=self.num_classes,
        )


@dataclass(frozen=True)
class TextShape:
    """A tokenized text with ``vocab_size`` distinct tokens, read in windows of ``context``."""

    vocab_size: int
    context: int

    def random(self, generator: torch.Generator, windows: int) -> Text:
        """A :class:`Text` of uniform random tokens whose three parts each hold ``windows``
        windows of ``context + 1`` tokens (input and next-token target)."""
        if windows <= 0:
            raise ValueError(f"TextShape.random: windows must be positive, got {windows}")
        length = windows * (self.context + 1)
        ids = torch.randint(0, self.vocab_size, (3, length), generator=generator)
        vocabulary = "".join(chr(0x4E00 + i) for i in range(self.vocab_size))
        return Text(ids[0], ids[1], ids[2], vocabulary)


#: What a task declares about its data.
DataShape = SplitShape | GraphShape | TextShape
