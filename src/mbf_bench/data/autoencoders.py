"""The autoencoder data sets: CURVES and FACES from their MATLAB files, and scikit-learn's digits.

File formats (the files of James Martens's Hessian-free / K-FAC experiments, used unchanged by
the TNT / K-BFGS / MBF framework):

- CURVES ``digs3pts_1.mat``: ``bdata`` (20,000 x 784) train and ``bdatatest`` (10,000 x 784)
  test, one 28x28 image per row, values in [0, 1]. Without the file use
  :func:`mbf_bench.data.make_curves`.
- FACES ``newfaces_rot_single.mat``: ``newfaces_single`` (625 x 165,600), one 25x25 face per
  column. As in that framework (and Martens's code: train = first 25/40 of the columns, test =
  last 10/40), the train set is the FIRST 103,500 columns and the test set the LAST 41,400; the
  20,700 columns in between are not used. Values are kept as stored (no rescaling).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .matfile import read_mat_variable
from .paths import resolve_file
from .split import Split

CURVES_FILE = "digs3pts_1.mat"
FACES_FILE = "newfaces_rot_single.mat"
FACES_TRAIN = 103_500
FACES_TEST = 41_400
DIGITS_TEST = 360


def _as_tensor(array: np.ndarray, path: Path, key: str) -> torch.Tensor:
    values = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(values).all():
        raise DataError(f"{path}: variable {key!r} holds NaN or infinite values; replace the file.")
    return torch.from_numpy(values)


def load_curves_mat(path: str | Path) -> Split:
    """The original CURVES set: x float32 (N, 784), rows as stored; no labels.

    ``path`` is ``digs3pts_1.mat`` itself or a folder holding it (or its ``curves/`` subfolder).
    """
    file = resolve_file(path, [CURVES_FILE], ["curves", "CURVES"], "CURVES")
    parts = []
    for key in ("bdata", "bdatatest"):
        array = read_mat_variable(file, key)
        if array.shape[1] != 784:
            raise DataError(
                f"{file}: variable {key!r} is {array.shape}, expected N x 784 (one 28x28 image a "
                "row); replace it with the original digs3pts_1.mat."
            )
        parts.append(_as_tensor(array, file, key))
    return Split(x_train=parts[0], y_train=None, x_test=parts[1], y_test=None, num_classes=None)


def load_faces_mat(path: str | Path, n_train: int = FACES_TRAIN, n_test: int = FACES_TEST) -> Split:
    """FACES: train = first ``n_train`` columns, test = last ``n_test``; x float32 (N, 625).

    ``path`` is ``newfaces_rot_single.mat`` itself or a folder holding it (or ``faces/``).
    """
    file = resolve_file(path, [FACES_FILE], ["faces", "FACES"], "FACES")
    array = read_mat_variable(file, "newfaces_single")
    if array.shape[0] != 625:
        raise DataError(
            f"{file}: 'newfaces_single' is {array.shape}, expected 625 x N (one 25x25 image a "
            "column); replace it with the original newfaces_rot_single.mat."
        )
    total = array.shape[1]
    if n_train < 1 or n_test < 1 or n_train + n_test > total:
        raise DataError(
            f"{file}: holds {total} images, too few for n_train={n_train} + n_test={n_test} "
            f"(the original file holds {FACES_TRAIN + 20_700 + FACES_TEST})."
        )
    return Split(
        x_train=_as_tensor(array[:, :n_train].T, file, "newfaces_single"),
        y_train=None,
        x_test=_as_tensor(array[:, total - n_test :].T, file, "newfaces_single"),
        y_test=None,
        num_classes=None,
    )


def load_digits(seed: int = 0) -> Split:
    """scikit-learn's 8x8 digits (bundled, no download): x float32 (N, 64) = pixels / 16.

    A stratified split with 360 test images (1,437 train), fixed by ``seed``; y int64, 10 classes.
    A CPU-sized data set for quick autoencoder and classifier runs.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    x = np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)
    y = np.asarray(bunch.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=DIGITS_TEST, stratify=y, random_state=seed
    )
    return Split(
        x_train=torch.from_numpy(np.ascontiguousarray(x_train)),
        y_train=torch.from_numpy(np.ascontiguousarray(y_train)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test)),
        y_test=torch.from_numpy(np.ascontiguousarray(y_test)),
        num_classes=10,
    )
