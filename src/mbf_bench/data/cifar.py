"""CIFAR-10 / CIFAR-100 from the python batch files or an ``.npz``, and GPU-friendly augmentation.

Sources accepted by :func:`load_cifar`:

- the folder of the official python version: CIFAR-10 ``data_batch_1..5`` + ``test_batch``
  (``cifar-10-batches-py``), CIFAR-100 ``train`` + ``test`` (``cifar-100-python``). These are
  pickles; they are read through :func:`mbf_bench.data.safe_pickle.restricted_load`, which allows
  only NumPy array reconstruction.
- an ``.npz`` with ``x_train, y_train, x_test, y_test`` (images uint8, NCHW or NHWC), read with
  ``allow_pickle=False``;
- a parent folder: searched two levels deep, batch folders first (they are the full data set),
  then ``.npz`` files (in the folder itself, or below it with "cifar" in their path).

Images are returned as float32 NCHW, ``(pixel / 255 - mean) / std`` per channel with the values
of the authors' TNT / K-BFGS / MBF framework (see :data:`NORMALIZATION`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import DataError
from .paths import DATA_DIR_HINT
from .safe_pickle import NUMPY_ARRAYS, restricted_load
from .split import Split

#: Per-channel (mean, std) of the RGB channels in [0, 1], as in the authors' framework. For
#: CIFAR-10 the std (0.2023, 0.1994, 0.2010) is the customary value of most CIFAR code (the mean
#: per-image std; the std over the whole training set is (0.2470, 0.2435, 0.2616)); kept for
#: fidelity to the experiments reproduced.
NORMALIZATION: dict[int, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    10: ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    100: ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
}
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"
SIDE = 32


def _batch_folder_kind(folder: Path) -> int | None:
    """10 or 100 if ``folder`` looks like an official python-version folder, else None."""
    if (folder / CIFAR10_TRAIN[0]).is_file():
        return 10
    if (folder / "train").is_file() and (folder / "test").is_file():
        return 100
    return None


def _read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch: images (n, 3, 32, 32) uint8 and labels (n,) int64."""
    if not path.is_file():
        raise DataError(
            f"{path}: file not found; the CIFAR python-version folder must hold all of its "
            "batch files (download and extract the official cifar-*-python.tar.gz)."
        )
    batch = restricted_load(path, NUMPY_ARRAYS, encoding="bytes")
    if not isinstance(batch, dict):
        raise DataError(f"{path}: holds a {type(batch).__name__}, not a CIFAR batch dictionary")
    entries: dict[str, Any] = {
        (k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in batch.items()
    }
    if "data" not in entries or label_key not in entries:
        raise DataError(
            f"{path}: lacks the key 'data' or {label_key!r} (has {sorted(entries)}); is it a "
            f"CIFAR-{10 if label_key == 'labels' else 100} batch?"
        )
    data = entries["data"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or (data.shape[1] != 3 * SIDE * SIDE)
    ):
        raise DataError(
            f"{path}: 'data' is {getattr(data, 'dtype', type(data).__name__)} "
            f"{getattr(data, 'shape', '')}, expected uint8 (n, 3072); replace the file."
        )
    labels = _labels(entries[label_key], len(data), path)
    return data.reshape(len(data), 3, SIDE, SIDE), labels


def _labels(raw: Any, count: int, path: Path) -> np.ndarray:
    try:
        labels = np.asarray(raw).reshape(-1)
    except Exception as exc:
        raise DataError(f"{path}: unreadable labels ({exc})") from exc
    if (
        labels.shape != (count,)
        or not np.issubdtype(labels.dtype, np.integer)
        or (count and labels.min() < 0)
    ):
        raise DataError(
            f"{path}: labels are {labels.dtype} {labels.shape}, expected {count} integers >= 0 "
            "(one per image); replace the file."
        )
    return labels.astype(np.int64)


def _load_batch_folder(folder: Path, kind: int) -> tuple[np.ndarray, ...]:
    if kind == 10:
        train = [_read_batch(folder / name, "labels") for name in CIFAR10_TRAIN]
        x_test, y_test = _read_batch(folder / CIFAR10_TEST, "labels")
    else:
        train = [_read_batch(folder / "train", "fine_labels")]
        x_test, y_test = _read_batch(folder / "test", "fine_labels")
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return x_train, y_train, x_test, y_test


def _nchw(images: np.ndarray, path: Path, key: str) -> np.ndarray:
    """uint8 images in NCHW, converting from NHWC when the channel axis is last."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(
            f"{path}: {key!r} is {images.dtype} {images.shape}, expected uint8 images "
            "(N, 3, 32, 32) or (N, 32, 32, 3)."
        )
    if images.shape[1:] == (3, SIDE, SIDE):
        return images
    if images.shape[1:] == (SIDE, SIDE, 3):
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    raise DataError(
        f"{path}: {key!r} has shape {images.shape}; expected (N, 3, 32, 32) or (N, 32, 32, 3)."
    )


def _load_npz(path: Path) -> tuple[np.ndarray, ...]:
    keys = ("x_train", "y_train", "x_test", "y_test")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in keys if k not in archive.files]
            if missing:
                raise DataError(
                    f"{path}: lacks {', '.join(missing)} (has {archive.files}); a CIFAR .npz "
                    "needs x_train, y_train, x_test, y_test."
                )
            arrays = {k: archive[k] for k in keys}
    except DataError:
        raise
    except Exception as exc:  # BadZipFile, pickled object arrays refused, truncated member...
        raise DataError(
            f"{path}: cannot read it as a NumPy .npz archive ({type(exc).__name__}: {exc}); "
            "replace it with a fresh copy."
        ) from exc
    x_train = _nchw(arrays["x_train"], path, "x_train")
    x_test = _nchw(arrays["x_test"], path, "x_test")
    return (
        x_train,
        _labels(arrays["y_train"], len(x_train), path),
        x_test,
        _labels(arrays["y_test"], len(x_test), path),
    )


def _find_source(root: Path, num_classes: int | None) -> tuple[Path, int | None]:
    """The batch folder or .npz to read under ``root``, with the batch folder's kind."""
    own = _batch_folder_kind(root)
    if own is not None and num_classes not in (None, own):
        raise DataError(
            f"{root}: holds CIFAR-{own} batches but num_classes={num_classes} was asked for."
        )
    folders = [
        root,
        *sorted(p for p in root.glob("*") if p.is_dir()),
        *sorted(p for p in root.glob("*/*") if p.is_dir()),
    ]
    batch = [
        (f, k)
        for f in folders
        if (k := _batch_folder_kind(f)) is not None and num_classes in (None, k)
    ]
    if len(batch) == 1:
        return batch[0]
    if len(batch) > 1:
        raise DataError(
            f"CIFAR: several data sets under {root}: {', '.join(str(f) for f, _ in batch)}; "
            "pass one of them as the source, or pass num_classes."
        )
    npz = sorted(root.glob("*.npz")) + sorted(
        p
        for pattern in ("*/*.npz", "*/*/*.npz")
        for p in root.glob(pattern)
        if "cifar" in str(p.relative_to(root)).lower()
    )
    if len(npz) == 1:
        return npz[0], None
    if len(npz) > 1:
        raise DataError(
            f"CIFAR: several .npz files under {root}: {', '.join(map(str, npz))}; pass the one "
            "to use as the source."
        )
    raise DataError(
        f"CIFAR: no data under {root} (searched two levels deep for data_batch_1..5 + "
        "test_batch, CIFAR-100 train + test, or a .npz); extract the official python version "
        f"(cifar-10-python.tar.gz / cifar-100-python.tar.gz) there, and {DATA_DIR_HINT}."
    )


def load_cifar(source: str | Path, num_classes: int | None = None) -> Split:
    """CIFAR-10/100: x float32 (N, 3, 32, 32) normalized per channel, y int64.

    ``num_classes`` (10 or 100) selects the data set when a parent folder holds both and fixes
    the normalization; by default it comes from the batch folder's kind or, for an ``.npz``,
    from the labels (10 if all labels are below 10, else 100).
    """
    if num_classes not in (None, 10, 100):
        raise ValueError(f"load_cifar: num_classes must be 10, 100 or None, got {num_classes}")
    path = Path(source).expanduser()
    if path.is_dir():
        path, kind = _find_source(path, num_classes)
    elif path.is_file():
        kind = None
        if path.suffix != ".npz":
            raise DataError(
                f"{path}: a CIFAR source must be an .npz file or a folder (the python-version "
                "batch folder or a parent of it)."
            )
    else:
        raise DataError(f"CIFAR: {path} does not exist; {DATA_DIR_HINT}.")
    x_train, y_train, x_test, y_test = (
        _load_batch_folder(path, kind) if kind is not None else _load_npz(path)
    )
    largest = int(max(y_train.max(initial=0), y_test.max(initial=0)))
    classes = num_classes or kind or (10 if largest < 10 else 100)
    if largest >= classes:
        raise DataError(f"{path}: label {largest} is out of range for CIFAR-{classes}.")
    mean, std = NORMALIZATION[classes]
    return Split(
        x_train=normalize(x_train, mean, std),
        y_train=torch.from_numpy(y_train),
        x_test=normalize(x_test, mean, std),
        y_test=torch.from_numpy(y_test),
        num_classes=classes,
    )


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 NCHW images to float32 ``(pixel / 255 - mean) / std`` per channel."""
    x = torch.from_numpy(images).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def black_level(num_classes: int) -> Tensor:
    """The normalized value of a black pixel, per channel: pass it as ``augment_cifar(fill=)``
    to pad exactly like torchvision's RandomCrop on raw images (which pads with 0)."""
    mean, std = NORMALIZATION[num_classes]
    return -torch.tensor(mean) / torch.tensor(std)


def augment_cifar(
    x: Tensor, generator: torch.Generator, *, padding: int = 4, fill: float | Tensor = 0.0
) -> Tensor:
    """Random crop (size of ``x``, after zero-padding by ``padding``) and random horizontal flip.

    Batched tensor indexing, no Python loop over images; works on any device. Offsets and flips
    are drawn from ``generator`` on its own device (offsets first, then flips), so a seeded
    generator gives the same augmentation everywhere. ``fill`` is the padding value, a scalar or
    one value per channel; 0 pads with the data mean of normalized images (see
    :func:`black_level` to pad with black instead).
    """
    if x.ndim != 4:
        raise ValueError(f"augment_cifar: expected images (B, C, H, W), got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    offsets = torch.randint(
        0, 2 * padding + 1, (2, b), generator=generator, device=generator.device
    ).to(x.device)
    flip = (torch.rand(b, generator=generator, device=generator.device) < 0.5).to(x.device)
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    padded = fill_t.expand(b, c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, :, padding : padding + h, padding : padding + w] = x
    cols = torch.arange(w, device=x.device)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[1, :, None] + torch.where(flip[:, None], w - 1 - cols, cols)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indices around a slice: the result is (B, H, W, C).
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
