"""MNIST from the original IDX files or from Hinton & Salakhutdinov's per-digit ``.mat`` files.

Each split (train, test) is read from IDX when its image file is found, otherwise from the ten
per-digit MATLAB files (``digit0..9.mat`` for train, ``test0..9.mat`` for test; variable ``D``,
uint8, one 28x28 row-major image per row; the label is the digit in the file name). The
per-digit train set comes grouped by digit, so it is returned in a fixed seeded shuffled order:
minibatches drawn in file order would otherwise hold a single class. Both sources hold the same
images (the test files are the t10k images of each digit in original order).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .matfile import read_mat_variable
from .paths import DATA_DIR_HINT, describe, existing_dir, find_first, search_dirs
from .split import Split

SUBFOLDERS = ("mnist", "MNIST", "mnist_hinton_mat", "MNIST/raw")
IMAGE_SIDE = 28
NUM_CLASSES = 10
#: IDX type byte 0x08 = unsigned byte; the fourth magic byte is the number of dimensions.
_IDX_UBYTE = 0x08
_PREFIX = {"train": "train", "test": "t10k"}
_MAT_PREFIX = {"train": "digit", "test": "test"}


def _idx_names(base: str) -> list[str]:
    """``train-images-idx3-ubyte`` and the spellings found in the wild (``.gz``, ``.idx3``)."""
    dotted = base.replace("-idx", ".idx")
    return [base + ".gz", base, dotted + ".gz", dotted]


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with ``ndim`` dimensions, gzip-compressed or raw.

    The magic number (0, 0, 0x08, ndim) and the exact file size are checked, so a truncated or
    padded download is reported instead of silently misread.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"{path}: cannot read or decompress it ({type(exc).__name__}: {exc}); replace it "
            "with a fresh copy of the original MNIST file."
        ) from exc
    header = 4 + 4 * ndim
    if len(raw) < header or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] != ndim:
        raise DataError(
            f"{path}: not an IDX file of unsigned bytes with {ndim} dimensions (magic number "
            f"{raw[:4].hex() or 'missing'}, expected 000008{ndim:02x}); is it the right file?"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(
            f"{path}: {len(raw)} bytes (decompressed) but its header {dims} implies {expected}; "
            "the file is truncated or corrupt: replace it with a fresh copy."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _from_idx(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(f"{images_path}: images are {images.shape[1:]}, expected 28x28")
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
            "labels; they must come from the same split of the same dataset."
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DataError(f"{labels_path}: label {labels.max()} is not a digit 0-9")
    return images.reshape(len(images), -1), labels


def _from_mat(dirs: list[Path], split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The ten per-digit files of ``split``, or None if none of them is there."""
    names = [f"{_MAT_PREFIX[split]}{digit}.mat" for digit in range(NUM_CLASSES)]
    paths = [find_first(dirs, [name]) for name in names]
    if all(p is None for p in paths):
        return None
    missing = [name for name, p in zip(names, paths, strict=True) if p is None]
    if missing:
        raise DataError(
            f"MNIST {split}: found some per-digit .mat files but not {', '.join(missing)} "
            f"(searched {describe(dirs)}); put all ten files in one folder."
        )
    images, labels = [], []
    for digit, path in enumerate(paths):
        assert path is not None
        block = read_mat_variable(path, "D")
        if block.dtype != np.uint8 or block.shape[1] != IMAGE_SIDE * IMAGE_SIDE:
            raise DataError(
                f"{path}: variable 'D' is {block.dtype} {block.shape}, expected uint8 [n x 784] "
                "as written by converter.m; replace it with the original file."
            )
        images.append(block)
        labels.append(np.full(len(block), digit, dtype=np.uint8))
    return np.concatenate(images), np.concatenate(labels)


def _load_split(dirs: list[Path], split: str) -> tuple[np.ndarray, np.ndarray, str]:
    prefix = _PREFIX[split]
    images_path = find_first(dirs, _idx_names(f"{prefix}-images-idx3-ubyte"))
    if images_path is not None:
        labels_path = find_first(dirs, _idx_names(f"{prefix}-labels-idx1-ubyte"))
        if labels_path is None:
            raise DataError(
                f"MNIST {split}: found {images_path} but no {prefix}-labels-idx1-ubyte[.gz] "
                f"(searched {describe(dirs)}); put the labels file beside it."
            )
        return (*_from_idx(images_path, labels_path), "idx")
    from_mat = _from_mat(dirs, split)
    if from_mat is None:
        raise DataError(
            f"MNIST {split}: no {prefix}-images-idx3-ubyte[.gz] (+ labels) and no "
            f"{_MAT_PREFIX[split]}0..9.mat found in {describe(dirs)}; put either set of files "
            f"in a folder and {DATA_DIR_HINT}."
        )
    return (*from_mat, "mat")


def load_mnist(data_dir: str | Path, *, shuffle_seed: int = 0) -> Split:
    """MNIST: x float32 (N, 784) = pixels / 255, y int64 digits; 60,000 train and 10,000 test.

    ``data_dir`` is the folder holding the files or a parent with ``mnist/`` and/or
    ``mnist_hinton_mat/`` subfolders. A train set read from the per-digit files is permuted with
    ``numpy.random.default_rng(shuffle_seed)``; IDX data and the test set keep file order.
    """
    root = existing_dir(data_dir, "MNIST")
    dirs = search_dirs(root, SUBFOLDERS)
    x_train, y_train, source = _load_split(dirs, "train")
    if source == "mat":
        order = np.random.default_rng(shuffle_seed).permutation(len(x_train))
        x_train, y_train = x_train[order], y_train[order]
    x_test, y_test, _ = _load_split(dirs, "test")
    return Split(
        x_train=_pixels(x_train),
        y_train=torch.from_numpy(y_train.astype(np.int64)),
        x_test=_pixels(x_test),
        y_test=torch.from_numpy(y_test.astype(np.int64)),
        num_classes=NUM_CLASSES,
    )


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32) / np.float32(255.0))
