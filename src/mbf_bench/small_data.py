"""Small real image sets for the exact (dense, float64) curvature studies.

The theory and curvature commands need a few dozen to a few hundred images as float64 arrays, not
a training pipeline: all 1,797 scikit-learn ``digits`` (8x8, bundled) and the 10,000 MNIST test
images, both read with the benchmark's own loaders (:mod:`mbf_bench.data`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data import DataError, load_digits, load_mnist

__all__ = ["DataError", "digits_images", "mnist_test_images"]


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """All scikit-learn digits: ``(1797, 8, 8)`` float64 pixels in [0, 1] and int64 labels."""
    split = load_digits()
    assert split.y_train is not None and split.y_test is not None
    x = torch.cat([split.x_train, split.x_test]).to(torch.float64)
    y = torch.cat([split.y_train, split.y_test])
    return x.reshape(-1, 8, 8).numpy(), y.numpy()


def mnist_test_images(data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 MNIST test images: ``(10000, 28, 28)`` float64 in [0, 1] and int64 labels.

    ``data_dir`` is the folder with the MNIST files or a parent of it (see
    :func:`mbf_bench.data.load_mnist`); a missing file raises :class:`DataError`.
    """
    split = load_mnist(data_dir)
    assert split.y_test is not None
    return split.x_test.to(torch.float64).reshape(-1, 28, 28).numpy(), split.y_test.numpy()
