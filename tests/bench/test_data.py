"""Data loaders: the real files in ../shared/data (skipped when absent) and small files written
here in each original format, including corrupt, truncated and malicious ones."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
import torch

from mbf_bench.data import (
    NORMALIZATION,
    DataError,
    augment_cifar,
    black_level,
    load_cifar,
    load_curves_mat,
    load_digits,
    load_faces_mat,
    load_mnist,
    load_planetoid,
    make_curves,
    restricted_load,
)
from mbf_bench.data.curves import STROKE_SIGMA, _quadratic, curve_points, render_curves
from mbf_bench.data.mnist import read_idx
from mbf_bench.data.safe_pickle import CONTAINERS, NUMPY_ARRAYS, SCIPY_CSR

# tests/bench/test_data.py -> the checkout is parents[2]; the data lie beside it.
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
CORA_CLASS_COUNTS = [351, 217, 418, 818, 426, 298, 180]  # the published Cora label distribution


def shared(sub: str) -> Path:
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"real data {path} not present (../shared/data beside the checkout)")
    return path


# ----------------------------------------------------------------------------- safe pickle


class _Evil:
    """Pickles to a call of os.system: what a doctored data file would contain."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (self.command,))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"data": _Evil(f"touch {sentinel}")}, protocol=2))
    everything_data_needs = NUMPY_ARRAYS | SCIPY_CSR | CONTAINERS
    with pytest.raises(DataError, match=r"evil\.pkl.*refused.*system"):
        restricted_load(evil, everything_data_needs, encoding="latin1")
    assert not sentinel.exists()
    # Sanity check of the test itself: plain pickle would have run the command.
    pickle.loads(evil.read_bytes())
    assert sentinel.exists()


@pytest.mark.parametrize(
    "payload",
    [
        b"c__builtin__\neval\n(S'1+1'\ntR.",  # protocol 0, Python-2 spelling of builtins.eval
        b"\x80\x02csubprocess\ncheck_output\n]q\x00U\x02lsq\x01a\x85R.",
        pickle.dumps(defaultdict(list), protocol=2).replace(b"collections", b"collectionz"),
    ],
)
def test_unlisted_globals_are_refused(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "bad.pkl"
    path.write_bytes(payload)
    with pytest.raises(DataError, match="refused"):
        restricted_load(path, NUMPY_ARRAYS | CONTAINERS, encoding="latin1")


def test_persistent_ids_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "pid.pkl"
    path.write_bytes(b"\x80\x02X\x03\x00\x00\x00abcQ.")  # BINPERSID
    with pytest.raises(DataError, match="persistent id"):
        restricted_load(path, NUMPY_ARRAYS)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_and_csr_round_trip_through_the_allow_list(tmp_path: Path, protocol: int) -> None:
    rng = np.random.default_rng(0)
    obj = {
        "a": rng.normal(size=(3, 4)).astype(np.float32),
        "b": sp.csr_matrix(rng.integers(0, 2, size=(5, 6)).astype(np.float32)),
        "c": defaultdict(list, {0: [1, 2]}),
        "n": np.int64(7),
    }
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    back = restricted_load(path, NUMPY_ARRAYS | SCIPY_CSR | CONTAINERS)
    np.testing.assert_array_equal(back["a"], obj["a"])
    np.testing.assert_array_equal(back["b"].toarray(), obj["b"].toarray())
    assert back["c"] == {0: [1, 2]} and back["n"] == 7
    with pytest.raises(DataError, match="refused.*csr_matrix"):
        restricted_load(path, NUMPY_ARRAYS | CONTAINERS)


def test_truncated_pickle_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps(np.arange(100), protocol=2)[:-20])
    with pytest.raises(DataError, match=r"cut\.pkl.*truncated or corrupt"):
        restricted_load(path, NUMPY_ARRAYS)


# ----------------------------------------------------------------------------- MNIST


@pytest.fixture(scope="module")
def real_mnist():  # type: ignore[no-untyped-def]
    return load_mnist(shared("."))


