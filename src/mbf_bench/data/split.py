"""The train/test container every dataset loader returns."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Split:
    """A dataset as tensors, already preprocessed.

    ``x_*`` are float32 with examples along dimension 0; ``y_*`` are int64 class indices, or
    ``None`` for autoencoder data (the target is the input). ``num_classes`` is ``None`` when there
    are no labels.
    """

    x_train: Tensor
    y_train: Tensor | None
    x_test: Tensor
    y_test: Tensor | None
    num_classes: int | None
