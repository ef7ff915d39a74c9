"""Small real datasets for the exact (dense, float64) curvature studies.

The theory and curvature commands need a few dozen to a few hundred examples, not a training
pipeline: scikit-learn's bundled ``digits`` (8x8 images, 64 features, always available) and the
MNIST test images read from the original IDX file. The IDX reader here is deliberately tiny; when
``mbf_bench.data.load_mnist`` lands on main it should replace :func:`mnist_test_images`.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_DATA_DIR", "digits_images", "mnist_test_images"]

#: Where the project's real data lives beside a checkout (``../shared/data``).
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"

MNIST_IMAGES = "t10k-images-idx3-ubyte.gz"
MNIST_LABELS = "t10k-labels-idx1-ubyte.gz"


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: ``(1797, 8, 8)`` float64 pixels in [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float64) / 16.0, bunch.target.astype(np.int64)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read a gzip IDX file of unsigned bytes with ``ndim`` dimensions."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x0800 + ndim:
        raise ValueError(f"{path}: not an IDX file of {ndim}-d unsigned bytes (magic {magic:#x})")
    dims = [int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {dims} bytes of data, found {data.size}")
    return data.reshape(dims)


def _mnist_folder(data_dir: str | Path) -> Path:
    root = Path(data_dir)
    for folder in (root, root / "mnist"):
        if (folder / MNIST_IMAGES).is_file() and (folder / MNIST_LABELS).is_file():
            return folder
    raise FileNotFoundError(
        f"MNIST test files {MNIST_IMAGES} and {MNIST_LABELS} not found in {root} or "
        f"{root / 'mnist'}; pass --data-dir pointing at the folder that holds them "
        "(the project's real data folder is ../shared/data)"
    )


def mnist_test_images(data_dir: str | Path = DEFAULT_DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 MNIST test images: ``(10000, 28, 28)`` float64 in [0, 1] and int64 labels.

    ``data_dir`` may be the folder with the IDX files or its parent (``.../data`` with
    ``mnist/`` inside).
    """
    folder = _mnist_folder(data_dir)
    images = _read_idx(folder / MNIST_IMAGES, 3).astype(np.float64) / 255.0
    labels = _read_idx(folder / MNIST_LABELS, 1).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} images but {len(labels)} labels")
    return images, labels