def test_mnist_real_shapes_ranges_and_counts(real_mnist) -> None:  # type: ignore[no-untyped-def]
    s = real_mnist
    assert s.x_train.shape == (60000, 784) and s.x_test.shape == (10000, 784)
    assert s.x_train.dtype == s.x_test.dtype == torch.float32
    assert s.y_train.dtype == s.y_test.dtype == torch.int64 and s.num_classes == 10
    assert s.x_train.min() == 0 and s.x_train.max() == 1
    np.testing.assert_allclose((s.x_test[:100] * 255).numpy(), (s.x_test[:100] * 255).round())
    assert s.y_train.bincount().tolist() == MNIST_TRAIN_COUNTS
    assert s.y_test.bincount().tolist() == MNIST_TEST_COUNTS
    # The per-digit counts also equal those of the original train label file.
    idx_labels = read_idx(shared("mnist/train-labels-idx1-ubyte.gz"), 1)
    assert np.bincount(idx_labels).tolist() == MNIST_TRAIN_COUNTS
    # The train set (read per digit) is shuffled: classes are mixed from the first batch on.
    assert len(set(s.y_train[:100].tolist())) == 10


def test_mnist_per_digit_test_files_hold_the_t10k_images(tmp_path: Path, real_mnist) -> None:  # type: ignore[no-untyped-def]
    """The test images of the per-digit .mat files equal the t10k IDX images (grouped by digit,
    original order within a digit); real_mnist read its test split from IDX."""
    for prefix in ("digit", "test"):
        for digit in range(10):
            name = f"{prefix}{digit}.mat"
            (tmp_path / name).symlink_to(shared("mnist_hinton_mat") / name)
    from_mat = load_mnist(tmp_path)
    order = np.argsort(real_mnist.y_test.numpy(), kind="stable")
    assert torch.equal(from_mat.y_test, real_mnist.y_test[order])
    assert torch.equal(from_mat.x_test, real_mnist.x_test[order])
    assert torch.equal(from_mat.x_train, real_mnist.x_train)  # same seeded order both times


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx_set(folder: Path, compressed: bool, rng: np.random.Generator) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(12, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, size=12),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(5, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, size=5),
    }
    for name, array in arrays.items():
        data = _idx_bytes(array)
        if compressed:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("compressed", [True, False])
def test_mnist_idx_synthetic(tmp_path: Path, compressed: bool) -> None:
    arrays = _write_idx_set(tmp_path / "mnist", compressed, np.random.default_rng(1))
    s = load_mnist(tmp_path)  # a parent folder: mnist/ is searched
    expected = arrays["train-images-idx3-ubyte"].reshape(12, 784) / 255.0
    np.testing.assert_allclose(s.x_train.numpy(), expected, rtol=1e-6)  # IDX keeps file order
    assert s.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert s.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert s.x_test.shape == (5, 784) and s.x_train.dtype == torch.float32


def _write_mat_set(folder: Path, rng: np.random.Generator, per_digit: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix in ("digit", "test"):
        for digit in range(10):
            images = rng.integers(0, 256, size=(per_digit, 784)).astype(np.uint8)
            images[:, 0] = digit  # makes each row's digit visible in its pixels
            scipy.io.savemat(folder / f"{prefix}{digit}.mat", {"D": images})


def test_mnist_mat_synthetic_is_shuffled_deterministically(tmp_path: Path) -> None:
    _write_mat_set(tmp_path / "mnist_hinton_mat", np.random.default_rng(2))
    a, b = load_mnist(tmp_path), load_mnist(tmp_path)
    c = load_mnist(tmp_path, shuffle_seed=1)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.y_train, c.y_train)
    assert a.y_train.tolist() != sorted(a.y_train.tolist())
    # Each label is the digit of the file its row came from.
    np.testing.assert_allclose((a.x_train[:, 0] * 255).round().long(), a.y_train)
    np.testing.assert_allclose((a.x_test[:, 0] * 255).round().long(), a.y_test)
    assert a.y_train.bincount().tolist() == [3] * 10 and a.y_test.tolist() == sorted(
        a.y_test.tolist()
    )


def test_mnist_missing_and_partial_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_mnist(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*digit0\.\.9\.mat.*--data-dir"):
        load_mnist(tmp_path)
    _write_mat_set(tmp_path, np.random.default_rng(3), per_digit=1)
    (tmp_path / "digit7.mat").unlink()
    with pytest.raises(DataError, match=r"digit7\.mat"):
        load_mnist(tmp_path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: gzip.compress(gzip.decompress(b)[:-100])[:], "truncated or corrupt"),
        (lambda b: b[: len(b) // 2], "decompress"),
        (lambda b: gzip.compress(b"\x00\x00\x08\x01" + gzip.decompress(b)[4:]), "magic number"),
        (lambda b: b"not a gzip file at all", "decompress"),
    ],
)
def test_mnist_corrupt_idx_names_the_file(tmp_path: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    _write_idx_set(tmp_path, True, np.random.default_rng(4))
    target = tmp_path / "train-images-idx3-ubyte.gz"
    target.write_bytes(damage(target.read_bytes()))
    with pytest.raises(DataError, match=rf"train-images-idx3-ubyte\.gz.*{message}"):
        load_mnist(tmp_path)


def test_mnist_label_count_mismatch(tmp_path: Path) -> None:
    _write_idx_set(tmp_path, False, np.random.default_rng(5))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(4)))
    with pytest.raises(DataError, match=r"t10k-images.*5 images.*4 labels"):
        load_mnist(tmp_path)


def test_mnist_corrupt_mat_names_the_file(tmp_path: Path) -> None:
    _write_mat_set(tmp_path, np.random.default_rng(6), per_digit=1)
    (tmp_path / "test3.mat").write_bytes((tmp_path / "test3.mat").read_bytes()[:150])
    with pytest.raises(DataError, match=r"test3\.mat.*corrupt"):
        load_mnist(tmp_path)
    scipy.io.savemat(tmp_path / "test3.mat", {"X": np.zeros((1, 784), np.uint8)})
    with pytest.raises(DataError, match=r"test3\.mat.*no variable 'D'"):
        load_mnist(tmp_path)


# ----------------------------------------------------------------------------- CURVES / FACES


def test_make_curves_shapes_determinism_and_independent_test_set() -> None:
    a = make_curves(n_train=60, n_test=20, seed=3)
    assert a.x_train.shape == (60, 784) and a.x_test.shape == (20, 784)
    assert a.x_train.dtype == torch.float32 and a.y_train is None and a.num_classes is None
    assert a.x_train.min() >= 0 and a.x_train.max() <= 1
    assert (a.x_train.amax(dim=1) > 0.9).all()  # every image has a stroke
    assert ((a.x_train > 0.5).float().mean(dim=1) < 0.3).all()  # and a black background
    b = make_curves(n_train=30, n_test=20, seed=3)
    assert torch.equal(a.x_train[:30], b.x_train) and torch.equal(a.x_test, b.x_test)
    assert not torch.equal(make_curves(5, 5, seed=4).x_train, a.x_train[:5])


def test_curves_ink_follows_the_curve_through_the_three_points() -> None:
    """Compare with a brute-force reference: ink = exp(-d^2 / 2 sigma^2), d = distance to a
    densely sampled curve; near the ends the stroke fades, so only the bulk is compared."""
    points = curve_points(12, np.random.default_rng(7))
    images = render_curves(points).numpy()
    t = np.linspace(0.0, 1.0, 801)
    curve, _ = _quadratic(points, t)
    rows, cols = np.meshgrid(np.arange(28), np.arange(28), indexing="ij")
    pixels = np.stack([cols.ravel(), rows.ravel()], axis=1).astype(np.float32)  # (x, y) per pixel
    dist = np.linalg.norm(pixels[None, :, None] - curve[:, None].astype(np.float32), axis=-1)
    nearest, d = t[dist.argmin(-1)], dist.min(-1)
    reference = np.exp(-(d**2) / (2 * STROKE_SIGMA**2))
    assert np.abs(images - reference).mean() < 0.01
    assert images[d > 4].max() < 1e-3  # nothing far from the curve
    bulk = (nearest > 0.1) & (nearest < 0.9)
    assert np.median(np.abs(images - reference)[bulk]) < 0.01
    # The curve passes through the middle point: its nearest pixel is well inked.
    middle = np.round(points[:, 1]).astype(int)
    assert (images.reshape(-1, 28, 28)[np.arange(12), middle[:, 1], middle[:, 0]] > 0.5).all()


def test_load_curves_mat(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    train, test = rng.random((7, 784)), rng.random((4, 784))
    scipy.io.savemat(tmp_path / "digs3pts_1.mat", {"bdata": train, "bdatatest": test})
    for source in (tmp_path / "digs3pts_1.mat", tmp_path):
        s = load_curves_mat(source)
        np.testing.assert_allclose(s.x_train.numpy(), train, rtol=1e-6)
        np.testing.assert_allclose(s.x_test.numpy(), test, rtol=1e-6)
        assert s.x_train.dtype == torch.float32 and s.y_train is None
    scipy.io.savemat(tmp_path / "digs3pts_1.mat", {"bdata": train[:, :100], "bdatatest": test})
    with pytest.raises(DataError, match=r"digs3pts_1\.mat.*'bdata'.*784"):
        load_curves_mat(tmp_path)
    with pytest.raises(DataError, match=r"no digs3pts_1\.mat in"):
        load_curves_mat(_empty(tmp_path))


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir(exist_ok=True)
    return folder


def test_load_faces_mat_layout(tmp_path: Path) -> None:
    """625 x N, one face per column: train = first n_train columns, test = last n_test."""
    n = 20
    faces = np.arange(n, dtype=np.float32)[None, :] + np.linspace(0, 0.5, 625)[:, None]
    scipy.io.savemat(tmp_path / "newfaces_rot_single.mat", {"newfaces_single": faces})
    s = load_faces_mat(tmp_path / "newfaces_rot_single.mat", n_train=10, n_test=6)
    assert s.x_train.shape == (10, 625) and s.x_test.shape == (6, 625)
    assert s.x_train[:, 0].tolist() == list(range(10))
    assert s.x_test[:, 0].tolist() == list(range(14, 20))  # the last 6 columns
    np.testing.assert_allclose(s.x_train[3].numpy(), faces[:, 3], rtol=1e-6)
    with pytest.raises(DataError, match=r"holds 20 images, too few"):
        load_faces_mat(tmp_path, n_train=15, n_test=6)
    with pytest.raises(DataError, match=r"newfaces_rot_single\.mat.*too few"):
        load_faces_mat(tmp_path)  # the defaults need the full 165,600-column file
    scipy.io.savemat(tmp_path / "newfaces_rot_single.mat", {"newfaces_single": faces.T})
    with pytest.raises(DataError, match=r"625 x N"):
        load_faces_mat(tmp_path, n_train=2, n_test=2)
    (tmp_path / "newfaces_rot_single.mat").write_bytes(b"MATLAB 5.0 MAT-file, garbage")
    with pytest.raises(DataError, match=r"newfaces_rot_single\.mat.*corrupt"):
        load_faces_mat(tmp_path, n_train=2, n_test=2)


# ----------------------------------------------------------------------------- digits


def test_load_digits_split() -> None:
    s = load_digits(seed=0)
    assert s.x_train.shape == (1437, 64) and s.x_test.shape == (360, 64)
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    assert s.x_train.min() == 0 and s.x_train.max() == 1 and s.num_classes == 10
    from sklearn.datasets import load_digits as sklearn_digits

    counts = np.bincount(sklearn_digits().target)
    test_counts = s.y_test.bincount(minlength=10).numpy()
    assert np.abs(test_counts - counts * 360 / counts.sum()).max() <= 1  # stratified
    assert (test_counts + s.y_train.bincount(minlength=10).numpy() == counts).all()
    again, other = load_digits(seed=0), load_digits(seed=1)
    assert torch.equal(again.x_test, s.x_test) and not torch.equal(other.x_test, s.x_test)


# ----------------------------------------------------------------------------- CIFAR


def test_cifar_real_sample_npz() -> None:
    path = shared("cifar10/aamirmalik-dr/cifar10_sample.npz")
    s = load_cifar(shared("."))  # found by searching the parent folder
    assert s.x_train.shape == (400, 3, 32, 32) and s.x_test.shape == (150, 3, 32, 32)
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    assert s.num_classes == 10
    assert s.y_train.bincount().tolist() == [40] * 10 and s.y_test.bincount().tolist() == [15] * 10
    with np.load(path) as raw:
        mean, std = np.array(NORMALIZATION[10][0]), np.array(NORMALIZATION[10][1])
        expected = (raw["x_test"] / 255.0 - mean[:, None, None]) / std[:, None, None]
    np.testing.assert_allclose(s.x_test.numpy(), expected, atol=1e-5)
    assert torch.equal(load_cifar(path).x_train, s.x_train)


def _write_batches(folder: Path, kind: int, rng: np.random.Generator, protocol: int = 2) -> dict:
    folder.mkdir(parents=True)
    names = (
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        if kind == 10
        else ["train", "test"]
    )
    key = "labels" if kind == 10 else "fine_labels"
    written = {}
    for name in names:
        data = rng.integers(0, 256, size=(4, 3072)).astype(np.uint8)
        labels = rng.integers(0, kind, size=4).tolist()
        # Python-2 files have str keys (bytes when read with encoding="bytes"); protocol 2 from
        # Python 3 can only write str keys without extra globals, protocol 4 writes bytes keys.
        batch = (
            {"data": data, key: labels} if protocol == 2 else {b"data": data, key.encode(): labels}
        )
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
        written[name] = (data, labels)
    return written


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar10_batch_folder(tmp_path: Path, protocol: int) -> None:
    written = _write_batches(
        tmp_path / "cifar-10-batches-py", 10, np.random.default_rng(9), protocol
    )
    s = load_cifar(tmp_path)
    assert s.x_train.shape == (20, 3, 32, 32) and s.x_test.shape == (4, 3, 32, 32)
    assert s.num_classes == 10
    labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert s.y_train.tolist() == labels
    mean, std = NORMALIZATION[10]
    first = written["data_batch_1"][0][0].reshape(3, 32, 32)
    expected = (first / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    np.testing.assert_allclose(s.x_train[0].numpy(), expected, atol=1e-5)


def test_cifar100_batch_folder_and_choice_between_datasets(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    written = _write_batches(tmp_path / "cifar-100-python", 100, rng)
    s = load_cifar(tmp_path / "cifar-100-python")
    assert s.num_classes == 100 and s.y_test.tolist() == written["test"][1]
    mean, std = NORMALIZATION[100]
    expected = written["test"][0][1].reshape(3, 32, 32) / 255.0 - np.array(mean)[:, None, None]
    np.testing.assert_allclose(
        s.x_test[1].numpy(), expected / np.array(std)[:, None, None], atol=1e-5
    )
    _write_batches(tmp_path / "cifar-10-batches-py", 10, rng)
    with pytest.raises(DataError, match="several data sets.*num_classes"):
        load_cifar(tmp_path)
    assert load_cifar(tmp_path, num_classes=10).x_train.shape[0] == 20
    assert load_cifar(tmp_path, num_classes=100).x_train.shape[0] == 4
    with pytest.raises(DataError, match="CIFAR-100 batches but num_classes=10"):
        load_cifar(tmp_path / "cifar-100-python", num_classes=10)


def test_cifar_npz_nchw_and_nhwc_agree(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    x_train = rng.integers(0, 256, size=(6, 3, 32, 32)).astype(np.uint8)
    x_test = rng.integers(0, 256, size=(2, 3, 32, 32)).astype(np.uint8)
    y_train, y_test = np.array([0, 1, 2, 3, 4, 55]), np.array([7, 8])
    np.savez(tmp_path / "nchw.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    np.savez(
        tmp_path / "nhwc.npz",
        x_train=x_train.transpose(0, 2, 3, 1),
        y_train=y_train,
        x_test=x_test.transpose(0, 2, 3, 1),
        y_test=y_test,
    )
    a, b = load_cifar(tmp_path / "nchw.npz"), load_cifar(tmp_path / "nhwc.npz")
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.x_test, b.x_test)
    assert a.num_classes == 100  # a label of 55: CIFAR-100 (and its normalization)
    mean, std = NORMALIZATION[100]
    np.testing.assert_allclose(
        a.x_train[5, 2].numpy(), (x_train[5, 2] / 255.0 - mean[2]) / std[2], atol=1e-5
    )
    with pytest.raises(DataError, match="several .npz"):
        load_cifar(tmp_path)


@pytest.mark.parametrize(
    ("contents", "message"),
    [
        (b"PK\x03\x04 definitely not a zip", "cannot read it as a NumPy .npz"),
        (None, "lacks y_test"),
        ("float", "expected uint8 images"),
    ],
)
def test_cifar_bad_npz_names_the_file(tmp_path: Path, contents, message: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "cifar.npz"
    x = np.zeros((2, 3, 32, 32), np.uint8)
    if contents is None:
        np.savez(path, x_train=x, y_train=np.zeros(2, int), x_test=x)
    elif contents == "float":
        np.savez(
            path,
            x_train=x.astype(float),
            y_train=np.zeros(2, int),
            x_test=x,
            y_test=np.zeros(2, int),
        )
    else:
        path.write_bytes(contents)
    with pytest.raises(DataError, match=rf"cifar\.npz.*{message}"):
        load_cifar(path)


def test_cifar_malicious_truncated_and_missing_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_batches(folder, 10, np.random.default_rng(12))
    sentinel = tmp_path / "pwned"
    (folder / "data_batch_3").write_bytes(
        pickle.dumps({"data": _Evil(f"touch {sentinel}"), "labels": []}, protocol=2)
    )
    with pytest.raises(DataError, match=r"data_batch_3.*refused"):
        load_cifar(folder)
    assert not sentinel.exists()
    good = pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0]}, protocol=2)
    (folder / "data_batch_3").write_bytes(good[:-30])
    with pytest.raises(DataError, match=r"data_batch_3.*truncated or corrupt"):
        load_cifar(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"data_batch_3: file not found"):
        load_cifar(folder)
    with pytest.raises(DataError, match="no data under"):
        load_cifar(_empty(tmp_path))


def test_augment_cifar_is_a_crop_and_flip_of_each_image() -> None:
    x = torch.randn(8, 3, 32, 32)
    out = augment_cifar(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):
        candidates = [
            crop.flip(-1) if flip else crop
            for dy in range(9)
            for dx in range(9)
            for crop in [padded[i, :, dy : dy + 32, dx : dx + 32]]
            for flip in (False, True)
        ]
        assert sum(torch.equal(out[i], c) for c in candidates) == 1
    same = augment_cifar(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, same)
    assert not torch.equal(out, augment_cifar(x, torch.Generator().manual_seed(1)))


def test_augment_cifar_covers_all_offsets_and_flips() -> None:
    """A ramp image reveals the crop offset (top-left value) and the flip (sign of the slope)."""
    b = 4000
    cols = torch.arange(32.0).expand(32, 32)
    rows = cols.T
    x = torch.stack([rows * 100 + cols + 1000, torch.zeros(32, 32), torch.zeros(32, 32)])
    out = augment_cifar(x.expand(b, 3, 32, 32), torch.Generator().manual_seed(2), fill=-1.0)
    interior = out[:, 0, 16, 10:22]
    flipped = interior[:, 1] < interior[:, 0]
    assert 0.45 < flipped.float().mean() < 0.55
    # The centre pixel is never padding; its value gives the offset (dy, dx) in [-4, 4]^2.
    centre = out[:, 0, 16, 16] - 1000
    dy = torch.div(centre, 100, rounding_mode="floor") - 16
    dx = centre % 100 - 16 + flipped.float()  # a flipped crop shows column dx + 15 at 16
    assert dy.abs().max() == 4 and (dx.abs().max() == 4)
    pairs = set(zip(dy.long().tolist(), dx.long().tolist(), strict=True))
    assert len(pairs) == 81
    # Padding takes the fill value, per channel when given per channel.
    black = black_level(10)
    padded_out = augment_cifar(
        torch.zeros(64, 3, 32, 32), torch.Generator().manual_seed(3), fill=black
    )
    values = set(padded_out[:, 1].unique().tolist())
    assert values <= {0.0, float(black[1])} and len(values) == 2


# ----------------------------------------------------------------------------- Planetoid


def _dense_gcn_adjacency(graph: dict, n: int) -> np.ndarray:
    """Reference: dense A from the adjacency lists, made symmetric, plus I, D^-1/2 . D^-1/2."""
    a = np.zeros((n, n))
    for u, nbrs in graph.items():
        for v in nbrs:
            a[u, v] = a[v, u] = 1.0
    a += np.eye(n)
    d = a.sum(1) ** -0.5
    return a * d[:, None] * d[None, :]


def test_cora_real() -> None:
    folder = shared("planetoid")
    g = load_planetoid(shared("."), "cora")  # parent folder: planetoid/ is searched
    n = 2708
    assert g.features.shape == (n, 1433) and g.features.dtype == torch.float32
    assert g.num_classes == 7 and g.labels.dtype == torch.int64
    assert g.labels.bincount().tolist() == CORA_CLASS_COUNTS
    assert [int(m.sum()) for m in (g.train_mask, g.val_mask, g.test_mask)] == [140, 500, 1000]
    assert g.train_mask[:140].all() and g.val_mask[140:640].all()
    assert not (g.train_mask & g.val_mask).any() and not (g.val_mask & g.test_mask).any()
    test_ids = [int(line) for line in (folder / "ind.cora.test.index").read_text().split()]
    assert g.test_mask[test_ids].all()
    np.testing.assert_allclose(g.features.sum(1).numpy(), 1.0, rtol=1e-5)  # row-normalized
    # Node test_ids[k] carries row k of tx and ty.
    allowed = NUMPY_ARRAYS | SCIPY_CSR | CONTAINERS
    tx = restricted_load(folder / "ind.cora.tx", allowed, "latin1").toarray()
    ty = restricted_load(folder / "ind.cora.ty", allowed, "latin1")
    k = 17
    np.testing.assert_allclose(g.features[test_ids[k]].numpy(), tx[k] / tx[k].sum(), rtol=1e-6)
    assert g.labels[test_ids[k]] == ty[k].argmax()
    graph = restricted_load(folder / "ind.cora.graph", allowed, "latin1")
    adjacency = g.adjacency
    assert adjacency.is_sparse and adjacency.dtype == torch.float32
    assert adjacency._nnz() == 10556 + n  # 5278 undirected edges, both directions, plus loops
    np.testing.assert_allclose(
        adjacency.to_dense().numpy(), _dense_gcn_adjacency(graph, n), atol=1e-7
    )


def _write_planetoid(folder: Path, name: str, graph: object | None = None) -> dict:
    """A small graph in the Planetoid format, with a gap in the test ids (like CiteSeer)."""
    rng = np.random.default_rng(13)
    folder.mkdir(parents=True, exist_ok=True)
    n_known, n_train, classes, features = 520, 6, 3, 5
    test_ids = np.array([524, 520, 523, 526, 521])  # 522 and 525 missing: isolated test nodes
    n = 527
    allx = sp.csr_matrix(rng.integers(0, 2, size=(n_known, features)).astype(np.float32))
    tx = sp.csr_matrix(rng.integers(0, 3, size=(len(test_ids), features)).astype(np.float32))
    ally = np.eye(classes, dtype=np.int32)[rng.integers(0, classes, n_known)]
    ty = np.eye(classes, dtype=np.int32)[rng.integers(0, classes, len(test_ids))]
    if graph is None:
        adjacency_lists: defaultdict[int, list[int]] = defaultdict(list)
        for u in range(n):
            adjacency_lists[u].extend(int(v) for v in rng.integers(0, n, size=2))
        adjacency_lists[3].append(3)  # a self-loop, and a duplicate edge
        adjacency_lists[4].extend([5, 5])
        graph = adjacency_lists
    parts = {
        "x": allx[:n_train],
        "y": ally[:n_train],
        "allx": allx,
        "ally": ally,
        "tx": tx,
        "ty": ty,
        "graph": graph,
    }
    for part, value in parts.items():
        (folder / f"ind.{name}.{part}").write_bytes(pickle.dumps(value, protocol=2))
    (folder / f"ind.{name}.test.index").write_text("\n".join(map(str, test_ids)) + "\n")
    return {**parts, "test_ids": test_ids, "n": n}


def test_planetoid_synthetic_with_missing_test_nodes(tmp_path: Path) -> None:
    raw = _write_planetoid(tmp_path / "planetoid", "citeseer")
    g = load_planetoid(tmp_path, "citeseer")
    n = raw["n"]
    assert g.features.shape == (n, 5) and g.num_classes == 3
    assert g.features[[522, 525]].abs().sum() == 0 and (g.labels[[522, 525]] == -1).all()
    assert [int(m.sum()) for m in (g.train_mask, g.val_mask, g.test_mask)] == [6, 500, 5]
    assert g.test_mask[raw["test_ids"]].all() and not g.test_mask[[522, 525]].any()
    tx, ty = raw["tx"].toarray(), raw["ty"]
    for k, node in enumerate(raw["test_ids"]):
        np.testing.assert_allclose(g.features[node].numpy(), tx[k] / max(tx[k].sum(), 1), rtol=1e-6)
        assert g.labels[node] == ty[k].argmax()
    assert g.labels[:520].tolist() == raw["ally"].argmax(1).tolist()
    np.testing.assert_allclose(
        g.adjacency.to_dense().numpy(), _dense_gcn_adjacency(raw["graph"], n), atol=1e-6
    )


def test_planetoid_errors_name_the_file(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    _write_planetoid(tmp_path, "cora", graph=_Evil(f"touch {sentinel}"))
    with pytest.raises(DataError, match=r"ind\.cora\.graph.*refused.*system"):
        load_planetoid(tmp_path, "cora")
    assert not sentinel.exists()
    _write_planetoid(tmp_path, "cora", graph={0: [1], 1: [600]})
    with pytest.raises(DataError, match=r"ind\.cora\.graph.*node ids outside"):
        load_planetoid(tmp_path, "cora")
    _write_planetoid(tmp_path, "cora")
    allx = tmp_path / "ind.cora.allx"
    allx.write_bytes(allx.read_bytes()[:200])
    with pytest.raises(DataError, match=r"ind\.cora\.allx.*truncated or corrupt"):
        load_planetoid(tmp_path, "cora")
    (tmp_path / "ind.cora.ty").unlink()
    with pytest.raises(DataError, match=r"ind\.cora\.ty: file not found"):
        load_planetoid(tmp_path, "cora")
    with pytest.raises(DataError, match=r"no ind\.pubmed\.x.*--data-dir"):
        load_planetoid(tmp_path, "pubmed")
